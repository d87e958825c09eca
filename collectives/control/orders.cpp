#include "collectives/control/orders.h"

#include <algorithm>
#include <iterator>

namespace resync::collectives {

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
  catch_up.stop = early.stop;
  catch_up.catchups = {{early.late_rank, early.donor_rank, early.shared}};
  if (early.shared) return {{early.late_rank, std::move(catch_up)}};
  StepOrder serve = catch_up;
  serve.kind = OrderKind::kServe;
  serve.donor = -1;
  return {{early.donor_rank, std::move(serve)}, {early.late_rank, std::move(catch_up)}};
}

uint64_t state_sequence(const StepOrder& order) { return 2 * order.step + (order.early ? 1 : 0); }

}  // namespace resync::collectives
