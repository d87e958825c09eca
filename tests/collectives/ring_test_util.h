// Deterministic inputs and result checks shared by the ring all-reduce tests of both tiers.
#pragma once

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

namespace resync::collectives::test {

// A float in [-1, 1) with a full 24-bit mantissa, so that sums round and the order of
// additions matters (what makes the bitwise cross-rank check meaningful).
inline float input_value(int rank, size_t index, uint64_t salt = 0) {
  uint64_t x = (static_cast<uint64_t>(rank) << 40) ^ index ^ (salt * 0x9e3779b97f4a7c15ULL);
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return static_cast<float>(static_cast<double>(x >> 40) / static_cast<double>(1 << 23) - 1.0);
}

inline void fill_input(std::span<float> data, int rank, uint64_t salt = 0) {
  for (size_t i = 0; i < data.size(); ++i) data[i] = input_value(rank, i, salt);
}

// FNV-1a over the bytes: equal hashes on every rank <=> (practically) bitwise-equal buffers.
inline uint64_t bytes_hash(std::span<const float> data) {
  uint64_t h = 0xcbf29ce484222325ULL;
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  for (size_t i = 0; i < data.size_bytes(); ++i) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

// Checks `got` against the double-precision sum of the participants' inputs; a float sum of
// p terms is within (p-1)·eps·Σ|x| of it. Reports at most a few failures, each naming the
// rank, index, expected and actual value.
inline void expect_sum_of(std::span<const float> got, std::span<const int> participants, int rank,
                          uint64_t salt = 0) {
  int n_reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double sum = 0.0;
    double sum_abs = 0.0;
    for (int q : participants) {
      const double v = input_value(q, i, salt);
      sum += v;
      sum_abs += std::fabs(v);
    }
    const double tol = 2.0 * participants.size() * FLT_EPSILON * sum_abs + 1e-30;
    if (!(std::fabs(got[i] - sum) <= tol)) {
      ADD_FAILURE() << "rank " << rank << " index " << i << " of " << got.size() << ": expected "
                    << sum << " (tolerance " << tol << "), actual " << got[i];
      if (++n_reported == 5) return;
    }
  }
}

// Index of the first element where two buffers differ bitwise, or -1.
inline long first_bitwise_difference(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return static_cast<long>(i);
  }
  return -1;
}

}  // namespace resync::collectives::test
