#include "collectives/control/control_plane.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <condition_variable>
#include <iterator>
#include <deque>
#include <mutex>
#include <random>

#include "base/error.h"
#include "base/log.h"

namespace resync::collectives {

// ---------------------------------------------------------------------------------------------
// StepOrder

std::vector<int> StepOrder::late_ranks_served_by(int rank) const {
  std::vector<int> late;
  for (const CatchUp& c : catchups) {
    if (c.donor_rank == rank && !c.shared) late.push_back(c.late_rank);
  }
  return late;
}

void StepOrder::allreduce_members(std::vector<int>& out) const {
  out.clear();
  std::merge(participants.begin(), participants.end(), passive.begin(), passive.end(),
             std::back_inserter(out));
}

bool StepOrder::is_passive(int rank) const {
  return std::binary_search(passive.begin(), passive.end(), rank);
}

std::vector<std::pair<int, StepOrder>> orders_for(const ClosedRound& round) {
  StepOrder common;
  common.step = round.step;
  common.attempt = round.attempt;
  common.final_round = round.final_round;
  common.stop = round.stop;
  common.timed_out = round.timed_out;
  // The final round has no all-reduce; an empty list makes that impossible to get wrong.
  if (!round.final_round) {
    common.participants = round.participants;
    common.passive = round.passive;
  }
  common.catchups = round.catchups;

  std::vector<std::pair<int, StepOrder>> orders;
  orders.reserve(round.participants.size() + round.catchups.size());
  for (int rank : round.participants) orders.emplace_back(rank, common);
  for (int rank : round.passive) orders.emplace_back(rank, common);
  for (const CatchUp& c : round.catchups) {
    if (std::binary_search(round.ordered_before.begin(), round.ordered_before.end(), c.late_rank)) {
      continue;  // still holds its order from the earlier attempt, same step and donor
    }
    StepOrder order = common;
    order.kind = OrderKind::kCatchUp;
    order.donor = c.donor_rank;
    order.shared = c.shared;
    orders.emplace_back(c.late_rank, std::move(order));
  }
  std::sort(orders.begin(), orders.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  return orders;
}

std::vector<std::pair<int, StepOrder>> orders_for(const EarlyCatchUp& early) {
  StepOrder catch_up;
  catch_up.kind = OrderKind::kCatchUp;
  catch_up.step = early.step;
  catch_up.early = true;
  catch_up.velocity_only = early.velocity_only;
  catch_up.shared = early.shared;
  catch_up.donor = early.donor_rank;
  catch_up.catchups = {{early.late_rank, early.donor_rank, early.shared}};
  if (early.shared) return {{early.late_rank, std::move(catch_up)}};
  StepOrder serve = catch_up;
  serve.kind = OrderKind::kServe;
  serve.donor = -1;
  return {{early.donor_rank, std::move(serve)}, {early.late_rank, std::move(catch_up)}};
}

uint64_t state_sequence(const StepOrder& order) { return 2 * order.step + (order.early ? 1 : 0); }

void log_closed_round(const ClosedRound& round) {
  auto log = log::get("coll");
  if (round.attempt > 0) {
    log->warn("control: step {} re-closed after a failed all-reduce (attempt {}): "
              "participants {}, catch-ups {}",
              round.step, round.attempt, round.participants, round.catchups.size());
  } else {
    log->debug("control: {} {} closed{}: participants {}, passive {}, catch-ups {}",
               round.final_round ? "final round after" : "step", round.step,
               round.timed_out ? " by the straggler timeout" : "", round.participants,
               round.passive, round.catchups.size());
  }
}

void log_early_catch_up(const EarlyCatchUp& early) {
  log::get("coll")->debug("control: rank {} catches up early from rank {} at step {}{}",
                          early.late_rank, early.donor_rank, early.step,
                          early.shared ? " (shared memory)" : "");
}

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
    case static_cast<uint8_t>(MsgType::kHello): {
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

// ---------------------------------------------------------------------------------------------
// LocalControlHub

namespace detail {

struct LocalHubState {
  explicit LocalHubState(const CoordinatorConfig& config)
      : coordinator(config, CoordClock::now()),
        mailbox(static_cast<size_t>(config.world_size)),
        handed_out(static_cast<size_t>(config.world_size), false) {}

  // Turns decisions into mailbox entries; caller holds `mu`.
  void apply(Decisions&& d) {
    timer_cv.notify_one();  // any event may move the next deadline (e.g. a first READY)
    if (d.empty()) return;
    auto log = log::get("coll");
    for (const ClosedRound& round : d.closed) {
      log_closed_round(round);
      for (auto& [rank, order] : orders_for(round)) {
        mailbox[static_cast<size_t>(rank)].push_back(std::move(order));
      }
    }
    for (const EarlyCatchUp& early : d.early) {
      log_early_catch_up(early);
      for (auto& [rank, order] : orders_for(early)) {
        mailbox[static_cast<size_t>(rank)].push_back(std::move(order));
      }
    }
    if (d.stall) {
      log->warn(
          "control: no step closed for {:.1f} s; step {} waits for ranks {} (late, to "
          "catch up: {})",
          d.stall->stalled_s, d.stall->step, d.stall->missing, d.stall->late_queued);
    }
    if (d.abort) set_abort(std::move(*d.abort));
    orders_cv.notify_all();
  }

  void set_abort(std::string reason) {
    if (abort_reason) return;
    log::get("coll")->error("control: aborting the job: {}", reason);
    abort_reason = std::move(reason);
    orders_cv.notify_all();
  }

  std::mutex mu;
  std::condition_variable orders_cv;  // rank threads wait for their mailbox
  std::condition_variable timer_cv;   // the timer thread waits for the next deadline
  Coordinator coordinator;
  std::vector<std::deque<StepOrder>> mailbox;  // a donor may get SERVE, then its PLAN
  std::vector<bool> handed_out;
  std::optional<std::string> abort_reason;
  bool shutdown = false;
};

}  // namespace detail

namespace {

enum class Report { kReady, kFinish, kFailed };

const char* report_name(Report report) {
  switch (report) {
    case Report::kReady:
      return "READY";
    case Report::kFinish:
      return "FINISH";
    case Report::kFailed:
      return "FAILED";
  }
  return "?";
}

class LocalChannel final : public ControlChannel {
 public:
  LocalChannel(std::shared_ptr<detail::LocalHubState> state, int rank)
      : state_(std::move(state)), rank_(rank) {}

  ~LocalChannel() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (!done_) state_->apply(state_->coordinator.connection_lost(rank_, CoordClock::now()));
  }

  StepOrder ready(uint64_t step) override { return exchange(Report::kReady, step); }
  StepOrder finish(uint64_t n_steps) override { return exchange(Report::kFinish, n_steps); }
  StepOrder failed(uint64_t step) override { return exchange(Report::kFailed, step); }

  StepOrder next_order() override {
    std::unique_lock<std::mutex> lock(state_->mu);
    check_open("waiting for an order");
    return wait_and_take(lock, state_->mailbox[static_cast<size_t>(rank_)]);
  }

  std::optional<StepOrder> busy(uint64_t step, std::chrono::nanoseconds max_wait) override {
    std::unique_lock<std::mutex> lock(state_->mu);
    check_open("BUSY");
    check_abort();
    auto& slot = state_->mailbox[static_cast<size_t>(rank_)];
    if (slot.empty()) {
      state_->apply(state_->coordinator.busy(rank_, step, CoordClock::now()));
      state_->orders_cv.wait_for(lock, max_wait,
                                 [&] { return !slot.empty() || state_->abort_reason; });
    }
    if (slot.empty()) {
      check_abort();
      answered_busy_ = false;
      return std::nullopt;
    }
    return take(slot);
  }

  void request_stop() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->abort_reason || done_) return;
    state_->apply(state_->coordinator.stop_requested(rank_, CoordClock::now()));
  }

  int rank() const override { return rank_; }

 private:
  StepOrder exchange(Report report, uint64_t step) {
    const char* what = report_name(report);
    std::unique_lock<std::mutex> lock(state_->mu);
    check_open(what);
    auto& slot = state_->mailbox[static_cast<size_t>(rank_)];
    // Only the answer to a BUSY whose wait ran out may be waiting already.
    RESYNC_CHECK(slot.empty() || (report == Report::kReady && !answered_busy_),
                 fmt::format("rank {}: an order arrived before {}", rank_, what));
    if (slot.empty()) check_abort();
    const auto now = CoordClock::now();
    // Reported even when the answer is there, as over TCP; the coordinator ignores it then.
    switch (report) {
      case Report::kReady:
        state_->apply(state_->coordinator.ready(rank_, step, now));
        break;
      case Report::kFinish:
        state_->apply(state_->coordinator.finish(rank_, step, now));
        break;
      case Report::kFailed:
        state_->apply(state_->coordinator.failed(rank_, step, now));
        break;
    }
    return wait_and_take(lock, slot);
  }

  StepOrder wait_and_take(std::unique_lock<std::mutex>& lock, std::deque<StepOrder>& slot) {
    state_->orders_cv.wait(lock, [&] { return !slot.empty() || state_->abort_reason; });
    // An order decided before an abort is delivered first, as over TCP where it precedes it.
    if (slot.empty()) check_abort();
    return take(slot);
  }

  StepOrder take(std::deque<StepOrder>& slot) {
    StepOrder order = std::move(slot.front());
    slot.pop_front();
    answered_busy_ = true;
    if (order.final_round) done_ = true;
    return order;
  }

  void check_open(const char* what) const {
    if (done_) {
      throw CommError(
          fmt::format("rank {}: {} after the final order: the control channel is "
                      "closed",
                      rank_, what));
    }
  }

  void check_abort() const {
    if (state_->abort_reason) {
      throw CommError(
          fmt::format("rank {}: job aborted by the coordinator: {}", rank_, *state_->abort_reason));
    }
  }

  std::shared_ptr<detail::LocalHubState> state_;
  int rank_;
  bool done_ = false;  // guarded by state_->mu
  // False between a BUSY whose wait ran out and the next order: that order may arrive early.
  bool answered_busy_ = true;  // guarded by state_->mu
};

}  // namespace

LocalControlHub::LocalControlHub(const CoordinatorConfig& config)
    : state_(std::make_shared<detail::LocalHubState>(config)) {
  timer_ = std::thread([state = state_] {
    std::unique_lock<std::mutex> lock(state->mu);
    while (!state->shutdown) {
      const auto deadline = state->coordinator.next_deadline();
      if (deadline) {
        state->timer_cv.wait_until(lock, *deadline);
      } else {
        state->timer_cv.wait(lock);
      }
      if (state->shutdown) break;
      state->apply(state->coordinator.tick(CoordClock::now()));
    }
  });
}

LocalControlHub::~LocalControlHub() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->shutdown = true;
    if (!state_->coordinator.finished() && !state_->coordinator.aborted()) {
      state_->set_abort("the in-process coordinator shut down before the job finished");
    }
    state_->timer_cv.notify_one();
  }
  timer_.join();
}

std::unique_ptr<ControlChannel> LocalControlHub::connect(int rank) {
  std::lock_guard<std::mutex> lock(state_->mu);
  const int world_size = state_->coordinator.config().world_size;
  RESYNC_CHECK_ARG(rank >= 0 && rank < world_size,
                   fmt::format("rank {} outside [0, {})", rank, world_size));
  RESYNC_CHECK_ARG(!state_->handed_out[static_cast<size_t>(rank)],
                   fmt::format("rank {} is already connected", rank));
  state_->handed_out[static_cast<size_t>(rank)] = true;
  return std::make_unique<LocalChannel>(state_, rank);
}

std::optional<std::string> LocalControlHub::abort_reason() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->abort_reason;
}

}  // namespace resync::collectives
