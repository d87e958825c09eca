#include "kernels/cuda/sgd.h"

#include "base/error.h"
#include "kernels/cuda/launch.h"
#include "kernels/elementwise.h"

namespace resync::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

__global__ void sgd_momentum_kernel(float* params, float* velocity, const float* grads, size_t n,
                                    float grad_scale, float lr, float momentum,
                                    float weight_decay) {
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) {
    sgd_momentum_element(params[i], velocity[i], grads[i], grad_scale, lr, momentum,
                         weight_decay);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

void sgd_momentum_update(cudaStream_t stream, float* params, float* velocity, const float* grads,
                         size_t n_elems, float grad_scale, const SgdHyper& h) {
  if (n_elems == 0) return;
  RESYNC_CHECK_ARG(params != nullptr && velocity != nullptr && grads != nullptr,
                   "cuda sgd_momentum_update: null pointer");
  sgd_momentum_kernel<<<launch::blocks_for(n_elems), launch::kBlock, 0, stream>>>(
      params, velocity, grads, n_elems, grad_scale, h.lr, h.momentum, h.weight_decay);
  RESYNC_CHECK_LAUNCH("sgd_momentum_kernel");
}

}  // namespace resync::kernels::cuda
