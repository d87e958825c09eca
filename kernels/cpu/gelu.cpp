#include "kernels/gelu.h"

#include "kernels/cpu/simd.h"  // RESYNC_VECTOR_CLONES: the math is the same per element
#include "kernels/transformer_math.h"

namespace resync::kernels {

RESYNC_VECTOR_CLONES void gelu_forward(const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = gelu(x[i]);
}

RESYNC_VECTOR_CLONES void gelu_backward(const float* x, const float* dy, float* dx, size_t n) {
  for (size_t i = 0; i < n; ++i) dx[i] = gelu_grad(x[i], dy[i]);
}

}  // namespace resync::kernels
