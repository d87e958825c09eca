// Layer normalisation over the last dimension of a row-major [rows x cols] matrix, with a
// per-column weight and bias (PyTorch's nn.LayerNorm(cols), eps = 1e-5), forward and backward.
#pragma once

#include <cstddef>

namespace resync::kernels {

// y = (x - mean) * rstd * weight + bias per row; stores each row's mean and rstd
// (1 / sqrt(biased variance + eps)) for the backward. y must not alias x.
void layernorm_forward(const float* x, const float* weight, const float* bias, float* y,
                       float* mean, float* rstd, size_t rows, size_t cols);

// Given dy and the forward's x, mean and rstd: ADDS the input gradient to dx and the weight
// and bias gradients to dweight and dbias (a transformer block sums dx into its residual
// gradient; callers that want a fresh gradient zero the buffers first).
void layernorm_backward(const float* dy, const float* x, const float* weight, const float* mean,
                        const float* rstd, float* dx, float* dweight, float* dbias, size_t rows,
                        size_t cols);

// As layernorm_backward, but WRITES dx = dres + the input gradient (dres may be dx itself, or
// null for the input gradient alone): a transformer block's residual gradient passes through
// without a copy. Still adds to dweight and dbias.
void layernorm_backward_into(const float* dy, const float* x, const float* weight,
                             const float* mean, const float* rstd, const float* dres, float* dx,
                             float* dweight, float* dbias, size_t rows, size_t cols);

}  // namespace resync::kernels
