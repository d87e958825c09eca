// The orders the coordinator's decisions turn into: what one rank is told when a round closes
// (StepOrder, OrderKind), how a closed round or an early catch-up becomes per-rank orders
// (orders_for), and the sequence number of the state transfer an order calls for.
#pragma once

#include <cstdint>
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

}  // namespace resync::collectives
