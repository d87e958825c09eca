// What the CUDA backend must do without a device (and still does with one): a clear one-line
// DeviceError instead of a crash, status decoders naming the error, argument checks that run
// before any CUDA call, and the `resync info` CUDA lines. Never skips.
#include <gtest/gtest.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <string>
#include <vector>

#include "base/error.h"
#include "kernels/cuda/bias.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/conv2d.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/maxpool.h"
#include "kernels/cuda/relu.h"
#include "kernels/cuda/softmax_xent.h"
#include "runtime/tools/device_info.h"

namespace resync::kernels::cuda {
namespace {

// The message of the DeviceError that fn throws, or "" when it throws nothing.
template <typename Fn>
std::string device_error_of(Fn fn) {
  try {
    fn();
  } catch (const DeviceError& e) {
    return e.what();
  }
  return "";
}

TEST(CudaContext, WithoutDeviceThrowsOneLineDeviceError) {
  const DeviceQuery query = query_devices();
  ASSERT_GE(query.n_devices, 0);
  if (query.n_devices == 0) {
    EXPECT_FALSE(query.reason.empty()) << "no device, but no reason given";
    const std::string msg = device_error_of([] { CudaContext ctx(0); });
    EXPECT_EQ(msg.rfind("no CUDA device available: ", 0), 0u) << msg;
    EXPECT_NE(msg.find(query.reason), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
  } else {
    // On a GPU machine the same path is reached with a device id that does not exist.
    const int bad = query.n_devices;
    const std::string msg = device_error_of([bad] { CudaContext ctx(bad); });
    EXPECT_NE(msg.find("CUDA device " + std::to_string(bad) + " does not exist"),
              std::string::npos)
        << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
  }
  // Asking again gives the same answer. (Without a driver every runtime call, cudaGetLastError
  // included, keeps returning the initialisation error, so there is no "cleared" state to test.)
  EXPECT_EQ(query_devices().n_devices, query.n_devices);
  if (query.n_devices > 0) {
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  }
}

TEST(CudaContext, NegativeDeviceIdIsRejected) {
  const std::string msg = device_error_of([] { CudaContext ctx(-1); });
  EXPECT_FALSE(msg.empty());
}

TEST(CudaChecks, DecodersNameTheStatusAndThrowDeviceError) {
  const std::string cuda_msg =
      device_error_of([] { RESYNC_CHECK_CUDA(cudaErrorMemoryAllocation); });
  EXPECT_NE(cuda_msg.find("cudaErrorMemoryAllocation"), std::string::npos) << cuda_msg;
  EXPECT_NE(cuda_msg.find("context_test.cpp"), std::string::npos) << cuda_msg;

  const std::string cublas_msg =
      device_error_of([] { RESYNC_CHECK_CUBLAS(CUBLAS_STATUS_ALLOC_FAILED); });
  EXPECT_NE(cublas_msg.find("CUBLAS_STATUS_ALLOC_FAILED"), std::string::npos) << cublas_msg;

  const std::string nccl_msg = device_error_of([] { RESYNC_CHECK_NCCL(ncclSystemError); });
  EXPECT_NE(nccl_msg.find("NCCL error"), std::string::npos) << nccl_msg;
  EXPECT_NE(nccl_msg.find("code 2"), std::string::npos) << nccl_msg;

  EXPECT_NO_THROW(RESYNC_CHECK_CUDA(cudaSuccess));
  EXPECT_NO_THROW(RESYNC_CHECK_CUBLAS(CUBLAS_STATUS_SUCCESS));
  EXPECT_NO_THROW(RESYNC_CHECK_NCCL(ncclSuccess));
}

TEST(DeviceBuffer, EmptyBufferNeedsNoDevice) {
  DeviceBuffer<float> empty(0);
  EXPECT_EQ(empty.data(), nullptr);
  EXPECT_EQ(empty.size(), 0u);
  DeviceBuffer<float> moved = std::move(empty);
  EXPECT_EQ(moved.n_bytes(), 0u);
}

TEST(DeviceBuffer, OutOfMemoryIsADeviceErrorNamingTheSize) {
  // Without a device the allocation fails for that reason instead; either way: DeviceError.
  const std::string msg = device_error_of([] { DeviceBuffer<float> huge(size_t{1} << 50); });
  EXPECT_NE(msg.find("cannot allocate"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
}

// Preconditions are checked before anything reaches the device, so they need none.
TEST(CudaLaunchers, RejectBadArgumentsBeforeTouchingTheDevice) {
  cudaStream_t no_stream = nullptr;
  EXPECT_THROW(gemm(nullptr, no_stream, Transpose::kNo, Transpose::kNo, 4, 4, 4, 1.0f, nullptr, 3,
                    nullptr, 4, 0.0f, nullptr, 4),
               InvalidArgument);
  EXPECT_THROW(gemm(nullptr, no_stream, Transpose::kYes, Transpose::kNo, 4, 4, 4, 1.0f, nullptr,
                    4, nullptr, 4, 0.0f, nullptr, 3),
               InvalidArgument);
  EXPECT_THROW(gemm(nullptr, no_stream, Transpose::kNo, Transpose::kNo, size_t{1} << 32, 1, 1,
                    1.0f, nullptr, 1, nullptr, 1, 0.0f, nullptr, 1),
               InvalidArgument);
  EXPECT_THROW(relu_forward(no_stream, nullptr, nullptr, 10), InvalidArgument);
  EXPECT_THROW(bias_add(no_stream, nullptr, nullptr, 2, 3), InvalidArgument);
  // Empty work launches nothing and checks nothing else.
  EXPECT_NO_THROW(relu_forward(no_stream, nullptr, nullptr, 0));
  EXPECT_NO_THROW(bias_grad(no_stream, nullptr, nullptr, 4, 0));

  XentDeviceResult* no_result = nullptr;
  EXPECT_THROW(softmax_xent_forward(no_stream, nullptr, nullptr, 1, 10, no_result),
               InvalidArgument);
  EXPECT_THROW(softmax_xent_forward_backward(no_stream, nullptr, nullptr, nullptr, 0, 10,
                                             no_result),
               InvalidArgument);

  const Conv2dShape bad_conv{.in_c = 1, .in_h = 2, .in_w = 2, .out_c = 1, .k_h = 3, .k_w = 3};
  EXPECT_THROW(im2col(no_stream, bad_conv, nullptr, 1, nullptr, 100), InvalidArgument);
  const Conv2dShape conv{.in_c = 1, .in_h = 5, .in_w = 5, .out_c = 2, .k_h = 3, .k_w = 3};
  EXPECT_THROW(im2col(no_stream, conv, nullptr, 2, nullptr, 2 * conv.col_cols() - 1),
               InvalidArgument);
  std::vector<float> too_small(conv2d_workspace_elems(conv, 2) - 1);
  EXPECT_THROW(conv2d_forward(nullptr, no_stream, conv, nullptr, nullptr, nullptr, nullptr, 2,
                              too_small),
               InvalidArgument);
  EXPECT_EQ(conv2d_workspace_elems(conv, 2),
            (conv.col_rows() + conv.out_c) * 2 * conv.col_cols());

  const Pool2dShape bad_pool{.channels = 1, .in_h = 1, .in_w = 4};
  EXPECT_THROW(maxpool_forward(no_stream, bad_pool, nullptr, nullptr, nullptr, 1),
               InvalidArgument);
}

// Without a device, a launcher that passes its argument checks fails at the launch, and the launch
// check turns that into a DeviceError naming the kernel. (Skipped on a GPU machine: the bogus
// pointers would fault there and poison the context of later tests.)
TEST(CudaLaunchers, LaunchWithoutDeviceIsADeviceError) {
  if (query_devices().n_devices > 0) GTEST_SKIP() << "a device exists; this is the no-device path";
  std::vector<float> host(16);
  const std::string msg = device_error_of(
      [&] { relu_forward(nullptr, host.data(), host.data(), host.size()); });
  EXPECT_NE(msg.find("launch of relu_forward_kernel"), std::string::npos) << msg;
}

TEST(DeviceInfo, ReportsVersionsAndDevicesOrWhyNone) {
  const std::string info = runtime::cuda_info();
  EXPECT_EQ(info.rfind("CUDA:", 0), 0u) << info;
  EXPECT_NE(info.find("runtime 13."), std::string::npos) << info;
  EXPECT_NE(info.find("cuBLAS 13."), std::string::npos) << info;
  EXPECT_NE(info.find("NCCL 2."), std::string::npos) << info;
  if (query_devices().n_devices == 0) {
    EXPECT_NE(info.find("no CUDA device available ("), std::string::npos) << info;
  } else {
    EXPECT_NE(info.find("device 0: "), std::string::npos) << info;
  }
}

}  // namespace
}  // namespace resync::kernels::cuda
