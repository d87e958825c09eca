// Elementwise math of the transformer kernels (GELU, LayerNorm's normalisation, the residual
// sum), shared by the CPU and CUDA backends so that the CPU tests check the GPU math.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/elementwise.h"  // RESYNC_HOST_DEVICE

namespace resync::kernels {

// sqrt(2/pi) and the cubic coefficient of GPT-2's tanh approximation of GELU.
inline constexpr float kGeluScale = 0.7978845608028654f;
inline constexpr float kGeluCubic = 0.044715f;
// LayerNorm's epsilon (PyTorch's and GPT-2's default).
inline constexpr float kLayerNormEps = 1e-5f;

// exp(x) for x <= 0, branch-free so that loops over it vectorise (glibc's tanhf/expf calls do
// not, and made GELU a third of a gpt step): x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor
// series to r^7 (truncation below 6e-9 relative), 2^n built in the exponent bits. Inputs below
// -87 give e^-87 (about 1.6e-38) rather than a subnormal.
RESYNC_HOST_DEVICE inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  // ln 2 in two parts (the first exact in float), so that r keeps its low bits.
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (int32_t{1} << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|): absolute error about 1e-7, what
// GELU's 0.5 x (1 + tanh) needs (its relative accuracy near u = 0 is not needed there).
RESYNC_HOST_DEVICE inline float tanh_approx(float u) {
  const float e = exp_nonpositive(-2.0f * std::fabs(u));
  return std::copysign((1.0f - e) / (1.0f + e), u);
}

// gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as GPT-2 and PyTorch's
// gelu(approximate="tanh").
RESYNC_HOST_DEVICE inline float gelu(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return 0.5f * x * (1.0f + tanh_approx(u));
}

// d gelu(x)/dx * dy.
RESYNC_HOST_DEVICE inline float gelu_grad(float x, float dy) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  const float t = tanh_approx(u);
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
RESYNC_HOST_DEVICE inline float layernorm_dx(float dxhat, float xhat, float rstd, float mean_dxhat,
                                             float mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

}  // namespace resync::kernels
