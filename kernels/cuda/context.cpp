#include "kernels/cuda/context.h"

#include <fmt/format.h>

#include <cstdlib>

#include "base/error.h"

namespace resync::kernels::cuda {
namespace {

std::string describe(cudaError_t rc) {
  return fmt::format("{} ({})", cudaGetErrorString(rc), cudaGetErrorName(rc));
}

// A set CUDA_VISIBLE_DEVICES often explains "no device": show it with the reason.
std::string visible_devices_note() {
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  return visible != nullptr ? fmt::format(" [CUDA_VISIBLE_DEVICES='{}']", visible) : "";
}

std::string format_bytes(size_t n_bytes) {
  constexpr double kMiB = 1024.0 * 1024.0;
  if (n_bytes < (size_t{1} << 20)) return fmt::format("{} bytes", n_bytes);
  return fmt::format("{:.1f} MiB", static_cast<double>(n_bytes) / kMiB);
}

}  // namespace

DeviceQuery query_devices() {
  int n_devices = 0;
  const cudaError_t rc = cudaGetDeviceCount(&n_devices);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: keep it from surfacing in a later launch check
    return {0, "cudaGetDeviceCount: " + describe(rc) + visible_devices_note()};
  }
  if (n_devices <= 0) return {0, "the CUDA runtime reports 0 devices" + visible_devices_note()};
  return {n_devices, {}};
}

namespace detail {

void StreamDeleter::operator()(cudaStream_t stream) const noexcept {
  (void)cudaStreamDestroy(stream);
}

void CublasDeleter::operator()(cublasHandle_t handle) const noexcept {
  // cuBLAS frees the handle's device resources on the current device.
  int previous = -1;
  const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != device;
  (void)cudaSetDevice(device);
  (void)cublasDestroy(handle);
  if (restore) (void)cudaSetDevice(previous);
}

void DeviceFree::operator()(void* p) const noexcept { (void)cudaFree(p); }

void* device_malloc(size_t n_bytes) {
  if (n_bytes == 0) return nullptr;
  void* p = nullptr;
  const cudaError_t rc = cudaMalloc(&p, n_bytes);
  if (rc != cudaSuccess) [[unlikely]] {
    (void)cudaGetLastError();
    int device = -1;
    size_t free_bytes = 0, total_bytes = 0;
    std::string where = "the current CUDA device";
    if (cudaGetDevice(&device) == cudaSuccess) where = fmt::format("CUDA device {}", device);
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      where += fmt::format(" ({} of {} free)", format_bytes(free_bytes), format_bytes(total_bytes));
    }
    (void)cudaGetLastError();
    resync::detail::check_failed(CheckKind::kCuda, "cudaMalloc", __FILE__, __LINE__,
                                 fmt::format("cannot allocate {} on {}: {}",
                                             format_bytes(n_bytes), where, describe(rc)));
  }
  return p;
}

void copy_async(void* dst, const void* src, size_t n_bytes, cudaMemcpyKind kind,
                cudaStream_t stream) {
  if (n_bytes == 0) return;
  RESYNC_CHECK_ARG(dst != nullptr && src != nullptr, "CUDA copy: null source or destination");
  RESYNC_CHECK_CUDA(cudaMemcpyAsync(dst, src, n_bytes, kind, stream));
}

}  // namespace detail

CudaContext::CudaContext(int device) : device_(device) {
  const DeviceQuery query = query_devices();
  if (query.n_devices == 0) {
    resync::detail::check_failed(CheckKind::kCuda, "cudaGetDeviceCount", __FILE__, __LINE__,
                                 "no CUDA device available: " + query.reason);
  }
  if (device < 0 || device >= query.n_devices) {
    resync::detail::check_failed(
        CheckKind::kCuda, "cudaSetDevice", __FILE__, __LINE__,
        fmt::format("CUDA device {} does not exist: {} device(s) visible (ids 0..{})", device,
                    query.n_devices, query.n_devices - 1));
  }
  RESYNC_CHECK_CUDA(cudaSetDevice(device));
  cudaStream_t stream = nullptr;
  RESYNC_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  stream_ = {stream, detail::StreamDeleter{device}};
  cublasHandle_t handle = nullptr;
  RESYNC_CHECK_CUBLAS(cublasCreate(&handle));
  cublas_ = {handle, detail::CublasDeleter{device}};
  RESYNC_CHECK_CUBLAS(cublasSetStream(handle, stream));
  // Explicit, so that a changed library default cannot switch FP32 GEMMs to TF32 behind our back.
  RESYNC_CHECK_CUBLAS(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
}

void CudaContext::make_current() const { RESYNC_CHECK_CUDA(cudaSetDevice(device_)); }

void CudaContext::synchronize() const { cuda::synchronize(stream()); }

void synchronize(cudaStream_t stream) { RESYNC_CHECK_CUDA(cudaStreamSynchronize(stream)); }

}  // namespace resync::kernels::cuda
