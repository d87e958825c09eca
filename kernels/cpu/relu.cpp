#include "kernels/relu.h"

#include "kernels/elementwise.h"

namespace resync::kernels {

void relu_forward(const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = relu(x[i]);
}

void relu_backward(const float* x, const float* dy, float* dx, size_t n) {
  for (size_t i = 0; i < n; ++i) dx[i] = relu_grad(x[i], dy[i]);
}

}  // namespace resync::kernels
