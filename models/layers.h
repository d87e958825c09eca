// The layers of the MLP: Linear (y = x W^T + b) and ReLU, plus the softmax cross-entropy loss.
#pragma once

#include <cstdint>

#include "models/layer.h"

namespace resync::models {

// Fully connected: weights W [out x in] row-major, then bias b [out]; y = x W^T + b.
// Initialised like PyTorch's default: W, b ~ U(-1/sqrt(in), 1/sqrt(in)).
class Linear final : public Layer {
 public:
  Linear(size_t in_features, size_t out_features);

  std::string name() const override;
  size_t in_size() const override { return in_; }
  size_t out_size() const override { return out_; }
  size_t n_params() const override { return out_ * in_ + out_; }
  void bind(std::span<float> params, std::span<float> grads) override;
  void init(SplitMix64& rng) override;
  void forward(const float* x, float* y, size_t batch) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, size_t batch) override;

 private:
  size_t in_, out_;
  float* w_ = nullptr;  // views into the model's buffers, set by bind()
  float* b_ = nullptr;
  float* dw_ = nullptr;
  float* db_ = nullptr;
};

class Relu final : public Layer {
 public:
  explicit Relu(size_t size) : size_(size) {}

  std::string name() const override;
  size_t in_size() const override { return size_; }
  size_t out_size() const override { return size_; }
  void forward(const float* x, float* y, size_t batch) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, size_t batch) override;

 private:
  size_t size_;
};

// Softmax cross-entropy over logits [batch x n_classes] with int32 labels. Not a Layer: it ends
// the forward pass and starts the backward one.
class SoftmaxCrossEntropy {
 public:
  explicit SoftmaxCrossEntropy(size_t n_classes) : n_classes_(n_classes) {}

  size_t n_classes() const { return n_classes_; }
  // Returns the mean loss; writes dlogits = d(mean loss)/d logits; counts argmax hits if asked.
  float forward_backward(const float* logits, const int32_t* labels, float* dlogits, size_t batch,
                         size_t* n_correct = nullptr) const;
  // Summed loss and argmax hits, no gradient.
  double loss_sum(const float* logits, const int32_t* labels, size_t batch,
                  size_t* n_correct) const;

 private:
  size_t n_classes_;
};

}  // namespace resync::models
