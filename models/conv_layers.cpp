#include "models/conv_layers.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "base/error.h"

namespace resync::models {

Conv2d::Conv2d(const kernels::Conv2dShape& shape, kernels::ConvLowering lowering)
    : shape_(shape), lowering_(lowering) {
  kernels::check_conv2d_shape(shape_);
}

std::string Conv2d::name() const {
  const auto& s = shape_;
  std::string text = fmt::format("conv {}x{} {}->{}", s.k_h, s.k_w, s.in_c, s.out_c);
  if (s.stride_h != 1 || s.stride_w != 1) {
    text += s.stride_h == s.stride_w ? fmt::format(" stride {}", s.stride_h)
                                     : fmt::format(" stride {}x{}", s.stride_h, s.stride_w);
  }
  if (s.pad_h != 0 || s.pad_w != 0) {
    text += s.pad_h == s.pad_w ? fmt::format(" pad {}", s.pad_h)
                               : fmt::format(" pad {}x{}", s.pad_h, s.pad_w);
  }
  return text + fmt::format(" ({}x{}->{}x{})", s.in_h, s.in_w, s.out_h(), s.out_w());
}

void Conv2d::bind(std::span<float> params, std::span<float> grads) {
  RESYNC_CHECK(params.size() == n_params() && grads.size() == n_params(),
               fmt::format("{}: bound to {} params / {} grads, needs {}", name(), params.size(),
                           grads.size(), n_params()));
  w_ = params.data();
  b_ = w_ + shape_.n_weights();
  dw_ = grads.data();
  db_ = dw_ + shape_.n_weights();
}

void Conv2d::init(SplitMix64& rng) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(shape_.col_rows()));
  for (size_t i = 0; i < n_params(); ++i) {
    w_[i] = static_cast<float>(bound * (2.0 * rng.uniform() - 1.0));  // b_ follows w_
  }
}

void Conv2d::reserve(size_t max_batch) {
  workspace_.assign(kernels::conv2d_workspace_elems(shape_, lowering_, max_batch), 0.0f);
}

void Conv2d::forward(const float* x, float* y, size_t batch) {
  kernels::conv2d_forward(shape_, lowering_, x, w_, b_, y, batch, workspace_);
}

void Conv2d::backward(const float* x, const float* /*y*/, const float* dy, float* dx,
                      size_t batch) {
  kernels::conv2d_backward(shape_, lowering_, x, w_, dy, dw_, db_, dx, batch, workspace_);
}

MaxPool2d::MaxPool2d(const kernels::Pool2dShape& shape) : shape_(shape) {
  kernels::check_pool2d_shape(shape_);
}

std::string MaxPool2d::name() const {
  const auto& s = shape_;
  const std::string window = s.k_h == s.k_w && s.stride_h == s.stride_w
                                 ? fmt::format("{}x{}/{}", s.k_h, s.k_w, s.stride_h)
                                 : fmt::format("{}x{}/{}x{}", s.k_h, s.k_w, s.stride_h, s.stride_w);
  return fmt::format("maxpool {} {}x{}x{}->{}x{}x{}", window, s.channels, s.in_h, s.in_w,
                     s.channels, s.out_h(), s.out_w());
}

void MaxPool2d::reserve(size_t max_batch) {
  max_batch_ = max_batch;
  argmax_.assign(max_batch * shape_.out_size(), 0);
}

void MaxPool2d::forward(const float* x, float* y, size_t batch) {
  RESYNC_CHECK_ARG(batch <= max_batch_, fmt::format("{}: batch {} exceeds the reserved {}",
                                                    name(), batch, max_batch_));
  kernels::maxpool_forward(shape_, x, y, argmax_.data(), batch);
}

void MaxPool2d::backward(const float* /*x*/, const float* /*y*/, const float* dy, float* dx,
                         size_t batch) {
  RESYNC_CHECK_ARG(batch <= max_batch_, fmt::format("{}: batch {} exceeds the reserved {}",
                                                    name(), batch, max_batch_));
  if (dx != nullptr) kernels::maxpool_backward(shape_, dy, argmax_.data(), dx, batch);
}

Flatten::Flatten(size_t channels, size_t height, size_t width)
    : c_(channels), h_(height), w_(width) {
  RESYNC_CHECK_ARG(c_ > 0 && h_ > 0 && w_ > 0,
                   fmt::format("flatten: sizes must be > 0, got {}x{}x{}", c_, h_, w_));
}

std::string Flatten::name() const {
  return fmt::format("flatten {}x{}x{}->{}", c_, h_, w_, out_size());
}

void Flatten::forward(const float* x, float* y, size_t batch) {
  std::copy(x, x + batch * out_size(), y);
}

void Flatten::backward(const float* /*x*/, const float* /*y*/, const float* dy, float* dx,
                       size_t batch) {
  if (dx != nullptr) std::copy(dy, dy + batch * in_size(), dx);
}

}  // namespace resync::models
