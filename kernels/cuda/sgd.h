// SGD with momentum and weight decay over a flat device parameter buffer: the CUDA twin of
// kernels/sgd.h, through the same element function (sgd_momentum_element).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "kernels/sgd.h"

namespace resync::kernels::cuda {

// For each i < n_elems: g = grads[i] * grad_scale + wd * params[i]; v = momentum * v + g;
// p -= lr * v. Deterministic per device; nvcc fuses multiply-adds, so results may differ from the
// CPU kernel in the last bits.
void sgd_momentum_update(cudaStream_t stream, float* params, float* velocity, const float* grads,
                         size_t n_elems, float grad_scale, const SgdHyper& h);

}  // namespace resync::kernels::cuda
