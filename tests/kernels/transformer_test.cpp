// The transformer kernels (GELU, LayerNorm, embedding, causal attention, residual) against naive
// references in double precision, with stated tolerances. Their backward passes are checked by
// finite differences through the layers (tests/models/gpt_test.cpp).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "base/error.h"
#include "kernels/attention.h"
#include "kernels/bias.h"
#include "kernels/embedding.h"
#include "kernels/gelu.h"
#include "kernels/layernorm.h"
#include "kernels/residual.h"
#include "kernels/transformer_math.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::random_floats;

TEST(Gelu, VectorisableExpAndTanhAreAccurate) {
  for (double x = -87.0; x <= 0.0; x += 0.00731) {
    const double ref = std::exp(double(float(x)));  // of the float input
    ASSERT_NEAR(exp_nonpositive(float(x)), ref, 3e-7 * ref) << "exp " << x;
  }
  EXPECT_EQ(exp_nonpositive(0.0f), 1.0f);
  EXPECT_GT(exp_nonpositive(-1000.0f), 0.0f);
  for (double u = -12.0; u <= 12.0; u += 0.001) {
    ASSERT_NEAR(tanh_approx(float(u)), std::tanh(float(u)), 2e-7) << "tanh " << u;
  }
}

TEST(Gelu, MatchesTheTanhFormulaInDouble) {
  auto x = random_floats(1000, 1, -6.0f, 6.0f);
  std::vector<float> y(x.size()), dx(x.size());
  const std::vector<float> dy(x.size(), 1.0f);
  gelu_forward(x.data(), y.data(), x.size());
  gelu_backward(x.data(), dy.data(), dx.data(), x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x[i], c = std::sqrt(2.0 / M_PI);
    const double t = std::tanh(c * (v + 0.044715 * v * v * v));
    const double ref = 0.5 * v * (1 + t);
    const double dref = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v);
    // float evaluation of the same formula: a few ulps of values up to 6.
    ASSERT_NEAR(y[i], ref, 2e-6 * (1 + std::fabs(ref))) << "x " << v;
    ASSERT_NEAR(dx[i], dref, 2e-6 * (1 + std::fabs(dref))) << "x " << v;
  }
}

TEST(Gelu, BackwardWithBiasMatchesBackwardThenBiasGrad) {
  // cols 37: rows are not whole vectors. The fused pass splits the work into vectors
  // differently from the flat one, so the last bit may differ (contracted multiply-adds).
  const size_t rows = 9, cols = 37;
  const auto x = random_floats(rows * cols, 2, -4.0f, 4.0f);
  const auto dy = random_floats(rows * cols, 3);
  std::vector<float> dx(x.size()), db(cols, 5.0f), ref_dx(x.size()), ref_db(cols);
  gelu_backward_bias(x.data(), dy.data(), dx.data(), db.data(), rows, cols);
  gelu_backward(x.data(), dy.data(), ref_dx.data(), x.size());
  bias_grad(ref_dx.data(), ref_db.data(), rows, cols);
  for (size_t i = 0; i < dx.size(); ++i) ASSERT_NEAR(dx[i], ref_dx[i], 1e-6) << i;
  for (size_t c = 0; c < cols; ++c) ASSERT_NEAR(db[c], ref_db[c], 1e-5) << c;
  std::vector<float> in_place = dy;  // dx may alias dy
  gelu_backward_bias(x.data(), in_place.data(), in_place.data(), db.data(), rows, cols);
  for (size_t i = 0; i < dx.size(); ++i) ASSERT_NEAR(in_place[i], ref_dx[i], 1e-6) << i;
}

TEST(LayerNorm, ForwardMatchesDoubleReference) {
  const size_t rows = 5, cols = 33;
  auto x = random_floats(rows * cols, 2, -3.0f, 5.0f);
  for (size_t c = 0; c < cols; ++c) x[c] += 1000.0f;  // a row far from zero: two-pass variance
  const auto w = random_floats(cols, 3), b = random_floats(cols, 4);
  std::vector<float> y(x.size()), mean(rows), rstd(rows);
  layernorm_forward(x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data(), rows, cols);
  for (size_t r = 0; r < rows; ++r) {
    double m = 0, v = 0;
    for (size_t c = 0; c < cols; ++c) m += x[r * cols + c];
    m /= cols;
    for (size_t c = 0; c < cols; ++c) v += (x[r * cols + c] - m) * (x[r * cols + c] - m);
    v /= cols;
    const double s = 1.0 / std::sqrt(v + 1e-5);
    EXPECT_NEAR(rstd[r], s, 1e-5 * s) << "row " << r;
    for (size_t c = 0; c < cols; ++c) {
      const double ref = (x[r * cols + c] - m) * s * w[c] + b[c];
      // The row of 1000s: its float inputs carry ~6e-5 absolute error into xhat.
      const double tol = r == 0 ? 2e-3 : 1e-5;
      ASSERT_NEAR(y[r * cols + c], ref, tol) << "row " << r << " col " << c;
    }
  }
}

TEST(Embedding, SumsTokenAndPositionRowsAndChecksTokens) {
  const EmbeddingShape s{2, 3, 4, 5};
  const auto wte = random_floats(5 * 4, 5), wpe = random_floats(3 * 4, 6);
  const std::vector<float> tokens = {4, 0, 2, 2, 1, 3};
  std::vector<float> out(2 * 3 * 4);
  embedding_forward(tokens.data(), wte.data(), wpe.data(), out.data(), s);
  for (size_t i = 0; i < 6; ++i) {
    for (size_t c = 0; c < 4; ++c) {
      ASSERT_EQ(out[i * 4 + c], wte[size_t(tokens[i]) * 4 + c] + wpe[(i % 3) * 4 + c]);
    }
  }
  std::vector<float> dwte(5 * 4, 1.0f), dwpe(3 * 4, 9.0f);
  const auto dout = random_floats(out.size(), 7);
  embedding_backward(dout.data(), tokens.data(), dwte.data(), dwpe.data(), s);
  // Token 2 appears at positions 2 and 3, on top of the 1.0 already in dwte.
  for (size_t c = 0; c < 4; ++c) {
    EXPECT_FLOAT_EQ(dwte[2 * 4 + c], 1.0f + dout[2 * 4 + c] + dout[3 * 4 + c]);
    EXPECT_FLOAT_EQ(dwpe[0 * 4 + c], dout[0 * 4 + c] + dout[3 * 4 + c]);
  }
  const std::vector<float> bad = {4, 0, 5, 2, 1, 3};
  EXPECT_THROW(embedding_forward(bad.data(), wte.data(), wpe.data(), out.data(), s),
               InvalidArgument);
}

TEST(Attention, ForwardMatchesNaiveCausalSoftmax) {
  // The CPU kernel works on 16-float vectors and blocks of 4 rows: head sizes 4 (padded) and 32
  // (two whole vectors), T = 70 and 37 (ending mid-vector and mid-block) and 36.
  for (const AttentionShape s : {AttentionShape{2, 7, 12, 3}, AttentionShape{1, 70, 8, 2},
                                 AttentionShape{2, 37, 64, 2}, AttentionShape{2, 36, 64, 2}}) {
    const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
    auto qkv = random_floats(s.batch * T * 3 * C, 8, -2.0f, 2.0f);
    std::vector<float> out(s.batch * T * C), att(s.batch * NH * T * T);
    attention_forward(qkv.data(), out.data(), att.data(), s);
    for (size_t b = 0; b < s.batch; ++b) {
      for (size_t h = 0; h < NH; ++h) {
        for (size_t t = 0; t < T; ++t) {
          std::vector<double> p(t + 1);
          double mx = -1e300, sum = 0;
          for (size_t j = 0; j <= t; ++j) {
            double dot = 0;
            for (size_t d = 0; d < hs; ++d) {
              dot += double(qkv[(b * T + t) * 3 * C + h * hs + d]) *
                     qkv[(b * T + j) * 3 * C + C + h * hs + d];
            }
            p[j] = dot / std::sqrt(double(hs));
            mx = std::max(mx, p[j]);
          }
          for (auto& v : p) sum += (v = std::exp(v - mx));
          for (size_t j = 0; j < T; ++j) {
            const double ref = j <= t ? p[j] / sum : 0.0;
            ASSERT_NEAR(att[((b * NH + h) * T + t) * T + j], ref, 1e-6) << b << h << t << j;
          }
          for (size_t d = 0; d < hs; ++d) {
            double ref = 0;
            for (size_t j = 0; j <= t; ++j) {
              ref += p[j] / sum * qkv[(b * T + j) * 3 * C + 2 * C + h * hs + d];
            }
            ASSERT_NEAR(out[(b * T + t) * C + h * hs + d], ref, 1e-5) << b << h << t << d;
          }
        }
      }
    }
  }
  auto qkv = random_floats(2 * 7 * 3 * 12, 8);
  std::vector<float> out(2 * 7 * 12), att(2 * 3 * 7 * 7);
  EXPECT_THROW(attention_forward(qkv.data(), out.data(), att.data(), AttentionShape{2, 7, 12, 5}),
               InvalidArgument);
}

TEST(Attention, BackwardMatchesNaiveReferenceAcrossShapes) {
  // dq = scale ds k, dk = scale ds^T q, dv = p^T dout with ds = p (dp - rowsum(p dp)),
  // dp = dout v^T, in double from the forward's att. The shapes alternate, and the first is
  // repeated at the end with the same bits: the kernel's per-thread buffers, reused between
  // calls, keep their zero padding.
  const AttentionShape shapes[] = {AttentionShape{2, 36, 64, 2}, AttentionShape{1, 37, 12, 3},
                                   AttentionShape{2, 37, 64, 2}, AttentionShape{2, 36, 64, 2}};
  std::vector<float> first;
  for (const AttentionShape& s : shapes) {
    const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
    const double scale = 1.0 / std::sqrt(double(hs));
    const auto qkv = random_floats(s.batch * T * 3 * C, 21, -2.0f, 2.0f);
    const auto dout = random_floats(s.batch * T * C, 22);
    std::vector<float> out(s.batch * T * C), att(s.batch * NH * T * T);
    std::vector<float> dqkv(qkv.size(), 7.0f), scratch(T * T);
    attention_forward(qkv.data(), out.data(), att.data(), s);
    attention_backward(dout.data(), qkv.data(), att.data(), dqkv.data(), scratch.data(), s);
    const auto at = [&](size_t b, size_t t, size_t part, size_t h, size_t d) {
      return ((b * T + t) * 3 + part) * C + h * hs + d;
    };
    for (size_t b = 0; b < s.batch; ++b) {
      for (size_t h = 0; h < NH; ++h) {
        const float* p = att.data() + (b * NH + h) * T * T;
        std::vector<double> ds(T * T, 0.0);
        for (size_t t = 0; t < T; ++t) {
          std::vector<double> dp(t + 1);
          double dot = 0;
          for (size_t j = 0; j <= t; ++j) {
            for (size_t d = 0; d < hs; ++d) {
              dp[j] += double(dout[(b * T + t) * C + h * hs + d]) * qkv[at(b, j, 2, h, d)];
            }
            dot += p[t * T + j] * dp[j];
          }
          for (size_t j = 0; j <= t; ++j) ds[t * T + j] = p[t * T + j] * (dp[j] - dot);
        }
        for (size_t t = 0; t < T; ++t) {
          for (size_t d = 0; d < hs; ++d) {
            double dq = 0, dk = 0, dv = 0;
            for (size_t j = 0; j <= t; ++j) dq += ds[t * T + j] * qkv[at(b, j, 1, h, d)];
            for (size_t u = t; u < T; ++u) {
              dk += ds[u * T + t] * qkv[at(b, u, 0, h, d)];
              dv += double(p[u * T + t]) * dout[(b * T + u) * C + h * hs + d];
            }
            ASSERT_NEAR(dqkv[at(b, t, 0, h, d)], scale * dq, 1e-5) << b << h << t << d;
            ASSERT_NEAR(dqkv[at(b, t, 1, h, d)], scale * dk, 1e-5) << b << h << t << d;
            ASSERT_NEAR(dqkv[at(b, t, 2, h, d)], dv, 1e-5) << b << h << t << d;
          }
        }
      }
    }
    if (first.empty()) {
      first = dqkv;
    } else if (&s == &shapes[3]) {
      EXPECT_EQ(dqkv, first);
    }
  }
}

TEST(Residual, AddsAndAccumulates) {
  const auto a = random_floats(9, 9), b = random_floats(9, 10);
  std::vector<float> out(9);
  residual_forward(a.data(), b.data(), out.data(), 9);
  for (size_t i = 0; i < 9; ++i) ASSERT_EQ(out[i], a[i] + b[i]);
  residual_accumulate(out.data(), a.data(), 9);
  for (size_t i = 0; i < 9; ++i) ASSERT_EQ(out[i], (a[i] + b[i]) + a[i]);
}

}  // namespace
}  // namespace resync::kernels
