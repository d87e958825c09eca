#include "kernels/cuda/gemm.h"

#include <climits>
#include <string>

#include "base/error.h"
#include "kernels/cuda/launch.h"

namespace resync::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// k == 0: C = beta * C over the m x n block of a row-major matrix; beta == 0 writes zeros (C is
// not read, so NaNs in it do not survive).
__global__ void scale_rows_kernel(size_t m, size_t n, float beta, float* c, size_t ldc) {
  const size_t n_elems = m * n;
  for (size_t i = launch::global_index(); i < n_elems; i += launch::grid_stride()) {
    float& x = c[(i / n) * ldc + i % n];
    x = beta == 0.0f ? 0.0f : x * beta;
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

int to_blas_int(size_t v, const char* what) {
  RESYNC_CHECK_ARG(v <= static_cast<size_t>(INT_MAX),
                   std::string("cuda gemm: ") + what + " = " + std::to_string(v) +
                       " exceeds the cuBLAS int range");
  return static_cast<int>(v);
}

cublasOperation_t to_cublas(Transpose t) {
  return t == Transpose::kYes ? CUBLAS_OP_T : CUBLAS_OP_N;
}

}  // namespace

void gemm(cublasHandle_t handle, cudaStream_t stream, Transpose ta, Transpose tb, size_t m,
          size_t n, size_t k, float alpha, const float* a, size_t lda, const float* b, size_t ldb,
          float beta, float* c, size_t ldc) {
  const size_t a_cols = ta == Transpose::kNo ? k : m;
  const size_t b_cols = tb == Transpose::kNo ? n : k;
  RESYNC_CHECK_ARG(lda >= a_cols, "cuda gemm: lda = " + std::to_string(lda) +
                                      " < stored row length " + std::to_string(a_cols) + " of A");
  RESYNC_CHECK_ARG(ldb >= b_cols, "cuda gemm: ldb = " + std::to_string(ldb) +
                                      " < stored row length " + std::to_string(b_cols) + " of B");
  RESYNC_CHECK_ARG(ldc >= n, "cuda gemm: ldc = " + std::to_string(ldc) + " < row length " +
                                 std::to_string(n) + " of C");
  if (m == 0 || n == 0) return;
  RESYNC_CHECK_ARG(c != nullptr, "cuda gemm: C is null");
  if (k == 0) {
    scale_rows_kernel<<<launch::blocks_for(m * n), launch::kBlock, 0, stream>>>(m, n, beta, c,
                                                                                 ldc);
    RESYNC_CHECK_LAUNCH("scale_rows_kernel");
    return;
  }
  RESYNC_CHECK_ARG(a != nullptr && b != nullptr, "cuda gemm: A or B is null");
  RESYNC_CHECK_ARG(handle != nullptr, "cuda gemm: no cuBLAS handle");
  // cuBLAS is column-major, and a row-major X is a column-major X^T: C^T = op(B)^T * op(A)^T is
  // the same call with A and B (and m and n) swapped and no data movement.
  RESYNC_CHECK_CUBLAS(cublasSetStream(handle, stream));
  RESYNC_CHECK_CUBLAS(cublasSgemm(handle, to_cublas(tb), to_cublas(ta), to_blas_int(n, "n"),
                                  to_blas_int(m, "m"), to_blas_int(k, "k"), &alpha, b,
                                  to_blas_int(ldb, "ldb"), a, to_blas_int(lda, "lda"), &beta, c,
                                  to_blas_int(ldc, "ldc")));
}

std::string cublas_version() {
  int major = 0, minor = 0, patch = 0;
  RESYNC_CHECK_CUBLAS(cublasGetProperty(MAJOR_VERSION, &major));
  RESYNC_CHECK_CUBLAS(cublasGetProperty(MINOR_VERSION, &minor));
  RESYNC_CHECK_CUBLAS(cublasGetProperty(PATCH_LEVEL, &patch));
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

}  // namespace resync::kernels::cuda
