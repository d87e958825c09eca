// SGD with momentum and weight decay over the model's flat parameter buffer. Its state (the
// velocity buffer) is part of what a catching-up rank receives.
#pragma once

#include <fmt/format.h>

#include <cstring>
#include <span>
#include <vector>

#include "base/error.h"
#include "kernels/sgd.h"

namespace resync::runtime {

class SgdOptimizer {
 public:
  // Its state beside the parameters (StateLayout::n_optimizer_buffers): the velocity.
  static constexpr size_t kBuffers = 1;

  SgdOptimizer(size_t n_params, kernels::SgdHyper hyper)
      : hyper_(hyper), owned_(n_params, 0.0f), velocity_(owned_) {}

  // Not copyable: a copy would share the velocity. Moving keeps it (a moved vector keeps its
  // heap buffer, so velocity_ stays valid in the new object).
  SgdOptimizer(const SgdOptimizer&) = delete;
  SgdOptimizer& operator=(const SgdOptimizer&) = delete;
  SgdOptimizer(SgdOptimizer&&) = default;
  SgdOptimizer& operator=(SgdOptimizer&&) = default;

  // params -= lr * v, v = momentum * v + grad_scale * grads + weight_decay * params.
  // grad_scale folds in the 1/|participants| average of the all-reduced sum.
  void step(std::span<float> params, std::span<const float> grads, float grad_scale) {
    kernels::sgd_momentum_update(params, velocity_, grads, grad_scale, hyper_);
  }

  // params -= lr * v: the parameter half of step(), for a rank that holds the parameters before
  // an update and the velocity after it (the same bits as step()).
  void apply_velocity(std::span<float> params) const {
    kernels::sgd_apply_velocity(params, velocity_, hyper_.lr);
  }

  // Moves the velocity into `storage` (at least as many floats as parameters, kept alive by the
  // caller), e.g. the node's shared-memory window, from which a late peer copies it. The current
  // values move along; state() then returns storage.first(n_params). InvalidArgument if too small.
  void place_state(std::span<float> storage) {
    RESYNC_CHECK_ARG(storage.size() >= velocity_.size(),
                     fmt::format("optimizer: velocity storage of {} floats for {} parameters",
                                 storage.size(), velocity_.size()));
    storage = storage.first(velocity_.size());
    // memmove: placing again into storage that overlaps the current one is allowed.
    if (!storage.empty() && storage.data() != velocity_.data()) {
      std::memmove(storage.data(), velocity_.data(), velocity_.size_bytes());
    }
    velocity_ = storage;
    owned_.clear();
    owned_.shrink_to_fit();
  }

  std::span<float> state() { return velocity_; }
  std::span<const float> state() const { return velocity_; }

 private:
  kernels::SgdHyper hyper_;
  std::vector<float> owned_;    // the velocity unless placed elsewhere
  std::span<float> velocity_;   // the live velocity
};

}  // namespace resync::runtime
