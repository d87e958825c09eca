// The straggler-tolerant step end to end in one process, through the shipped StepExecutor:
// ranks as threads over the loopback transport and the in-process control hub, the
// all-reducer over each step's participants, catch-ups by state transfer, and a toy model whose
// gradient is a deterministic function of rank, step and parameters. Checks the invariants of
// docs/DESIGN.md: the reduced sum is the sum of the participants' gradients, a slow rank is left
// out and caught up, and every rank ends with the same parameters and optimizer state (a toy
// SGD-like update, and the shipped AdamW whose state is two buffers and whose update depends on
// the step).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "collectives/allreduce/allreducer.h"
#include "collectives/control/control_plane.h"
#include "collectives/control/local_hub.h"
#include "collectives/transport/context.h"
#include "collectives/transport/loopback_transport.h"
#include "runtime/observe/timeline.h"
#include "runtime/train/optimizer.h"
#include "runtime/train/step_executor.h"

namespace resync::runtime {
namespace {

using namespace collectives;

constexpr size_t kParams = 257;
constexpr uint64_t kSteps = 12;
constexpr float kLr = 0.1f;

// Gradient of `rank` at `step`, a function of the current parameters (as a real one is).
float toy_gradient(int rank, uint64_t step, size_t i, float param) {
  return 0.01f * static_cast<float>((rank + 1) * (i % 7 + 1)) - 0.001f * param +
         0.0001f * static_cast<float>(step);
}

// The update the toy model makes: its own SGD-like one, or the shipped AdamW.
enum class ToyUpdate { kToySgd, kAdamW };

OptimizerConfig toy_adamw() {
  OptimizerConfig c;
  c.kind = OptimizerKind::kAdamW;
  c.lr = kLr;
  c.weight_decay = 0.01f;
  c.schedule = {.kind = LrScheduleKind::kCosine, .warmup_steps = 2, .total_steps = kSteps};
  return c;
}

// A model with SGD-like state: parameters and one optimizer buffer, v = scaled gradient,
// p -= lr * v (so a rank one step behind can finish the update from v alone); or with AdamW's
// state, two buffers updated by runtime::Optimizer.
class ToyState final : public StepState {
 public:
  explicit ToyState(int rank, ToyUpdate update = ToyUpdate::kToySgd)
      : rank_(rank),
        update_(update),
        n_buffers_(update == ToyUpdate::kAdamW ? 2 : 1),
        state_((1 + n_buffers_) * kParams, 0.5f),
        grads_(kParams),
        adamw_(kParams, toy_adamw()) {
    std::fill(state_.begin() + kParams, state_.end(), 0.0f);
    if (update_ == ToyUpdate::kAdamW) adamw_.place_state(std::span(state_).subspan(kParams));
    parts_.push_back(params());
    for (size_t j = 0; j < n_buffers_; ++j) {
      parts_.push_back(std::span(state_).subspan((1 + j) * kParams, kParams));
    }
  }

  void compute(uint64_t step) {
    step_ = step;
    for (size_t i = 0; i < kParams; ++i) grads_[i] = toy_gradient(rank_, step, i, params()[i]);
  }
  std::span<float> params() { return std::span(state_).first(kParams); }
  std::span<float> velocity() { return std::span(state_).subspan(kParams); }

  std::span<float> gradient() override { return grads_; }
  void recompute_gradient() override {
    ++recomputed;
    compute(step_);
  }
  void apply_update(float grad_scale, uint64_t step) override {
    if (update_ == ToyUpdate::kAdamW) {
      adamw_.step(params(), grads_, grad_scale, step);
      return;
    }
    for (size_t i = 0; i < kParams; ++i) {
      velocity()[i] = grads_[i] * grad_scale;
      params()[i] -= kLr * velocity()[i];
    }
  }
  StateLayout layout() const override {
    return {.n_params = kParams, .n_optimizer_buffers = n_buffers_};
  }
  std::span<const std::span<float>> host_state() override { return parts_; }
  void download_state() override {}
  void upload_state() override {}
  void apply_update_from_optimizer_state(uint64_t step) override {
    ++from_optimizer_state;
    if (update_ == ToyUpdate::kAdamW) {
      adamw_.apply_update_from_state(params(), step);
      return;
    }
    for (size_t i = 0; i < kParams; ++i) params()[i] -= kLr * velocity()[i];
  }
  size_t n_state_floats() const { return state_.size(); }

  int recomputed = 0;
  int from_optimizer_state = 0;  // velocity-only catch-ups

 private:
  int rank_;
  ToyUpdate update_;
  size_t n_buffers_;
  uint64_t step_ = 0;
  std::vector<float> state_;
  std::vector<float> grads_;
  Optimizer adamw_;  // its state lies in state_ (ToyUpdate::kAdamW)
  std::vector<std::span<float>> parts_;
};

// The shipped exchange, checked after every sum: participants hold identical parameters, so
// each can recompute every member's gradient, and the ring's sum must match theirs.
class CheckedExchange final : public GradientExchange {
 public:
  CheckedExchange(Allreducer& allreducer, ToyState& state)
      : inner_(allreducer, state.gradient()), state_(state) {}
  void allreduce_sum(std::span<const int> members, uint64_t seq) override {
    inner_.allreduce_sum(members, seq);
    const uint64_t step = seq / StepExecutor::kAttemptsPerStep;
    for (size_t i = 0; i < kParams; ++i) {
      double expected = 0;
      for (int p : members) expected += toy_gradient(p, step, i, state_.params()[i]);
      const float sum = state_.gradient()[i];
      if (std::abs(sum - expected) > 1e-5 * (1 + std::abs(expected))) ++mismatches;
    }
  }
  int mismatches = 0;

 private:
  AllreducerExchange inner_;
  ToyState& state_;
};

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
  std::vector<float> state;  // parameters and the optimizer's buffers
  uint64_t steps_done = 0;
  int times_left_out = 0;
  uint64_t catch_ups = 0;
  int early_catch_ups = 0;  // received while the step they rejoin was still open
  int sum_mismatches = 0;
  int velocity_only = 0;  // catch-ups that sent only the optimizer buffers
  uint64_t torn = 0;      // catch-ups that failed the checksums
};

void run_job(int world, int backup, int slow_rank, std::vector<RankResult>& results,
             bool early_catch_up = true, ToyUpdate update = ToyUpdate::kToySgd) {
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
    Context ctx(transport, std::chrono::milliseconds(20'000));
    Allreducer allreducer(ctx, {.ring = {.segment_bytes = 64}, .max_elems = kParams});
    ToyState state(rank, update);
    CheckedExchange exchange(allreducer, state);
    Timeline timeline;  // disabled
    StepExecutor executor({.straggler_mode = backup > 0}, ctx,
                          *channels[static_cast<size_t>(rank)], exchange, state, nullptr,
                          timeline);
    uint64_t step = 0;
    bool over = false;
    while (step < kSteps && !over) {
      state.compute(step);
      if (rank == slow_rank) board.wait_closed(step);  // arrive only after the step closed
      const StepReport report = executor.run(step, 0);
      over = report.final_round;
      if (report.outcome == StepReport::Outcome::kCaughtUp) {
        if (report.order->early) ++out.early_catch_ups;
      } else {
        if (report.order->participants.size() < static_cast<size_t>(world)) ++out.times_left_out;
        if (rank == 0) board.closed(step);
      }
      step = report.next_step;
    }
    if (!over) step = executor.finish(step).next_step;
    if (rank == 0) board.finish();
    const float* first = state.host_state()[0].data();  // the parts, back to back
    out.state.assign(first, first + state.n_state_floats());
    out.steps_done = step;
    out.catch_ups = executor.catch_ups();
    out.velocity_only = state.from_optimizer_state;
    out.torn = executor.torn_catch_ups();
    out.sum_mismatches = exchange.mismatches;
  });
}

// (world size, early catch-ups on, update)
class StragglerProtocol
    : public ::testing::TestWithParam<std::tuple<int, bool, ToyUpdate>> {};

TEST_P(StragglerProtocol, SlowRankIsLeftOutCaughtUpAndEveryoneAgrees) {
  const auto [world, early, update] = GetParam();
  const int slow = world - 1;
  const size_t n_state = (update == ToyUpdate::kAdamW ? 3 : 2) * kParams;
  std::vector<RankResult> results;
  run_job(world, /*backup=*/1, slow, results, early, update);
  for (int r = 0; r < world; ++r) {
    const RankResult& res = results[static_cast<size_t>(r)];
    EXPECT_EQ(res.sum_mismatches, 0) << "rank " << r << ": all-reduce sums differ from the "
                                     << "participants' gradients";
    EXPECT_EQ(res.steps_done, kSteps) << "rank " << r;
    ASSERT_EQ(res.state.size(), n_state) << "rank " << r;
    for (size_t i = 0; i < res.state.size(); ++i) {
      ASSERT_EQ(res.state[i], results[0].state[i])
          << "rank " << r << " index " << i << " (part " << i / kParams
          << ": 0 parameters, then the optimizer's buffers) differs from rank 0";
    }
  }
  EXPECT_GE(results[0].times_left_out, 1) << "the slow rank was never left out";
  const RankResult& slow_result = results[static_cast<size_t>(slow)];
  EXPECT_GE(slow_result.catch_ups, 1u) << "the slow rank never caught up";
  EXPECT_EQ(slow_result.torn, 0u) << "a catch-up failed its checksums";
  // Whether a late READY finds a rank already waiting for the next step depends on thread
  // timing (the coordinator tests pin the rule down); none may happen while switched off.
  if (!early || world < 3) {  // with W = 2, b = 1 the first READY closes: no time to serve
    EXPECT_EQ(slow_result.early_catch_ups, 0) << "early catch-ups while impossible";
  }
}

INSTANTIATE_TEST_SUITE_P(Worlds, StragglerProtocol,
                         ::testing::Combine(::testing::Values(2, 3, 4, 5), ::testing::Bool(),
                                            ::testing::Values(ToyUpdate::kToySgd,
                                                              ToyUpdate::kAdamW)));

// The catch-up of a rank one step behind sends AdamW's moments only; the late rank recomputes
// its parameters with the parameter half of that step's update and ends bit for bit equal.
// Whether a late READY finds a donor waiting is thread timing, so runs repeat until one such
// catch-up happened (in about every other run at W = 5), each run checked in full.
TEST(StragglerProtocol, AdamWOptimizerOnlyCatchUpsKeepRanksEqual) {
  int velocity_only = 0;
  int runs = 0;
  for (; runs < 200 && velocity_only == 0; ++runs) {
    std::vector<RankResult> results;
    run_job(5, /*backup=*/1, /*slow_rank=*/4, results, true, ToyUpdate::kAdamW);
    for (const RankResult& r : results) {
      ASSERT_EQ(r.state, results[0].state) << "run " << runs << ": ranks differ";
      // A parameter recomputed wrongly fails the checksums and is asked for again in full:
      // the ranks would still agree, so count those too.
      ASSERT_EQ(r.torn, 0u) << "run " << runs << ": a catch-up failed its checksums";
      velocity_only += r.velocity_only;
    }
  }
  EXPECT_GE(velocity_only, 1) << "no catch-up sent the optimizer buffers only in " << runs
                              << " runs";
  RecordProperty("runs", runs);
}

// AdamW's state after a run differs from SGD's toy: the run really moved the moments.
TEST(StragglerProtocol, AdamWStateMovesAndPlainSyncAgrees) {
  std::vector<RankResult> plain;
  run_job(3, /*backup=*/0, /*slow_rank=*/-1, plain, true, ToyUpdate::kAdamW);
  ASSERT_EQ(plain[0].state.size(), 3 * kParams);
  EXPECT_NE(plain[0].state[kParams], 0.0f) << "first moment untouched";
  EXPECT_GT(plain[0].state[2 * kParams], 0.0f) << "second moment untouched";
  for (const RankResult& r : plain) EXPECT_EQ(r.state, plain[0].state);
}

TEST(StragglerProtocol, PlainSyncEqualsAFullAllreduceEveryStep) {
  std::vector<RankResult> plain;
  run_job(3, /*backup=*/0, /*slow_rank=*/-1, plain);
  for (const RankResult& r : plain) {
    EXPECT_EQ(r.times_left_out, 0);
    EXPECT_EQ(r.catch_ups, 0u);
    EXPECT_EQ(r.sum_mismatches, 0);
    EXPECT_EQ(r.state, plain[0].state);
  }
}

}  // namespace
}  // namespace resync::runtime
