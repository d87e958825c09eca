// Bias broadcast over the rows of a row-major [rows x cols] device matrix, and its gradient: the
// CUDA twins of kernels/bias.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace resync::kernels::cuda {

// y[r][c] += bias[c].
void bias_add(cudaStream_t stream, float* y, const float* bias, size_t rows, size_t cols);

// dbias[c] = sum_r dy[r][c]; overwrites dbias. Rows are summed in order, as on the CPU, so the
// result equals kernels::bias_grad bit for bit.
void bias_grad(cudaStream_t stream, const float* dy, float* dbias, size_t rows, size_t cols);

}  // namespace resync::kernels::cuda
