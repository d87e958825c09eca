// Rectified linear unit over a flat buffer, forward and backward.
#pragma once

#include <cstddef>

namespace resync::kernels {

// y[i] = max(0, x[i]). y may alias x.
void relu_forward(const float* x, float* y, size_t n);

// dx[i] = x[i] > 0 ? dy[i] : 0, where x is the forward input. dx may alias dy.
void relu_backward(const float* x, const float* dy, float* dx, size_t n);

}  // namespace resync::kernels
