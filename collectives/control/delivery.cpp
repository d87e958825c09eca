#include "collectives/control/delivery.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <vector>

#include "base/log.h"

namespace resync::collectives {
namespace {

// A re-closed step is a warning; the rest is debug detail.
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

}  // namespace

std::string OrderSink::who(int rank) const { return fmt::format("rank {}", rank); }

void deliver(const Decisions& decisions, OrderSink& sink) {
  for (const ClosedRound& round : decisions.closed) {
    log_closed_round(round);
    for (auto& [rank, order] : orders_for(round)) sink.send(rank, std::move(order));
    sink.round_sent(round);
  }
  for (const EarlyCatchUp& early : decisions.early) {
    log_early_catch_up(early);
    for (auto& [rank, order] : orders_for(early)) sink.send(rank, std::move(order));
  }
  if (decisions.stall) {
    const StallReport& stall = *decisions.stall;
    std::vector<std::string> missing;
    for (int rank : stall.missing) missing.push_back(sink.who(rank));
    log::get("coll")->warn(
        "control: no step closed for {:.1f} s; step {} is waiting for {} (late, to be "
        "caught up: {})",
        stall.stalled_s, stall.step, fmt::join(missing, ", "), stall.late_queued);
  }
  if (decisions.abort) sink.abort(*decisions.abort);
}

}  // namespace resync::collectives
