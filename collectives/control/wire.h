// The job token a control connection must present, and the codec of control messages as
// length-prefixed binary frames (namespace wire), shared by both ends of the TCP control plane.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "collectives/control/orders.h"

namespace resync::collectives {

// Random 128-bit secret of one job: a control connection must present it.
struct JobToken {
  std::array<uint8_t, 16> bytes{};

  static JobToken random();  // from std::random_device (the kernel's entropy source)
  // Throws resync::InvalidArgument unless `hex` is 32 hexadecimal digits.
  static JobToken from_hex(std::string_view hex);
  std::string hex() const;
  // Constant time, so response timing does not reveal how much of a guess was right.
  bool operator==(const JobToken& other) const;
};

// Control messages as length-prefixed binary frames: u32 body length, then the body (u8 type,
// fields little-endian). Both ends of the TCP control plane use this codec.
namespace wire {

enum class MsgType : uint8_t {
  kHello = 1,    // client -> server: magic, version, token, rank, host name
  kWelcome = 2,  // server -> client: the HELLO was accepted
  kReady = 3,    // client -> server: step
  kFinish = 4,   // client -> server: number of steps
  kStop = 5,     // client -> server: stop at the next boundary
  kOrder = 6,    // server -> client: a StepOrder (PLAN or CATCHUP)
  kAbort = 7,    // server -> client: the job is over, with the reason
  kBusy = 8,     // client -> server: step
  kFailed = 9,   // client -> server: step
  // The watch connection (tcp_watch.h): a second connection per rank that only listens.
  kWatchHello = 10,  // client -> server: as kHello
  kHeartbeat = 11,   // server -> client: the coordinator is alive
  kEnd = 12,         // server -> client: the job ended normally (after the final round)
};

inline constexpr uint32_t kMagic = 0x52535943;  // "RSYC"
inline constexpr uint16_t kVersion = 5;  // 2: BUSY, FAILED, attempt; 3: early catch-up;
                                         // 4: shared catch-ups; 5: watch connections
inline constexpr size_t kFrameHeaderBytes = 4;
inline constexpr size_t kMaxFrameBytes = size_t{4} << 20;  // a PLAN for ~500k ranks
inline constexpr size_t kMaxHelloBytes = 1024;             // what an unknown peer may send

struct Message {
  MsgType type = MsgType::kReady;
  JobToken token;     // kHello, kWatchHello
  int rank = -1;      // kHello, kWatchHello
  uint64_t step = 0;  // kReady, kFinish, kBusy, kFailed
  std::string text;   // kHello, kWatchHello: host name; kAbort: reason
  StepOrder order;    // kOrder
};

// A message of `type` with every other field at its default.
inline Message message_of(MsgType type) {
  Message msg;
  msg.type = type;
  return msg;
}

// Appends one frame holding `msg` to `out`.
void append_frame(const Message& msg, std::vector<uint8_t>& out);

// Decodes the frame at the front of `bytes` into `msg`. Returns the bytes it used, or 0 if the
// frame is not complete yet. Throws resync::CommError on a malformed frame or one whose body
// exceeds `max_body_bytes` (checked from the header alone, before the body arrives).
size_t decode_frame(std::span<const uint8_t> bytes, size_t max_body_bytes, Message& msg);

}  // namespace wire

}  // namespace resync::collectives
