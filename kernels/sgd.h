// SGD with momentum and weight decay over a flat parameter buffer (PyTorch semantics).
#pragma once

#include <span>

namespace resync::kernels {

struct SgdHyper {
  float lr = 0.01f;
  float momentum = 0.0f;
  float weight_decay = 0.0f;
};

// For each i: g = grads[i] * grad_scale + wd * params[i]; v = momentum * v + g; p -= lr * v.
// grad_scale folds in the 1/|participants| of an all-reduce sum. Deterministic: equal inputs give
// equal bits, so every rank that applies the same averaged gradient stays bitwise identical.
// The three spans must have the same size (InvalidArgument otherwise).
void sgd_momentum_update(std::span<float> params, std::span<float> velocity,
                         std::span<const float> grads, float grad_scale, const SgdHyper& h);

// params -= lr * velocity: the parameter half of sgd_momentum_update, for a rank that holds the
// parameters before an update and receives the velocity after it (same bits as the update).
void sgd_apply_velocity(std::span<float> params, std::span<const float> velocity, float lr);

}  // namespace resync::kernels
