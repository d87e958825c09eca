// AdamW over a flat parameter buffer (PyTorch's torch.optim.AdamW: bias correction, decoupled
// weight decay, eps outside the square root) and the global gradient norm for clipping.
#pragma once

#include <cstdint>
#include <span>

namespace resync::kernels {

struct AdamWHyper {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;
};

// The scalars of one update, the same on every rank: computed once on the host in double and
// rounded to float, then applied per element (kernels/elementwise.h).
struct AdamWStep {
  float beta1 = 0, one_minus_beta1 = 0, beta2 = 0, one_minus_beta2 = 0, eps = 0;
  float decay = 1;       // 1 - lr * weight_decay
  float step_size = 0;   // lr / (1 - beta1^t)
  float bias2_sqrt = 1;  // sqrt(1 - beta2^t)
};

// The scalars of update number t (t >= 1: the first update is t = 1) at learning rate lr.
// InvalidArgument for t == 0.
AdamWStep adamw_step(const AdamWHyper& h, float lr, uint64_t t);

// For each i: the moments with grads[i] * grad_scale, then the parameter (decay and the
// bias-corrected step). Deterministic: equal inputs give equal bits. The four spans must have
// the same size (InvalidArgument otherwise).
void adamw_update(std::span<float> params, std::span<float> m, std::span<float> v,
                  std::span<const float> grads, float grad_scale, const AdamWStep& s);

// The parameter half of adamw_update, for a rank that holds the parameters before an update and
// receives the moments after it: the same bits as the update.
void adamw_apply_moments(std::span<float> params, std::span<const float> m,
                         std::span<const float> v, const AdamWStep& s);

// The sum of squares of `values` in double, added in index order (the same on every rank).
double sum_of_squares(std::span<const float> values);

// The factor to multiply a gradient by so that its L2 norm is at most max_norm, as
// torch.nn.utils.clip_grad_norm_: min(1, max_norm / (norm + 1e-6)), norm = sqrt(sum_sq) *
// grad_scale. 1 when max_norm <= 0 (no clipping).
double clip_factor(double sum_sq, float grad_scale, float max_norm);

}  // namespace resync::kernels
