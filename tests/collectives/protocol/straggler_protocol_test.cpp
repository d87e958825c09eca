// The straggler-tolerant step end to end in one process: ranks as threads over the loopback
// transport and the in-process control hub, a deterministic "gradient" per rank and step, the
// ring over each step's participants, and catch-up by state transfer. Checks the invariants of
// docs/DESIGN.md: the reduced sum is the sum of the participants' gradients, a slow rank is left
// out and caught up, and every rank ends with the same parameters.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "collectives/transport/context.h"
#include "collectives/control/local_hub.h"
#include "collectives/transport/loopback_transport.h"
#include "collectives/allreduce/ring_allreduce.h"
#include "collectives/state/state_transfer.h"

namespace resync::collectives {
namespace {

constexpr size_t kParams = 257;
constexpr uint64_t kSteps = 12;

// Gradient of `rank` at `step`, a function of the current parameters (as a real one is).
float gradient(int rank, uint64_t step, size_t i, float param) {
  return 0.01f * static_cast<float>((rank + 1) * (i % 7 + 1)) - 0.001f * param +
         0.0001f * static_cast<float>(step);
}

// Lets the test hold the slow rank back until the others closed a step without it: an event,
// not a sleep.
class StepBoard {
 public:
  void closed(uint64_t step) {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = std::max(closed_, step + 1);
    cv_.notify_all();
  }
  void wait_closed(uint64_t step) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return closed_ > step || done_; });
  }
  void finish() {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t closed_ = 0;
  bool done_ = false;
};

struct RankResult {
  std::vector<float> params;
  int times_left_out = 0;
  int catch_ups = 0;
  int early_catch_ups = 0;  // received while the step they rejoin was still open
  int served_early = 0;     // early catch-ups this rank sent
  int sum_mismatches = 0;
};

void run_job(int world, int backup, int slow_rank, std::vector<RankResult>& results,
             bool early_catch_up = true) {
  LoopbackFabric fabric(world);
  CoordinatorConfig config;
  config.world_size = world;
  config.backup_workers = backup;
  config.stall_warning_s = 0;
  config.early_catch_up = early_catch_up;
  LocalControlHub hub(config);
  std::vector<std::unique_ptr<ControlChannel>> channels;
  for (int r = 0; r < world; ++r) channels.push_back(hub.connect(r));
  StepBoard board;
  results.assign(static_cast<size_t>(world), {});

  run_on_ranks(fabric, [&](Transport& transport) {
    const int rank = transport.rank();
    RankResult& out = results[static_cast<size_t>(rank)];
    ControlChannel& control = *channels[static_cast<size_t>(rank)];
    Context ctx(transport, std::chrono::milliseconds(20'000));
    RingAllreduce ring(ctx, {.segment_bytes = 64, .max_elems = kParams});
    std::vector<float> params(kParams, 0.5f);
    std::vector<float> grads(kParams);
    const std::array<std::span<const float>, 1> state_out = {params};
    const std::array<std::span<float>, 1> state_in = {params};

    uint64_t step = 0;
    bool final_done = false;
    while (step < kSteps && !final_done) {
      for (size_t i = 0; i < kParams; ++i) grads[i] = gradient(rank, step, i, params[i]);
      if (rank == slow_rank) board.wait_closed(step);  // arrive only after the step closed
      StepOrder order = control.ready(step);
      while (order.kind == OrderKind::kServe) {  // a late rank needs our state of `step` now
        for (int late : order.late_ranks_served_by(rank)) {
          send_state(ctx, late, state_sequence(order), {.step = order.step}, state_out);
          ++out.served_early;
        }
        order = control.next_order();
      }
      if (order.kind == OrderKind::kCatchUp) {
        StateHeader header;
        recv_state(ctx, order.donor, state_sequence(order), header, state_in);
        ++out.catch_ups;
        if (order.early) ++out.early_catch_ups;
        step = header.step;
        final_done = order.final_round;
        continue;
      }
      if (order.participants.size() < static_cast<size_t>(world)) ++out.times_left_out;
      ring.allreduce_sum(grads, order.participants, step);
      for (size_t i = 0; i < kParams; ++i) {
        // Participants hold identical parameters, so each can recompute every participant's
        // gradient: the ring's sum must match theirs (in any order: a float tolerance).
        double expected = 0;
        for (int p : order.participants) expected += gradient(p, step, i, params[i]);
        if (std::abs(grads[i] - expected) > 1e-5 * (1 + std::abs(expected))) ++out.sum_mismatches;
        params[i] -= 0.1f * grads[i] / static_cast<float>(order.participants.size());
      }
      for (int late : order.late_ranks_served_by(rank)) {
        send_state(ctx, late, state_sequence(order), {.step = order.step + 1}, state_out);
      }
      if (rank == 0) board.closed(step);
      ++step;
    }
    if (!final_done) {
      StepOrder last = control.finish(step);
      if (last.kind == OrderKind::kCatchUp) {
        StateHeader header;
        recv_state(ctx, last.donor, state_sequence(last), header, state_in);
        ++out.catch_ups;
      } else {
        for (int late : last.late_ranks_served_by(rank)) {
          send_state(ctx, late, state_sequence(last), {.step = last.step}, state_out);
        }
      }
    }
    if (rank == 0) board.finish();
    out.params = params;
  });
}

// (world size, early catch-ups on)
class StragglerProtocol : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(StragglerProtocol, SlowRankIsLeftOutCaughtUpAndEveryoneAgrees) {
  const auto [world, early] = GetParam();
  const int slow = world - 1;
  std::vector<RankResult> results;
  run_job(world, /*backup=*/1, slow, results, early);
  for (int r = 0; r < world; ++r) {
    const RankResult& res = results[static_cast<size_t>(r)];
    EXPECT_EQ(res.sum_mismatches, 0) << "rank " << r << ": all-reduce sums differ from the "
                                     << "participants' gradients";
    ASSERT_EQ(res.params.size(), kParams) << "rank " << r;
    for (size_t i = 0; i < kParams; ++i) {
      ASSERT_EQ(res.params[i], results[0].params[i])
          << "rank " << r << " index " << i << " differs from rank 0";
    }
  }
  EXPECT_GE(results[0].times_left_out, 1) << "the slow rank was never left out";
  EXPECT_GE(results[static_cast<size_t>(slow)].catch_ups, 1) << "the slow rank never caught up";
  // Whether a late READY finds a rank already waiting for the next step depends on thread
  // timing (the coordinator tests pin the rule down); what must hold is that every early
  // transfer sent was received, and none happen while switched off.
  int served_early = 0;
  for (const RankResult& r : results) served_early += r.served_early;
  const RankResult& slow_result = results[static_cast<size_t>(slow)];
  EXPECT_EQ(served_early, slow_result.early_catch_ups) << "every early send was received";
  if (!early || world < 3) {  // with W = 2, b = 1 the first READY closes: no time to serve
    EXPECT_EQ(slow_result.early_catch_ups, 0) << "early catch-ups while impossible";
  }
}

INSTANTIATE_TEST_SUITE_P(Worlds, StragglerProtocol,
                         ::testing::Combine(::testing::Values(2, 3, 4, 5), ::testing::Bool()));

TEST(StragglerProtocol, PlainSyncEqualsAFullAllreduceEveryStep) {
  std::vector<RankResult> plain;
  run_job(3, /*backup=*/0, /*slow_rank=*/-1, plain);
  for (const RankResult& r : plain) {
    EXPECT_EQ(r.times_left_out, 0);
    EXPECT_EQ(r.catch_ups, 0);
    EXPECT_EQ(r.params, plain[0].params);
  }
}

}  // namespace
}  // namespace resync::collectives
