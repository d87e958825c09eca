// Deterministic test data for the kernel tests (a tiny LCG, independent of the code under test).
#pragma once

#include <cstdint>
#include <vector>

namespace resync::kernels::testing {

// Uniform floats in [lo, hi) from a fixed 64-bit LCG, so failures reproduce everywhere.
inline std::vector<float> random_floats(size_t n, uint64_t seed, float lo = -1.0f,
                                        float hi = 1.0f) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const float u = static_cast<float>(s >> 40) / static_cast<float>(1ull << 24);
    x = lo + (hi - lo) * u;
  }
  return v;
}

}  // namespace resync::kernels::testing
