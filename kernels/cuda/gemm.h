// GEMM on row-major float matrices in device memory through cuBLAS: the CUDA twin of
// kernels/gemm.h, same arguments and semantics.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

#include "kernels/gemm.h"

namespace resync::kernels::cuda {

// C = alpha * op(A) * op(B) + beta * C on `stream` (the handle is bound to it), all row-major as
// in kernels::gemm: beta == 0 means C is not read, k == 0 gives C = beta * C. A, B and C are
// device pointers. Throws InvalidArgument on a leading dimension smaller than the stored row or a
// size > INT_MAX, DeviceError on a cuBLAS or launch failure.
void gemm(cublasHandle_t handle, cudaStream_t stream, Transpose ta, Transpose tb, size_t m,
          size_t n, size_t k, float alpha, const float* a, size_t lda, const float* b, size_t ldb,
          float beta, float* c, size_t ldc);

// The cuBLAS library loaded at run time, e.g. "13.0.2"; needs no device.
std::string cublas_version();

}  // namespace resync::kernels::cuda
