// Unit tests of the coordinator's catch-up policies, driven by explicit events and a fake clock:
// early catch-ups while the next step is open, busy ranks joining the all-reduce, catch-ups
// through a node's shared memory, resumed step numbers and odd world sizes.
#include <gtest/gtest.h>

#include <chrono>
#include <vector>

#include "collectives/control/coordinator.h"
#include "collectives/control/orders.h"
#include "tests/collectives/control/coordinator_test_util.h"

namespace resync::collectives {
namespace {

using namespace testing;  // NOLINT: the fake clock and helpers of every coordinator test
using std::chrono::milliseconds;
using std::chrono::seconds;

CoordinatorConfig early_config(int world_size, int backup_workers, int64_t timeout_ms = 0) {
  CoordinatorConfig c = make_config(world_size, backup_workers, timeout_ms);
  c.early_catch_up = true;
  return c;
}

TEST(CoordinatorEarlyCatchUp, LateRankIsServedByTheFirstRankReadyForTheOpenStep) {
  Coordinator c(early_config(4, 1), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  // Nobody holds the state of step 1 in a waiting state yet: rank 3 waits.
  EXPECT_TRUE(c.ready(3, 0, at_ms(5)).empty());
  Decisions d = c.ready(2, 1, at_ms(8));
  EXPECT_TRUE(d.closed.empty());
  ASSERT_EQ(d.early.size(), 1u);
  EXPECT_EQ(d.early[0],
            (EarlyCatchUp{.step = 1, .late_rank = 3, .donor_rank = 2, .velocity_only = true}))
      << "rank 3 holds the state of step 0 exactly: the new velocity is enough";
  // Rank 3 now computes step 1 and counts towards its close like everyone else: the step
  // closes at W - b = 3 READYs without waiting for rank 0 (the straggler of step 1).
  EXPECT_TRUE(c.ready(1, 1, at_ms(9)).empty());
  ClosedRound r = only_close(c.ready(3, 1, at_ms(12)));
  EXPECT_EQ(r.participants, (std::vector<int>{1, 2, 3}));
  EXPECT_TRUE(r.catchups.empty()) << "rank 0 neither reported nor is late";
}

TEST(CoordinatorEarlyCatchUp, LateReadyWithARankAlreadyWaitingIsServedAtOnce) {
  Coordinator c(early_config(3, 1), kT0);
  only_close(all_ready(c, {0, 1}, 0, at_ms(0)));
  EXPECT_TRUE(c.ready(0, 1, at_ms(1)).empty());
  Decisions d = c.ready(2, 0, at_ms(2));
  ASSERT_EQ(d.early.size(), 1u);
  EXPECT_EQ(d.early[0],
            (EarlyCatchUp{.step = 1, .late_rank = 2, .donor_rank = 0, .velocity_only = true}));
  // After the early catch-up, reporting an older step is a protocol violation.
  Decisions bad = c.ready(2, 0, at_ms(3));
  ASSERT_TRUE(bad.abort);
  EXPECT_NE(bad.abort->find("rank 2"), std::string::npos) << *bad.abort;
}

TEST(CoordinatorEarlyCatchUp, FailedEarlyTransferMakesTheRankLateAgain) {
  Coordinator c(early_config(4, 1), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.ready(1, 1, at_ms(1)).empty());
  ASSERT_EQ(c.ready(3, 0, at_ms(2)).early.size(), 1u);
  // The transfer from rank 1 timed out on rank 3: FAILED(1) names the step of the state.
  Decisions d = c.failed(3, 1, at_ms(3));
  EXPECT_FALSE(d.abort) << d.abort.value_or("");
  ASSERT_EQ(d.early.size(), 1u) << "served again by a rank waiting for step 1";
  EXPECT_EQ(d.early[0].late_rank, 3);
  EXPECT_EQ(d.early[0].donor_rank, 1);
  EXPECT_FALSE(d.early[0].velocity_only) << "after a failed transfer its state may be torn";
}

TEST(CoordinatorEarlyCatchUp, ARankSeveralStepsBehindGetsTheFullState) {
  Coordinator c(early_config(3, 1), kT0);
  for (uint64_t step = 0; step < 3; ++step) only_close(all_ready(c, {0, 1}, step, at_ms(step)));
  EXPECT_TRUE(c.ready(0, 3, at_ms(10)).empty());
  Decisions d = c.ready(2, 0, at_ms(11));  // woke up (SIGCONT) three steps behind
  ASSERT_EQ(d.early.size(), 1u);
  EXPECT_EQ(d.early[0].step, 3u);
  EXPECT_FALSE(d.early[0].velocity_only) << "the velocity alone cannot bridge three steps";
}

TEST(CoordinatorBusyJoins, BusyRankJoinsTheAllreduceWithoutCatchUp) {
  CoordinatorConfig config = make_config(4, 1);
  config.busy_ranks_join = true;
  Coordinator c(config, kT0);
  EXPECT_TRUE(c.busy(3, 0, at_ms(1)).empty());
  ClosedRound r = only_close(all_ready(c, {0, 2, 1}, 0, at_ms(2)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(r.passive, std::vector<int>{3});
  EXPECT_TRUE(r.catchups.empty()) << "a passive member ends the step with everyone's state";
  // It continues with step 1 like the participants (its repeated BUSY(0) is stale).
  EXPECT_TRUE(c.busy(3, 0, at_ms(3)).empty());
  EXPECT_TRUE(c.ready(3, 1, at_ms(4)).empty());
  r = only_close(all_ready(c, {0, 1}, 1, at_ms(5)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 3}));
  EXPECT_TRUE(r.passive.empty()) << "rank 2 neither ready nor busy: not waited for, not taken";
  // Every member of the all-reduce gets kParticipate with both lists.
  ClosedRound with_busy;
  with_busy.step = 7;
  with_busy.participants = {0, 1};
  with_busy.passive = {3};
  const auto orders = orders_for(with_busy);
  ASSERT_EQ(orders.size(), 3u);
  for (const auto& [rank, order] : orders) {
    EXPECT_EQ(order.kind, OrderKind::kParticipate) << "rank " << rank;
    std::vector<int> members = {9};  // stale contents are replaced
    order.allreduce_members(members);
    EXPECT_EQ(members, (std::vector<int>{0, 1, 3})) << "rank " << rank;
    EXPECT_EQ(order.is_passive(rank), rank == 3);
  }
}

TEST(CoordinatorBusyJoins, RepairKeepsThePassiveRole) {
  CoordinatorConfig config = make_config(3, 1);
  config.busy_ranks_join = true;
  Coordinator c(config, kT0);
  EXPECT_TRUE(c.busy(2, 0, at_ms(0)).empty());
  ClosedRound r = only_close(all_ready(c, {0, 1}, 0, at_ms(1)));
  ASSERT_EQ(r.passive, std::vector<int>{2});
  // Rank 1 froze inside the all-reduce; ranks 0 and 2 report the failure: the retry runs over
  // them, rank 2 still with a zero gradient.
  EXPECT_TRUE(c.failed(0, 0, at_ms(10)).empty());
  Decisions d = c.failed(2, 0, at_ms(11));
  if (d.closed.empty()) d = c.tick(at_ms(10 + config.repair_window_ms));
  ClosedRound retry = only_close(d);
  EXPECT_EQ(retry.attempt, 1u);
  EXPECT_EQ(retry.participants, std::vector<int>{0});
  EXPECT_EQ(retry.passive, std::vector<int>{2});
}

TEST(CoordinatorEarlyCatchUp, NotInTheFinalRound) {
  Coordinator c(early_config(3, 1), kT0);
  only_close(all_ready(c, {0, 1}, 0, at_ms(0)));
  EXPECT_TRUE(c.finish(0, 1, at_ms(1)).empty());
  // Rank 2 is late for step 0 while rank 0 already finished: it is caught up by the final
  // round (no early catch-up: the final round has no READYs to serve from).
  Decisions d = c.ready(2, 0, at_ms(2));
  EXPECT_TRUE(d.early.empty());
  ClosedRound r = only_close(c.finish(1, 1, at_ms(3)));
  EXPECT_TRUE(r.final_round);
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
}

// ---- catch-ups through shared memory -----------------------------------------------------

CoordinatorConfig shared_config(std::vector<int> nodes, int backup_workers, bool early) {
  CoordinatorConfig c = make_config(static_cast<int>(nodes.size()), backup_workers);
  c.early_catch_up = early;
  c.shared_state_node = std::move(nodes);
  return c;
}

TEST(CoordinatorSharedCatchUp, ConfigNeedsOneNodePerRank) {
  CoordinatorConfig c = shared_config({0, 0, 0}, 1, true);
  c.world_size = 4;
  EXPECT_THROW(c.validate(), InvalidArgument);
  c.shared_state_node = {0, 0, -1, 1};
  EXPECT_NO_THROW(c.validate());
  EXPECT_TRUE(c.share_state(0, 1));
  EXPECT_FALSE(c.share_state(1, 2)) << "rank 2's state is not in shared memory";
  EXPECT_FALSE(c.share_state(2, 2));
  EXPECT_FALSE(c.share_state(0, 3));
}

TEST(CoordinatorSharedCatchUp, LateRankCopiesAtOnceFromARankStillComputing) {
  Coordinator c(shared_config({0, 0, 0, 0}, 1, true), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  // Nobody waits for step 1 yet, but ranks 0-2 will hold its state after their update: rank 3
  // copies it out of shared memory instead of waiting for a rank to send it.
  Decisions d = c.ready(3, 0, at_ms(5));
  EXPECT_TRUE(d.closed.empty());
  ASSERT_EQ(d.early.size(), 1u);
  EXPECT_EQ(d.early[0].step, 1u);
  EXPECT_EQ(d.early[0].late_rank, 3);
  EXPECT_TRUE(d.early[0].shared);
  EXPECT_FALSE(d.early[0].velocity_only) << "a shared copy takes the whole state";
  EXPECT_NE(d.early[0].donor_rank, 3);
  // The donor gets no order: only the late rank does.
  const auto orders = orders_for(d.early[0]);
  ASSERT_EQ(orders.size(), 1u);
  EXPECT_EQ(orders[0].first, 3);
  EXPECT_EQ(orders[0].second.kind, OrderKind::kCatchUp);
  EXPECT_TRUE(orders[0].second.shared && orders[0].second.early);
  EXPECT_EQ(orders[0].second.donor, d.early[0].donor_rank);
  // Rank 3 counts towards step 1 like everyone else.
  EXPECT_TRUE(c.ready(1, 1, at_ms(9)).empty());
  EXPECT_TRUE(c.ready(2, 1, at_ms(10)).empty());
  ClosedRound r = only_close(c.ready(3, 1, at_ms(12)));
  EXPECT_EQ(r.participants, (std::vector<int>{1, 2, 3}));
}

// A stop (SIGTERM/SIGUSR1) carried by the close of step 0 ends every participant after it; a
// rank late for step 0 and caught up early to the state of step 1 must end there too, not
// compute step 1 alone (the others' FINISH(1) against its READY(1) once aborted the job).
TEST(CoordinatorSharedCatchUp, AnEarlyCatchUpAfterAStoppingRoundCarriesTheStop) {
  Coordinator c(shared_config({0, 0, 0, 0}, 1, true), kT0);
  EXPECT_TRUE(c.stop_requested(0, at_ms(0)).empty());
  EXPECT_TRUE(only_close(all_ready(c, {0, 1, 2}, 0, at_ms(1))).stop);
  Decisions d = c.ready(3, 0, at_ms(5));
  ASSERT_EQ(d.early.size(), 1u);
  EXPECT_TRUE(d.early[0].stop);
  const auto orders = orders_for(d.early[0]);
  ASSERT_EQ(orders.size(), 1u);
  EXPECT_TRUE(orders[0].second.stop) << "the late rank's order must say stop";
  // Everyone, the late rank included, finishes after step 1's state: the final round closes.
  for (int rank : {0, 1, 2}) EXPECT_TRUE(c.finish(rank, 1, at_ms(6)).closed.empty());
  Decisions last = c.finish(3, 1, at_ms(7));
  EXPECT_FALSE(last.abort) << last.abort.value_or("");
  ASSERT_EQ(last.closed.size(), 1u);
  EXPECT_TRUE(last.closed[0].final_round);
}

// Without a stop on the round before, an early catch-up leaves the late rank computing the
// open step with everyone (the stop, if requested meanwhile, comes with that step's close).
TEST(CoordinatorSharedCatchUp, AStopRequestedDuringTheOpenStepComesWithItsClose) {
  Coordinator c(shared_config({0, 0, 0, 0}, 1, true), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(1)));
  EXPECT_TRUE(c.stop_requested(0, at_ms(2)).empty());
  Decisions d = c.ready(3, 0, at_ms(5));
  ASSERT_EQ(d.early.size(), 1u);
  EXPECT_FALSE(d.early[0].stop);
  EXPECT_TRUE(c.ready(1, 1, at_ms(9)).empty());
  EXPECT_TRUE(c.ready(2, 1, at_ms(10)).empty());
  EXPECT_TRUE(only_close(c.ready(3, 1, at_ms(12))).stop);
}

TEST(CoordinatorSharedCatchUp, DonorsArePickedOnTheLateRanksNode) {
  // Two nodes: {0, 1} and {2, 3}. Catch-ups at the close (early catch-up off).
  Coordinator c(shared_config({0, 0, 1, 1}, 2, false), kT0);
  for (uint64_t step = 0; step < 6; step += 2) {
    // Ranks 1 and 3 are late for `step` and caught up at the close of step + 1; the
    // participants are ranks 0 and 2, and round-robin alone would give rank 3 donor 0 sometimes.
    only_close(all_ready(c, {0, 2}, step, at_ms(10 * step)));
    EXPECT_TRUE(c.ready(1, step, at_ms(10 * step + 5)).empty());
    EXPECT_TRUE(c.ready(3, step, at_ms(10 * step + 6)).empty());
    ClosedRound r = only_close(all_ready(c, {0, 2}, step + 1, at_ms(10 * step + 7)));
    ASSERT_EQ(r.catchups.size(), 2u) << "step " << step + 1;
    EXPECT_EQ(r.catchups[0], (CatchUp{1, 0, true})) << "step " << step + 1;
    EXPECT_EQ(r.catchups[1], (CatchUp{3, 2, true})) << "step " << step + 1;
    // Donors serve nobody themselves; the late ranks' orders say shared.
    for (const auto& [rank, order] : orders_for(r)) {
      if (order.kind == OrderKind::kCatchUp) {
        EXPECT_TRUE(order.shared) << "rank " << rank;
      } else {
        EXPECT_TRUE(order.late_ranks_served_by(rank).empty()) << "rank " << rank;
      }
    }
  }
}

TEST(CoordinatorSharedCatchUp, NoDonorOnTheNodeFallsBackToASentState) {
  // Rank 2 is alone on its node: it waits for a rank that can send it the state of step 1.
  Coordinator c(shared_config({0, 0, 1}, 1, true), kT0);
  only_close(all_ready(c, {0, 1}, 0, at_ms(0)));
  EXPECT_TRUE(c.ready(2, 0, at_ms(1)).empty());
  Decisions d = c.ready(1, 1, at_ms(2));
  ASSERT_EQ(d.early.size(), 1u);
  EXPECT_EQ(d.early[0],
            (EarlyCatchUp{.step = 1, .late_rank = 2, .donor_rank = 1, .velocity_only = true}));
  EXPECT_EQ(orders_for(d.early[0]).size(), 2u) << "kServe to the donor, kCatchUp to rank 2";
}

TEST(CoordinatorSharedCatchUp, FailedSharedCopyIsRetriedWithTheFullState) {
  Coordinator c(shared_config({0, 0, 0}, 1, true), kT0);
  only_close(all_ready(c, {0, 1}, 0, at_ms(0)));
  Decisions d = c.ready(2, 0, at_ms(1));
  ASSERT_EQ(d.early.size(), 1u);
  // The donor moved past step 1 before rank 2 copied (or it timed out): FAILED(1).
  d = c.failed(2, 1, at_ms(2));
  EXPECT_FALSE(d.abort) << d.abort.value_or("");
  ASSERT_EQ(d.early.size(), 1u) << "another shared copy of the open step's state";
  EXPECT_TRUE(d.early[0].shared);
  EXPECT_EQ(d.early[0].late_rank, 2);
}

// A node peer frozen right after its update (SIGSTOP) never publishes the state a late rank
// waits to copy: the coordinator must not send the late rank to it again for that step, but to
// another holder, here a rank of the other node by MPI (once one waits for its order).
TEST(CoordinatorSharedCatchUp, ADonorThatFailedIsNotAskedAgainForTheStep) {
  Coordinator c(shared_config({0, 0, 1, 1}, 1, true), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  Decisions d = c.ready(3, 0, at_ms(1));
  ASSERT_EQ(d.early.size(), 1u);
  ASSERT_EQ(d.early[0].donor_rank, 2) << "the late rank's node peer";
  ASSERT_TRUE(d.early[0].shared);
  d = c.failed(3, 1, at_ms(2));  // rank 2 froze: the copy timed out
  EXPECT_FALSE(d.abort) << d.abort.value_or("");
  for (const EarlyCatchUp& e : d.early) EXPECT_NE(e.donor_rank, 2) << "the frozen donor again";
  if (d.early.empty()) d = c.ready(0, 1, at_ms(3));
  ASSERT_EQ(d.early.size(), 1u);
  EXPECT_EQ(d.early[0].late_rank, 3);
  EXPECT_NE(d.early[0].donor_rank, 2);
  EXPECT_FALSE(d.early[0].shared) << "no other holder on its node: by MPI";
  // Rank 3 computes step 1 and closes it with ranks 0 and 1 while rank 2 is still frozen.
  c.ready(1, 1, at_ms(4));  // (may or may not close: the test is about what follows)
  ClosedRound r = only_close(c.ready(3, 1, at_ms(5)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 3}));
}

TEST(Coordinator, AResumedRunKeepsItsStepNumbers) {
  CoordinatorConfig config = make_config(3, 1);
  config.first_step = 500;
  Coordinator c(config, kT0);
  EXPECT_EQ(c.open_step(), 500u);
  ClosedRound r = only_close(all_ready(c, {0, 1}, 500, at_ms(1)));
  EXPECT_EQ(r.step, 500u);
  EXPECT_EQ(c.open_step(), 501u);
  // Rank 2 reports the first step late: caught up at the next close, like any late rank.
  EXPECT_TRUE(c.ready(2, 500, at_ms(2)).empty());
  r = only_close(all_ready(c, {0, 1}, 501, at_ms(3)));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
  // A step before the resume point is a protocol violation.
  Coordinator fresh(config, kT0);
  Decisions d = fresh.ready(0, 0, at_ms(1));
  ASSERT_TRUE(d.abort);
  EXPECT_NE(d.abort->find("expected a step in [500, 500]"), std::string::npos) << *d.abort;
  // The final round after the run's last step.
  Coordinator end(config, kT0);
  EXPECT_TRUE(end.finish(0, 500, at_ms(1)).empty());
  EXPECT_TRUE(end.finish(1, 500, at_ms(1)).empty());
  r = only_close(end.finish(2, 500, at_ms(1)));
  EXPECT_TRUE(r.final_round);
  EXPECT_EQ(r.step, 500u);
}

TEST(Coordinator, OddWorldSizesCloseAtWMinusB) {
  for (int w : {3, 5}) {
    for (int b = 1; b < w; ++b) {
      Coordinator c(make_config(w, b), kT0);
      Decisions d;
      for (int r = 0; r < w - b; ++r) {
        EXPECT_TRUE(d.empty()) << "W=" << w << " b=" << b << " closed before rank " << r;
        d = c.ready(r, 0, kT0);
      }
      ClosedRound r = only_close(d);
      EXPECT_EQ(r.participants.size(), static_cast<size_t>(w - b)) << "W=" << w << " b=" << b;
    }
  }
}

}  // namespace
}  // namespace resync::collectives
