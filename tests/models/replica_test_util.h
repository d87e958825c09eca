// A seeded mini-batch for a model spec, shared by the CPU and CUDA replica tests.
#pragma once

#include <cstdint>
#include <vector>

#include "base/random.h"
#include "models/model.h"

namespace resync::runtime::testing {

struct Batch {
  std::vector<float> x;
  std::vector<int32_t> y;
};

// Inputs uniform in [-1, 1), labels uniform over the spec's classes.
inline Batch seeded_batch(const models::ModelSpec& spec, size_t n, uint64_t seed) {
  SplitMix64 rng(seed);
  Batch b{std::vector<float>(n * spec.input_size()), std::vector<int32_t>(n)};
  for (float& v : b.x) v = static_cast<float>(2.0 * rng.uniform() - 1.0);
  for (int32_t& label : b.y) label = static_cast<int32_t>(rng.next() % spec.n_classes);
  return b;
}

}  // namespace resync::runtime::testing
