// Central finite differences for the model tests, with a per-element tolerance report.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace resync::models::testing {

// Uniform floats in [lo, hi) from a fixed LCG: test data independent of the code under test.
inline std::vector<float> random_floats(size_t n, uint64_t seed, float lo = -1.0f,
                                        float hi = 1.0f) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = lo + (hi - lo) * (static_cast<float>(s >> 40) / static_cast<float>(1ull << 24));
  }
  return v;
}

// Compares analytic[i] with (loss(v[i] + h) - loss(v[i] - h)) / 2h for every element of v,
// where h is the step actually representable in float. Fails with the index, both values and
// the tolerance abs_tol + rel_tol * |numeric|.
inline void expect_grad_matches(const std::string& what, std::span<float> v,
                                std::span<const float> analytic,
                                const std::function<double()>& loss, float eps, double abs_tol,
                                double rel_tol) {
  ASSERT_EQ(v.size(), analytic.size()) << what;
  size_t n_bad = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    const float saved = v[i];
    const float plus = saved + eps, minus = saved - eps;
    v[i] = plus;
    const double l_plus = loss();
    v[i] = minus;
    const double l_minus = loss();
    v[i] = saved;
    const double numeric = (l_plus - l_minus) / (double(plus) - double(minus));
    const double tol = abs_tol + rel_tol * std::fabs(numeric);
    if (std::fabs(analytic[i] - numeric) > tol && ++n_bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "]: expected (finite difference) " << numeric
                    << ", actual (backward) " << analytic[i] << ", tolerance " << tol;
    }
  }
  EXPECT_EQ(n_bad, 0u) << what << ": " << n_bad << " of " << v.size() << " elements differ";
}

}  // namespace resync::models::testing
