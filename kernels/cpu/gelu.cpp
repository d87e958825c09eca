#include "kernels/gelu.h"

#include "kernels/transformer_math.h"

// Wider vector units where the CPU has them (picked once at load time by the dynamic linker);
// the math is the same per element.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define RESYNC_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RESYNC_VECTOR_CLONES
#endif

namespace resync::kernels {

RESYNC_VECTOR_CLONES void gelu_forward(const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = gelu(x[i]);
}

RESYNC_VECTOR_CLONES void gelu_backward(const float* x, const float* dy, float* dx, size_t n) {
  for (size_t i = 0; i < n; ++i) dx[i] = gelu_grad(x[i], dy[i]);
}

}  // namespace resync::kernels
