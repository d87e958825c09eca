// The CUDA, cuBLAS and NCCL decoders behind RESYNC_CHECK_CUDA / _CUBLAS / _NCCL (base/error.h):
// name and describe the status code, then throw DeviceError through the common check helper.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <nccl.h>

#include "base/error.h"

namespace resync::detail {

[[noreturn]] [[gnu::cold]] void cuda_check_failed(int code, const char* expr, const char* file,
                                                  int line) {
  const auto err = static_cast<cudaError_t>(code);
  // The runtime also records the error as the thread's last error; clear it so that the next
  // launch check does not report this failure a second time.
  (void)cudaGetLastError();
  check_failed(CheckKind::kCuda, expr, file, line,
               fmt::format("CUDA error: {} ({}, code {})", cudaGetErrorString(err),
                           cudaGetErrorName(err), code));
}

[[noreturn]] [[gnu::cold]] void cublas_check_failed(int code, const char* expr, const char* file,
                                                    int line) {
  const auto status = static_cast<cublasStatus_t>(code);
  check_failed(CheckKind::kCublas, expr, file, line,
               fmt::format("cuBLAS error: {} ({}, code {})", cublasGetStatusString(status),
                           cublasGetStatusName(status), code));
}

[[noreturn]] [[gnu::cold]] void nccl_check_failed(int code, const char* expr, const char* file,
                                                  int line) {
  check_failed(CheckKind::kNccl, expr, file, line,
               fmt::format("NCCL error: {} (code {})",
                           ncclGetErrorString(static_cast<ncclResult_t>(code)), code));
}

}  // namespace resync::detail
