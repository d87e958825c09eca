#include "runtime/tools/device_info.h"

#ifdef RESYNC_WITH_CUDA
#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <nccl.h>

#include <exception>

#include "kernels/cuda/context.h"
#include "kernels/cuda/gemm.h"
#endif

namespace resync::runtime {

#ifdef RESYNC_WITH_CUDA
namespace {

constexpr const char* kIndent = "         ";  // under the value column of `resync info`

// CUDA encodes versions as 1000 * major + 10 * minor.
std::string cuda_version(int v) { return fmt::format("{}.{}", v / 1000, v % 1000 / 10); }

std::string runtime_versions() {
  int runtime = 0, driver = 0;
  const std::string runtime_text =
      cudaRuntimeGetVersion(&runtime) == cudaSuccess ? cuda_version(runtime) : "?";
  // Without a driver the call succeeds and reports 0.
  const std::string driver_text = cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0
                                      ? cuda_version(driver)
                                      : std::string("none");
  (void)cudaGetLastError();
  return fmt::format("runtime {} (built with {}, linked statically), driver {}", runtime_text,
                     cuda_version(CUDART_VERSION), driver_text);
}

std::string library_versions() {
  std::string cublas;
  try {
    cublas = kernels::cuda::cublas_version();
  } catch (const std::exception& e) {
    cublas = fmt::format("? ({})", e.what());
  }
  int nccl = 0;
  std::string nccl_text = "?";
  if (ncclGetVersion(&nccl) == ncclSuccess) {
    // Since NCCL 2.9 the code is 10000 * major + 100 * minor + patch.
    nccl_text = fmt::format("{}.{}.{}", nccl / 10000, nccl / 100 % 100, nccl % 100);
  }
  return fmt::format("cuBLAS {}, NCCL {}", cublas, nccl_text);
}

std::string device_line(int device) {
  cudaDeviceProp prop{};
  const cudaError_t rc = cudaGetDeviceProperties(&prop, device);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();
    return fmt::format("device {}: properties unavailable: {} ({})", device,
                       cudaGetErrorString(rc), cudaGetErrorName(rc));
  }
  return fmt::format("device {}: {} (sm_{}{}, {:.1f} GiB, {} SMs)", device, prop.name, prop.major,
                     prop.minor,
                     static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0),
                     prop.multiProcessorCount);
}

}  // namespace

std::string cuda_info() {
  std::string out = fmt::format("CUDA:    {}; {}", runtime_versions(), library_versions());
  const kernels::cuda::DeviceQuery query = kernels::cuda::query_devices();
  if (query.n_devices == 0) {
    out += fmt::format("\n{}no CUDA device available ({})", kIndent, query.reason);
  }
  for (int d = 0; d < query.n_devices; ++d) out += fmt::format("\n{}{}", kIndent, device_line(d));
  return out;
}

#else

std::string cuda_info() { return "CUDA:    not built"; }

#endif

}  // namespace resync::runtime
