// Elementwise math of the transformer kernels (GELU, LayerNorm's normalisation, the residual
// sum), shared by the CPU and CUDA backends so that the CPU tests check the GPU math.
#pragma once

#include <cmath>

#include "kernels/elementwise.h"  // RESYNC_HOST_DEVICE

namespace resync::kernels {

// sqrt(2/pi) and the cubic coefficient of GPT-2's tanh approximation of GELU.
inline constexpr float kGeluScale = 0.7978845608028654f;
inline constexpr float kGeluCubic = 0.044715f;
// LayerNorm's epsilon (PyTorch's and GPT-2's default).
inline constexpr float kLayerNormEps = 1e-5f;

// gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as GPT-2 and PyTorch's
// gelu(approximate="tanh").
RESYNC_HOST_DEVICE inline float gelu(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return 0.5f * x * (1.0f + std::tanh(u));
}

// d gelu(x)/dx * dy.
RESYNC_HOST_DEVICE inline float gelu_grad(float x, float dy) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  const float t = std::tanh(u);
  const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
  return dy * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du);
}

// One normalised, scaled and shifted element of LayerNorm: (x - mean) * rstd * w + b.
RESYNC_HOST_DEVICE inline float layernorm_element(float x, float mean, float rstd, float w,
                                                  float b) {
  return (x - mean) * rstd * w + b;
}

// 1 / sqrt(variance + eps), the reciprocal standard deviation LayerNorm keeps for its backward.
RESYNC_HOST_DEVICE inline float layernorm_rstd(float variance) {
  return 1.0f / std::sqrt(variance + kLayerNormEps);
}

// LayerNorm's input gradient for one element, given the row means of dxhat and dxhat * xhat:
//   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
RESYNC_HOST_DEVICE inline float layernorm_dx(float dxhat, float xhat, float rstd,
                                             float mean_dxhat, float mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

}  // namespace resync::kernels
