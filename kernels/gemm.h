// General matrix multiply on row-major float matrices (CPU: OpenBLAS cblas_sgemm), and the
// BLAS thread/version queries shown by `resync info`.
#pragma once

#include <cstddef>
#include <string>

namespace resync::kernels {

enum class Transpose { kNo, kYes };

// C = alpha * op(A) * op(B) + beta * C, all row-major. op(A) is m x k, op(B) is k x n, C is m x n.
// A is stored m x k (lda >= k) for kNo and k x m (lda >= m) for kYes; likewise B is k x n or n x k.
// As in BLAS, beta == 0 means C is not read (NaNs in C are overwritten). k == 0 gives C = beta*C.
// Throws InvalidArgument on a leading dimension smaller than the stored row or a size > INT_MAX.
void gemm(Transpose ta, Transpose tb, size_t m, size_t n, size_t k, float alpha, const float* a,
          size_t lda, const float* b, size_t ldb, float beta, float* c, size_t ldc);

// Threads used by the BLAS library in this process (n >= 1). Ranks sharing a node want 1.
void set_blas_threads(int n);
int blas_threads();

// e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64".
std::string blas_version();

// The kernel set the BLAS picked for this CPU at load time, e.g. "Haswell" or "Prescott".
std::string blas_core();

// The OPENBLAS_CORETYPE that would give this CPU fast kernels when OpenBLAS picked slow ones
// (OpenBLAS 0.3.21 does not recognise recent Xeons and falls back to SSE3), else empty.
std::string blas_recommended_coretype();

// Empty, or a one-line warning when the BLAS runs pre-AVX2 kernels on a CPU with AVX2/FMA:
// OpenBLAS's DYNAMIC_ARCH does not know every CPU model (VMs often report a generic one) and
// falls back to SSE3 "Prescott" kernels, about 4x slower. The choice is made when the library
// loads, so the fix is the environment of a new process: the warning names the
// OPENBLAS_CORETYPE value to export.
std::string blas_core_advice();

}  // namespace resync::kernels
