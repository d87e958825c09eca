#include "kernels/sgd.h"

#include <fmt/format.h>

#include "base/error.h"
#include "kernels/elementwise.h"

namespace resync::kernels {

void sgd_momentum_update(std::span<float> params, std::span<float> velocity,
                         std::span<const float> grads, float grad_scale, const SgdHyper& h) {
  RESYNC_CHECK_ARG(params.size() == velocity.size() && params.size() == grads.size(),
                   fmt::format("sgd: sizes differ: params {}, velocity {}, grads {}", params.size(),
                               velocity.size(), grads.size()));
  float* p = params.data();
  float* v = velocity.data();
  const float* g = grads.data();
  for (size_t i = 0; i < params.size(); ++i) {
    sgd_momentum_element(p[i], v[i], g[i], grad_scale, h.lr, h.momentum, h.weight_decay);
  }
}

void sgd_apply_velocity(std::span<float> params, std::span<const float> velocity, float lr) {
  RESYNC_CHECK_ARG(params.size() == velocity.size(),
                   fmt::format("sgd: sizes differ: params {}, velocity {}", params.size(),
                               velocity.size()));
  for (size_t i = 0; i < params.size(); ++i) sgd_velocity_element(params[i], velocity[i], lr);
}

}  // namespace resync::kernels
