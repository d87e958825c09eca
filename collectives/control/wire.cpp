#include "collectives/control/wire.h"

#include <fmt/format.h>

#include <algorithm>
#include <random>

#include "base/error.h"

namespace resync::collectives {

// ---------------------------------------------------------------------------------------------
// JobToken

JobToken JobToken::random() {
  std::random_device entropy;
  JobToken token;
  for (size_t i = 0; i < token.bytes.size(); i += 4) {
    const uint32_t word = entropy();
    for (size_t k = 0; k < 4; ++k) token.bytes[i + k] = static_cast<uint8_t>(word >> (8 * k));
  }
  return token;
}

JobToken JobToken::from_hex(std::string_view hex) {
  RESYNC_CHECK_ARG(hex.size() == 32, fmt::format("job token must be 32 hexadecimal digits, got "
                                                 "{} characters",
                                                 hex.size()));
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  JobToken token;
  for (size_t i = 0; i < token.bytes.size(); ++i) {
    const int hi = nibble(hex[2 * i]);
    const int lo = nibble(hex[2 * i + 1]);
    RESYNC_CHECK_ARG(hi >= 0 && lo >= 0, "job token must be 32 hexadecimal digits");
    token.bytes[i] = static_cast<uint8_t>(hi * 16 + lo);
  }
  return token;
}

std::string JobToken::hex() const {
  std::string out;
  out.reserve(32);
  for (uint8_t b : bytes) out += fmt::format("{:02x}", b);
  return out;
}

bool JobToken::operator==(const JobToken& other) const {
  uint8_t diff = 0;
  for (size_t i = 0; i < bytes.size(); ++i) diff |= static_cast<uint8_t>(bytes[i] ^ other.bytes[i]);
  return diff == 0;
}

// ---------------------------------------------------------------------------------------------
// Wire format

namespace wire {
namespace {

class Writer {
 public:
  explicit Writer(std::vector<uint8_t>& out) : out_(out) {}
  void u8(uint8_t v) { out_.push_back(v); }
  void u16(uint16_t v) { le(v, 2); }
  void u32(uint32_t v) { le(v, 4); }
  void u64(uint64_t v) { le(v, 8); }
  void bytes(std::span<const uint8_t> b) { out_.insert(out_.end(), b.begin(), b.end()); }
  void string16(const std::string& s) {
    const size_t n = std::min<size_t>(s.size(), 0xffff);
    u16(static_cast<uint16_t>(n));
    out_.insert(out_.end(), s.begin(), s.begin() + static_cast<std::ptrdiff_t>(n));
  }
  void string32(const std::string& s) {
    u32(static_cast<uint32_t>(s.size()));
    out_.insert(out_.end(), s.begin(), s.end());
  }

 private:
  void le(uint64_t v, int n_bytes) {
    for (int i = 0; i < n_bytes; ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  std::vector<uint8_t>& out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> body) : body_(body) {}
  uint8_t u8() { return static_cast<uint8_t>(le(1)); }
  uint16_t u16() { return static_cast<uint16_t>(le(2)); }
  uint32_t u32() { return static_cast<uint32_t>(le(4)); }
  uint64_t u64() { return le(8); }
  void bytes(std::span<uint8_t> out) {
    need(out.size());
    std::copy_n(body_.begin() + static_cast<std::ptrdiff_t>(pos_), out.size(), out.begin());
    pos_ += out.size();
  }
  std::string string(size_t n) {
    need(n);
    std::string s(reinterpret_cast<const char*>(body_.data()) + pos_, n);
    pos_ += n;
    return s;
  }
  // Checks that `count` items of `item_bytes` fit before anything is allocated for them.
  size_t count(size_t item_bytes) {
    const size_t n = u32();
    need(n * item_bytes);
    return n;
  }
  int rank() {
    const uint32_t v = u32();
    if (v > 0x7fffffffu) throw CommError("malformed control frame: rank out of range");
    return static_cast<int>(v);
  }
  void expect_end() const {
    if (pos_ != body_.size()) {
      throw CommError(
          fmt::format("malformed control frame: {} trailing bytes", body_.size() - pos_));
    }
  }

 private:
  void need(size_t n) const {
    if (n > body_.size() - pos_) throw CommError("malformed control frame: truncated body");
  }
  uint64_t le(int n_bytes) {
    need(static_cast<size_t>(n_bytes));
    uint64_t v = 0;
    for (int i = 0; i < n_bytes; ++i) {
      v |= uint64_t{body_[pos_ + static_cast<size_t>(i)]} << (8 * i);
    }
    pos_ += static_cast<size_t>(n_bytes);
    return v;
  }
  std::span<const uint8_t> body_;
  size_t pos_ = 0;
};

constexpr uint8_t kFlagFinal = 1;
constexpr uint8_t kFlagStop = 2;
constexpr uint8_t kFlagTimedOut = 4;
constexpr uint8_t kFlagEarly = 8;
constexpr uint8_t kFlagVelocityOnly = 16;
constexpr uint8_t kFlagShared = 32;

void write_order(Writer& w, const StepOrder& o) {
  w.u8(static_cast<uint8_t>(o.kind));
  w.u64(o.step);
  w.u32(o.attempt);
  w.u8(static_cast<uint8_t>((o.final_round ? kFlagFinal : 0) | (o.stop ? kFlagStop : 0) |
                            (o.timed_out ? kFlagTimedOut : 0) | (o.early ? kFlagEarly : 0) |
                            (o.velocity_only ? kFlagVelocityOnly : 0) |
                            (o.shared ? kFlagShared : 0)));
  w.u32(static_cast<uint32_t>(o.donor));
  w.u32(static_cast<uint32_t>(o.participants.size()));
  for (int p : o.participants) w.u32(static_cast<uint32_t>(p));
  w.u32(static_cast<uint32_t>(o.passive.size()));
  for (int p : o.passive) w.u32(static_cast<uint32_t>(p));
  w.u32(static_cast<uint32_t>(o.catchups.size()));
  for (const CatchUp& c : o.catchups) {
    w.u32(static_cast<uint32_t>(c.late_rank));
    w.u32(static_cast<uint32_t>(c.donor_rank));
    w.u8(c.shared ? 1 : 0);
  }
}

StepOrder read_order(Reader& r) {
  StepOrder o;
  const uint8_t kind = r.u8();
  if (kind != static_cast<uint8_t>(OrderKind::kParticipate) &&
      kind != static_cast<uint8_t>(OrderKind::kCatchUp) &&
      kind != static_cast<uint8_t>(OrderKind::kServe)) {
    throw CommError(fmt::format("malformed control frame: unknown order kind {}", kind));
  }
  o.kind = static_cast<OrderKind>(kind);
  o.step = r.u64();
  o.attempt = r.u32();
  const uint8_t flags = r.u8();
  o.final_round = (flags & kFlagFinal) != 0;
  o.stop = (flags & kFlagStop) != 0;
  o.timed_out = (flags & kFlagTimedOut) != 0;
  o.early = (flags & kFlagEarly) != 0;
  o.velocity_only = (flags & kFlagVelocityOnly) != 0;
  o.shared = (flags & kFlagShared) != 0;
  o.donor = static_cast<int>(static_cast<int32_t>(r.u32()));
  const size_t n_participants = r.count(4);
  o.participants.reserve(n_participants);
  for (size_t i = 0; i < n_participants; ++i) o.participants.push_back(r.rank());
  const size_t n_passive = r.count(4);
  o.passive.reserve(n_passive);
  for (size_t i = 0; i < n_passive; ++i) o.passive.push_back(r.rank());
  const size_t n_catchups = r.count(9);
  o.catchups.reserve(n_catchups);
  for (size_t i = 0; i < n_catchups; ++i) {
    CatchUp c;
    c.late_rank = r.rank();
    c.donor_rank = r.rank();
    c.shared = r.u8() != 0;
    o.catchups.push_back(c);
  }
  return o;
}

}  // namespace

void append_frame(const Message& msg, std::vector<uint8_t>& out) {
  const size_t header_at = out.size();
  out.resize(header_at + kFrameHeaderBytes);
  Writer w(out);
  w.u8(static_cast<uint8_t>(msg.type));
  switch (msg.type) {
    case MsgType::kHello:
    case MsgType::kWatchHello:
      w.u32(kMagic);
      w.u16(kVersion);
      w.bytes(msg.token.bytes);
      w.u32(static_cast<uint32_t>(msg.rank));
      w.string16(msg.text);
      break;
    case MsgType::kReady:
    case MsgType::kFinish:
    case MsgType::kBusy:
    case MsgType::kFailed:
      w.u64(msg.step);
      break;
    case MsgType::kWelcome:
    case MsgType::kStop:
    case MsgType::kHeartbeat:
    case MsgType::kEnd:
      break;
    case MsgType::kOrder:
      write_order(w, msg.order);
      break;
    case MsgType::kAbort:
      w.string32(msg.text);
      break;
  }
  const size_t body_bytes = out.size() - header_at - kFrameHeaderBytes;
  RESYNC_CHECK(body_bytes <= kMaxFrameBytes,
               fmt::format("control message of {} bytes exceeds the {} byte limit", body_bytes,
                           kMaxFrameBytes));
  for (size_t i = 0; i < kFrameHeaderBytes; ++i) {
    out[header_at + i] = static_cast<uint8_t>(body_bytes >> (8 * i));
  }
}

size_t decode_frame(std::span<const uint8_t> bytes, size_t max_body_bytes, Message& msg) {
  if (bytes.size() < kFrameHeaderBytes) return 0;
  size_t body_bytes = 0;
  for (size_t i = 0; i < kFrameHeaderBytes; ++i) body_bytes |= size_t{bytes[i]} << (8 * i);
  if (body_bytes == 0 || body_bytes > max_body_bytes) {
    throw CommError(fmt::format("malformed control frame: body of {} bytes (limit {})", body_bytes,
                                max_body_bytes));
  }
  if (bytes.size() < kFrameHeaderBytes + body_bytes) return 0;

  Reader r(bytes.subspan(kFrameHeaderBytes, body_bytes));
  msg = Message{};
  const uint8_t type = r.u8();
  switch (type) {
    case static_cast<uint8_t>(MsgType::kHello):
    case static_cast<uint8_t>(MsgType::kWatchHello): {
      const uint32_t magic = r.u32();
      if (magic != kMagic) throw CommError("not a resync control HELLO (bad magic)");
      const uint16_t version = r.u16();
      if (version != kVersion) {
        throw CommError(
            fmt::format("control protocol version {} (this build speaks {})", version, kVersion));
      }
      r.bytes(msg.token.bytes);
      msg.rank = r.rank();
      msg.text = r.string(r.u16());
      break;
    }
    case static_cast<uint8_t>(MsgType::kReady):
    case static_cast<uint8_t>(MsgType::kFinish):
    case static_cast<uint8_t>(MsgType::kBusy):
    case static_cast<uint8_t>(MsgType::kFailed):
      msg.step = r.u64();
      break;
    case static_cast<uint8_t>(MsgType::kWelcome):
    case static_cast<uint8_t>(MsgType::kStop):
    case static_cast<uint8_t>(MsgType::kHeartbeat):
    case static_cast<uint8_t>(MsgType::kEnd):
      break;
    case static_cast<uint8_t>(MsgType::kOrder):
      msg.order = read_order(r);
      break;
    case static_cast<uint8_t>(MsgType::kAbort):
      msg.text = r.string(r.u32());
      break;
    default:
      throw CommError(fmt::format("malformed control frame: unknown message type {}", type));
  }
  msg.type = static_cast<MsgType>(type);
  r.expect_end();
  return kFrameHeaderBytes + body_bytes;
}

}  // namespace wire

}  // namespace resync::collectives
