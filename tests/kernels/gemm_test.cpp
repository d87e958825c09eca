// gemm against a double-accumulating triple loop, all transpose cases and awkward shapes.
#include "kernels/gemm.h"

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "base/error.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::random_floats;

constexpr float kSentinel = 12345.0f;

struct Case {
  size_t m, n, k;
  size_t pad;  // extra elements per stored row: leading dimensions larger than the row
  float alpha, beta;
};

// Element (i, p) of op(X) where X is stored row-major with leading dimension ld.
float at(const std::vector<float>& x, Transpose t, size_t ld, size_t i, size_t p) {
  return t == Transpose::kNo ? x[i * ld + p] : x[p * ld + i];
}

void run_case(Transpose ta, Transpose tb, const Case& tc) {
  const auto [m, n, k, pad, alpha, beta] = tc;
  const size_t a_rows = ta == Transpose::kNo ? m : k, a_cols = ta == Transpose::kNo ? k : m;
  const size_t b_rows = tb == Transpose::kNo ? k : n, b_cols = tb == Transpose::kNo ? n : k;
  const size_t lda = a_cols + pad, ldb = b_cols + pad, ldc = n + pad;
  auto a = random_floats(a_rows * lda, 1 + m);
  auto b = random_floats(b_rows * ldb, 2 + n);
  auto c = random_floats(m * ldc, 3 + k);
  // Padding must be neither read (NaN would leak into C) nor written (sentinel must survive).
  for (size_t r = 0; r < a_rows; ++r)
    for (size_t j = a_cols; j < lda; ++j) a[r * lda + j] = std::numeric_limits<float>::quiet_NaN();
  for (size_t r = 0; r < b_rows; ++r)
    for (size_t j = b_cols; j < ldb; ++j) b[r * ldb + j] = std::numeric_limits<float>::quiet_NaN();
  for (size_t r = 0; r < m; ++r)
    for (size_t j = n; j < ldc; ++j) c[r * ldc + j] = kSentinel;
  if (beta == 0.0f) {
    for (size_t r = 0; r < m; ++r)
      for (size_t j = 0; j < n; ++j) c[r * ldc + j] = std::numeric_limits<float>::quiet_NaN();
  }
  const auto c0 = c;
  gemm(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);

  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < n; ++j) {
      double ref = 0, abs_sum = 0;
      for (size_t p = 0; p < k; ++p) {
        const double prod = double(at(a, ta, lda, i, p)) * double(at(b, tb, ldb, p, j));
        ref += prod;
        abs_sum += std::fabs(prod);
      }
      ref *= alpha;
      double c_in = beta == 0.0f ? 0.0 : double(beta) * double(c0[i * ldc + j]);
      ref += c_in;
      // Tolerance: the standard float dot-product error bound, (k + 2) eps * sum |terms|.
      const double tol =
          (k + 2) * double(FLT_EPSILON) * (std::fabs(alpha) * abs_sum + std::fabs(c_in)) + 1e-30;
      ASSERT_NEAR(c[i * ldc + j], ref, tol)
          << "C[" << i << "][" << j << "] m=" << m << " n=" << n << " k=" << k << " pad=" << pad
          << " ta=" << int(ta) << " tb=" << int(tb) << " alpha=" << alpha << " beta=" << beta;
    }
    for (size_t j = n; j < ldc; ++j) {
      ASSERT_EQ(c[i * ldc + j], kSentinel) << "padding C[" << i << "][" << j << "] was written";
    }
  }
}

class GemmTest : public ::testing::TestWithParam<std::tuple<Transpose, Transpose>> {};

TEST_P(GemmTest, MatchesNaiveReference) {
  const auto [ta, tb] = GetParam();
  const Case cases[] = {
      {1, 1, 1, 0, 1.0f, 0.0f},      {1, 13, 1, 0, 1.0f, 0.0f},    {13, 1, 7, 0, 1.0f, 1.0f},
      {7, 5, 3, 0, 1.0f, 0.0f},      {7, 5, 3, 3, 0.5f, -2.0f},    {33, 17, 65, 0, 1.0f, 0.0f},
      {33, 17, 65, 5, -1.5f, 0.25f}, {64, 10, 512, 1, 1.0f, 0.0f}, {2, 129, 31, 2, 2.0f, 1.0f},
      {5, 3, 0, 1, 1.0f, 0.5f},      {5, 3, 0, 0, 1.0f, 0.0f},
  };
  for (const Case& tc : cases) {
    run_case(ta, tb, tc);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

std::string transpose_case_name(
    const ::testing::TestParamInfo<std::tuple<Transpose, Transpose>>& param) {
  const auto letter = [](Transpose t) { return t == Transpose::kNo ? 'N' : 'T'; };
  return {letter(std::get<0>(param.param)), letter(std::get<1>(param.param))};
}

INSTANTIATE_TEST_SUITE_P(AllTransposes, GemmTest,
                         ::testing::Combine(::testing::Values(Transpose::kNo, Transpose::kYes),
                                            ::testing::Values(Transpose::kNo, Transpose::kYes)),
                         transpose_case_name);

TEST(Gemm, EmptyOutputIsANoOp) {
  float c = kSentinel;
  gemm(Transpose::kNo, Transpose::kNo, 0, 1, 4, 1.0f, nullptr, 4, nullptr, 1, 0.0f, &c, 1);
  gemm(Transpose::kNo, Transpose::kNo, 1, 0, 4, 1.0f, nullptr, 4, nullptr, 1, 0.0f, &c, 1);
  EXPECT_EQ(c, kSentinel);
}

TEST(Gemm, RejectsShortLeadingDimensions) {
  std::vector<float> a(12), b(12), c(12);
  // A is 3 x 4 (kNo) so lda must be >= 4.
  EXPECT_THROW(gemm(Transpose::kNo, Transpose::kNo, 3, 3, 4, 1.0f, a.data(), 3, b.data(), 3, 0.0f,
                    c.data(), 3),
               InvalidArgument);
  // Stored transposed, A is 4 x 3 so lda >= 3 is fine, but ldc < n is not.
  EXPECT_THROW(gemm(Transpose::kYes, Transpose::kNo, 3, 3, 4, 1.0f, a.data(), 3, b.data(), 3, 0.0f,
                    c.data(), 2),
               InvalidArgument);
  EXPECT_NO_THROW(gemm(Transpose::kYes, Transpose::kNo, 3, 3, 4, 1.0f, a.data(), 3, b.data(), 3,
                       0.0f, c.data(), 3));
}

TEST(Gemm, VersionAndThreads) {
  EXPECT_NE(blas_version().find("OpenBLAS"), std::string::npos) << blas_version();
  EXPECT_FALSE(blas_core().empty());
  const std::string advice = blas_core_advice();
  EXPECT_TRUE(advice.empty() || advice.find("OPENBLAS_CORETYPE=") != std::string::npos) << advice;
  const int before = blas_threads();
  set_blas_threads(1);
  EXPECT_EQ(blas_threads(), 1);
  set_blas_threads(before);
  EXPECT_THROW(set_blas_threads(0), InvalidArgument);
}

}  // namespace
}  // namespace resync::kernels
