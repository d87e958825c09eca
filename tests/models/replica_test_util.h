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

// Labels per sample of the spec's model: 1 for a classifier, the context for gpt.
inline size_t labels_per_sample(const models::ModelSpec& spec) {
  return models::build_layer_stack(spec).layers.back()->out_size() / spec.n_classes;
}

// Inputs uniform in [-1, 1) (for gpt: tokens, integral floats in [0, n_classes)), labels uniform
// over the spec's classes, labels_per_sample(spec) of them per sample.
inline Batch seeded_batch(const models::ModelSpec& spec, size_t n, uint64_t seed) {
  SplitMix64 rng(seed);
  const bool tokens = spec.name == "gpt";
  Batch b{std::vector<float>(n * spec.input_size()),
          std::vector<int32_t>(n * labels_per_sample(spec))};
  for (float& v : b.x) {
    v = tokens ? static_cast<float>(rng.next() % spec.n_classes)
               : static_cast<float>(2.0 * rng.uniform() - 1.0);
  }
  for (int32_t& label : b.y) label = static_cast<int32_t>(rng.next() % spec.n_classes);
  return b;
}

}  // namespace resync::runtime::testing
