#include "kernels/residual.h"

namespace resync::kernels {

void residual_forward(const float* a, const float* b, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void residual_accumulate(float* acc, const float* d, size_t n) {
  for (size_t i = 0; i < n; ++i) acc[i] += d[i];
}

}  // namespace resync::kernels
