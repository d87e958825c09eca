#include "kernels/cuda/relu.h"

#include "base/error.h"
#include "kernels/cuda/launch.h"
#include "kernels/elementwise.h"

namespace resync::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

__global__ void relu_forward_kernel(const float* x, float* y, size_t n) {
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) y[i] = relu(x[i]);
}

__global__ void relu_backward_kernel(const float* x, const float* dy, float* dx, size_t n) {
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) {
    dx[i] = relu_grad(x[i], dy[i]);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

void relu_forward(cudaStream_t stream, const float* x, float* y, size_t n) {
  if (n == 0) return;
  RESYNC_CHECK_ARG(x != nullptr && y != nullptr, "cuda relu_forward: null pointer");
  relu_forward_kernel<<<launch::blocks_for(n), launch::kBlock, 0, stream>>>(x, y, n);
  RESYNC_CHECK_LAUNCH("relu_forward_kernel");
}

void relu_backward(cudaStream_t stream, const float* x, const float* dy, float* dx, size_t n) {
  if (n == 0) return;
  RESYNC_CHECK_ARG(x != nullptr && dy != nullptr && dx != nullptr,
                   "cuda relu_backward: null pointer");
  relu_backward_kernel<<<launch::blocks_for(n), launch::kBlock, 0, stream>>>(x, dy, dx, n);
  RESYNC_CHECK_LAUNCH("relu_backward_kernel");
}

}  // namespace resync::kernels::cuda
