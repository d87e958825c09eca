// The layer interface of resync models: a layer owns no parameters, it holds views into the
// model's one flat parameter buffer and one flat gradient buffer (llm.c style).
#pragma once

#include <cstddef>
#include <span>
#include <string>

#include "base/random.h"

namespace resync::models {

// Sizes are elements per sample; activations are row-major [batch x size].
class Layer {
 public:
  virtual ~Layer() = default;

  virtual std::string name() const = 0;  // e.g. "linear 784->512"
  virtual size_t in_size() const = 0;
  virtual size_t out_size() const = 0;

  // Parameters are laid out contiguously in the order the model binds its layers; the layer
  // documents its own internal layout (checkpoints depend on it).
  virtual size_t n_params() const { return 0; }
  virtual void bind(std::span<float> /*params*/, std::span<float> /*grads*/) {}
  // Draws this layer's initial parameters from rng (called in layer order, once).
  virtual void init(SplitMix64& /*rng*/) {}
  // Allocates any scratch a layer needs for up to max_batch samples, once, before any step.
  virtual void reserve(size_t /*max_batch*/) {}

  // y = f(x) for `batch` samples.
  virtual void forward(const float* x, float* y, size_t batch) = 0;
  // Given x, y = f(x) and dy = dL/dy: overwrites this layer's parameter gradients with dL/dθ
  // and, unless dx is null (the first layer needs no input gradient), writes dx = dL/dx.
  virtual void backward(const float* x, const float* y, const float* dy, float* dx,
                        size_t batch) = 0;
};

}  // namespace resync::models
