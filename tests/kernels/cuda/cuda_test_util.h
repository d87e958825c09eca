// Helpers of the CUDA kernel tests: a fixture that skips without a device and owns a CudaContext,
// host<->device copies, and bitwise comparison of float results.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kernels/cuda/context.h"

namespace resync::kernels::testing {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const cuda::DeviceQuery query = cuda::query_devices();
    if (query.n_devices == 0) {
      GTEST_SKIP() << "no CUDA device available: " << query.reason;
    }
    ctx_.emplace(0);
  }

  cudaStream_t stream() const { return ctx_->stream(); }
  cublasHandle_t cublas() const { return ctx_->cublas(); }

  template <typename T>
  cuda::DeviceBuffer<T> to_device(const std::vector<T>& host) {
    cuda::DeviceBuffer<T> buf(host.size());
    cuda::upload(std::span<const T>(host), buf.data(), stream());
    return buf;
  }

  template <typename T>
  std::vector<T> to_host(const cuda::DeviceBuffer<T>& buf) {
    std::vector<T> host(buf.size());
    cuda::download(buf.data(), std::span<T>(host), stream());
    ctx_->synchronize();
    return host;
  }

  std::optional<cuda::CudaContext> ctx_;
};

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// Bit-for-bit equality (NaN payloads and the sign of zero included), first mismatch reported.
inline void expect_same_bits(const std::vector<float>& gpu, const std::vector<float>& cpu,
                             const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  for (size_t i = 0; i < gpu.size(); ++i) {
    ASSERT_EQ(bits_of(gpu[i]), bits_of(cpu[i]))
        << what << ": index " << i << " expected (CPU) " << cpu[i] << " actual (CUDA) " << gpu[i];
  }
}

}  // namespace resync::kernels::testing
