// Pieces of registered models that the tests share, as an outside program would write them:
// a layer no device backend knows (Tanh) and the feature layers of a convolutional model in
// shapes no built-in uses (a strided convolution, an overlapping non-square pool).
#pragma once

#include <cmath>
#include <memory>
#include <string>

#include "models/conv_layers.h"
#include "models/layers.h"
#include "models/model.h"

namespace resync::models::testing {

// Like docs/examples/custom_model's Tanh: a CPU-only layer.
class Tanh final : public Layer {
 public:
  explicit Tanh(size_t size) : size_(size) {}
  std::string name() const override { return "tanh " + std::to_string(size_); }
  size_t in_size() const override { return size_; }
  size_t out_size() const override { return size_; }
  void forward(const float* x, float* y, size_t batch) override {
    for (size_t i = 0; i < batch * size_; ++i) y[i] = std::tanh(x[i]);
  }
  void backward(const float* /*x*/, const float* y, const float* dy, float* dx,
                size_t batch) override {
    if (dx == nullptr) return;
    for (size_t i = 0; i < batch * size_; ++i) dx[i] = dy[i] * (1.0f - y[i] * y[i]);
  }

 private:
  size_t size_;
};

// Linear 16, Tanh, Linear: the shape of docs/examples/custom_model's tanh-net.
inline LayerStack build_tanh_net(const ModelSpec& spec) {
  LayerStack stack;
  stack.label = "tanh-net";
  stack.layers.push_back(std::make_unique<Linear>(spec.input_size(), 16));
  stack.layers.push_back(std::make_unique<Tanh>(16));
  stack.layers.push_back(std::make_unique<Linear>(16, spec.n_classes));
  return stack;
}

// Appends conv 3x3 to 4 channels (stride 2, pad 1), ReLU, max-pool 3x2 with stride 1x2 (windows
// overlap, so the backward pass adds up) and Flatten to `stack`; returns the features' size.
inline size_t add_odd_conv_features(const ModelSpec& spec, LayerStack& stack) {
  const kernels::Conv2dShape conv{.in_c = spec.in_channels,
                                  .in_h = spec.in_height,
                                  .in_w = spec.in_width,
                                  .out_c = 4,
                                  .k_h = 3,
                                  .k_w = 3,
                                  .stride_h = 2,
                                  .stride_w = 2,
                                  .pad_h = 1,
                                  .pad_w = 1};
  const kernels::Pool2dShape pool{.channels = conv.out_c,
                                  .in_h = conv.out_h(),
                                  .in_w = conv.out_w(),
                                  .k_h = 3,
                                  .k_w = 2,
                                  .stride_h = 1,
                                  .stride_w = 2};
  stack.label = "odd-conv";
  stack.layers.push_back(std::make_unique<Conv2d>(conv));
  stack.layers.push_back(std::make_unique<Relu>(conv.out_size()));
  stack.layers.push_back(std::make_unique<MaxPool2d>(pool));
  stack.layers.push_back(std::make_unique<Flatten>(pool.channels, pool.out_h(), pool.out_w()));
  return pool.out_size();
}

}  // namespace resync::models::testing
