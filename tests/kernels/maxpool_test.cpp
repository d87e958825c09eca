// maxpool forward/backward against a naive window scan: floor mode on odd sizes, overlapping
// windows, ties (first maximum wins) and NaN propagation.
#include "kernels/maxpool.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "base/error.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::random_floats;

struct Case {
  Pool2dShape s;
  size_t batch;
};

const Case kCases[] = {
    {{.channels = 2, .in_h = 7, .in_w = 7}, 3},  // 2x2/2 on odd sizes: last row/col dropped
    {{.channels = 1, .in_h = 6, .in_w = 5}, 1},
    {{.channels = 3, .in_h = 28, .in_w = 28}, 2},
    {{.channels = 3, .in_h = 5, .in_w = 8, .k_h = 3, .k_w = 3, .stride_h = 2, .stride_w = 2}, 3},
    {{.channels = 2, .in_h = 4, .in_w = 5, .k_h = 3, .k_w = 2, .stride_h = 1, .stride_w = 1}, 2},
    {{.channels = 1, .in_h = 1, .in_w = 5, .k_h = 1, .k_w = 2, .stride_h = 1, .stride_w = 2}, 3},
    {{.channels = 2, .in_h = 3, .in_w = 3, .k_h = 3, .k_w = 3}, 1},  // one window per plane
};

std::string describe(const Case& c) {
  const Pool2dShape& s = c.s;
  return std::to_string(s.channels) + "x" + std::to_string(s.in_h) + "x" + std::to_string(s.in_w) +
         " k " + std::to_string(s.k_h) + "x" + std::to_string(s.k_w) + " stride " +
         std::to_string(s.stride_h) + "x" + std::to_string(s.stride_w) + " batch " +
         std::to_string(c.batch);
}

struct Reference {
  std::vector<float> y, dx;
};

Reference reference(const Case& tc, const std::vector<float>& x, const std::vector<float>& dy) {
  const Pool2dShape& s = tc.s;
  Reference ref{std::vector<float>(tc.batch * s.out_size()),
                std::vector<float>(tc.batch * s.in_size(), 0.0f)};
  for (size_t plane = 0; plane < tc.batch * s.channels; ++plane)
    for (size_t oh = 0; oh < s.out_h(); ++oh)
      for (size_t ow = 0; ow < s.out_w(); ++ow) {
        size_t best = SIZE_MAX;
        for (size_t ki = 0; ki < s.k_h; ++ki)
          for (size_t kj = 0; kj < s.k_w; ++kj) {
            const size_t i = plane * s.in_h * s.in_w + (oh * s.stride_h + ki) * s.in_w +
                             ow * s.stride_w + kj;
            if (best == SIZE_MAX || x[i] > x[best]) best = i;  // first maximum on ties
          }
        const size_t o = (plane * s.out_h() + oh) * s.out_w() + ow;
        ref.y[o] = x[best];
        ref.dx[best] += dy[o];
      }
  return ref;
}

TEST(Pool2dShapeTest, FloorModeAndValidation) {
  const Pool2dShape odd{.channels = 4, .in_h = 7, .in_w = 9};
  EXPECT_EQ(odd.out_h(), 3u);
  EXPECT_EQ(odd.out_w(), 4u);
  EXPECT_EQ(odd.out_size(), 48u);
  EXPECT_THROW(check_pool2d_shape({.channels = 1, .in_h = 1, .in_w = 4}), InvalidArgument);
  EXPECT_THROW(check_pool2d_shape({.channels = 1, .in_h = 4, .in_w = 4, .stride_h = 0}),
               InvalidArgument);
  EXPECT_THROW(check_pool2d_shape({.channels = 0, .in_h = 4, .in_w = 4}), InvalidArgument);
  EXPECT_NO_THROW(check_pool2d_shape({.channels = 1, .in_h = 2, .in_w = 2}));
}

TEST(MaxPool, ForwardAndBackwardMatchNaiveScanExactly) {
  for (const Case& tc : kCases) {
    const Pool2dShape& s = tc.s;
    auto x = random_floats(tc.batch * s.in_size(), s.in_h * 7 + s.in_w);
    // Coarse values make ties frequent: the first maximum must win in forward and backward.
    for (auto& v : x) v = std::round(v * 3.0f);
    const auto dy = random_floats(tc.batch * s.out_size(), s.channels + 5);
    const Reference ref = reference(tc, x, dy);
    std::vector<float> y(ref.y.size(), -1.0f);
    std::vector<uint32_t> argmax(ref.y.size());
    std::vector<float> dx(ref.dx.size(), std::numeric_limits<float>::quiet_NaN());
    maxpool_forward(s, x.data(), y.data(), argmax.data(), tc.batch);
    maxpool_backward(s, dy.data(), argmax.data(), dx.data(), tc.batch);
    for (size_t i = 0; i < y.size(); ++i) {
      ASSERT_EQ(y[i], ref.y[i]) << "y[" << i << "] " << describe(tc);
    }
    // Each dx element is a sum of at most k_h*k_w dy values added in output order by both:
    // with non-overlapping windows it is a copy; overlapping sums are in the same order.
    for (size_t i = 0; i < dx.size(); ++i) {
      ASSERT_EQ(dx[i], ref.dx[i]) << "dx[" << i << "] " << describe(tc);
    }
  }
}

TEST(MaxPool, OddInputDropsLastRowAndColumn) {
  // 1 x 3 x 3, 2x2/2: one window over the top-left 2x2; row 2 and column 2 are never read.
  const Pool2dShape s{.channels = 1, .in_h = 3, .in_w = 3};
  const std::vector<float> x = {1, 2, 90, 4, 3, 91, 92, 93, 94};
  std::vector<float> y(1), dx(9, -1.0f);
  std::vector<uint32_t> argmax(1);
  maxpool_forward(s, x.data(), y.data(), argmax.data(), 1);
  EXPECT_EQ(y[0], 4.0f);
  EXPECT_EQ(argmax[0], 3u);
  const float dy = 0.5f;
  maxpool_backward(s, &dy, argmax.data(), dx.data(), 1);
  EXPECT_EQ(dx, (std::vector<float>{0, 0, 0, 0.5f, 0, 0, 0, 0, 0}));
}

TEST(MaxPool, NanPropagatesAndTiesGoToTheFirst) {
  // The same two windows through the 2x2/2 path and (stride_h 1 on a 2-row input gives the same
  // windows) through the generic path.
  const Pool2dShape shapes[] = {{.channels = 1, .in_h = 2, .in_w = 4},
                                {.channels = 1, .in_h = 2, .in_w = 4, .stride_h = 1}};
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {7, 1, 2, 5, 7, nan, 5, 5};
  for (const Pool2dShape& s : shapes) {
    std::vector<float> y(2);
    std::vector<uint32_t> argmax(2);
    maxpool_forward(s, x.data(), y.data(), argmax.data(), 1);
    EXPECT_TRUE(std::isnan(y[0])) << "a NaN in the window must reach the output, got " << y[0]
                                  << " (stride_h " << s.stride_h << ")";
    EXPECT_EQ(argmax[0], 5u) << "stride_h " << s.stride_h;
    EXPECT_EQ(y[1], 5.0f) << "stride_h " << s.stride_h;
    EXPECT_EQ(argmax[1], 3u) << "ties: the first maximum in row-major window order, stride_h "
                             << s.stride_h;
  }
}

}  // namespace
}  // namespace resync::kernels
