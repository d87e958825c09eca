// AdamW against PyTorch's update rule written out in double, the parameter half reproducing the
// update bit for bit, and the gradient norm used for clipping.
#include "kernels/adamw.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "base/error.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::random_floats;

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// torch.optim.AdamW (amsgrad off, maximize off) in double:
//   p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
TEST(AdamW, MatchesPyTorchRuleOverSeveralSteps) {
  const size_t n = 1001;  // odd: exercises any vector remainder
  const AdamWHyper h{.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
  const float grad_scale = 1.0f / 3.0f;
  const float lrs[] = {1e-3f, 2e-3f, 3e-3f, 2.5e-3f, 1e-3f, 5e-4f};  // a schedule's rates
  auto p = random_floats(n, 1);
  std::vector<float> m(n, 0.0f), v(n, 0.0f);
  std::vector<double> p_ref(p.begin(), p.end()), m_ref(n, 0.0), v_ref(n, 0.0);
  for (int step = 0; step < 6; ++step) {
    const auto g = random_floats(n, 100 + step, -2.0f, 2.0f);
    const uint64_t t = uint64_t(step) + 1;
    adamw_update(p, m, v, g, grad_scale, adamw_step(h, lrs[step], t));
    const double lr = lrs[step];
    for (size_t i = 0; i < n; ++i) {
      const double gi = double(g[i]) * grad_scale;
      p_ref[i] *= 1.0 - lr * h.weight_decay;
      m_ref[i] = h.beta1 * m_ref[i] + (1.0 - h.beta1) * gi;
      v_ref[i] = h.beta2 * v_ref[i] + (1.0 - h.beta2) * gi * gi;
      const double denom =
          std::sqrt(v_ref[i]) / std::sqrt(1.0 - std::pow(double(h.beta2), double(t))) + h.eps;
      p_ref[i] -= lr / (1.0 - std::pow(double(h.beta1), double(t))) * m_ref[i] / denom;
    }
    for (size_t i = 0; i < n; ++i) {
      // A few float roundings per step; an Adam step moves p by about lr, so its rounding
      // is far below 1e-6.
      ASSERT_NEAR(m[i], m_ref[i], 1e-6 * (step + 1)) << "m[" << i << "] step " << step;
      ASSERT_NEAR(v[i], v_ref[i], 1e-6 * (step + 1)) << "v[" << i << "] step " << step;
      ASSERT_NEAR(p[i], p_ref[i], 2e-6 * (step + 1)) << "p[" << i << "] step " << step;
    }
  }
}

// The first step of Adam moves each parameter by lr * sign(g) (bias correction undoes the
// moments' warm start), plus the decoupled decay.
TEST(AdamW, FirstStepIsLrTimesTheSignOfTheGradient) {
  std::vector<float> p = {1.0f, -2.0f, 0.5f}, m(3, 0.0f), v(3, 0.0f);
  const std::vector<float> g = {0.3f, -4.0f, 1e-3f};
  adamw_update(p, m, v, g, 1.0f,
               adamw_step({.beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-12f, .weight_decay = 0.5f},
                          0.01f, 1));
  EXPECT_NEAR(p[0], 1.0 * (1 - 0.005) - 0.01, 1e-6);
  EXPECT_NEAR(p[1], -2.0 * (1 - 0.005) + 0.01, 1e-6);
  EXPECT_NEAR(p[2], 0.5 * (1 - 0.005) - 0.01, 1e-6);
}

// A rank one step behind receives m and v after the update and recomputes p: the same bits.
TEST(AdamW, ParameterHalfReproducesTheUpdateBitForBit) {
  const size_t n = 777;
  const AdamWHyper h{};
  auto donor = random_floats(n, 5);
  std::vector<float> m(n, 0.0f), v(n, 0.0f);
  for (uint64_t t = 1; t <= 5; ++t) {
    std::vector<float> late = donor;  // the parameters before this update
    const AdamWStep s = adamw_step(h, 3e-3f * float(t), t);
    adamw_update(donor, m, v, random_floats(n, 40 + t, -5.0f, 5.0f), 0.5f, s);
    adamw_apply_moments(late, m, v, s);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(bits_of(late[i]), bits_of(donor[i])) << "t " << t << " index " << i;
    }
  }
}

TEST(AdamW, StepScalars) {
  const AdamWStep s = adamw_step({.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
                                  .weight_decay = 0.1f},
                                 2e-3f, 2);
  EXPECT_FLOAT_EQ(s.decay, 1.0f - 2e-4f);
  EXPECT_FLOAT_EQ(s.step_size, float(2e-3 / (1 - 0.9 * 0.9)));
  EXPECT_FLOAT_EQ(s.bias2_sqrt, float(std::sqrt(1 - 0.95 * 0.95)));
  EXPECT_FLOAT_EQ(s.one_minus_beta1, 0.1f);
  EXPECT_THROW(adamw_step({}, 1e-3f, 0), InvalidArgument);
}

TEST(AdamW, SizeMismatchIsRejectedAndEmptyIsFine) {
  std::vector<float> p(4), m(4), v(3), g(4);
  EXPECT_THROW(adamw_update(p, m, v, g, 1.0f, adamw_step({}, 1e-3f, 1)), InvalidArgument);
  EXPECT_THROW(adamw_apply_moments(p, m, v, adamw_step({}, 1e-3f, 1)), InvalidArgument);
  std::vector<float> empty;
  EXPECT_NO_THROW(adamw_update(empty, empty, empty, empty, 1.0f, adamw_step({}, 1e-3f, 1)));
}

TEST(GradClip, SumOfSquaresAndTorchsClipFactor) {
  const std::vector<float> g = {3.0f, -4.0f};
  EXPECT_EQ(sum_of_squares(g), 25.0);
  EXPECT_EQ(sum_of_squares(std::vector<float>{}), 0.0);
  EXPECT_EQ(clip_factor(25.0, 1.0f, 0.0f), 1.0) << "max_norm 0: no clipping";
  EXPECT_EQ(clip_factor(25.0, 1.0f, 10.0f), 1.0) << "within the bound: unchanged";
  EXPECT_DOUBLE_EQ(clip_factor(25.0, 1.0f, 1.0f), 1.0 / (5.0 + 1e-6));
  // The norm of the averaged gradient: a sum over 2 ranks scaled by 1/2 has norm 2.5.
  EXPECT_DOUBLE_EQ(clip_factor(25.0, 0.5f, 1.0f), 1.0 / (2.5 + 1e-6));
}

}  // namespace
}  // namespace resync::kernels
