// 2-D max pooling on NCHW device batches: the CUDA twins of kernels/maxpool.h, through the same
// window test (pool_takes), so values, argmax and gradients equal the CPU's bit for bit.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/maxpool.h"

namespace resync::kernels::cuda {

// y [batch x channels x out_h x out_w] = window maxima of x; argmax receives each maximum's index
// ih * in_w + iw within its input plane (first maximum on ties, NaN wins).
void maxpool_forward(cudaStream_t stream, const Pool2dShape& s, const float* x, float* y,
                     uint32_t* argmax, size_t batch);

// dx = sum of the dy whose argmax points at each input element (overlapping windows add up, in
// output order as on the CPU). argmax must come from maxpool_forward on the same shape.
void maxpool_backward(cudaStream_t stream, const Pool2dShape& s, const float* dy,
                      const uint32_t* argmax, float* dx, size_t batch);

}  // namespace resync::kernels::cuda
