#include "kernels/attention.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "base/error.h"
#include "kernels/elementwise.h"
#include "kernels/gemm.h"

namespace resync::kernels {
namespace {

// Rows of the score matrix are processed in blocks of kBlock positions: a block of rows attends
// only to the columns up to its last row, so the GEMMs skip the part above the diagonal (for
// T = 128, 10 of 16 tiles).
constexpr size_t kBlock = 32;

void check_shape(const AttentionShape& s) {
  RESYNC_CHECK_ARG(s.n_head > 0 && s.dim % s.n_head == 0,
                   fmt::format("attention: {} heads do not divide width {}", s.n_head, s.dim));
}

// Causal softmax of row t of the scores in place, max subtracted; zeros above the diagonal.
void causal_softmax_row(float* row, size_t t, size_t T) {
  float row_max = row[0];
  for (size_t j = 1; j <= t; ++j) row_max = row[j] > row_max ? row[j] : row_max;
  float sum = 0.0f;
  for (size_t j = 0; j <= t; ++j) {
    row[j] = shifted_exp(row[j], row_max);
    sum += row[j];
  }
  const float inv_sum = 1.0f / sum;
  for (size_t j = 0; j <= t; ++j) row[j] *= inv_sum;
  for (size_t j = t + 1; j < T; ++j) row[j] = 0.0f;
}

}  // namespace

void attention_forward(const float* qkv, float* out, float* att, const AttentionShape& s) {
  check_shape(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  const size_t ld = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t h = 0; h < NH; ++h) {
      const float* q = qkv + b * T * ld + h * hs;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* p = att + (b * NH + h) * T * T;
      float* o = out + b * T * C + h * hs;
      for (size_t r0 = 0; r0 < T; r0 += kBlock) {
        const size_t r1 = std::min(T, r0 + kBlock), m = r1 - r0;
        // Scores of rows [r0, r1) against keys [0, r1): scale * q k^T.
        gemm(Transpose::kNo, Transpose::kYes, m, r1, hs, scale, q + r0 * ld, ld, k, ld, 0.0f,
             p + r0 * T, T);
        for (size_t t = r0; t < r1; ++t) causal_softmax_row(p + t * T, t, T);
        // out rows [r0, r1) (row stride C) = p [r0:r1, 0:r1] v [0:r1].
        gemm(Transpose::kNo, Transpose::kNo, m, hs, r1, 1.0f, p + r0 * T, T, v, ld, 0.0f,
             o + r0 * C, C);
      }
    }
  }
}

void attention_backward(const float* dout, const float* qkv, const float* att, float* dqkv,
                        float* scratch, const AttentionShape& s) {
  check_shape(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  const size_t ld = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t h = 0; h < NH; ++h) {
      const size_t at = b * T * ld + h * hs;
      const float* q = qkv + at;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* dq = dqkv + at;
      float* dk = dq + C;
      float* dv = dq + 2 * C;
      const float* p = att + (b * NH + h) * T * T;
      const float* dout_bh = dout + b * T * C + h * hs;
      float* ds = scratch;
      for (size_t r0 = 0; r0 < T; r0 += kBlock) {
        const size_t r1 = std::min(T, r0 + kBlock), m = r1 - r0;
        // dp [r0:r1, 0:r1] = dout v^T, then the softmax backward in place:
        // ds = p * (dp - sum_j p dp) on and below the diagonal, zeros above it.
        gemm(Transpose::kNo, Transpose::kYes, m, r1, hs, 1.0f, dout_bh + r0 * C, C, v, ld, 0.0f,
             ds + r0 * T, T);
        for (size_t t = r0; t < r1; ++t) {
          const float* prow = p + t * T;
          float* row = ds + t * T;
          float dot = 0.0f;
          for (size_t j = 0; j <= t; ++j) dot += prow[j] * row[j];
          for (size_t j = 0; j <= t; ++j) row[j] = prow[j] * (row[j] - dot);
          for (size_t j = t + 1; j < T; ++j) row[j] = 0.0f;
        }
        // dq rows [r0, r1) = scale * ds [r0:r1, 0:r1] k [0:r1].
        gemm(Transpose::kNo, Transpose::kNo, m, hs, r1, scale, ds + r0 * T, T, k, ld, 0.0f,
             dq + r0 * ld, ld);
      }
      // Key and value rows [c0, c1) gather from the query rows [c0, T) at or after them:
      // dv = p^T dout, dk = scale * ds^T q.
      for (size_t c0 = 0; c0 < T; c0 += kBlock) {
        const size_t c1 = std::min(T, c0 + kBlock), m = c1 - c0, n_rows = T - c0;
        gemm(Transpose::kYes, Transpose::kNo, m, hs, n_rows, 1.0f, p + c0 * T + c0, T,
             dout_bh + c0 * C, C, 0.0f, dv + c0 * ld, ld);
        gemm(Transpose::kYes, Transpose::kNo, m, hs, n_rows, scale, ds + c0 * T + c0, T,
             q + c0 * ld, ld, 0.0f, dk + c0 * ld, ld);
      }
    }
  }
}

}  // namespace resync::kernels
