// CPU kernels' vector helpers: 16-float vectors (GCC/Clang vector extensions; one AVX-512
// register, or two AVX2 / four SSE registers where the CPU lacks it), function clones for the
// wider vector units (picked once at load time by the dynamic linker), and lane-wise reductions
// whose order is fixed, so results are the same on every run (no -ffast-math reassociation).
// The helpers are always inlined, so no 64-byte vector crosses a call: files using them build
// with -Wno-psabi (GCC's note that such a call's ABI depends on AVX-512 does not apply).
// A scalar operand of a vector operation (`s * v`) is one broadcast from memory; building a
// vector from a scalar through a helper function compiled to lane-by-lane stack stores.
#pragma once

#include <cstddef>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define RESYNC_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RESYNC_VECTOR_CLONES
#endif

#if defined(__GNUC__)
#define RESYNC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RESYNC_ALWAYS_INLINE inline
#endif

namespace resync::kernels::simd {

inline constexpr size_t kLanes = 16;

#if defined(__GNUC__)
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
#endif

RESYNC_ALWAYS_INLINE Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

RESYNC_ALWAYS_INLINE void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// Sum of the lanes in a fixed order.
RESYNC_ALWAYS_INLINE float hsum(Vec v) {
  float s = 0.0f;
  for (size_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Sum of x[0..n): whole vectors lane-wise, then the lanes, then the tail.
RESYNC_ALWAYS_INLINE float sum(const float* x, size_t n) {
  Vec acc{};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(x + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

// Sum of x[i] * y[i] over [0, n), in the same order as sum().
RESYNC_ALWAYS_INLINE float dot(const float* x, const float* y, size_t n) {
  Vec acc{};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(x + i) * load(y + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

// max of x[0..n), n >= 1.
RESYNC_ALWAYS_INLINE float max(const float* x, size_t n) {
  float m = x[0];
  size_t i = 0;
  if (n >= kLanes) {
    Vec acc = load(x);
    for (i = kLanes; i + kLanes <= n; i += kLanes) {
      const Vec v = load(x + i);
      acc = v > acc ? v : acc;
    }
    m = acc[0];
    for (size_t l = 1; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

}  // namespace resync::kernels::simd
