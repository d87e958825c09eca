// GELU (GPT-2's tanh approximation) over a flat buffer, forward and backward.
#pragma once

#include <cstddef>

namespace resync::kernels {

// y[i] = gelu(x[i]) (kernels/transformer_math.h). y may alias x.
void gelu_forward(const float* x, float* y, size_t n);

// dx[i] = gelu'(x[i]) * dy[i], where x is the forward input. dx may alias dy.
void gelu_backward(const float* x, const float* dy, float* dx, size_t n);

}  // namespace resync::kernels
