// Rectified linear unit over a flat device buffer, forward and backward: the CUDA twins of
// kernels/relu.h (same elementwise functions, so the same bits).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace resync::kernels::cuda {

// y[i] = max(0, x[i]). y may alias x.
void relu_forward(cudaStream_t stream, const float* x, float* y, size_t n);

// dx[i] = x[i] > 0 ? dy[i] : 0, where x is the forward input. dx may alias dy.
void relu_backward(cudaStream_t stream, const float* x, const float* dy, float* dx, size_t n);

}  // namespace resync::kernels::cuda
