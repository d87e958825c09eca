// GELU (GPT-2's tanh approximation) over a flat buffer, forward and backward.
#pragma once

#include <cstddef>

namespace resync::kernels {

// y[i] = gelu(x[i]) (kernels/transformer_math.h). y may alias x.
void gelu_forward(const float* x, float* y, size_t n);

// dx[i] = gelu'(x[i]) * dy[i], where x is the forward input. dx may alias dy.
void gelu_backward(const float* x, const float* dy, float* dx, size_t n);

// gelu_backward over a [rows x cols] matrix that also OVERWRITES dbias [cols] with the column
// sums of dx (the gradient of the bias of the linear layer before the GELU), in the same pass
// and in the same order as bias_grad. dx may alias dy.
void gelu_backward_bias(const float* x, const float* dy, float* dx, float* dbias, size_t rows,
                        size_t cols);

}  // namespace resync::kernels
