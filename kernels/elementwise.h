// Elementwise math shared by the CPU and CUDA backends: ReLU, the softmax cross-entropy
// gradient and the SGD-momentum and AdamW element updates. Written once so the CPU tests check
// the GPU math.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define RESYNC_HOST_DEVICE __host__ __device__
#else
#define RESYNC_HOST_DEVICE
#endif

namespace resync::kernels {

// max(0, x). Written as `x < 0 ? 0 : x` so that a NaN propagates (as in PyTorch) and a
// diverging run shows up in the loss instead of being silently clamped.
RESYNC_HOST_DEVICE inline float relu(float x) { return x < 0.0f ? 0.0f : x; }

// d relu(x) / dx * dy, with the subgradient 0 at x == 0 (PyTorch's choice).
RESYNC_HOST_DEVICE inline float relu_grad(float x, float dy) { return x > 0.0f ? dy : 0.0f; }

// exp(x - row_max): every exponent is <= 0, so nothing overflows even for logits of 1e4.
RESYNC_HOST_DEVICE inline float shifted_exp(float x, float row_max) {
  return std::exp(x - row_max);
}

// d(mean loss)/d logit for one class: (softmax - onehot) / batch, with softmax = e * inv_sum.
RESYNC_HOST_DEVICE inline float xent_grad(float e, float inv_sum, bool is_label, float inv_batch) {
  return (e * inv_sum - (is_label ? 1.0f : 0.0f)) * inv_batch;
}

// One parameter of SGD with momentum and weight decay, PyTorch semantics (no dampening):
//   g = grad * grad_scale + wd * p;  v = momentum * v + g;  p -= lr * v.
// The operation order is fixed (no reassociation), so equal inputs give equal bits on every rank
// of one backend (nvcc may fuse the multiply-adds, so CPU and GPU can differ in the last bit).
// The parameter half of the update: p -= lr * v with the new velocity. A rank one step behind
// that receives the new velocity recomputes the new parameter with it, bit for bit.
RESYNC_HOST_DEVICE inline void sgd_velocity_element(float& p, float v, float lr) { p = p - lr * v; }

RESYNC_HOST_DEVICE inline void sgd_momentum_element(float& p, float& v, float grad,
                                                    float grad_scale, float lr, float momentum,
                                                    float weight_decay) {
  const float g = grad * grad_scale + weight_decay * p;
  v = momentum * v + g;
  sgd_velocity_element(p, v, lr);
}

// One parameter of AdamW (PyTorch's torch.optim.AdamW), in two halves so that a rank holding
// the parameter before an update and the moments after it recomputes the parameter bit for bit.
// The per-step scalars (kernels/adamw.h, AdamWStep) are computed once on the host.
// The moments: g = grad * grad_scale; m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g.
RESYNC_HOST_DEVICE inline void adamw_moments_element(float& m, float& v, float grad,
                                                     float grad_scale, float beta1,
                                                     float one_minus_beta1, float beta2,
                                                     float one_minus_beta2) {
  const float g = grad * grad_scale;
  m = beta1 * m + one_minus_beta1 * g;
  v = beta2 * v + one_minus_beta2 * (g * g);
}

// The parameter: decoupled weight decay p *= 1 - lr * wd, then
// p -= step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps), step_size = lr / (1 - b1^t).
RESYNC_HOST_DEVICE inline void adamw_param_element(float& p, float m, float v, float decay,
                                                   float step_size, float bias2_sqrt, float eps) {
  const float denom = std::sqrt(v) / bias2_sqrt + eps;
  p = p * decay;
  p = p - step_size * (m / denom);
}

}  // namespace resync::kernels
