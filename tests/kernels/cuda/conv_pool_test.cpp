// CUDA im2col/col2im, conv2d and max pooling against the CPU kernels on seeded inputs: the data
// movement kernels (im2col, col2im, max pooling) bit for bit, the GEMM-based conv within the
// rounding bound of its sums.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "base/error.h"
#include "kernels/conv2d.h"
#include "kernels/cuda/conv2d.h"
#include "kernels/cuda/maxpool.h"
#include "kernels/maxpool.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::CudaTest;
using testing::expect_same_bits;
using testing::random_floats;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct ConvCase {
  Conv2dShape s;
  size_t batch;
};

// Padding on one axis only, strides 2 and 3, kernels wider than the unpadded input, 1x1 kernels,
// one and several input channels, batch 1 and > 1, and the cnn's first layer.
const ConvCase kConvCases[] = {
    {{.in_c = 1, .in_h = 5, .in_w = 7, .out_c = 2, .k_h = 3, .k_w = 3, .pad_h = 1, .pad_w = 1}, 1},
    {{.in_c = 3, .in_h = 7, .in_w = 6, .out_c = 4, .k_h = 3, .k_w = 2, .stride_h = 2,
      .stride_w = 2, .pad_h = 1, .pad_w = 0},
     3},
    {{.in_c = 1, .in_h = 11, .in_w = 9, .out_c = 3, .k_h = 4, .k_w = 3, .stride_h = 2,
      .stride_w = 1, .pad_h = 0, .pad_w = 2},
     2},
    {{.in_c = 2, .in_h = 6, .in_w = 5, .out_c = 3, .k_h = 1, .k_w = 1, .stride_h = 2,
      .stride_w = 2},
     3},
    {{.in_c = 1, .in_h = 2, .in_w = 3, .out_c = 2, .k_h = 5, .k_w = 5, .stride_h = 3,
      .stride_w = 3, .pad_h = 2, .pad_w = 2},
     3},
    {{.in_c = 1, .in_h = 28, .in_w = 28, .out_c = 6, .k_h = 5, .k_w = 5, .pad_h = 2, .pad_w = 2},
     4},
};

std::string describe(const ConvCase& c) {
  const Conv2dShape& s = c.s;
  return "in " + std::to_string(s.in_c) + "x" + std::to_string(s.in_h) + "x" +
         std::to_string(s.in_w) + " out_c " + std::to_string(s.out_c) + " k " +
         std::to_string(s.k_h) + "x" + std::to_string(s.k_w) + " stride " +
         std::to_string(s.stride_h) + "x" + std::to_string(s.stride_w) + " pad " +
         std::to_string(s.pad_h) + "x" + std::to_string(s.pad_w) + " batch " +
         std::to_string(c.batch);
}

std::vector<float> abs_of(std::vector<float> v) {
  for (float& x : v) x = std::fabs(x);
  return v;
}

// |gpu - cpu| within twice the recursive-summation bound (n_terms + 2) eps sum|terms|, where
// sum|terms| is the same computation on absolute values (abs_result).
void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu,
                  const std::vector<float>& abs_result, size_t n_terms, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  for (size_t i = 0; i < gpu.size(); ++i) {
    const double tol = 2.0 * (n_terms + 2) * FLT_EPSILON * abs_result[i] + 1e-30;
    ASSERT_NEAR(gpu[i], cpu[i], tol) << what << ": index " << i << " expected (CPU) " << cpu[i]
                                     << " actual (CUDA) " << gpu[i];
  }
}

using CudaConv = CudaTest;

TEST_F(CudaConv, Im2colAndCol2imMatchCpuBitForBit) {
  for (const ConvCase& tc : kConvCases) {
    const Conv2dShape& s = tc.s;
    const size_t batch = tc.batch, n_pixels = s.col_cols(), ld = batch * n_pixels + 3;
    const auto x = random_floats(batch * s.in_size(), s.in_h * 31 + batch);
    // CPU: the batched layout built sample by sample through the padded copy.
    std::vector<float> cpu_col(s.col_rows() * ld, kNaN), xp(s.padded_size());
    for (size_t n = 0; n < batch; ++n) {
      pad_sample(s, x.data() + n * s.in_size(), xp.data());
      im2col(s, xp.data(), cpu_col.data() + n * n_pixels, ld);
    }
    auto d_x = to_device(x);
    auto d_col = to_device(std::vector<float>(cpu_col.size(), kNaN));  // the gaps stay NaN
    cuda::im2col(stream(), s, d_x.data(), batch, d_col.data(), ld);
    expect_same_bits(to_host(d_col), cpu_col, "im2col " + describe(tc));

    const auto col = random_floats(s.col_rows() * ld, s.k_h * 17 + batch);
    std::vector<float> cpu_dx(batch * s.in_size()), dxp(s.padded_size());
    for (size_t n = 0; n < batch; ++n) {
      col2im(s, col.data() + n * n_pixels, ld, dxp.data());
      crop_sample(s, dxp.data(), cpu_dx.data() + n * s.in_size());
    }
    auto d_col2 = to_device(col);
    auto d_dx = to_device(std::vector<float>(cpu_dx.size(), kNaN));  // must be overwritten
    cuda::col2im(stream(), s, d_col2.data(), ld, batch, d_dx.data());
    expect_same_bits(to_host(d_dx), cpu_dx, "col2im " + describe(tc));
  }
}

TEST_F(CudaConv, ForwardAndBackwardMatchCpu) {
  for (const ConvCase& tc : kConvCases) {
    const Conv2dShape& s = tc.s;
    const size_t batch = tc.batch;
    const std::string what = describe(tc);
    const auto x = random_floats(batch * s.in_size(), 100 + s.in_h + batch);
    const auto w = random_floats(s.n_weights(), 200 + s.out_c);
    const auto bias = random_floats(s.out_c, 300 + s.k_h);
    const auto dy = random_floats(batch * s.out_size(), 400 + s.k_w);

    // CPU results, and the same computations on absolute values for the error bounds.
    std::vector<float> ws(conv2d_workspace_elems(s, ConvLowering::kBatched, batch));
    std::vector<float> y(batch * s.out_size()), abs_y(y.size());
    conv2d_forward(s, ConvLowering::kBatched, x.data(), w.data(), bias.data(), y.data(), batch, ws);
    conv2d_forward(s, ConvLowering::kBatched, abs_of(x).data(), abs_of(w).data(),
                   abs_of(bias).data(), abs_y.data(), batch, ws);
    std::vector<float> dw(s.n_weights()), dbias(s.out_c), dx(x.size());
    std::vector<float> abs_dw(dw.size()), abs_dbias(dbias.size()), abs_dx(dx.size());
    conv2d_backward(s, ConvLowering::kBatched, x.data(), w.data(), dy.data(), dw.data(),
                    dbias.data(), dx.data(), batch, ws);
    conv2d_backward(s, ConvLowering::kBatched, abs_of(x).data(), abs_of(w).data(),
                    abs_of(dy).data(), abs_dw.data(), abs_dbias.data(), abs_dx.data(), batch, ws);

    auto d_x = to_device(x);
    auto d_w = to_device(w);
    auto d_bias = to_device(bias);
    auto d_dy = to_device(dy);
    cuda::DeviceBuffer<float> d_ws(cuda::conv2d_workspace_elems(s, batch));
    cuda::DeviceBuffer<float> d_y(y.size()), d_dw(dw.size()), d_dbias(dbias.size()),
        d_dx(dx.size());
    const std::span<float> workspace(d_ws.data(), d_ws.size());
    cuda::conv2d_forward(cublas(), stream(), s, d_x.data(), d_w.data(), d_bias.data(), d_y.data(),
                         batch, workspace);
    cuda::conv2d_backward(cublas(), stream(), s, d_x.data(), d_w.data(), d_dy.data(),
                          d_dw.data(), d_dbias.data(), d_dx.data(), batch, workspace);

    const size_t n_batch_terms = batch * s.col_cols();  // dw and dbias sum over samples x pixels
    expect_close(to_host(d_y), y, abs_y, s.col_rows() + 1, "conv forward y " + what);
    expect_close(to_host(d_dw), dw, abs_dw, n_batch_terms, "conv dw " + what);
    expect_close(to_host(d_dbias), dbias, abs_dbias, n_batch_terms, "conv dbias " + what);
    expect_close(to_host(d_dx), dx, abs_dx, s.out_c * s.k_h * s.k_w, "conv dx " + what);
  }
}

TEST_F(CudaConv, WorkspaceTooSmallIsRejected) {
  const Conv2dShape s{.in_c = 1, .in_h = 5, .in_w = 5, .out_c = 2, .k_h = 3, .k_w = 3};
  cuda::DeviceBuffer<float> d_ws(cuda::conv2d_workspace_elems(s, 2) - 1);
  EXPECT_THROW(cuda::conv2d_forward(cublas(), stream(), s, nullptr, nullptr, nullptr, nullptr, 2,
                                    std::span<float>(d_ws.data(), d_ws.size())),
               InvalidArgument);
}

// ---- Max pooling --------------------------------------------------------------------------------

using CudaMaxPool = CudaTest;

TEST_F(CudaMaxPool, ForwardAndBackwardMatchCpuBitForBit) {
  const Pool2dShape shapes[] = {
      {.channels = 3, .in_h = 8, .in_w = 8},  // 2x2 stride 2, the cnn's pool
      {.channels = 2, .in_h = 7, .in_w = 9},  // odd sizes: the last row/column is dropped
      {.channels = 2, .in_h = 9, .in_w = 7, .k_h = 3, .k_w = 3, .stride_h = 2, .stride_w = 2},
      {.channels = 1, .in_h = 6, .in_w = 5, .k_h = 3, .k_w = 2, .stride_h = 1, .stride_w = 1},
      {.channels = 4, .in_h = 5, .in_w = 11, .k_h = 2, .k_w = 4, .stride_h = 3, .stride_w = 3},
  };
  const size_t batch = 3;
  for (const Pool2dShape& s : shapes) {
    const std::string what = std::to_string(s.in_h) + "x" + std::to_string(s.in_w) + " k " +
                             std::to_string(s.k_h) + "x" + std::to_string(s.k_w) + " stride " +
                             std::to_string(s.stride_h) + "x" + std::to_string(s.stride_w);
    // Values rounded to a coarse grid produce ties (first maximum wins), plus a few NaNs.
    auto x = random_floats(batch * s.in_size(), s.in_h * 7 + s.k_w);
    for (float& v : x) v = std::round(v * 3.0f);
    x[5] = kNaN;
    x[x.size() / 2] = kNaN;
    const auto dy = random_floats(batch * s.out_size(), s.in_w * 5 + s.k_h);

    std::vector<float> y(batch * s.out_size()), dx(x.size());
    std::vector<uint32_t> argmax(y.size());
    maxpool_forward(s, x.data(), y.data(), argmax.data(), batch);
    maxpool_backward(s, dy.data(), argmax.data(), dx.data(), batch);

    auto d_x = to_device(x);
    auto d_dy = to_device(dy);
    cuda::DeviceBuffer<float> d_y(y.size()), d_dx(dx.size());
    cuda::DeviceBuffer<uint32_t> d_argmax(argmax.size());
    cuda::maxpool_forward(stream(), s, d_x.data(), d_y.data(), d_argmax.data(), batch);
    cuda::maxpool_backward(stream(), s, d_dy.data(), d_argmax.data(), d_dx.data(), batch);

    expect_same_bits(to_host(d_y), y, "maxpool y " + what);
    const auto gpu_argmax = to_host(d_argmax);
    for (size_t i = 0; i < argmax.size(); ++i) {
      ASSERT_EQ(gpu_argmax[i], argmax[i]) << "maxpool argmax " << what << ": output " << i;
    }
    expect_same_bits(to_host(d_dx), dx, "maxpool dx " + what);
  }
}

}  // namespace
}  // namespace resync::kernels
