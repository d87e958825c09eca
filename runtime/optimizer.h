// SGD with momentum and weight decay over the model's flat parameter buffer. Its state (the
// velocity buffer) is part of what a catching-up rank receives.
#pragma once

#include <span>
#include <vector>

#include "kernels/sgd.h"

namespace resync::runtime {

class SgdOptimizer {
 public:
  SgdOptimizer(size_t n_params, kernels::SgdHyper hyper) : hyper_(hyper), velocity_(n_params, 0.0f) {}

  // params -= lr * v, v = momentum * v + grad_scale * grads + weight_decay * params.
  // grad_scale folds in the 1/|participants| average of the all-reduced sum.
  void step(std::span<float> params, std::span<const float> grads, float grad_scale) {
    kernels::sgd_momentum_update(params, velocity_, grads, grad_scale, hyper_);
  }

  std::span<float> state() { return velocity_; }
  std::span<const float> state() const { return velocity_; }

 private:
  kernels::SgdHyper hyper_;
  std::vector<float> velocity_;
};

}  // namespace resync::runtime
