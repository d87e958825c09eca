// RingAllreduce: bandwidth-optimal in-place float sum over a ring of participant ranks
// (reduce-scatter then all-gather), segmented and pipelined over any Transport; and the
// PhaseObserver that all-reduce paths report their phases to (e.g. for a timeline).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "collectives/transport/context.h"
#include "collectives/transport/transport.h"

namespace resync::collectives {

// Phases of one all-reduce call, as an observer (e.g. a timeline) sees them.
enum class AllreducePhase : uint8_t {
  kReduceScatter,  // until every chunk this rank owns is fully summed
  kAllGather,      // until the summed chunks have reached every participant
  kWhole,          // a path without separate phases (direct exchange, shared memory)
};

// "reduce_scatter", "all_gather", "allreduce".
const char* phase_name(AllreducePhase phase);

struct PhaseEvent {
  AllreducePhase phase;
  uint64_t seq;
  size_t n_elems;
  int n_participants;
};

// Told, on the calling thread, when a phase of an all-reduce begins and ends. Every begin is
// matched by an end, also when the call throws (the end then comes before the exception
// leaves). The callbacks run inside the collective: they must be cheap and must not throw.
class PhaseObserver {
 public:
  virtual ~PhaseObserver() = default;
  virtual void phase_begin(const PhaseEvent& event) noexcept = 0;
  virtual void phase_end(const PhaseEvent& event) noexcept = 0;
};

// Brackets the phases of one call for `observer` (nullptr: does nothing at all); the open phase
// ends when the scope does, so an exception leaving the call still closes it.
class ScopedPhase {
 public:
  ScopedPhase(PhaseObserver* observer, const PhaseEvent& event) noexcept
      : observer_(observer), event_(event) {
    if (observer_) observer_->phase_begin(event_);
  }
  ~ScopedPhase() { end(); }
  ScopedPhase(const ScopedPhase&) = delete;
  ScopedPhase& operator=(const ScopedPhase&) = delete;

  // Ends the current phase and begins `phase`.
  void next(AllreducePhase phase) noexcept {
    if (!observer_) return;
    end();
    event_.phase = phase;
    observer_->phase_begin(event_);
    open_ = true;
  }
  void end() noexcept {
    if (observer_ && open_) observer_->phase_end(event_);
    open_ = false;
  }

 private:
  PhaseObserver* observer_;
  PhaseEvent event_;
  bool open_ = true;
};

struct RingOptions {
  // Messages carry at most this many bytes; a chunk is cut into segments so that receiving one
  // segment overlaps reducing the previous one. Rounded down to whole floats (at least one).
  size_t segment_bytes = 512 * 1024;
  // Largest buffer expected, to size the scratch once up front (0: size on first use). A
  // larger buffer later grows the scratch once; steady state never allocates.
  size_t max_elems = 0;
  // Receives posted ahead of the one being reduced (2 = double buffering).
  int recv_depth = 2;
  // Sends in flight at once before waiting for the oldest.
  int max_sends_in_flight = 4;
};

// One instance per Context; reuse it every step. Not thread-safe.
//
// Over p participants each rank sends and receives 2(p-1)/p of the buffer. Every element is
// summed once, on one rank, in ring order, and the all-gather copies that result, so all
// participants end with bitwise-identical buffers. A participant that does not show up makes
// the others throw TimeoutError (naming the neighbour and the sequence) once the context's
// timeout has passed since the call began; their buffers then hold partial sums.
class RingAllreduce {
 public:
  explicit RingAllreduce(Context& ctx, RingOptions options = {});

  // Sums `data` over every rank of the context; the sequence is ctx.next_sequence(), so every
  // rank must make the same calls in the same order.
  void allreduce_sum(std::span<float> data);

  // Sums `data` over `participants` only: sorted, distinct world ranks including this one.
  // Ranks outside it are never contacted. Every participant passes the same list, element
  // count and `seq` (e.g. the training step, which all ranks know even when some sit out).
  void allreduce_sum(std::span<float> data, std::span<const int> participants, uint64_t seq);

  // As above with seq = ctx.next_sequence(): only safe if ranks that sit out a round also
  // call ctx.next_sequence(), so that the counters stay equal.
  void allreduce_sum(std::span<float> data, std::span<const int> participants);

  // Not owned; must outlive the calls made while set. nullptr (the default) turns it off.
  void set_phase_observer(PhaseObserver* observer) { observer_ = observer; }

  const RingOptions& options() const { return options_; }
  // Floats of scratch currently held (for tests of the no-allocation promise).
  size_t scratch_elems() const { return scratch_.size(); }

 private:
  struct Plan;
  void run(const Plan& plan, std::span<float> data, uint64_t seq);
  void reserve_scratch(size_t slot_elems);
  void abandon_all() noexcept;

  Context& ctx_;
  RingOptions options_;
  PhaseObserver* observer_ = nullptr;
  size_t seg_elems_;
  size_t slot_elems_ = 0;
  std::vector<float> scratch_;           // recv_depth slots of slot_elems_
  std::vector<Request> recvs_;           // one per scratch slot
  std::vector<Request> sends_;           // FIFO of sends in flight
  std::vector<int> world_;               // 0..size-1, for the whole-world overload
  std::vector<size_t> recv_step_start_;  // per call: receive-stream index where step t begins
};

}  // namespace resync::collectives
