// The convolutional layers: Conv2d (im2col + GEMM), MaxPool2d and Flatten. Activations are NCHW,
// i.e. row-major [batch x C*H*W], the same layout the Linear layer reads.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/conv2d.h"
#include "kernels/maxpool.h"
#include "models/layer.h"

namespace resync::models {

// 2-D convolution: weights W [out_c x in_c x k_h x k_w] row-major, then bias b [out_c].
// Initialised like PyTorch's default: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
// fan_in = in_c * k_h * k_w. The im2col scratch is allocated once, in reserve().
class Conv2d final : public Layer {
 public:
  // kPerSample is the default: on the cnn's layers at batch 64 it measured ~2x faster than
  // kBatched, and the whole cnn step 23 ms against 39 ms (tests/kernels/bench_conv.cpp). Its
  // im2col buffer (<= 320 KB) stays in L2, whereas the batched one streams ~20 MB per pass.
  explicit Conv2d(const kernels::Conv2dShape& shape,
                  kernels::ConvLowering lowering = kernels::ConvLowering::kPerSample);

  std::string name() const override;  // e.g. "conv 5x5 1->16 pad 2 (28x28->28x28)"
  size_t in_size() const override { return shape_.in_size(); }
  size_t out_size() const override { return shape_.out_size(); }
  size_t n_params() const override { return shape_.n_weights() + shape_.out_c; }
  void bind(std::span<float> params, std::span<float> grads) override;
  void init(SplitMix64& rng) override;
  void reserve(size_t max_batch) override;
  void forward(const float* x, float* y, size_t batch) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, size_t batch) override;

  const kernels::Conv2dShape& shape() const { return shape_; }

 private:
  kernels::Conv2dShape shape_;
  kernels::ConvLowering lowering_;
  std::vector<float> workspace_;
  float* w_ = nullptr;  // views into the model's buffers, set by bind()
  float* b_ = nullptr;
  float* dw_ = nullptr;
  float* db_ = nullptr;
};

// Max pooling without parameters (floor mode: rows/columns that do not fill a window are
// dropped). forward() keeps each window's argmax for up to max_batch samples (sized in
// reserve()); backward() routes dy to those positions, so it must follow the forward call on
// the same x, as Model::forward_backward does.
class MaxPool2d final : public Layer {
 public:
  explicit MaxPool2d(const kernels::Pool2dShape& shape);

  std::string name() const override;  // e.g. "maxpool 2x2/2 16x28x28->16x14x14"
  size_t in_size() const override { return shape_.in_size(); }
  size_t out_size() const override { return shape_.out_size(); }
  void reserve(size_t max_batch) override;
  void forward(const float* x, float* y, size_t batch) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, size_t batch) override;

  const kernels::Pool2dShape& shape() const { return shape_; }

 private:
  kernels::Pool2dShape shape_;
  size_t max_batch_ = 0;
  std::vector<uint32_t> argmax_;  // [max_batch x out_size]
};

// [batch x C x H x W] -> [batch x C*H*W]: the same bytes, so forward and backward are copies.
// It exists to name the shape change in the layer list (the Model gives every layer its own
// output buffer; the copy costs well under 1% of a cnn step).
class Flatten final : public Layer {
 public:
  Flatten(size_t channels, size_t height, size_t width);

  std::string name() const override;  // e.g. "flatten 32x7x7->1568"
  size_t in_size() const override { return c_ * h_ * w_; }
  size_t out_size() const override { return c_ * h_ * w_; }
  void forward(const float* x, float* y, size_t batch) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, size_t batch) override;

 private:
  size_t c_, h_, w_;
};

}  // namespace resync::models
