#include "models/layers.h"

#include <fmt/format.h>

#include <cmath>

#include "base/error.h"
#include "kernels/bias.h"
#include "kernels/gemm.h"
#include "kernels/relu.h"
#include "kernels/softmax_xent.h"

namespace resync::models {

using kernels::Transpose;

Linear::Linear(size_t in_features, size_t out_features) : in_(in_features), out_(out_features) {
  RESYNC_CHECK_ARG(in_ > 0 && out_ > 0,
                   fmt::format("linear layer sizes must be > 0, got {} -> {}", in_, out_));
}

std::string Linear::name() const { return fmt::format("linear {}->{}", in_, out_); }

void Linear::bind(std::span<float> params, std::span<float> grads) {
  RESYNC_CHECK(params.size() == n_params() && grads.size() == n_params(),
               fmt::format("{}: bound to {} params / {} grads, needs {}", name(), params.size(),
                           grads.size(), n_params()));
  w_ = params.data();
  b_ = w_ + out_ * in_;
  dw_ = grads.data();
  db_ = dw_ + out_ * in_;
}

void Linear::init(SplitMix64& rng) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
  for (size_t i = 0; i < n_params(); ++i) {
    w_[i] = static_cast<float>(bound * (2.0 * rng.uniform() - 1.0));  // b_ follows w_
  }
}

void Linear::forward(const float* x, float* y, size_t batch) {
  // y [batch x out] = x [batch x in] * W^T, then + b per row.
  kernels::gemm(Transpose::kNo, Transpose::kYes, batch, out_, in_, 1.0f, x, in_, w_, in_, 0.0f, y,
                out_);
  kernels::bias_add(y, b_, batch, out_);
}

void Linear::backward(const float* x, const float* /*y*/, const float* dy, float* dx,
                      size_t batch) {
  // dW [out x in] = dy^T [out x batch] * x [batch x in]; db = column sums of dy.
  kernels::gemm(Transpose::kYes, Transpose::kNo, out_, in_, batch, 1.0f, dy, out_, x, in_, 0.0f,
                dw_, in_);
  kernels::bias_grad(dy, db_, batch, out_);
  // dx [batch x in] = dy [batch x out] * W [out x in].
  if (dx != nullptr) {
    kernels::gemm(Transpose::kNo, Transpose::kNo, batch, in_, out_, 1.0f, dy, out_, w_, in_, 0.0f,
                  dx, in_);
  }
}

std::string Relu::name() const { return fmt::format("relu {}", size_); }

void Relu::forward(const float* x, float* y, size_t batch) {
  kernels::relu_forward(x, y, batch * size_);
}

void Relu::backward(const float* x, const float* /*y*/, const float* dy, float* dx, size_t batch) {
  if (dx != nullptr) kernels::relu_backward(x, dy, dx, batch * size_);
}

float SoftmaxCrossEntropy::forward_backward(const float* logits, const int32_t* labels,
                                            float* dlogits, size_t batch, size_t* n_correct) const {
  return kernels::softmax_xent_forward_backward(logits, labels, dlogits, batch, n_classes_,
                                                n_correct);
}

double SoftmaxCrossEntropy::loss_sum(const float* logits, const int32_t* labels, size_t batch,
                                     size_t* n_correct) const {
  const kernels::XentSums sums = kernels::softmax_xent_forward(logits, labels, batch, n_classes_);
  if (n_correct != nullptr) *n_correct = sums.n_correct;
  return sums.loss_sum;
}

}  // namespace resync::models
