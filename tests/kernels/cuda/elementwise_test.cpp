// CUDA GEMM, bias, ReLU, SGD, AdamW and softmax cross-entropy against the CPU kernels on seeded
// inputs.
// Ops whose CUDA kernel performs the CPU's operations in the CPU's order are compared bit for bit;
// the others (cuBLAS sums, fused multiply-adds, device exp/log) within a stated rounding bound.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "base/error.h"
#include "kernels/adamw.h"
#include "kernels/bias.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/bias.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/relu.h"
#include "kernels/cuda/sgd.h"
#include "kernels/cuda/softmax_xent.h"
#include "kernels/gemm.h"
#include "kernels/relu.h"
#include "kernels/sgd.h"
#include "kernels/softmax_xent.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::CudaTest;
using testing::expect_same_bits;
using testing::random_floats;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kSentinel = 12345.0f;

// ---- GEMM ---------------------------------------------------------------------------------------

using CudaGemm = CudaTest;

struct GemmCase {
  size_t m, n, k, pad;
  float alpha, beta;
};

TEST_F(CudaGemm, MatchesCpuForAllTransposesAndShapes) {
  const GemmCase cases[] = {{1, 1, 1, 0, 1.0f, 0.0f},   {7, 5, 3, 2, 1.0f, 0.0f},
                            {5, 9, 17, 1, 0.5f, 1.0f},  {33, 17, 65, 3, -1.5f, 0.25f},
                            {64, 48, 100, 0, 1.0f, 0.0f}, {6, 4, 0, 1, 1.0f, 0.5f},
                            {6, 4, 0, 0, 1.0f, 0.0f}};
  for (const Transpose ta : {Transpose::kNo, Transpose::kYes}) {
    for (const Transpose tb : {Transpose::kNo, Transpose::kYes}) {
      for (const GemmCase& tc : cases) {
        const auto [m, n, k, pad, alpha, beta] = tc;
        const std::string what = "m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
                                 std::to_string(k) + " pad " + std::to_string(pad) + " ta " +
                                 std::to_string(ta == Transpose::kYes) + " tb " +
                                 std::to_string(tb == Transpose::kYes) + " beta " +
                                 std::to_string(beta);
        const size_t a_rows = ta == Transpose::kNo ? m : k, a_cols = ta == Transpose::kNo ? k : m;
        const size_t b_rows = tb == Transpose::kNo ? k : n, b_cols = tb == Transpose::kNo ? n : k;
        const size_t lda = a_cols + pad, ldb = b_cols + pad, ldc = n + pad;
        auto a = random_floats(a_rows * lda, 11 + m);
        auto b = random_floats(b_rows * ldb, 12 + n);
        auto c = random_floats(m * ldc, 13 + k);
        // Padding must be neither read (NaN would leak) nor written (the sentinel must survive);
        // with beta == 0, C must not be read either.
        for (size_t r = 0; r < a_rows; ++r)
          for (size_t j = a_cols; j < lda; ++j) a[r * lda + j] = kNaN;
        for (size_t r = 0; r < b_rows; ++r)
          for (size_t j = b_cols; j < ldb; ++j) b[r * ldb + j] = kNaN;
        for (size_t r = 0; r < m; ++r) {
          for (size_t j = 0; j < ldc; ++j) {
            if (j >= n) c[r * ldc + j] = kSentinel;
            else if (beta == 0.0f) c[r * ldc + j] = kNaN;
          }
        }
        auto d_a = to_device(a);
        auto d_b = to_device(b);
        auto d_c = to_device(c);
        cuda::gemm(cublas(), stream(), ta, tb, m, n, k, alpha, d_a.data(), lda, d_b.data(), ldb,
                   beta, d_c.data(), ldc);
        const auto gpu = to_host(d_c);
        auto cpu = c;
        gemm(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, cpu.data(), ldc);

        for (size_t i = 0; i < m; ++i) {
          for (size_t j = 0; j < ldc; ++j) {
            const size_t idx = i * ldc + j;
            if (j >= n) {
              ASSERT_EQ(gpu[idx], kSentinel) << what << ": padding of C written at " << i << ","
                                             << j;
              continue;
            }
            // Both results lie within (k + 2) eps sum|terms| of the exact value.
            double abs_sum = beta == 0.0f ? 0.0 : std::fabs(double(beta) * c[idx]);
            for (size_t p = 0; p < k; ++p) {
              const float av = ta == Transpose::kNo ? a[i * lda + p] : a[p * lda + i];
              const float bv = tb == Transpose::kNo ? b[p * ldb + j] : b[j * ldb + p];
              abs_sum += std::fabs(double(alpha) * av * bv);
            }
            const double tol = 2.0 * (k + 2) * FLT_EPSILON * abs_sum + 1e-30;
            ASSERT_NEAR(gpu[idx], cpu[idx], tol)
                << what << ": C(" << i << "," << j << ") expected (CPU) " << cpu[idx]
                << " actual (CUDA) " << gpu[idx];
          }
        }
      }
    }
  }
}

TEST_F(CudaGemm, RejectsShortLeadingDimensionBeforeLaunching) {
  EXPECT_THROW(cuda::gemm(cublas(), stream(), Transpose::kNo, Transpose::kNo, 4, 4, 4, 1.0f,
                          nullptr, 3, nullptr, 4, 0.0f, nullptr, 4),
               InvalidArgument);
}

// ---- Bias, ReLU ---------------------------------------------------------------------------------

using CudaBias = CudaTest;

TEST_F(CudaBias, AddAndGradMatchCpuBitForBit) {
  for (const auto& [rows, cols] : {std::pair<size_t, size_t>{1, 1}, {3, 10}, {64, 100},
                                  {257, 33}, {5, 1000}}) {
    const std::string what = std::to_string(rows) + "x" + std::to_string(cols);
    const auto y = random_floats(rows * cols, rows + 1);
    const auto bias = random_floats(cols, cols + 2);
    auto d_y = to_device(y);
    auto d_bias = to_device(bias);
    cuda::bias_add(stream(), d_y.data(), d_bias.data(), rows, cols);
    auto cpu_y = y;
    bias_add(cpu_y.data(), bias.data(), rows, cols);
    expect_same_bits(to_host(d_y), cpu_y, "bias_add " + what);

    const auto dy = random_floats(rows * cols, rows + 3, -10.0f, 10.0f);
    auto d_dy = to_device(dy);
    cuda::DeviceBuffer<float> d_dbias(cols);
    cuda::bias_grad(stream(), d_dy.data(), d_dbias.data(), rows, cols);
    std::vector<float> cpu_dbias(cols, kNaN);
    bias_grad(dy.data(), cpu_dbias.data(), rows, cols);
    expect_same_bits(to_host(d_dbias), cpu_dbias, "bias_grad " + what);
  }
}

using CudaRelu = CudaTest;

TEST_F(CudaRelu, ForwardAndBackwardMatchCpuBitForBitIncludingNaNAndZeros) {
  auto x = random_floats(10007, 7);
  const auto dy = random_floats(x.size(), 8);
  x[0] = 0.0f;
  x[1] = -0.0f;
  x[2] = kNaN;
  x[3] = -std::numeric_limits<float>::infinity();
  x[4] = std::numeric_limits<float>::denorm_min();
  auto d_x = to_device(x);
  auto d_y = cuda::DeviceBuffer<float>(x.size());
  cuda::relu_forward(stream(), d_x.data(), d_y.data(), x.size());
  std::vector<float> cpu_y(x.size());
  relu_forward(x.data(), cpu_y.data(), x.size());
  expect_same_bits(to_host(d_y), cpu_y, "relu_forward");

  auto d_dy = to_device(dy);
  cuda::relu_backward(stream(), d_x.data(), d_dy.data(), d_dy.data(), x.size());  // in place
  std::vector<float> cpu_dx(x.size());
  relu_backward(x.data(), dy.data(), cpu_dx.data(), x.size());
  expect_same_bits(to_host(d_dy), cpu_dx, "relu_backward (in place)");
}

// ---- SGD ----------------------------------------------------------------------------------------

using CudaSgd = CudaTest;

// nvcc contracts the update into fused multiply-adds, so a step may differ from the CPU's in the
// last bits of each product: a few ulps of the largest magnitude involved, per step.
TEST_F(CudaSgd, MomentumUpdateMatchesCpuOverSeveralSteps) {
  const size_t n = 4099;
  auto params = random_floats(n, 21);
  auto velocity = random_floats(n, 22, -0.1f, 0.1f);
  const SgdHyper h{.lr = 0.05f, .momentum = 0.9f, .weight_decay = 1e-4f};
  const float grad_scale = 0.25f;
  auto d_p = to_device(params);
  auto d_v = to_device(velocity);
  for (int step = 0; step < 5; ++step) {
    const auto grads = random_floats(n, 30 + step, -4.0f, 4.0f);
    auto d_g = to_device(grads);
    cuda::sgd_momentum_update(stream(), d_p.data(), d_v.data(), d_g.data(), n, grad_scale, h);
    sgd_momentum_update(params, velocity, grads, grad_scale, h);
    const auto gpu_p = to_host(d_p);
    const auto gpu_v = to_host(d_v);
    for (size_t i = 0; i < n; ++i) {
      const double tol_v = 8.0 * FLT_EPSILON * (std::fabs(velocity[i]) + 4.0);
      ASSERT_NEAR(gpu_v[i], velocity[i], tol_v) << "step " << step << " velocity index " << i;
      const double tol_p = 8.0 * FLT_EPSILON * (std::fabs(params[i]) + 1.0);
      ASSERT_NEAR(gpu_p[i], params[i], tol_p) << "step " << step << " param index " << i;
    }
    // Continue both runs from the same state, so the bound stays per step.
    params = gpu_p;
    velocity = gpu_v;
    d_p = to_device(params);
    d_v = to_device(velocity);
  }
}

// ---- AdamW --------------------------------------------------------------------------------------

using CudaAdamW = CudaTest;

// kernels/cuda/adamw.cu is built without fused multiply-adds: the device update is the CPU's,
// bit for bit, step after step, and so is its parameter half.
TEST_F(CudaAdamW, UpdateAndParameterHalfEqualTheCpuBitForBit) {
  const size_t n = 4099;
  auto params = random_floats(n, 51);
  std::vector<float> m(n, 0.0f), v(n, 0.0f);
  const AdamWHyper h{.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
  auto d_p = to_device(params);
  auto d_m = to_device(m);
  auto d_v = to_device(v);
  for (uint64_t t = 1; t <= 5; ++t) {
    const auto grads = random_floats(n, 60 + t, -4.0f, 4.0f);
    const AdamWStep s = adamw_step(h, 1e-3f * float(t), t);
    auto d_g = to_device(grads);
    auto d_late = to_device(params);  // the parameters before this update
    cuda::adamw_update(stream(), d_p.data(), d_m.data(), d_v.data(), d_g.data(), n, 0.25f, s);
    adamw_update(params, m, v, grads, 0.25f, s);
    expect_same_bits(to_host(d_p), params, "parameters");
    expect_same_bits(to_host(d_m), m, "first moment");
    expect_same_bits(to_host(d_v), v, "second moment");
    cuda::adamw_apply_moments(stream(), d_late.data(), d_m.data(), d_v.data(), n, s);
    expect_same_bits(to_host(d_late), params, "parameter half");
  }
}

TEST_F(CudaAdamW, SumOfSquaresMatchesTheCpuAndIsRepeatable) {
  for (size_t n : {size_t{1}, size_t{255}, size_t{100003}}) {
    const auto values = random_floats(n, 70 + n, -3.0f, 3.0f);
    auto d = to_device(values);
    const double gpu = cuda::sum_of_squares(stream(), d.data(), n);
    const double cpu = sum_of_squares(values);
    EXPECT_NEAR(gpu, cpu, 1e-12 * cpu) << "n " << n;
    EXPECT_EQ(cuda::sum_of_squares(stream(), d.data(), n), gpu) << "n " << n << ": not repeatable";
  }
  EXPECT_EQ(cuda::sum_of_squares(stream(), nullptr, 0), 0.0);
}

// ---- Softmax cross-entropy ----------------------------------------------------------------------

using CudaXent = CudaTest;

struct XentCase {
  size_t batch, n_classes;
  float scale;  // logits in [-scale, scale): 1e4 checks the max shift
};

std::vector<int32_t> seeded_labels(size_t batch, size_t n_classes, uint64_t seed) {
  const auto u = random_floats(batch, seed, 0.0f, 1.0f);
  std::vector<int32_t> labels(batch);
  for (size_t r = 0; r < batch; ++r) {
    labels[r] = static_cast<int32_t>(std::min(n_classes - 1, size_t(u[r] * float(n_classes))));
  }
  return labels;
}

TEST_F(CudaXent, TrainingAndEvaluationMatchCpu) {
  for (const XentCase& tc : {XentCase{1, 1, 1.0f}, XentCase{1, 10, 3.0f}, XentCase{64, 10, 5.0f},
                             XentCase{300, 10, 1e4f}, XentCase{513, 37, 2.0f},
                             XentCase{7, 1000, 8.0f}}) {
    const std::string what =
        "batch " + std::to_string(tc.batch) + " classes " + std::to_string(tc.n_classes);
    const auto logits = random_floats(tc.batch * tc.n_classes, tc.batch, -tc.scale, tc.scale);
    const auto labels = seeded_labels(tc.batch, tc.n_classes, tc.n_classes);
    auto d_logits = to_device(logits);
    auto d_labels = to_device(labels);
    cuda::DeviceBuffer<float> d_dlogits(logits.size());
    cuda::DeviceBuffer<cuda::XentDeviceResult> d_result(1);

    cuda::softmax_xent_forward_backward(stream(), d_logits.data(), d_labels.data(),
                                        d_dlogits.data(), tc.batch, tc.n_classes,
                                        d_result.data());
    const XentSums gpu = cuda::read_xent_result(d_result.data(), stream());
    std::vector<float> cpu_dlogits(logits.size());
    size_t cpu_correct = 0;
    const float cpu_loss =
        softmax_xent_forward_backward(logits.data(), labels.data(), cpu_dlogits.data(), tc.batch,
                                      tc.n_classes, &cpu_correct);
    const float gpu_loss = static_cast<float>(gpu.loss_sum / double(tc.batch));
    // Per row, log and exp may each differ by an ulp or two between libm and the device.
    EXPECT_NEAR(gpu_loss, cpu_loss, 1e-5 * (std::fabs(cpu_loss) + 1.0)) << what;
    EXPECT_EQ(gpu.n_correct, cpu_correct) << what;
    const auto gpu_dlogits = to_host(d_dlogits);
    const double inv_batch = 1.0 / double(tc.batch);
    for (size_t i = 0; i < logits.size(); ++i) {
      ASSERT_NEAR(gpu_dlogits[i], cpu_dlogits[i], 1e-5 * inv_batch)
          << what << ": dlogits index " << i << " (row " << i / tc.n_classes << ")";
    }

    cuda::softmax_xent_forward(stream(), d_logits.data(), d_labels.data(), tc.batch,
                               tc.n_classes, d_result.data());
    const XentSums gpu_eval = cuda::read_xent_result(d_result.data(), stream());
    const XentSums cpu_eval =
        softmax_xent_forward(logits.data(), labels.data(), tc.batch, tc.n_classes);
    EXPECT_NEAR(gpu_eval.loss_sum, cpu_eval.loss_sum, 1e-5 * (std::fabs(cpu_eval.loss_sum) + 1.0))
        << what;
    EXPECT_EQ(gpu_eval.n_correct, cpu_eval.n_correct) << what;
    // Evaluation and training sum the same row losses in the same order.
    EXPECT_EQ(gpu_eval.loss_sum, gpu.loss_sum) << what;
  }
}

TEST_F(CudaXent, EmptyEvaluationBatchGivesZeros) {
  cuda::DeviceBuffer<cuda::XentDeviceResult> d_result(1);
  cuda::softmax_xent_forward(stream(), nullptr, nullptr, 0, 10, d_result.data());
  const XentSums sums = cuda::read_xent_result(d_result.data(), stream());
  EXPECT_EQ(sums.loss_sum, 0.0);
  EXPECT_EQ(sums.n_correct, 0u);
}

TEST_F(CudaXent, BadLabelIsReportedLikeTheCpuKernel) {
  const size_t batch = 6, n_classes = 4;
  const auto logits = random_floats(batch * n_classes, 5);
  std::vector<int32_t> labels = {0, 1, 2, 3, 4, -1};  // rows 4 and 5 are bad; row 4 is named
  auto d_logits = to_device(logits);
  auto d_labels = to_device(labels);
  cuda::DeviceBuffer<float> d_dlogits(logits.size());
  cuda::DeviceBuffer<cuda::XentDeviceResult> d_result(1);
  cuda::softmax_xent_forward_backward(stream(), d_logits.data(), d_labels.data(),
                                      d_dlogits.data(), batch, n_classes, d_result.data());
  std::string gpu_message, cpu_message;
  try {
    cuda::read_xent_result(d_result.data(), stream());
  } catch (const InvalidArgument& e) {
    gpu_message = e.what();
  }
  std::vector<float> cpu_dlogits(logits.size());
  try {
    softmax_xent_forward_backward(logits.data(), labels.data(), cpu_dlogits.data(), batch,
                                  n_classes);
  } catch (const InvalidArgument& e) {
    cpu_message = e.what();
  }
  EXPECT_FALSE(gpu_message.empty()) << "the bad label was not reported";
  EXPECT_EQ(gpu_message, cpu_message);
}

}  // namespace
}  // namespace resync::kernels
