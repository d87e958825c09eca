// bias_add / bias_grad and relu_forward / relu_backward against plain loops.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/bias.h"
#include "kernels/relu.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::random_floats;

struct Shape {
  size_t rows, cols;
};
constexpr Shape kShapes[] = {{1, 1}, {1, 17}, {17, 1}, {3, 5}, {64, 512}, {129, 10}};

TEST(Bias, AddMatchesReferenceExactly) {
  for (const auto [rows, cols] : kShapes) {
    const auto y0 = random_floats(rows * cols, rows);
    const auto bias = random_floats(cols, cols + 7);
    auto y = y0;
    bias_add(y.data(), bias.data(), rows, cols);
    for (size_t r = 0; r < rows; ++r) {
      for (size_t c = 0; c < cols; ++c) {
        // One float addition per element: the result must be exact.
        ASSERT_EQ(y[r * cols + c], y0[r * cols + c] + bias[c])
            << "y[" << r << "][" << c << "] shape " << rows << "x" << cols;
      }
    }
  }
}

TEST(Bias, GradMatchesDoubleReferenceAndOverwrites) {
  for (const auto [rows, cols] : kShapes) {
    const auto dy = random_floats(rows * cols, rows * 3 + cols);
    std::vector<float> db(cols, std::numeric_limits<float>::quiet_NaN());  // must be overwritten
    bias_grad(dy.data(), db.data(), rows, cols);
    for (size_t c = 0; c < cols; ++c) {
      double ref = 0, abs_sum = 0;
      for (size_t r = 0; r < rows; ++r) {
        ref += dy[r * cols + c];
        abs_sum += std::fabs(dy[r * cols + c]);
      }
      // Tolerance: recursive float summation bound, rows * eps * sum |dy|.
      ASSERT_NEAR(db[c], ref, rows * double(FLT_EPSILON) * abs_sum + 1e-30)
          << "dbias[" << c << "] shape " << rows << "x" << cols;
    }
  }
}

TEST(Relu, ForwardAndBackwardMatchReference) {
  for (const size_t n : {size_t{1}, size_t{7}, size_t{1000}, size_t{32769}}) {
    auto x = random_floats(n, n);
    x[0] = 0.0f;  // the kink: forward 0, gradient 0 (PyTorch's subgradient)
    const auto dy = random_floats(n, n + 1);
    std::vector<float> y(n), dx(n);
    relu_forward(x.data(), y.data(), n);
    relu_backward(x.data(), dy.data(), dx.data(), n);
    for (size_t i = 0; i < n; ++i) {
      const float ref_y = x[i] > 0 ? x[i] : 0.0f;
      const float ref_dx = x[i] > 0 ? dy[i] : 0.0f;
      ASSERT_EQ(y[i], ref_y) << "y[" << i << "] x=" << x[i] << " n=" << n;
      ASSERT_EQ(dx[i], ref_dx) << "dx[" << i << "] x=" << x[i] << " n=" << n;
    }
  }
}

TEST(Relu, InPlaceAndNanPropagates) {
  std::vector<float> v = {-2.0f, 3.0f, std::numeric_limits<float>::quiet_NaN(), -0.5f};
  relu_forward(v.data(), v.data(), v.size());
  EXPECT_EQ(v[0], 0.0f);
  EXPECT_EQ(v[1], 3.0f);
  EXPECT_TRUE(std::isnan(v[2])) << "a NaN activation must not be hidden by ReLU";
  EXPECT_EQ(v[3], 0.0f);

  const std::vector<float> x = {-1.0f, 2.0f, 0.0f};
  std::vector<float> g = {5.0f, 6.0f, 7.0f};
  relu_backward(x.data(), g.data(), g.data(), g.size());
  EXPECT_EQ(g, (std::vector<float>{0.0f, 6.0f, 0.0f}));
}

}  // namespace
}  // namespace resync::kernels
