#include "kernels/gelu.h"

#include <algorithm>

#include "kernels/cpu/simd.h"  // RESYNC_VECTOR_CLONES: the math is the same per element
#include "kernels/transformer_math.h"

namespace resync::kernels {

RESYNC_VECTOR_CLONES void gelu_forward(const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = gelu(x[i]);
}

RESYNC_VECTOR_CLONES void gelu_backward(const float* x, const float* dy, float* dx, size_t n) {
  for (size_t i = 0; i < n; ++i) dx[i] = gelu_grad(x[i], dy[i]);
}

RESYNC_VECTOR_CLONES void gelu_backward_bias(const float* x, const float* dy, float* dx,
                                             float* dbias, size_t rows, size_t cols) {
  std::fill(dbias, dbias + cols, 0.0f);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    const float* dyr = dy + r * cols;
    float* dxr = dx + r * cols;
    for (size_t c = 0; c < cols; ++c) {
      const float g = gelu_grad(xr[c], dyr[c]);
      dxr[c] = g;
      dbias[c] += g;
    }
  }
}

}  // namespace resync::kernels
