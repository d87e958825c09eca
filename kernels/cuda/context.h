// CUDA device handles for the CUDA kernels: the device query, CudaContext (device, stream, cuBLAS
// handle) and DeviceBuffer<T> (device memory), all move-only RAII. Built with RESYNC_WITH_CUDA.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <utility>

namespace resync::kernels::cuda {

// What the CUDA runtime sees. Never throws: no driver (libcuda missing or too old) and no device
// are answers here, not errors.
struct DeviceQuery {
  int n_devices = 0;
  std::string reason;  // why n_devices == 0, e.g. "cudaGetDeviceCount: ... (cudaErrorNoDevice)"
};
DeviceQuery query_devices();

namespace detail {
struct StreamDeleter {
  int device = 0;
  void operator()(cudaStream_t stream) const noexcept;
};
struct CublasDeleter {
  int device = 0;
  void operator()(cublasHandle_t handle) const noexcept;
};
struct DeviceFree {
  void operator()(void* p) const noexcept;
};
// cudaMalloc on the current device; nullptr for 0 bytes. Throws DeviceError naming the size.
void* device_malloc(size_t n_bytes);
}  // namespace detail

// One device as this process uses it: the device made current, a non-blocking stream, and a
// cuBLAS handle bound to that stream (default math mode: FP32 GEMMs, no TF32). Kernels and copies
// are issued on stream(); a non-blocking stream does not order itself with the legacy default
// stream, so plain cudaMemcpy must not be mixed with work on it.
class CudaContext {
 public:
  // Throws DeviceError: "no CUDA device available: <reason>" when the runtime sees no device
  // (no driver, or none visible), and a one-line message for an out-of-range device id.
  explicit CudaContext(int device = 0);

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_.get(); }
  cublasHandle_t cublas() const { return cublas_.get(); }

  // Makes this context's device current for the calling thread (the runtime's current device is
  // per thread, and cudaMalloc/launches go to it).
  void make_current() const;

  // Waits for everything issued on stream(); rethrows an asynchronous kernel error.
  void synchronize() const;

 private:
  int device_ = 0;
  // Declared before the handle so that the handle, which uses the stream, is destroyed first.
  std::unique_ptr<CUstream_st, detail::StreamDeleter> stream_;
  std::unique_ptr<cublasContext, detail::CublasDeleter> cublas_;
};

// n_elems elements of T in device memory on the device current at construction (uninitialised).
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n_elems)
      : n_elems_(n_elems), ptr_(static_cast<T*>(detail::device_malloc(n_elems * sizeof(T)))) {}
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : n_elems_(std::exchange(other.n_elems_, 0)), ptr_(std::move(other.ptr_)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    n_elems_ = std::exchange(other.n_elems_, 0);
    ptr_ = std::move(other.ptr_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() = default;

  T* data() { return ptr_.get(); }
  const T* data() const { return ptr_.get(); }
  size_t size() const { return n_elems_; }
  size_t n_bytes() const { return n_elems_ * sizeof(T); }

 private:
  size_t n_elems_ = 0;
  std::unique_ptr<T, detail::DeviceFree> ptr_;
};

namespace detail {
void copy_async(void* dst, const void* src, size_t n_bytes, cudaMemcpyKind kind,
                cudaStream_t stream);
}  // namespace detail

// Asynchronous copies on `stream`. The host memory must stay valid and unchanged until the stream
// has passed the copy (synchronise before reading a download or reusing an upload's source);
// pinned host memory makes them truly asynchronous. The device side must hold host.size() items.
template <typename T>
void upload(std::span<const T> host, T* device, cudaStream_t stream) {
  detail::copy_async(device, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, stream);
}
template <typename T>
void download(const T* device, std::span<T> host, cudaStream_t stream) {
  detail::copy_async(host.data(), device, host.size_bytes(), cudaMemcpyDeviceToHost, stream);
}

// Waits for `stream`; rethrows an asynchronous kernel error as DeviceError.
void synchronize(cudaStream_t stream);

}  // namespace resync::kernels::cuda
