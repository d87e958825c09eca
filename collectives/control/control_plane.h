// The control channel through which a rank takes part in the synchronous step protocol (the
// StepOrder it receives, the ControlChannel interface), the wire format of control messages,
// and an in-process implementation (LocalControlHub) for ranks run as threads without MPI.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "collectives/control/coordinator.h"

namespace resync::collectives {

enum class OrderKind : uint8_t {
  kParticipate = 1,  // all-reduce over `participants`, update, then serve your catch-ups
  kCatchUp = 2,      // your gradient was dropped: receive the full state from `donor`
  kServe = 3,        // send your state to the late rank in `catchups` now, then next_order()
};

// What the coordinator tells one rank when a round closes.
//
// Regular step t: participants run the ring over `participants`, apply the update, then every
// donor sends its state (step counter t + 1) to each late rank it serves; a kCatchUp rank
// receives it and continues with step t + 1. Final round (`final_round`): no all-reduce and
// `participants` is empty; donors send their final state (step counter = `step` = T) to their
// late ranks; training is over. `stop` (on kParticipate and kCatchUp alike): after this round
// and its catch-ups, call finish(step + 1) instead of training on.
//
// Repair: a round may come again for the same step with `attempt` + 1 (after FAILED), naming the
// ranks that retry the all-reduce. Ring messages use sequence step * 16 + attempt, so a retry
// never matches messages of the abandoned attempt.
//
// Early catch-up (EarlyCatchUp): while step t is still open, ready(t) may return kServe: send
// this rank's current state (step counter t) to `catchups[0].late_rank` at once, then call
// next_order() for the real order. The late rank gets kCatchUp with `early`: it receives that
// state and continues with step t itself (not t + 1). State messages of an early catch-up use
// their own sequence (see state_sequence) so they never match a regular catch-up's.
//
// Note: ready() itself can return the final order (kCatchUp, final_round) when this rank's
// last READY came late and the others had already finished: receive the state and end
// training, without calling finish().
struct StepOrder {
  OrderKind kind = OrderKind::kParticipate;
  uint64_t step = 0;
  uint32_t attempt = 0;  // re-closes of `step` before this one (ClosedRound::attempt)
  bool final_round = false;
  bool stop = false;
  bool timed_out = false;         // the step closed by the straggler timeout (for metrics/logs)
  std::vector<int> participants;  // sorted P_t; identical on every rank of the round
  // Sorted; busy ranks in the all-reduce with a zero gradient (ClosedRound::passive). The ring
  // runs over participants + passive; the average divides by |participants|.
  std::vector<int> passive;
  std::vector<CatchUp> catchups;  // every (late, donor) pair of the round, sorted by late rank
  int donor = -1;                 // kCatchUp only
  bool early = false;             // kCatchUp/kServe of an early catch-up: state of step `step`
  // Early catch-up of a rank one step behind: only the optimizer state (velocity) travels; the
  // late rank recomputes the parameters from it (kernels::sgd_apply_velocity).
  bool velocity_only = false;
  // kCatchUp from a donor on this rank's node (CatchUp::shared): copy the donor's state out of
  // shared memory once the donor has published it (the state of step `step`, or `step` + 1
  // after a regular round); nothing is sent.
  bool shared = false;

  // Every rank of this round's all-reduce (participants and passive members), ascending, into
  // `out` (cleared first; its capacity is reused, so a step allocates nothing).
  void allreduce_members(std::vector<int>& out) const;
  bool is_passive(int rank) const;
  // Late ranks that `rank` sends its state to after this round (not the shared ones, which
  // copy it themselves), ascending.
  std::vector<int> late_ranks_served_by(int rank) const;
  bool operator==(const StepOrder&) const = default;
};

// The orders a closed round sends, as (rank, order): one per participant (kParticipate) and one
// per late rank (kCatchUp) except those in round.ordered_before, ascending by rank.
std::vector<std::pair<int, StepOrder>> orders_for(const ClosedRound& round);

// The orders of an early catch-up, as (rank, order): kServe to the donor (unless shared), kCatchUp
// to the late rank.
std::vector<std::pair<int, StepOrder>> orders_for(const EarlyCatchUp& early);

// The sequence number of the state transfer an order calls for (the same on both sides):
// regular catch-ups after a close of step t and early catch-ups during step t never share one.
uint64_t state_sequence(const StepOrder& order);

// Logs a closed round on the "coll" logger (a re-closed step as a warning), the same way for
// the TCP and the in-process control plane.
void log_closed_round(const ClosedRound& round);
// Logs an early catch-up (debug, "coll" logger), for both control planes alike.
void log_early_catch_up(const EarlyCatchUp& early);

// One rank's end of the control plane. The training thread is its only user, except
// request_stop(), which any thread may call.
class ControlChannel {
 public:
  virtual ~ControlChannel() = default;

  // After computing the gradient of `step`: reports READY(step) and blocks (in the kernel, no
  // spinning) until this rank's order (possibly the final one, see StepOrder). Throws
  // resync::CommError with the coordinator's reason if the job was aborted, or if the
  // coordinator is gone.
  virtual StepOrder ready(uint64_t step) = 0;
  // During a long delay in computing `step` (this rank is slow but awake): reports BUSY(step)
  // and waits up to `max_wait` (in the kernel) for an order. Returns it if one came: a kCatchUp
  // when `step` closed without this rank (its gradient is no longer needed), possibly the final
  // order. Returns nullopt when the wait ran out: finish computing and call ready(step) as usual
  // (an order that arrives meanwhile is what ready(step) then returns). Errors as ready().
  virtual std::optional<StepOrder> busy(uint64_t step, std::chrono::nanoseconds max_wait) = 0;
  // After the all-reduce of the order for `step`, or the catch-up receive of a kCatchUp for
  // `step`, timed out: reports FAILED(step) and blocks like ready() for the next order: a
  // re-close of `step` (kParticipate, attempt + 1) or a kCatchUp. Errors as ready().
  virtual StepOrder failed(uint64_t step) = 0;
  // After the last step (`n_steps` = T, or step + 1 after a `stop` order): reports FINISH and
  // blocks until the final order (final_round = true). Errors as ready().
  virtual StepOrder finish(uint64_t n_steps) = 0;
  // After carrying out a kServe order: blocks like ready() for this rank's next order (another
  // kServe, or the order of the step it reported). Errors as ready().
  virtual StepOrder next_order() = 0;
  // Asks that every rank stops at the next round boundary (the order's `stop` flag).
  virtual void request_stop() = 0;

  virtual int rank() const = 0;
};

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
};

inline constexpr uint32_t kMagic = 0x52535943;  // "RSYC"
inline constexpr uint16_t kVersion = 4;  // 2: BUSY, FAILED, attempt; 3: early catch-up;
                                         // 4: shared catch-ups
inline constexpr size_t kFrameHeaderBytes = 4;
inline constexpr size_t kMaxFrameBytes = size_t{4} << 20;  // a PLAN for ~500k ranks
inline constexpr size_t kMaxHelloBytes = 1024;             // what an unknown peer may send

struct Message {
  MsgType type = MsgType::kReady;
  JobToken token;     // kHello
  int rank = -1;      // kHello
  uint64_t step = 0;  // kReady, kFinish, kBusy, kFailed
  std::string text;   // kHello: host name; kAbort: reason
  StepOrder order;    // kOrder
};

// Appends one frame holding `msg` to `out`.
void append_frame(const Message& msg, std::vector<uint8_t>& out);

// Decodes the frame at the front of `bytes` into `msg`. Returns the bytes it used, or 0 if the
// frame is not complete yet. Throws resync::CommError on a malformed frame or one whose body
// exceeds `max_body_bytes` (checked from the header alone, before the body arrives).
size_t decode_frame(std::span<const uint8_t> bytes, size_t max_body_bytes, Message& msg);

}  // namespace wire

namespace detail {
struct LocalHubState;
}  // namespace detail

// In-process control plane: the same Coordinator behind a mutex, a timer thread for its
// deadlines, and one channel object per rank. For the loopback tier (ranks as threads).
// Destroying a rank's channel before its final order counts as that rank dying; destroying
// the hub while the job runs aborts it, so no rank thread waits forever.
class LocalControlHub {
 public:
  explicit LocalControlHub(const CoordinatorConfig& config);
  ~LocalControlHub();
  LocalControlHub(const LocalControlHub&) = delete;
  LocalControlHub& operator=(const LocalControlHub&) = delete;

  // The channel of `rank`, once per rank. It may outlive the hub (then it only reports errors).
  std::unique_ptr<ControlChannel> connect(int rank);
  // Set once the job was aborted.
  std::optional<std::string> abort_reason() const;

 private:
  std::shared_ptr<detail::LocalHubState> state_;
  std::thread timer_;
};

}  // namespace resync::collectives
