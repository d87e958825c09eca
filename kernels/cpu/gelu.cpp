#include "kernels/gelu.h"

#include "kernels/transformer_math.h"

namespace resync::kernels {

void gelu_forward(const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = gelu(x[i]);
}

void gelu_backward(const float* x, const float* dy, float* dx, size_t n) {
  for (size_t i = 0; i < n; ++i) dx[i] = gelu_grad(x[i], dy[i]);
}

}  // namespace resync::kernels
