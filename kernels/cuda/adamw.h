// AdamW and the gradient's sum of squares over flat device buffers: the CUDA twins of
// kernels/adamw.h, through the same element functions (kernels/elementwise.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "kernels/adamw.h"

namespace resync::kernels::cuda {

// For each i < n_elems: the moments with grads[i] * grad_scale, then the parameter. Built with
// -fmad=false, so the results equal the CPU kernel's bit for bit (and the parameter half below
// reproduces the full update on either backend).
void adamw_update(cudaStream_t stream, float* params, float* m, float* v, const float* grads,
                  size_t n_elems, float grad_scale, const AdamWStep& s);

// The parameter half of adamw_update (kernels::adamw_apply_moments).
void adamw_apply_moments(cudaStream_t stream, float* params, const float* m, const float* v,
                         size_t n_elems, const AdamWStep& s);

// The sum of squares of values[0, n_elems) in double: a fixed grid of partial sums reduced in a
// fixed order, so the result is the same on every run of one device (not the CPU's bits, whose
// sum runs in index order). Synchronises the stream.
double sum_of_squares(cudaStream_t stream, const float* values, size_t n_elems);

}  // namespace resync::kernels::cuda
