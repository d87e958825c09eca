#include "kernels/adamw.h"

#include <fmt/format.h>

#include <cmath>

#include "base/error.h"
#include "kernels/elementwise.h"

namespace resync::kernels {

AdamWStep adamw_step(const AdamWHyper& h, float lr, uint64_t t) {
  RESYNC_CHECK_ARG(t >= 1, "adamw: the first update is t = 1");
  const double b1 = h.beta1;
  const double b2 = h.beta2;
  const double td = static_cast<double>(t);
  AdamWStep s;
  s.beta1 = h.beta1;
  s.one_minus_beta1 = static_cast<float>(1.0 - b1);
  s.beta2 = h.beta2;
  s.one_minus_beta2 = static_cast<float>(1.0 - b2);
  s.eps = h.eps;
  s.decay = static_cast<float>(1.0 - double(lr) * double(h.weight_decay));
  s.step_size = static_cast<float>(double(lr) / (1.0 - std::pow(b1, td)));
  s.bias2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(b2, td)));
  return s;
}

void adamw_update(std::span<float> params, std::span<float> m, std::span<float> v,
                  std::span<const float> grads, float grad_scale, const AdamWStep& s) {
  RESYNC_CHECK_ARG(params.size() == m.size() && params.size() == v.size() &&
                       params.size() == grads.size(),
                   fmt::format("adamw: sizes differ: params {}, m {}, v {}, grads {}",
                               params.size(), m.size(), v.size(), grads.size()));
  float* p = params.data();
  float* mp = m.data();
  float* vp = v.data();
  const float* g = grads.data();
  for (size_t i = 0; i < params.size(); ++i) {
    adamw_moments_element(mp[i], vp[i], g[i], grad_scale, s.beta1, s.one_minus_beta1, s.beta2,
                          s.one_minus_beta2);
    adamw_param_element(p[i], mp[i], vp[i], s.decay, s.step_size, s.bias2_sqrt, s.eps);
  }
}

void adamw_apply_moments(std::span<float> params, std::span<const float> m,
                         std::span<const float> v, const AdamWStep& s) {
  RESYNC_CHECK_ARG(params.size() == m.size() && params.size() == v.size(),
                   fmt::format("adamw: sizes differ: params {}, m {}, v {}", params.size(),
                               m.size(), v.size()));
  for (size_t i = 0; i < params.size(); ++i) {
    adamw_param_element(params[i], m[i], v[i], s.decay, s.step_size, s.bias2_sqrt, s.eps);
  }
}

double sum_of_squares(std::span<const float> values) {
  double sum = 0;
  for (float x : values) sum += double(x) * double(x);
  return sum;
}

double clip_factor(double sum_sq, float grad_scale, float max_norm) {
  if (!(max_norm > 0)) return 1.0;
  const double norm = std::sqrt(sum_sq) * double(grad_scale);
  const double factor = double(max_norm) / (norm + 1e-6);
  return factor < 1.0 ? factor : 1.0;
}

}  // namespace resync::kernels
