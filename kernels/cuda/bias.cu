#include "kernels/cuda/bias.h"

#include "base/error.h"
#include "kernels/cuda/launch.h"

namespace resync::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

__global__ void bias_add_kernel(float* y, const float* bias, size_t rows, size_t cols) {
  const size_t n_elems = rows * cols;
  for (size_t i = launch::global_index(); i < n_elems; i += launch::grid_stride()) {
    y[i] += bias[i % cols];
  }
}

// One thread per column walking the rows in order: neighbouring threads read neighbouring
// columns (coalesced), and each sum is formed in the CPU kernel's order, so the bits match. Bias
// vectors are short and batches small, so a tree reduction over the rows would buy little.
__global__ void bias_grad_kernel(const float* dy, float* dbias, size_t rows, size_t cols) {
  for (size_t c = launch::global_index(); c < cols; c += launch::grid_stride()) {
    float sum = 0.0f;
    for (size_t r = 0; r < rows; ++r) sum += dy[r * cols + c];
    dbias[c] = sum;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

void bias_add(cudaStream_t stream, float* y, const float* bias, size_t rows, size_t cols) {
  if (rows == 0 || cols == 0) return;
  RESYNC_CHECK_ARG(y != nullptr && bias != nullptr, "cuda bias_add: null pointer");
  bias_add_kernel<<<launch::blocks_for(rows * cols), launch::kBlock, 0, stream>>>(y, bias, rows,
                                                                                   cols);
  RESYNC_CHECK_LAUNCH("bias_add_kernel");
}

void bias_grad(cudaStream_t stream, const float* dy, float* dbias, size_t rows, size_t cols) {
  if (cols == 0) return;
  RESYNC_CHECK_ARG(dbias != nullptr && (rows == 0 || dy != nullptr),
                   "cuda bias_grad: null pointer");
  bias_grad_kernel<<<launch::blocks_for(cols), launch::kBlock, 0, stream>>>(dy, dbias, rows,
                                                                             cols);
  RESYNC_CHECK_LAUNCH("bias_grad_kernel");
}

}  // namespace resync::kernels::cuda
