// runtime::Optimizer: the learning-rate schedule, SGD's bits unchanged, AdamW's state and
// parameter half, clipping of the averaged gradient, updates on a slice (an async server's
// shard), and placing the state in caller storage.
#include "runtime/train/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numbers>
#include <vector>

#include "base/error.h"
#include "kernels/adamw.h"
#include "kernels/sgd.h"
#include "tests/kernels/test_util.h"

namespace resync::runtime {
namespace {

using kernels::testing::random_floats;

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

void expect_same_bits(std::span<const float> a, std::span<const float> b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(bits_of(a[i]), bits_of(b[i])) << what << ": index " << i << " " << a[i] << " vs "
                                            << b[i];
  }
}

OptimizerConfig adamw(float clip = 0.0f) {
  OptimizerConfig c;
  c.kind = OptimizerKind::kAdamW;
  c.lr = 2e-3f;
  c.weight_decay = 0.1f;
  c.grad_clip = clip;
  c.schedule = {.kind = LrScheduleKind::kCosine, .warmup_steps = 3, .min_lr = 1e-4f,
                .total_steps = 20};
  return c;
}

TEST(LrSchedule, ConstantIsTheRateItself) {
  const LrSchedule constant;
  for (uint64_t s : {0u, 1u, 1000u}) EXPECT_EQ(bits_of(constant.lr_at(0.05f, s)), bits_of(0.05f));
}

TEST(LrSchedule, WarmUpThenCosineToMinLr) {
  const LrSchedule s{.kind = LrScheduleKind::kCosine, .warmup_steps = 4, .min_lr = 0.1f,
                     .total_steps = 14};
  EXPECT_FLOAT_EQ(s.lr_at(1.0f, 0), 0.25f);
  EXPECT_FLOAT_EQ(s.lr_at(1.0f, 1), 0.5f);
  EXPECT_FLOAT_EQ(s.lr_at(1.0f, 3), 1.0f);
  EXPECT_FLOAT_EQ(s.lr_at(1.0f, 4), 1.0f) << "the decay starts at the rate itself";
  EXPECT_FLOAT_EQ(s.lr_at(1.0f, 9), 0.55f) << "half way: the mean of lr and min_lr";
  EXPECT_FLOAT_EQ(s.lr_at(1.0f, 14), 0.1f);
  EXPECT_FLOAT_EQ(s.lr_at(1.0f, 100), 0.1f) << "after the run: min_lr";
  const double at6 = 0.1 + 0.5 * (1 + std::cos(std::numbers::pi * 0.2)) * 0.9;
  EXPECT_FLOAT_EQ(s.lr_at(1.0f, 6), float(at6));
  const LrSchedule warm_constant{.warmup_steps = 2};
  EXPECT_FLOAT_EQ(warm_constant.lr_at(0.4f, 0), 0.2f);
  EXPECT_EQ(warm_constant.lr_at(0.4f, 2), 0.4f);
}

// SGD through the Optimizer at a constant rate is the kernel's update, bit for bit: what every
// run did before AdamW.
TEST(Optimizer, SgdKeepsTheKernelsBits) {
  const size_t n = 513;
  const kernels::SgdHyper h{.lr = 0.05f, .momentum = 0.9f, .weight_decay = 1e-4f};
  Optimizer opt(n, h);
  ASSERT_EQ(opt.n_buffers(), 1u);
  auto p = random_floats(n, 1);
  auto p_ref = p;
  std::vector<float> v_ref(n, 0.0f);
  for (uint64_t step = 0; step < 4; ++step) {
    const auto g = random_floats(n, 10 + step);
    opt.step(p, g, 0.5f, step);
    kernels::sgd_momentum_update(p_ref, v_ref, g, 0.5f, h);
  }
  expect_same_bits(p, p_ref, "parameters");
  expect_same_bits(opt.buffer(0), v_ref, "velocity");
}

TEST(Optimizer, AdamWHasTwoBuffersAndItsParameterHalfMatches) {
  const size_t n = 300;
  Optimizer opt(n, adamw(0.5f));
  ASSERT_EQ(opt.n_buffers(), 2u);
  ASSERT_EQ(opt.state().size(), 2 * n);
  auto p = random_floats(n, 2);
  for (uint64_t step = 0; step < 8; ++step) {
    std::vector<float> late = p;
    opt.step(p, random_floats(n, 20 + step, -3.0f, 3.0f), 0.25f, step);
    opt.apply_update_from_state(late, step);
    expect_same_bits(late, p, "parameters from the state");
  }
  for (float x : opt.buffer(1)) ASSERT_GE(x, 0.0f) << "a second moment is never negative";
}

// Clipping scales the averaged gradient to norm grad_clip: the same as feeding the clipped
// gradient to an unclipped optimizer.
TEST(Optimizer, ClippingBoundsTheAveragedGradientsNorm) {
  const size_t n = 64;
  Optimizer clipped(n, adamw(0.1f));
  Optimizer plain(n, adamw(0.0f));
  auto p1 = random_floats(n, 3);
  auto p2 = p1;
  const auto g = random_floats(n, 4, -1.0f, 1.0f);
  const float scale = 0.5f;
  const double norm = std::sqrt(kernels::sum_of_squares(g)) * scale;
  ASSERT_GT(norm, 0.1);
  clipped.step(p1, g, scale, 0);
  plain.step(p2, g, float(scale * (0.1 / (norm + 1e-6))), 0);
  expect_same_bits(p1, p2, "parameters");
  expect_same_bits(clipped.state(), plain.state(), "moments");
  // Below the bound nothing changes.
  Optimizer loose(n, adamw(1e6f));
  auto p3 = random_floats(n, 3);
  Optimizer none(n, adamw(0.0f));
  auto p4 = p3;
  loose.step(p3, g, scale, 0);
  none.step(p4, g, scale, 0);
  expect_same_bits(p3, p4, "parameters within the bound");
}

// An async server updates its shard: the slices of the state it owns, the same bits as the
// whole buffer updated at once.
TEST(Optimizer, SliceUpdatesMatchTheWholeBuffer) {
  for (OptimizerKind kind : {OptimizerKind::kSgd, OptimizerKind::kAdamW}) {
    const size_t n = 101;
    OptimizerConfig c = adamw();
    c.kind = kind;
    c.momentum = 0.9f;
    Optimizer whole(n, c);
    Optimizer sharded(n, c);
    auto p1 = random_floats(n, 7);
    auto p2 = p1;
    for (uint64_t step = 0; step < 3; ++step) {
      const auto g = random_floats(n, 70 + step);
      whole.step(p1, g, 1.0f, step);
      for (size_t offset : {size_t{0}, size_t{34}, size_t{68}}) {
        const size_t len = std::min<size_t>(34, n - offset);
        sharded.step(std::span(p2).subspan(offset, len), std::span(g).subspan(offset, len),
                     1.0f, step, offset);
      }
    }
    expect_same_bits(p2, p1, "parameters");
    expect_same_bits(sharded.state(), whole.state(), "state");
  }
  Optimizer small(10, adamw());
  std::vector<float> p(5), g(5);
  EXPECT_THROW(small.step(p, g, 1.0f, 0, 6), InvalidArgument);
}

TEST(Optimizer, PlaceStateMovesBothBuffers) {
  const size_t n = 50;
  Optimizer opt(n, adamw());
  auto p = random_floats(n, 9);
  opt.step(p, random_floats(n, 10), 1.0f, 0);
  const std::vector<float> before(opt.state().begin(), opt.state().end());
  std::vector<float> storage(2 * n + 1, -7.0f);
  EXPECT_THROW(opt.place_state(std::span(storage).first(2 * n - 1)), InvalidArgument);
  opt.place_state(storage);
  EXPECT_EQ(opt.state().data(), storage.data());
  EXPECT_EQ(opt.buffer(1).data(), storage.data() + n);
  expect_same_bits(std::span(storage).first(2 * n), before, "placed state");
  EXPECT_EQ(storage.back(), -7.0f);
}

TEST(Optimizer, Names) {
  EXPECT_EQ(parse_optimizer("sgd"), OptimizerKind::kSgd);
  EXPECT_EQ(parse_optimizer("adamw"), OptimizerKind::kAdamW);
  EXPECT_EQ(optimizer_name(OptimizerKind::kAdamW), "adamw");
  EXPECT_THROW(parse_optimizer("adam"), InvalidArgument);
}

}  // namespace
}  // namespace resync::runtime
