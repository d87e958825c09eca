#include "kernels/attention.h"

#include <fmt/format.h>

#include <cmath>

#include "base/error.h"
#include "kernels/elementwise.h"
#include "kernels/gemm.h"

namespace resync::kernels {
namespace {

void check_shape(const AttentionShape& s) {
  RESYNC_CHECK_ARG(s.n_head > 0 && s.dim % s.n_head == 0,
                   fmt::format("attention: {} heads do not divide width {}", s.n_head, s.dim));
}

}  // namespace

void attention_forward(const float* qkv, float* out, float* att, const AttentionShape& s) {
  check_shape(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  const size_t ld_qkv = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t h = 0; h < NH; ++h) {
      const float* q = qkv + b * T * ld_qkv + h * hs;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* p = att + (b * NH + h) * T * T;
      // Scores: p [T x T] = scale * q k^T (the part above the diagonal is unused).
      gemm(Transpose::kNo, Transpose::kYes, T, T, hs, scale, q, ld_qkv, k, ld_qkv, 0.0f, p, T);
      // Causal softmax per row, max subtracted; zeros above the diagonal.
      for (size_t t = 0; t < T; ++t) {
        float* row = p + t * T;
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
      // out [T x hs] (row stride C) = p v.
      gemm(Transpose::kNo, Transpose::kNo, T, hs, T, 1.0f, p, T, v, ld_qkv, 0.0f,
           out + b * T * C + h * hs, C);
    }
  }
}

void attention_backward(const float* dout, const float* qkv, const float* att, float* dqkv,
                        float* scratch, const AttentionShape& s) {
  check_shape(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  const size_t ld_qkv = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t h = 0; h < NH; ++h) {
      const size_t qkv_at = b * T * ld_qkv + h * hs;
      const float* q = qkv + qkv_at;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* dq = dqkv + qkv_at;
      float* dk = dq + C;
      float* dv = dq + 2 * C;
      const float* p = att + (b * NH + h) * T * T;
      const float* dout_bh = dout + b * T * C + h * hs;
      float* ds = scratch;
      // dp = dout v^T; dv = p^T dout.
      gemm(Transpose::kNo, Transpose::kYes, T, T, hs, 1.0f, dout_bh, C, v, ld_qkv, 0.0f, ds, T);
      gemm(Transpose::kYes, Transpose::kNo, T, hs, T, 1.0f, p, T, dout_bh, C, 0.0f, dv, ld_qkv);
      // Softmax backward in place: ds = p * (dp - sum_j p dp) on and below the diagonal.
      for (size_t t = 0; t < T; ++t) {
        const float* prow = p + t * T;
        float* row = ds + t * T;
        float dot = 0.0f;
        for (size_t j = 0; j <= t; ++j) dot += prow[j] * row[j];
        for (size_t j = 0; j <= t; ++j) row[j] = prow[j] * (row[j] - dot);
        for (size_t j = t + 1; j < T; ++j) row[j] = 0.0f;
      }
      // dq = scale * ds k; dk = scale * ds^T q.
      gemm(Transpose::kNo, Transpose::kNo, T, hs, T, scale, ds, T, k, ld_qkv, 0.0f, dq, ld_qkv);
      gemm(Transpose::kYes, Transpose::kNo, T, hs, T, scale, ds, T, q, ld_qkv, 0.0f, dk, ld_qkv);
    }
  }
}

}  // namespace resync::kernels
