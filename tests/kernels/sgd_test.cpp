// SGD with momentum against PyTorch's update rule written out in double, and determinism.
#include "kernels/sgd.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "base/error.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::random_floats;

TEST(Sgd, MatchesPyTorchRuleOverSeveralSteps) {
  const size_t n = 1001;  // odd: exercises any vector remainder
  const SgdHyper h{0.05f, 0.9f, 1e-3f};
  const float grad_scale = 1.0f / 3.0f;  // e.g. average over three participants
  auto p = random_floats(n, 1);
  std::vector<float> v(n, 0.0f);
  std::vector<double> p_ref(p.begin(), p.end()), v_ref(n, 0.0);
  for (int step = 0; step < 5; ++step) {
    const auto g = random_floats(n, 100 + step);
    sgd_momentum_update(p, v, g, grad_scale, h);
    for (size_t i = 0; i < n; ++i) {
      const double gi = double(g[i]) * grad_scale + double(h.weight_decay) * p_ref[i];
      v_ref[i] = double(h.momentum) * v_ref[i] + gi;
      p_ref[i] -= double(h.lr) * v_ref[i];
    }
    for (size_t i = 0; i < n; ++i) {
      // Tolerance: a few float roundings per step, accumulated over the steps so far.
      ASSERT_NEAR(v[i], v_ref[i], 1e-6 * (step + 1)) << "v[" << i << "] step " << step;
      ASSERT_NEAR(p[i], p_ref[i], 1e-6 * (step + 1)) << "p[" << i << "] step " << step;
    }
  }
}

TEST(Sgd, PlainSgdWithoutMomentumIsExact) {
  std::vector<float> p = {1.0f, -2.0f, 0.5f}, v(3, 0.0f);
  const std::vector<float> g = {0.5f, 0.25f, -1.0f};
  sgd_momentum_update(p, v, g, 1.0f, SgdHyper{0.5f, 0.0f, 0.0f});
  EXPECT_EQ(p, (std::vector<float>{0.75f, -2.125f, 1.0f}));
}

TEST(Sgd, BitwiseDeterministic) {
  const size_t n = 4099;
  const SgdHyper h{0.1f, 0.9f, 5e-4f};
  auto p1 = random_floats(n, 7), p2 = p1;
  auto v1 = random_floats(n, 8), v2 = v1;
  for (int step = 0; step < 3; ++step) {
    const auto g = random_floats(n, 9 + step);
    sgd_momentum_update(p1, v1, g, 0.25f, h);
    // Same values through a differently aligned buffer: no alignment-dependent code path.
    std::vector<float> p_off(n + 1), v_off(n + 1), g_off(n + 1);
    std::memcpy(p_off.data() + 1, p2.data(), n * sizeof(float));
    std::memcpy(v_off.data() + 1, v2.data(), n * sizeof(float));
    std::memcpy(g_off.data() + 1, g.data(), n * sizeof(float));
    sgd_momentum_update(std::span(p_off).subspan(1), std::span(v_off).subspan(1),
                        std::span<const float>(g_off).subspan(1), 0.25f, h);
    std::memcpy(p2.data(), p_off.data() + 1, n * sizeof(float));
    std::memcpy(v2.data(), v_off.data() + 1, n * sizeof(float));
  }
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(std::memcmp(&p1[i], &p2[i], sizeof(float)), 0)
        << "p[" << i << "]: " << p1[i] << " vs " << p2[i];
    ASSERT_EQ(std::memcmp(&v1[i], &v2[i], sizeof(float)), 0)
        << "v[" << i << "]: " << v1[i] << " vs " << v2[i];
  }
}

TEST(Sgd, NewVelocityRecomputesTheUpdatedParametersBitForBit) {
  // What a rank one step behind does with an early catch-up: it holds the parameters before
  // the update, receives the velocity after it, and must end with the updater's bits.
  const size_t n = 4099;
  const SgdHyper h{0.05f, 0.9f, 1e-4f};
  std::vector<float> params = random_floats(n, 1);
  std::vector<float> velocity = random_floats(n, 2);
  const std::vector<float> grads = random_floats(n, 3);
  std::vector<float> behind = params;
  sgd_momentum_update(params, velocity, grads, 0.25f, h);
  sgd_apply_velocity(behind, velocity, h.lr);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(std::memcmp(&behind[i], &params[i], sizeof(float)), 0)
        << "element " << i << ": " << behind[i] << " vs " << params[i];
  }
  std::vector<float> short_velocity(n - 1);
  EXPECT_THROW(sgd_apply_velocity(behind, short_velocity, h.lr), InvalidArgument);
}

TEST(Sgd, RejectsMismatchedSizes) {
  std::vector<float> p(4), v(3), g(4);
  EXPECT_THROW(sgd_momentum_update(p, v, g, 1.0f, SgdHyper{}), InvalidArgument);
  std::vector<float> empty;
  EXPECT_NO_THROW(sgd_momentum_update(empty, empty, empty, 1.0f, SgdHyper{}));
}

}  // namespace
}  // namespace resync::kernels
