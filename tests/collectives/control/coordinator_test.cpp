// Unit tests of the coordinator's decision logic, driven by explicit events and a fake clock.
#include "collectives/control/coordinator.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <set>

#include "base/error.h"
#include "collectives/control/orders.h"
#include "tests/collectives/control/coordinator_test_util.h"

namespace resync::collectives {
namespace {

using namespace testing;  // NOLINT: the fake clock and helpers of every coordinator test
using std::chrono::milliseconds;
using std::chrono::seconds;

TEST(CoordinatorConfig, RejectsInvalidCombinationsNamingTheFlag) {
  auto c = make_config(4);
  c.backup_workers = 4;
  expect_invalid(c, "--backup-workers");
  c.backup_workers = -1;
  expect_invalid(c, "--backup-workers");
  c = make_config(4);
  c.straggler_timeout_ms = -5;
  expect_invalid(c, "--straggler-timeout-ms");
  c = make_config(4);
  c.min_quorum = 5;
  expect_invalid(c, "--min-quorum");
  c.min_quorum = -1;
  expect_invalid(c, "--min-quorum");
  c = make_config(4);
  c.stall_warning_s = -1;
  expect_invalid(c, "--stall-warning-s");
  c.stall_warning_s = std::nan("");
  expect_invalid(c, "--stall-warning-s");
  c = make_config(4);
  c.stall_abort_s = -0.5;
  expect_invalid(c, "--stall-abort-s");
  // The constructor validates too.
  c = make_config(2, 2);
  EXPECT_THROW(Coordinator(c, kT0), InvalidArgument);
}

TEST(CoordinatorConfig, AcceptsTheEdges) {
  auto c = make_config(4, 3, 0, 4);
  EXPECT_NO_THROW(c.validate());
  c = make_config(1, 0, 100, 0);
  EXPECT_NO_THROW(c.validate());
}

TEST(Coordinator, PlainSyncWaitsForAllRanks) {
  Coordinator c(make_config(4), kT0);
  EXPECT_FALSE(c.next_deadline()) << "no timeout and no stall checks: nothing to wake for";
  for (uint64_t step = 0; step < 3; ++step) {
    ClosedRound r = only_close(all_ready(c, {2, 0, 3, 1}, step, at_ms(10 * step)));
    EXPECT_EQ(r.step, step);
    EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 2, 3})) << "step " << step;
    EXPECT_TRUE(r.catchups.empty());
    EXPECT_FALSE(r.timed_out);
    EXPECT_FALSE(r.final_round);
  }
  EXPECT_EQ(c.open_step(), 3u);
}

TEST(Coordinator, SingleRankClosesAtOnce) {
  Coordinator c(make_config(1), kT0);
  ClosedRound r = only_close(c.ready(0, 0, kT0));
  EXPECT_EQ(r.participants, std::vector<int>{0});
  r = only_close(c.finish(0, 1, kT0));
  EXPECT_TRUE(r.final_round);
  EXPECT_TRUE(c.finished());
}

TEST(Coordinator, OneBackupWorkerClosesAtWMinusOneThenCatchesUpTheLastRank) {
  Coordinator c(make_config(4, 1), kT0);
  ClosedRound r = only_close(all_ready(c, {0, 2, 1}, 0, at_ms(0)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 2}));
  EXPECT_TRUE(r.catchups.empty());

  // Rank 3's READY(0) arrives after step 0 closed: late, nothing to decide yet.
  EXPECT_TRUE(c.ready(3, 0, at_ms(5)).empty());

  r = only_close(all_ready(c, {1, 0, 2}, 1, at_ms(10)));
  EXPECT_EQ(r.step, 1u);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 2}));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 3);
  EXPECT_TRUE(std::count(r.participants.begin(), r.participants.end(), r.catchups[0].donor_rank))
      << "donor " << r.catchups[0].donor_rank << " is not a participant of step 1";

  // Rank 3 resumes at step 2 and takes part again; it may not report an older step.
  r = only_close(all_ready(c, {3, 1, 0}, 2, at_ms(20)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 3}));
}

TEST(Coordinator, LateRankIsCaughtUpAtTheNextCloseEvenWithPlainSync) {
  // b = 0 with a timeout: after a timeout close the late rank cannot report the next step
  // before it is caught up, so the next step closes with the others instead of waiting.
  Coordinator c(make_config(3, 0, 100), kT0);
  EXPECT_TRUE(all_ready(c, {0, 1}, 0, at_ms(0)).empty());
  ClosedRound r = only_close(c.tick(at_ms(100)));
  EXPECT_TRUE(r.timed_out);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1}));
  EXPECT_TRUE(c.ready(2, 0, at_ms(150)).empty());
  r = only_close(all_ready(c, {1, 0}, 1, at_ms(160)));
  EXPECT_FALSE(r.timed_out) << "closed by the count, not by another timeout";
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1}));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
}

TEST(Coordinator, TimeoutClosesWithQuorum) {
  Coordinator c(make_config(4, 0, 100, 2), kT0);
  EXPECT_TRUE(c.ready(0, 0, at_ms(0)).empty());
  EXPECT_TRUE(c.ready(1, 0, at_ms(30)).empty());
  ASSERT_TRUE(c.next_deadline());
  EXPECT_EQ(*c.next_deadline(), at_ms(100)) << "timeout counts from the first READY";
  EXPECT_TRUE(c.tick(at_ms(99)).empty());
  ClosedRound r = only_close(c.tick(at_ms(100)));
  EXPECT_TRUE(r.timed_out);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1}));
  EXPECT_FALSE(c.next_deadline()) << "no READY for step 1 yet: no timeout running";
}

TEST(Coordinator, TimeoutWithoutQuorumKeepsWaiting) {
  Coordinator c(make_config(4, 0, 100, 3), kT0);
  EXPECT_TRUE(all_ready(c, {0, 1}, 0, at_ms(0)).empty());
  EXPECT_TRUE(c.tick(at_ms(100)).empty()) << "2 ready < quorum 3";
  EXPECT_FALSE(c.next_deadline()) << "a passed timeout must not make the event loop spin";
  EXPECT_TRUE(c.tick(at_ms(500)).empty());
  // The third READY reaches the quorum after the timeout: the step closes at once.
  ClosedRound r = only_close(c.ready(3, 0, at_ms(600)));
  EXPECT_TRUE(r.timed_out);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 3}));
  EXPECT_TRUE(c.ready(2, 0, at_ms(700)).empty()) << "rank 2 is late for step 0";
}

TEST(Coordinator, RankLateByManySteps) {
  Coordinator c(make_config(3, 1), kT0);
  for (uint64_t step = 0; step < 10; ++step) {
    ClosedRound r = only_close(all_ready(c, {0, 1}, step, at_ms(step)));
    EXPECT_EQ(r.participants, (std::vector<int>{0, 1})) << "step " << step;
  }
  // Rank 2 wakes up (e.g. SIGCONT) and reports the step it was computing.
  EXPECT_TRUE(c.ready(2, 0, at_ms(20)).empty());
  ClosedRound r = only_close(all_ready(c, {0, 1}, 10, at_ms(30)));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
  EXPECT_NE(r.catchups[0].donor_rank, 2);
  // After catching up at step 10 it continues with step 11, not with an older one.
  Decisions d = c.ready(2, 5, at_ms(40));
  ASSERT_TRUE(d.abort) << "READY(5) after a catch-up at step 10 must be rejected";
  EXPECT_NE(d.abort->find("rank 2"), std::string::npos) << *d.abort;
}

TEST(Coordinator, SeveralLateRanksGetDifferentDonors) {
  Coordinator c(make_config(5, 2), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.ready(4, 0, at_ms(1)).empty());
  EXPECT_TRUE(c.ready(3, 0, at_ms(2)).empty());
  ClosedRound r = only_close(all_ready(c, {2, 1, 0}, 1, at_ms(3)));
  ASSERT_EQ(r.catchups.size(), 2u);
  EXPECT_EQ(r.catchups[0].late_rank, 3);
  EXPECT_EQ(r.catchups[1].late_rank, 4);
  EXPECT_NE(r.catchups[0].donor_rank, r.catchups[1].donor_rank) << "load not spread";
  for (const CatchUp& cu : r.catchups) {
    EXPECT_TRUE(std::count(r.participants.begin(), r.participants.end(), cu.donor_rank))
        << "donor " << cu.donor_rank << " of rank " << cu.late_rank << " is no participant";
  }
}

TEST(Coordinator, TooManyLateRanksDoNotDeadlockTheNextStep) {
  // W = 4, b = 1 (3 gradients per step). A timeout close leaves two ranks late; only two can
  // report step 1, so waiting for three would stall until the next timeout (or forever).
  Coordinator c(make_config(4, 1, 100), kT0);
  EXPECT_TRUE(all_ready(c, {0, 1}, 0, at_ms(0)).empty());
  ClosedRound r = only_close(c.tick(at_ms(100)));
  EXPECT_TRUE(r.timed_out);
  EXPECT_TRUE(c.ready(3, 0, at_ms(110)).empty());
  EXPECT_TRUE(c.ready(2, 0, at_ms(120)).empty());
  r = only_close(all_ready(c, {1, 0}, 1, at_ms(130)));
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1}));
  ASSERT_EQ(r.catchups.size(), 2u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
  EXPECT_EQ(r.catchups[1].late_rank, 3);
}

TEST(Coordinator, FinalRoundWaitsForEveryRankAndAssignsDonors) {
  Coordinator c(make_config(4, 1, 50), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  only_close(all_ready(c, {0, 1, 2}, 1, at_ms(1)));
  // T = 2: three ranks finish; rank 3 is still computing step 0.
  EXPECT_TRUE(c.finish(0, 2, at_ms(2)).empty());
  EXPECT_TRUE(c.finish(2, 2, at_ms(3)).empty());
  EXPECT_TRUE(c.finish(1, 2, at_ms(4)).empty());
  EXPECT_TRUE(c.tick(at_ms(5000)).empty()) << "the final round never times out";
  ClosedRound r = only_close(c.ready(3, 0, at_ms(6000)));
  EXPECT_TRUE(r.final_round);
  EXPECT_EQ(r.step, 2u);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 2}));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 3);
  EXPECT_TRUE(c.finished());
  EXPECT_FALSE(c.next_deadline());
  EXPECT_TRUE(c.connection_lost(3, at_ms(7000)).empty()) << "closing after the end is normal";
}

TEST(Coordinator, FinalRoundWithEveryoneOnTime) {
  Coordinator c(make_config(3), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.finish(1, 1, at_ms(1)).empty());
  EXPECT_TRUE(c.finish(0, 1, at_ms(1)).empty());
  ClosedRound r = only_close(c.finish(2, 1, at_ms(1)));
  EXPECT_TRUE(r.final_round);
  EXPECT_TRUE(r.catchups.empty());
}

TEST(Coordinator, RanksDisagreeingOnTheStepCountAbort) {
  Coordinator c(make_config(3), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.finish(0, 1, at_ms(1)).empty());
  Decisions d = c.ready(1, 1, at_ms(2));
  ASSERT_TRUE(d.abort);
  EXPECT_NE(d.abort->find("disagree"), std::string::npos) << *d.abort;
  EXPECT_TRUE(c.aborted());
}

TEST(Coordinator, StallWarningsRepeatAndAbortNamesMissingRanks) {
  auto cfg = make_config(3);
  cfg.stall_warning_s = 10;
  cfg.stall_abort_s = 25;
  Coordinator c(cfg, kT0);
  EXPECT_TRUE(c.ready(0, 0, at_ms(1000)).empty());
  ASSERT_TRUE(c.next_deadline());
  EXPECT_EQ(*c.next_deadline(), kT0 + seconds(10));
  EXPECT_TRUE(c.tick(at_ms(9999)).empty());
  Decisions d = c.tick(at_ms(10'000));
  ASSERT_TRUE(d.stall);
  EXPECT_FALSE(d.abort);
  EXPECT_EQ(d.stall->step, 0u);
  EXPECT_EQ(d.stall->missing, (std::vector<int>{1, 2}));
  EXPECT_DOUBLE_EQ(d.stall->stalled_s, 10.0);
  EXPECT_EQ(*c.next_deadline(), kT0 + seconds(20)) << "the warning repeats each period";
  EXPECT_TRUE(c.tick(at_ms(15'000)).empty());
  d = c.tick(at_ms(20'000));
  ASSERT_TRUE(d.stall);
  EXPECT_EQ(*c.next_deadline(), kT0 + seconds(25));
  d = c.tick(at_ms(25'000));
  ASSERT_TRUE(d.abort);
  EXPECT_NE(d.abort->find("[1, 2]"), std::string::npos) << *d.abort;
  EXPECT_NE(d.abort->find("--stall-abort-s"), std::string::npos) << *d.abort;
  EXPECT_TRUE(c.aborted());
  EXPECT_FALSE(c.next_deadline());
  EXPECT_TRUE(c.ready(1, 0, at_ms(26'000)).empty()) << "events after an abort are ignored";
}

TEST(Coordinator, StallClockRestartsAtEachClose) {
  auto cfg = make_config(2);
  cfg.stall_warning_s = 10;
  Coordinator c(cfg, kT0);
  only_close(all_ready(c, {0, 1}, 0, at_ms(8000)));
  EXPECT_EQ(*c.next_deadline(), at_ms(18'000));
  EXPECT_TRUE(c.tick(at_ms(17'999)).empty());
  // A late look at the clock reports once, then schedules the next period.
  Decisions d = c.tick(at_ms(45'000));
  ASSERT_TRUE(d.stall);
  EXPECT_EQ(d.stall->missing, (std::vector<int>{0, 1}));
  EXPECT_EQ(*c.next_deadline(), at_ms(48'000));
}

TEST(Coordinator, ConnectionLostAbortsNamingTheRank) {
  Coordinator c(make_config(4, 1), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  Decisions d = c.connection_lost(2, at_ms(1), "node7");
  ASSERT_TRUE(d.abort);
  EXPECT_EQ(*d.abort, "rank 2 (node7) closed its control connection: it died");
  EXPECT_TRUE(c.aborted());
}

TEST(Coordinator, StopRequestReachesTheNextCloseAndStays) {
  Coordinator c(make_config(3, 1), kT0);
  EXPECT_TRUE(c.stop_requested(2, at_ms(0)).empty());
  ClosedRound r = only_close(all_ready(c, {0, 1}, 0, at_ms(1)));
  EXPECT_TRUE(r.stop);
  r = only_close(all_ready(c, {0, 2}, 1, at_ms(2)));
  EXPECT_TRUE(r.stop) << "sticky, so a rank that missed the first stop order sees it too";
}

TEST(Coordinator, ProtocolViolationsAbort) {
  Coordinator c(make_config(3), kT0);
  EXPECT_TRUE(c.ready(0, 0, at_ms(0)).empty());
  Decisions d = c.ready(0, 0, at_ms(1));
  ASSERT_TRUE(d.abort) << "second READY while waiting";
  EXPECT_NE(d.abort->find("rank 0"), std::string::npos) << *d.abort;

  Coordinator c2(make_config(3), kT0);
  d = c2.ready(1, 4, at_ms(0));
  ASSERT_TRUE(d.abort) << "READY for a step that is not open yet";
  EXPECT_THROW(c2.ready(3, 0, at_ms(0)), InvalidArgument) << "rank out of range";
}

// ---- BUSY: interruptible stragglers ----

bool has(const std::vector<int>& v, int x) { return std::find(v.begin(), v.end(), x) != v.end(); }

TEST(CoordinatorBusy, BusyRankIsCaughtUpInTheSameClose) {
  Coordinator c(make_config(4, 1), kT0);
  EXPECT_TRUE(c.ready(0, 0, at_ms(0)).empty());
  EXPECT_TRUE(c.busy(3, 0, at_ms(1)).empty()) << "BUSY alone decides nothing";
  EXPECT_TRUE(c.ready(1, 0, at_ms(2)).empty()) << "a busy rank does not count as ready";
  ClosedRound r = only_close(c.ready(2, 0, at_ms(3)));
  EXPECT_EQ(r.step, 0u);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 2}));
  ASSERT_EQ(r.catchups.size(), 1u) << "the busy rank is caught up by this very close";
  EXPECT_EQ(r.catchups[0].late_rank, 3);
  EXPECT_TRUE(has(r.participants, r.catchups[0].donor_rank));
  // Its READY(0) crossed the CATCHUP on the wire: ignored, no abort.
  Decisions d = c.ready(3, 0, at_ms(4));
  EXPECT_TRUE(d.empty()) << "READY racing a busy catch-up: " << d.abort.value_or("");
  // It computes step 1 on time and takes part.
  r = only_close(all_ready(c, {3, 1, 0}, 1, at_ms(5)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 3}));
  EXPECT_TRUE(r.catchups.empty()) << "rank 2 never went late";
}

TEST(CoordinatorBusy, BusyThenReadyBeforeTheCloseIsAParticipant) {
  Coordinator c(make_config(3), kT0);
  EXPECT_TRUE(c.busy(2, 0, at_ms(0)).empty());
  EXPECT_TRUE(all_ready(c, {0, 1}, 0, at_ms(1)).empty())
      << "b = 0: the busy rank can still report, so the step waits for it";
  ClosedRound r = only_close(c.ready(2, 0, at_ms(2)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 2}));
  EXPECT_TRUE(r.catchups.empty());
}

TEST(CoordinatorBusy, BusyRankIsCaughtUpByATimeoutClose) {
  Coordinator c(make_config(3, 0, 100), kT0);
  EXPECT_TRUE(all_ready(c, {0, 1}, 0, at_ms(0)).empty());
  EXPECT_TRUE(c.busy(2, 0, at_ms(10)).empty());
  ClosedRound r = only_close(c.tick(at_ms(100)));
  EXPECT_TRUE(r.timed_out);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1}));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
  EXPECT_TRUE(c.busy(2, 0, at_ms(110)).empty()) << "a repeated BUSY after its catch-up";
  EXPECT_TRUE(c.ready(2, 0, at_ms(120)).empty()) << "READY racing the catch-up";
  r = only_close(all_ready(c, {0, 1, 2}, 1, at_ms(130)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 2}));
}

TEST(CoordinatorBusy, BusyForAClosedStepIsLate) {
  Coordinator c(make_config(3, 1), kT0);
  only_close(all_ready(c, {0, 1}, 0, at_ms(0)));
  EXPECT_TRUE(c.busy(2, 0, at_ms(1)).empty()) << "late: queued for the next close";
  EXPECT_TRUE(c.busy(2, 0, at_ms(2)).empty()) << "repeated BUSY while queued";
  EXPECT_TRUE(c.ready(2, 0, at_ms(3)).empty()) << "READY while queued as late for that step";
  ClosedRound r = only_close(all_ready(c, {1, 0}, 1, at_ms(4)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1}));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
  r = only_close(all_ready(c, {2, 0}, 2, at_ms(5)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 2}));
}

TEST(CoordinatorBusy, BusyViolationsAndFinishDisagreementAbort) {
  Coordinator c(make_config(3), kT0);
  Decisions d = c.busy(0, 1, at_ms(0));
  ASSERT_TRUE(d.abort) << "BUSY for a step that is not open";
  EXPECT_NE(d.abort->find("rank 0"), std::string::npos) << *d.abort;

  Coordinator c2(make_config(2), kT0);
  only_close(all_ready(c2, {0, 1}, 0, at_ms(0)));
  EXPECT_TRUE(c2.busy(1, 1, at_ms(1)).empty());
  d = c2.finish(0, 1, at_ms(2));
  ASSERT_TRUE(d.abort) << "FINISH(1) while rank 1 is busy computing step 1";
  EXPECT_NE(d.abort->find("disagree"), std::string::npos) << *d.abort;
}

// ---- FAILED: ring repair ----

CoordinatorConfig repair_config(int world_size, int backup_workers, int64_t window_ms = 2000) {
  CoordinatorConfig cfg = make_config(world_size, backup_workers);
  cfg.repair_window_ms = window_ms;
  return cfg;
}

TEST(CoordinatorRepair, RepairWindowIsValidated) {
  auto cfg = make_config(2);
  cfg.repair_window_ms = 0;
  expect_invalid(cfg, "--ring-timeout-ms");
  cfg.repair_window_ms = 1;
  EXPECT_NO_THROW(cfg.validate());
}

TEST(CoordinatorRepair, FailedAfterAPeerCompletedIsLateAndCaughtUpNextClose) {
  Coordinator c(repair_config(3, 0), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.ready(0, 1, at_ms(10)).empty()) << "rank 0 completed step 0";
  EXPECT_TRUE(c.failed(1, 0, at_ms(20)).empty()) << "a peer holds the result: rank 1 is late";
  EXPECT_FALSE(c.next_deadline()) << "no repair window once completion is proven";
  ClosedRound r = only_close(c.ready(2, 1, at_ms(30)));
  EXPECT_EQ(r.step, 1u);
  EXPECT_EQ(r.attempt, 0u);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 2}));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 1);
}

TEST(CoordinatorRepair, CompletionDuringTheWindowTurnsFailedRanksLate) {
  Coordinator c(repair_config(3, 0, 500), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.failed(1, 0, at_ms(10)).empty());
  ASSERT_TRUE(c.next_deadline());
  EXPECT_EQ(*c.next_deadline(), at_ms(510)) << "the window starts at the first FAILED";
  EXPECT_TRUE(c.busy(2, 1, at_ms(100)).empty()) << "BUSY(1) proves rank 2 completed step 0";
  EXPECT_FALSE(c.next_deadline()) << "window cancelled";
  EXPECT_TRUE(c.tick(at_ms(600)).empty());
  EXPECT_TRUE(c.ready(0, 1, at_ms(700)).empty()) << "target min(3, 3 - 1 late) = 2 ready";
  ClosedRound r = only_close(c.ready(2, 1, at_ms(800)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 2}));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 1) << "the failed rank is caught up like a late one";
}

TEST(CoordinatorRepair, AllParticipantsFailedReclosesAtOnce) {
  Coordinator c(repair_config(3, 0), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.failed(2, 0, at_ms(5)).empty());
  EXPECT_TRUE(c.failed(0, 0, at_ms(6)).empty());
  ClosedRound r = only_close(c.failed(1, 0, at_ms(7)));
  EXPECT_EQ(r.step, 0u);
  EXPECT_EQ(r.attempt, 1u);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 2}));
  EXPECT_TRUE(r.catchups.empty());
  EXPECT_EQ(c.open_step(), 1u);
  EXPECT_FALSE(c.next_deadline()) << "the repair consumed the window";
  r = only_close(all_ready(c, {0, 1, 2}, 1, at_ms(8)));
  EXPECT_EQ(r.step, 1u);
  EXPECT_EQ(r.attempt, 0u) << "a new step starts at attempt 0";
}

TEST(CoordinatorRepair, FrozenParticipantIsLeftOutAfterTheWindow) {
  // W = 4, b = 1. Step 0 drops rank 3; step 1 catches it up from donor 0. Then the ring of
  // step 1 fails: ranks 0 and 1 report it, rank 2 is frozen and says nothing.
  Coordinator c(repair_config(4, 1, 2000), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.ready(3, 0, at_ms(1)).empty());
  ClosedRound r = only_close(all_ready(c, {0, 1, 2}, 1, at_ms(2)));
  ASSERT_EQ(r.catchups, (std::vector<CatchUp>{{3, 0}}));

  EXPECT_TRUE(c.failed(0, 1, at_ms(100)).empty());
  EXPECT_TRUE(c.failed(1, 1, at_ms(200)).empty());
  ASSERT_TRUE(c.next_deadline());
  EXPECT_EQ(*c.next_deadline(), at_ms(2100));
  EXPECT_TRUE(c.tick(at_ms(2099)).empty());
  r = only_close(c.tick(at_ms(2100)));
  EXPECT_EQ(r.step, 1u);
  EXPECT_EQ(r.attempt, 1u);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1})) << "without frozen rank 2";
  EXPECT_EQ(r.catchups, (std::vector<CatchUp>{{3, 0}})) << "donor 0 retries: pair kept";
  EXPECT_EQ(r.ordered_before, std::vector<int>{3});
  EXPECT_EQ(c.open_step(), 2u);
  // Rank 3 still waits for donor 0's state of step 1: it gets no second order.
  for (const auto& [rank, order] : orders_for(r)) {
    EXPECT_NE(rank, 3) << "a second CATCHUP would be a stale order in rank 3's channel";
    EXPECT_EQ(order.attempt, 1u) << "rank " << rank;
  }
  // The frozen rank wakes up and reports its failure: caught up at the next close.
  EXPECT_TRUE(c.failed(2, 1, at_ms(3000)).empty());
  r = only_close(all_ready(c, {0, 3, 1}, 2, at_ms(3100)));
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1, 3}));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
  EXPECT_NE(r.catchups[0].donor_rank, 2);
}

TEST(CoordinatorRepair, LeftOutDonorAndStaleStateAreCaughtUp) {
  // The donor of rank 3 (rank 0) is the one that froze; rank 0 may even have completed the
  // abandoned attempt: whatever it or rank 3 report next must not join a step.
  Coordinator c(repair_config(4, 1, 1000), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.ready(3, 0, at_ms(1)).empty());
  ClosedRound r = only_close(all_ready(c, {0, 1, 2}, 1, at_ms(2)));
  ASSERT_EQ(r.catchups, (std::vector<CatchUp>{{3, 0}}));
  EXPECT_TRUE(c.failed(1, 1, at_ms(10)).empty());
  EXPECT_TRUE(c.failed(2, 1, at_ms(20)).empty());
  r = only_close(c.tick(at_ms(1010)));
  EXPECT_EQ(r.participants, (std::vector<int>{1, 2}));
  EXPECT_TRUE(r.catchups.empty()) << "donor 0 is gone: rank 3 will give up and be queued";
  EXPECT_TRUE(r.ordered_before.empty());
  EXPECT_TRUE(c.failed(3, 1, at_ms(1020)).empty()) << "catch-up receive timed out: late";
  EXPECT_TRUE(c.ready(0, 2, at_ms(1030)).empty()) << "state of the abandoned attempt: late";
  // Two late ranks: the target is min(3, 4 - 2) = 2.
  r = only_close(all_ready(c, {1, 2}, 2, at_ms(1040)));
  EXPECT_EQ(r.participants, (std::vector<int>{1, 2}));
  std::vector<int> late;
  for (const CatchUp& cu : r.catchups) {
    late.push_back(cu.late_rank);
    EXPECT_TRUE(has(r.participants, cu.donor_rank)) << "donor of rank " << cu.late_rank;
  }
  EXPECT_EQ(late, (std::vector<int>{0, 3}));
}

TEST(CoordinatorRepair, LateRanksQueuedDuringTheWindowAreCaughtUpByTheRepair) {
  Coordinator c(repair_config(3, 1, 1000), kT0);
  only_close(all_ready(c, {0, 1}, 0, at_ms(0)));
  EXPECT_TRUE(c.failed(0, 0, at_ms(10)).empty());
  EXPECT_TRUE(c.ready(2, 0, at_ms(20)).empty()) << "straggler: late for step 0";
  ClosedRound r = only_close(c.failed(1, 0, at_ms(30)));
  EXPECT_EQ(r.attempt, 1u);
  EXPECT_EQ(r.participants, (std::vector<int>{0, 1}));
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
  EXPECT_TRUE(r.ordered_before.empty()) << "rank 2 waits for an order: it gets one";
  r = only_close(all_ready(c, {2, 1}, 1, at_ms(40)));
  EXPECT_EQ(r.participants, (std::vector<int>{1, 2}));
}

TEST(CoordinatorRepair, AttemptLimitAborts) {
  Coordinator c(repair_config(2, 0), kT0);
  only_close(all_ready(c, {0, 1}, 0, at_ms(0)));
  for (uint32_t attempt = 1; attempt < kMaxStepAttempts; ++attempt) {
    EXPECT_TRUE(c.failed(1, 0, at_ms(attempt)).empty());
    ClosedRound r = only_close(c.failed(0, 0, at_ms(attempt)));
    EXPECT_EQ(r.attempt, attempt);
  }
  EXPECT_TRUE(c.failed(0, 0, at_ms(100)).empty());
  Decisions d = c.failed(1, 0, at_ms(100));
  EXPECT_TRUE(d.closed.empty());
  ASSERT_TRUE(d.abort);
  EXPECT_NE(d.abort->find("step 0 failed 16 times"), std::string::npos) << *d.abort;
  EXPECT_TRUE(c.aborted());
}

TEST(CoordinatorRepair, FailedViolationsAbort) {
  Coordinator c(repair_config(2, 0), kT0);
  Decisions d = c.failed(0, 0, at_ms(0));
  ASSERT_TRUE(d.abort) << "FAILED before any order";
  EXPECT_NE(d.abort->find("rank 0"), std::string::npos) << *d.abort;

  Coordinator c2(repair_config(2, 0), kT0);
  only_close(all_ready(c2, {0, 1}, 0, at_ms(0)));
  EXPECT_TRUE(c2.failed(0, 0, at_ms(1)).empty());
  d = c2.failed(0, 0, at_ms(2));
  ASSERT_TRUE(d.abort) << "second FAILED while waiting";
  EXPECT_NE(d.abort->find("FAILED(0)"), std::string::npos) << *d.abort;
}

TEST(CoordinatorRepair, FinishProvesCompletionOfTheLastStep) {
  Coordinator c(repair_config(3, 0), kT0);
  only_close(all_ready(c, {0, 1, 2}, 0, at_ms(0)));
  EXPECT_TRUE(c.failed(2, 0, at_ms(1)).empty());
  EXPECT_TRUE(c.finish(0, 1, at_ms(2)).empty());
  EXPECT_FALSE(c.next_deadline()) << "FINISH(1) proves step 0 completed";
  ClosedRound r = only_close(c.finish(1, 1, at_ms(3)));
  EXPECT_TRUE(r.final_round);
  ASSERT_EQ(r.catchups.size(), 1u);
  EXPECT_EQ(r.catchups[0].late_rank, 2);
}

// Drives the coordinator with every rank as a simulated process: each reports, gets its order,
// and reports again; the arrival order is shuffled and some ranks are slow. Checks the
// invariants for odd and even world sizes and several backup-worker counts.
struct SimRank {
  uint64_t next_step = 0;  // what it reports next
  bool waiting = false;
  bool finished = false;
};

// `nodes` > 0: ranks r and r + nodes share a node (CoordinatorConfig::shared_state_node).
void simulate(int world_size, int backup_workers, uint64_t n_steps, uint32_t seed,
              bool early_catch_up = false, int* n_early = nullptr, int nodes = 0) {
  SCOPED_TRACE(fmt::format("W={} b={} seed={} early={} nodes={}", world_size, backup_workers,
                           seed, early_catch_up, nodes));
  CoordinatorConfig config = make_config(world_size, backup_workers);
  config.early_catch_up = early_catch_up;
  for (int r = 0; nodes > 0 && r < world_size; ++r) config.shared_state_node.push_back(r % nodes);
  Coordinator c(config, kT0);
  std::vector<SimRank> ranks(static_cast<size_t>(world_size));
  std::mt19937 rng(seed);
  uint64_t expected_close = 0;
  bool done = false;
  int64_t clock_ms = 0;
  for (int iteration = 0; iteration < 100'000 && !done; ++iteration) {
    std::vector<int> can_act;
    for (int r = 0; r < world_size; ++r) {
      if (!ranks[static_cast<size_t>(r)].waiting) can_act.push_back(r);
    }
    ASSERT_FALSE(can_act.empty()) << "every rank waits and nothing closed: deadlock";
    // Rank W-1 is a straggler: it acts only one time in eight when others could.
    int rank = can_act[rng() % can_act.size()];
    if (rank == world_size - 1 && can_act.size() > 1 && rng() % 8 != 0) {
      rank = can_act[rng() % (can_act.size() - 1)];
    }
    SimRank& me = ranks[static_cast<size_t>(rank)];
    me.waiting = true;
    const CoordTime now = at_ms(++clock_ms);
    Decisions d =
        me.next_step < n_steps ? c.ready(rank, me.next_step, now) : c.finish(rank, n_steps, now);
    ASSERT_FALSE(d.abort) << *d.abort;
    for (const ClosedRound& r : d.closed) {
      EXPECT_EQ(r.step, expected_close);
      ++expected_close;
      std::set<int> seen(r.participants.begin(), r.participants.end());
      EXPECT_EQ(seen.size(), r.participants.size()) << "duplicate participant, step " << r.step;
      EXPECT_TRUE(std::is_sorted(r.participants.begin(), r.participants.end()));
      if (!r.final_round) {
        EXPECT_LE(r.participants.size(), static_cast<size_t>(world_size - backup_workers))
            << "step " << r.step;
        if (backup_workers == 0) {
          EXPECT_EQ(r.participants.size(), static_cast<size_t>(world_size))
              << "plain sync must take every rank, step " << r.step;
        }
      }
      for (int p : r.participants) {
        SimRank& pr = ranks[static_cast<size_t>(p)];
        EXPECT_TRUE(pr.waiting) << "rank " << p << " took part without reporting";
        pr.waiting = false;
        pr.next_step = r.step + 1;
        if (r.final_round) pr.finished = true;
      }
      for (const CatchUp& cu : r.catchups) {
        EXPECT_FALSE(seen.count(cu.late_rank)) << "rank " << cu.late_rank << " late and in P";
        EXPECT_TRUE(seen.count(cu.donor_rank)) << "donor " << cu.donor_rank << " not in P";
        EXPECT_EQ(cu.shared, config.share_state(cu.late_rank, cu.donor_rank));
        SimRank& lr = ranks[static_cast<size_t>(cu.late_rank)];
        EXPECT_TRUE(lr.waiting) << "rank " << cu.late_rank << " caught up without reporting";
        lr.waiting = false;
        lr.next_step = r.step + 1;
        if (r.final_round) lr.finished = true;
      }
      if (r.final_round) done = true;
    }
    for (const EarlyCatchUp& e : d.early) {
      EXPECT_TRUE(early_catch_up) << "early catch-up while switched off";
      EXPECT_EQ(e.step, c.open_step()) << "early catch-ups carry the open step's state";
      const SimRank& donor = ranks[static_cast<size_t>(e.donor_rank)];
      // A shared donor may still be computing the step: it holds its state (published in
      // shared memory) from its update of the last round on. Others must be waiting.
      EXPECT_TRUE(donor.next_step == e.step && (donor.waiting || e.shared))
          << "donor " << e.donor_rank << " does not hold the state of step " << e.step;
      EXPECT_EQ(e.shared, config.share_state(e.late_rank, e.donor_rank));
      EXPECT_FALSE(e.shared && e.velocity_only);
      SimRank& lr = ranks[static_cast<size_t>(e.late_rank)];
      EXPECT_TRUE(lr.waiting) << "rank " << e.late_rank << " caught up without reporting";
      EXPECT_LT(lr.next_step, e.step) << "rank " << e.late_rank << " was not behind";
      lr.waiting = false;
      lr.next_step = e.step;
      if (n_early) ++*n_early;
    }
  }
  ASSERT_TRUE(done) << "the final round never closed";
  EXPECT_EQ(expected_close, n_steps + 1);
  for (int r = 0; r < world_size; ++r) {
    EXPECT_TRUE(ranks[static_cast<size_t>(r)].finished) << "rank " << r << " did not finish";
  }
}

TEST(Coordinator, SimulatedTrainingOddAndEvenWorldSizes) {
  for (int nodes : {0, 1, 2}) {
  for (bool early : {false, true}) {
    for (int w : {1, 2, 3, 4, 5}) {
      for (int b = 0; b < std::min(w, 3); ++b) {
        int n_early = 0;
        for (uint32_t seed : {1u, 2u, 3u}) simulate(w, b, 40, seed, early, &n_early, nodes);
        // The straggler falls behind when b >= 1; unless one READY closes a step (W - b = 1),
        // a rank waiting for the next step can then serve it early.
        if (early && b >= 1 && w - b >= 2) {
          EXPECT_GT(n_early, 0) << "W=" << w << " b=" << b << ": no early catch-up simulated";
        }
      }
    }
  }
  }
}

// ---- early catch-up ---------------------------------------------------------------------

}  // namespace
}  // namespace resync::collectives
