// Bias broadcast over the rows of a row-major [rows x cols] matrix, and its gradient.
#pragma once

#include <cstddef>

namespace resync::kernels {

// y[r][c] += bias[c].
void bias_add(float* y, const float* bias, size_t rows, size_t cols);

// dbias[c] = sum_r dy[r][c]; overwrites dbias. Rows are summed in order, so the bits are
// reproducible.
void bias_grad(const float* dy, float* dbias, size_t rows, size_t cols);

}  // namespace resync::kernels
