// conv2d forward/backward (both GEMM lowerings) and im2col/col2im against a direct convolution
// written as plain loops with double accumulation; awkward shapes, padding, strides, batches.
#include "kernels/conv2d.h"

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "base/error.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::random_floats;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr ConvLowering kLowerings[] = {ConvLowering::kPerSample, ConvLowering::kBatched};

const char* lowering_name(ConvLowering l) {
  return l == ConvLowering::kPerSample ? "per-sample" : "batched";
}

struct Case {
  Conv2dShape s;
  size_t batch;
};

// Odd and non-square sizes, padding on one axis only, strides 2 and 3, a kernel wider than the
// unpadded input, 1x1 kernels, in_c 1 and 3, batch 1 and 3.
const Case kCases[] = {
    {{.in_c = 1, .in_h = 5, .in_w = 7, .out_c = 2, .k_h = 3, .k_w = 3, .pad_h = 1, .pad_w = 1}, 1},
    {{.in_c = 3, .in_h = 7, .in_w = 6, .out_c = 4, .k_h = 3, .k_w = 2, .stride_h = 2,
      .stride_w = 2, .pad_h = 1, .pad_w = 0},
     3},
    {{.in_c = 3, .in_h = 9, .in_w = 8, .out_c = 5, .k_h = 5, .k_w = 5, .pad_h = 2, .pad_w = 2}, 3},
    {{.in_c = 1, .in_h = 11, .in_w = 9, .out_c = 3, .k_h = 4, .k_w = 3, .stride_h = 2,
      .stride_w = 1, .pad_h = 0, .pad_w = 2},
     3},
    {{.in_c = 2, .in_h = 6, .in_w = 5, .out_c = 3, .k_h = 1, .k_w = 1, .stride_h = 2,
      .stride_w = 2},
     3},
    {{.in_c = 3, .in_h = 4, .in_w = 4, .out_c = 2, .k_h = 4, .k_w = 4}, 1},
    {{.in_c = 1, .in_h = 2, .in_w = 3, .out_c = 2, .k_h = 5, .k_w = 5, .stride_h = 3,
      .stride_w = 3, .pad_h = 2, .pad_w = 2},
     3},
    {{.in_c = 1, .in_h = 28, .in_w = 28, .out_c = 4, .k_h = 5, .k_w = 5, .pad_h = 2, .pad_w = 2},
     1},
};

std::string describe(const Case& c, ConvLowering l) {
  const Conv2dShape& s = c.s;
  return "in " + std::to_string(s.in_c) + "x" + std::to_string(s.in_h) + "x" +
         std::to_string(s.in_w) + " out_c " + std::to_string(s.out_c) + " k " +
         std::to_string(s.k_h) + "x" + std::to_string(s.k_w) + " stride " +
         std::to_string(s.stride_h) + "x" + std::to_string(s.stride_w) + " pad " +
         std::to_string(s.pad_h) + "x" + std::to_string(s.pad_w) + " batch " +
         std::to_string(c.batch) + " " + lowering_name(l);
}

// A value of the reference and the bound on the float error of computing it.
struct Ref {
  std::vector<double> value, abs_sum;
  std::vector<size_t> n_terms;
  explicit Ref(size_t n) : value(n, 0.0), abs_sum(n, 0.0), n_terms(n, 0) {}
  void add(size_t i, double term) {
    value[i] += term;
    abs_sum[i] += std::fabs(term);
    ++n_terms[i];
  }
  // The recursive-summation bound (terms + 2) eps sum |terms|: holds for any summation order.
  double tol(size_t i) const { return (n_terms[i] + 2) * double(FLT_EPSILON) * abs_sum[i] + 1e-30; }
};

// Calls fn(n, oc, oh, ow, c, ki, kj, x index, w index, y index) for every in-range product of
// the direct convolution.
template <typename Fn>
void for_each_product(const Conv2dShape& s, size_t batch, Fn&& fn) {
  for (size_t n = 0; n < batch; ++n)
    for (size_t oc = 0; oc < s.out_c; ++oc)
      for (size_t oh = 0; oh < s.out_h(); ++oh)
        for (size_t ow = 0; ow < s.out_w(); ++ow)
          for (size_t c = 0; c < s.in_c; ++c)
            for (size_t ki = 0; ki < s.k_h; ++ki)
              for (size_t kj = 0; kj < s.k_w; ++kj) {
                const long ih = long(oh * s.stride_h + ki) - long(s.pad_h);
                const long iw = long(ow * s.stride_w + kj) - long(s.pad_w);
                if (ih < 0 || iw < 0 || ih >= long(s.in_h) || iw >= long(s.in_w)) continue;
                const size_t xi = ((n * s.in_c + c) * s.in_h + size_t(ih)) * s.in_w + size_t(iw);
                const size_t wi = ((oc * s.in_c + c) * s.k_h + ki) * s.k_w + kj;
                const size_t yi = ((n * s.out_c + oc) * s.out_h() + oh) * s.out_w() + ow;
                fn(n, oc, xi, wi, yi);
              }
}

void expect_near_ref(const std::vector<float>& actual, const Ref& ref, const std::string& what) {
  ASSERT_EQ(actual.size(), ref.value.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_NEAR(actual[i], ref.value[i], ref.tol(i))
        << what << "[" << i << "]: expected " << ref.value[i] << ", actual " << actual[i];
  }
}

TEST(Conv2dShapeTest, OutputSizesFloorLikePyTorch) {
  const Conv2dShape s{.in_c = 2, .in_h = 7, .in_w = 6, .out_c = 3, .k_h = 3, .k_w = 2,
                      .stride_h = 2, .stride_w = 3, .pad_h = 1, .pad_w = 0};
  EXPECT_EQ(s.out_h(), 4u);  // (7 + 2 - 3) / 2 + 1
  EXPECT_EQ(s.out_w(), 2u);  // (6 - 2) / 3 + 1, the last column of the input is not reached
  EXPECT_EQ(s.col_rows(), 12u);
  EXPECT_EQ(s.col_cols(), 8u);
  EXPECT_EQ(s.out_size(), 24u);
  EXPECT_EQ(s.n_weights(), 36u);
}

TEST(Conv2dShapeTest, RejectsBadShapesAndShortWorkspace) {
  EXPECT_THROW(check_conv2d_shape({.in_c = 1, .in_h = 3, .in_w = 3, .out_c = 1, .k_h = 5,
                                   .k_w = 3, .pad_h = 0, .pad_w = 0}),
               InvalidArgument);
  EXPECT_THROW(check_conv2d_shape({.in_c = 1, .in_h = 3, .in_w = 3, .out_c = 1, .k_h = 1,
                                   .k_w = 1, .stride_h = 0}),
               InvalidArgument);
  EXPECT_THROW(check_conv2d_shape({.in_c = 0}), InvalidArgument);
  const Conv2dShape s{.in_c = 1, .in_h = 4, .in_w = 4, .out_c = 2, .k_h = 3, .k_w = 3};
  std::vector<float> x(2 * s.in_size()), w(s.n_weights()), b(2), y(2 * s.out_size());
  for (const ConvLowering l : kLowerings) {
    std::vector<float> ws(conv2d_workspace_elems(s, l, 2) - 1);
    EXPECT_THROW(conv2d_forward(s, l, x.data(), w.data(), b.data(), y.data(), 2, ws),
                 InvalidArgument)
        << lowering_name(l);
  }
  // The per-sample workspace does not grow with the batch; the batched one does.
  EXPECT_EQ(conv2d_workspace_elems(s, ConvLowering::kPerSample, 1),
            conv2d_workspace_elems(s, ConvLowering::kPerSample, 64));
  EXPECT_EQ(conv2d_workspace_elems(s, ConvLowering::kBatched, 64) -
                conv2d_workspace_elems(s, ConvLowering::kBatched, 1),
            63 * (s.col_rows() + s.out_c) * s.col_cols());
}

TEST(Im2col, PadThenLowerCopiesWindowsExactlyAndRespectsLeadingDimension) {
  for (const Case& tc : kCases) {
    const Conv2dShape& s = tc.s;
    const size_t ld = s.col_cols() + 3;
    const auto x = random_floats(s.in_size(), s.in_h * 13 + s.in_w);
    std::vector<float> xp(s.padded_size(), kNaN), col(s.col_rows() * ld, kNaN);
    pad_sample(s, x.data(), xp.data());
    std::vector<float> cropped(s.in_size(), kNaN);
    crop_sample(s, xp.data(), cropped.data());
    ASSERT_EQ(cropped, x) << "crop_sample(pad_sample(x)) != x, " << describe(tc, kLowerings[0]);
    im2col(s, xp.data(), col.data(), ld);
    for (size_t c = 0; c < s.in_c; ++c)
      for (size_t ki = 0; ki < s.k_h; ++ki)
        for (size_t kj = 0; kj < s.k_w; ++kj) {
          const size_t r = (c * s.k_h + ki) * s.k_w + kj;
          for (size_t oh = 0; oh < s.out_h(); ++oh)
            for (size_t ow = 0; ow < s.out_w(); ++ow) {
              const long ih = long(oh * s.stride_h + ki) - long(s.pad_h);
              const long iw = long(ow * s.stride_w + kj) - long(s.pad_w);
              const bool inside = ih >= 0 && iw >= 0 && ih < long(s.in_h) && iw < long(s.in_w);
              const float expected =
                  inside ? x[(c * s.in_h + size_t(ih)) * s.in_w + size_t(iw)] : 0.0f;
              const size_t p = oh * s.out_w() + ow;
              ASSERT_EQ(col[r * ld + p], expected)
                  << "col[" << r << "][" << p << "] " << describe(tc, kLowerings[0]);
            }
          for (size_t p = s.col_cols(); p < ld; ++p) {
            ASSERT_TRUE(std::isnan(col[r * ld + p])) << "gap col[" << r << "][" << p
                                                     << "] was written";
          }
        }
  }
}

TEST(Conv2d, ForwardMatchesDirectConvolution) {
  for (const Case& tc : kCases) {
    const Conv2dShape& s = tc.s;
    const size_t batch = tc.batch;
    const auto x = random_floats(batch * s.in_size(), 1 + s.in_h * 31 + s.in_w);
    const auto w = random_floats(s.n_weights(), 2 + s.out_c);
    const auto bias = random_floats(s.out_c, 3 + s.k_h);
    Ref ref(batch * s.out_size());
    for (size_t i = 0; i < ref.value.size(); ++i) {
      ref.add(i, bias[(i / s.col_cols()) % s.out_c]);
    }
    for_each_product(s, batch, [&](size_t, size_t, size_t xi, size_t wi, size_t yi) {
      ref.add(yi, double(x[xi]) * double(w[wi]));
    });
    for (const ConvLowering l : kLowerings) {
      std::vector<float> ws(conv2d_workspace_elems(s, l, batch), kNaN);  // must not be read
      std::vector<float> y(batch * s.out_size(), kNaN);
      conv2d_forward(s, l, x.data(), w.data(), bias.data(), y.data(), batch, ws);
      expect_near_ref(y, ref, "y " + describe(tc, l));
      if (HasFatalFailure()) return;
    }
  }
}

TEST(Conv2d, BackwardMatchesDirectConvolutionAdjoint) {
  for (const Case& tc : kCases) {
    const Conv2dShape& s = tc.s;
    const size_t batch = tc.batch;
    const auto x = random_floats(batch * s.in_size(), 4 + s.in_w);
    const auto w = random_floats(s.n_weights(), 5 + s.in_c);
    const auto dy = random_floats(batch * s.out_size(), 6 + s.out_c);
    Ref ref_dx(batch * s.in_size()), ref_dw(s.n_weights()), ref_db(s.out_c);
    for (size_t i = 0; i < dy.size(); ++i) ref_db.add((i / s.col_cols()) % s.out_c, dy[i]);
    for_each_product(s, batch, [&](size_t, size_t, size_t xi, size_t wi, size_t yi) {
      ref_dx.add(xi, double(w[wi]) * double(dy[yi]));
      ref_dw.add(wi, double(x[xi]) * double(dy[yi]));
    });
    for (const ConvLowering l : kLowerings) {
      const std::string what = describe(tc, l);
      std::vector<float> ws(conv2d_workspace_elems(s, l, batch), kNaN);
      // NaN-filled outputs: every element must be overwritten, not accumulated into.
      std::vector<float> dx(batch * s.in_size(), kNaN), dw(s.n_weights(), kNaN), db(s.out_c, kNaN);
      conv2d_backward(s, l, x.data(), w.data(), dy.data(), dw.data(), db.data(), dx.data(), batch,
                      ws);
      expect_near_ref(dx, ref_dx, "dx " + what);
      expect_near_ref(dw, ref_dw, "dw " + what);
      expect_near_ref(db, ref_db, "db " + what);
      if (HasFatalFailure()) return;

      // Without dx (a first layer): the same parameter gradients, dx untouched.
      std::vector<float> dw2(s.n_weights(), kNaN), db2(s.out_c, kNaN);
      conv2d_backward(s, l, x.data(), w.data(), dy.data(), dw2.data(), db2.data(), nullptr, batch,
                      ws);
      EXPECT_EQ(dw2, dw) << "dw without dx differs, " << what;
      EXPECT_EQ(db2, db) << "db without dx differs, " << what;
    }
  }
}

TEST(Conv2d, RepeatedCallsGiveIdenticalBits) {
  const Case& tc = kCases[2];
  const Conv2dShape& s = tc.s;
  const auto x = random_floats(tc.batch * s.in_size(), 7);
  const auto w = random_floats(s.n_weights(), 8);
  const auto dy = random_floats(tc.batch * s.out_size(), 9);
  for (const ConvLowering l : kLowerings) {
    std::vector<float> ws(conv2d_workspace_elems(s, l, tc.batch));
    std::vector<float> dx1(tc.batch * s.in_size()), dw1(s.n_weights()), db1(s.out_c);
    conv2d_backward(s, l, x.data(), w.data(), dy.data(), dw1.data(), db1.data(), dx1.data(),
                    tc.batch, ws);
    auto dx2 = dx1, dw2 = dw1, db2 = db1;
    conv2d_backward(s, l, x.data(), w.data(), dy.data(), dw2.data(), db2.data(), dx2.data(),
                    tc.batch, ws);
    EXPECT_EQ(dx1, dx2) << lowering_name(l);
    EXPECT_EQ(dw1, dw2) << lowering_name(l);
    EXPECT_EQ(db1, db2) << lowering_name(l);
  }
}

TEST(Col2im, IsTheAdjointOfIm2col) {
  // <im2col(pad(x)), c> == <x, crop(col2im(c))>: col2im adds each element back exactly once, and
  // the share of the padding lands on the border that crop drops.
  for (const Case& tc : kCases) {
    const Conv2dShape& s = tc.s;
    const size_t ld = s.col_cols();
    const auto x = random_floats(s.in_size(), 10 + s.in_h);
    const auto c = random_floats(s.col_rows() * ld, 11 + s.in_w);
    std::vector<float> xp(s.padded_size()), col(c.size()), dxp(s.padded_size(), kNaN);
    std::vector<float> dx(s.in_size(), kNaN);
    pad_sample(s, x.data(), xp.data());
    im2col(s, xp.data(), col.data(), ld);
    col2im(s, c.data(), ld, dxp.data());
    crop_sample(s, dxp.data(), dx.data());
    double lhs = 0, rhs = 0, abs_sum = 0;
    for (size_t i = 0; i < c.size(); ++i) {
      lhs += double(col[i]) * double(c[i]);
      abs_sum += std::fabs(double(col[i]) * double(c[i]));
    }
    for (size_t i = 0; i < x.size(); ++i) rhs += double(x[i]) * double(dx[i]);
    // dx elements are float sums of up to k_h * k_w terms.
    EXPECT_NEAR(lhs, rhs, (s.k_h * s.k_w + 2) * double(FLT_EPSILON) * abs_sum + 1e-12)
        << describe(tc, ConvLowering::kPerSample);
  }
}

}  // namespace
}  // namespace resync::kernels
