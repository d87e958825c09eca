#include "kernels/attention.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "base/error.h"
#include "kernels/cpu/simd.h"
#include "kernels/transformer_math.h"

// One head of one sequence at a time, in cache-sized buffers: the head's query, key and value
// rows are copied out of qkv into contiguous buffers padded with zeros (positions to a multiple
// of 16, the head size to a multiple of 16), and every product runs as a register-blocked loop
// over 16-float vectors: 4 query (or key) rows at a time, only on and below the diagonal. Per-head
// GEMM calls through the BLAS cost more in packing and call overhead than they compute at these
// sizes (T x T x head size, head size 32 in the default gpt).

namespace resync::kernels {
namespace {

using simd::kLanes;
using simd::load;
using simd::store;
using simd::Vec;

constexpr size_t kRows = 4;  // rows per register block

void check_shape(const AttentionShape& s) {
  RESYNC_CHECK_ARG(s.n_head > 0 && s.dim % s.n_head == 0,
                   fmt::format("attention: {} heads do not divide width {}", s.n_head, s.dim));
}

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// out[r][0:jn) = sum_d a[r][d] bt[d][0:jn) for the kRows rows from r0; jn a multiple of 16.
RESYNC_ALWAYS_INLINE void rows_by_columns(const float* a, size_t lda, const float* bt, size_t ldb,
                                          size_t depth, size_t r0, size_t jn, float* out,
                                          size_t ldo) {
  const float* a0 = a + r0 * lda;
  for (size_t j = 0; j < jn; j += kLanes) {
    Vec c0{}, c1{}, c2{}, c3{};
    for (size_t d = 0; d < depth; ++d) {
      const Vec b = load(bt + d * ldb + j);
      c0 += a0[d] * b;
      c1 += a0[lda + d] * b;
      c2 += a0[2 * lda + d] * b;
      c3 += a0[3 * lda + d] * b;
    }
    float* o = out + r0 * ldo + j;
    store(o, c0);
    store(o + ldo, c1);
    store(o + 2 * ldo, c2);
    store(o + 3 * ldo, c3);
  }
}

// out[r][0:width) = sum_{j < jn} w[r][j] m[j][0:width) for the kRows rows from r0.
RESYNC_ALWAYS_INLINE void weighted_rows(const float* w, size_t ldw, const float* m, size_t ldm,
                                        size_t width, size_t r0, size_t jn, float* out,
                                        size_t ldo) {
  const float* w0 = w + r0 * ldw;
  for (size_t c = 0; c < width; c += kLanes) {
    Vec c0{}, c1{}, c2{}, c3{};
    for (size_t j = 0; j < jn; ++j) {
      const Vec v = load(m + j * ldm + c);
      c0 += w0[j] * v;
      c1 += w0[ldw + j] * v;
      c2 += w0[2 * ldw + j] * v;
      c3 += w0[3 * ldw + j] * v;
    }
    float* o = out + r0 * ldo + c;
    store(o, c0);
    store(o + ldo, c1);
    store(o + 2 * ldo, c2);
    store(o + 3 * ldo, c3);
  }
}

// out[j][0:width) = sum_{t in [j0, tn)} w[t][j] m[t][0:width) for the kRows columns j from j0.
RESYNC_ALWAYS_INLINE void weighted_rows_transposed(const float* w, size_t ldw, const float* m,
                                                   size_t ldm, size_t width, size_t j0, size_t tn,
                                                   float* out, size_t ldo) {
  for (size_t c = 0; c < width; c += kLanes) {
    Vec c0{}, c1{}, c2{}, c3{};
    for (size_t t = j0; t < tn; ++t) {
      const Vec v = load(m + t * ldm + c);
      const float* wt = w + t * ldw + j0;
      c0 += wt[0] * v;
      c1 += wt[1] * v;
      c2 += wt[2] * v;
      c3 += wt[3] * v;
    }
    float* o = out + j0 * ldo + c;
    store(o, c0);
    store(o + ldo, c1);
    store(o + 2 * ldo, c2);
    store(o + 3 * ldo, c3);
  }
}

// Rows [0, T) x columns [0, hs) of a strided matrix into a padded buffer (ld columns), times
// `scale`.
void gather(const float* src, size_t ld_src, size_t T, size_t hs, float scale, float* dst,
            size_t ld) {
  for (size_t t = 0; t < T; ++t) {
    for (size_t d = 0; d < hs; ++d) dst[t * ld + d] = scale * src[t * ld_src + d];
  }
}

// The transpose: dst[d][t] = src[t][d].
void gather_transposed(const float* src, size_t ld_src, size_t T, size_t hs, float* dst,
                       size_t ld) {
  for (size_t d = 0; d < hs; ++d) {
    for (size_t t = 0; t < T; ++t) dst[d * ld + t] = src[t * ld_src + d];
  }
}

void scatter(const float* src, size_t ld, size_t T, size_t hs, float scale, float* dst,
             size_t ld_dst) {
  for (size_t t = 0; t < T; ++t) {
    for (size_t d = 0; d < hs; ++d) dst[t * ld_dst + d] = scale * src[t * ld + d];
  }
}

// Zero-initialised, padded per-head buffers: padding is never written, so it stays zero.
struct Padded {
  size_t T, Tp, hs, hsp;
  std::vector<float> q, k, v, o, s, p;  // rows Tp x hsp (q, k, v, o) or Tp x Tp (s, p)
  std::vector<float> extra1, extra2;    // backward: two more Tp x hsp buffers
  explicit Padded(const AttentionShape& sh, bool backward)
      : T(sh.seq_len),
        Tp(round_up(sh.seq_len, kLanes)),
        hs(sh.head_size()),
        hsp(round_up(sh.head_size(), kLanes)),
        q(Tp * hsp),
        k(Tp * hsp),
        v(Tp * hsp),
        o(Tp * hsp),
        s(Tp * Tp),
        p(Tp * Tp),
        extra1(backward ? Tp * hsp : 0),
        extra2(backward ? Tp * hsp : 0) {}
};

// Causal softmax of row t of s (its first t + 1 scores) into row t of p; zeros in p from t + 1
// to `zero_to`.
RESYNC_ALWAYS_INLINE void causal_softmax_row(const float* s, float* p, size_t t,
                                             size_t zero_to) {
  const size_t n = t + 1;
  const float row_max = simd::max(s, n);
  for (size_t j = 0; j < n; ++j) p[j] = exp_nonpositive(s[j] - row_max);
  const float inv_sum = 1.0f / simd::sum(p, n);
  for (size_t j = 0; j < n; ++j) p[j] *= inv_sum;
  for (size_t j = n; j < zero_to; ++j) p[j] = 0.0f;
}

RESYNC_VECTOR_CLONES void forward_head(const float* qkv, size_t ld, size_t C, float scale,
                                       float* out, size_t ld_out, float* att, Padded& b) {
  const size_t T = b.T, Tp = b.Tp, hs = b.hs, hsp = b.hsp;
  gather(qkv, ld, T, hs, scale, b.q.data(), hsp);
  gather_transposed(qkv + C, ld, T, hs, b.k.data(), Tp);  // k holds K^T [hsp x Tp]
  gather(qkv + 2 * C, ld, T, hs, 1.0f, b.v.data(), hsp);
  for (size_t r0 = 0; r0 < T; r0 += kRows) {
    const size_t r1 = r0 + kRows;  // <= Tp
    // Scores of the block's rows against keys [0, r1), rounded up to whole vectors.
    rows_by_columns(b.q.data(), hsp, b.k.data(), Tp, hs, r0, round_up(r1, kLanes), b.s.data(),
                    Tp);
    for (size_t t = r0; t < std::min(r1, T); ++t) {
      float* prow = b.p.data() + t * Tp;
      causal_softmax_row(b.s.data() + t * Tp, prow, t, r1);
      float* arow = att + t * T;
      std::memcpy(arow, prow, (t + 1) * sizeof(float));
      std::fill(arow + t + 1, arow + T, 0.0f);
    }
    // Rows past T, and columns past each row's diagonal, are zeros in p.
    weighted_rows(b.p.data(), Tp, b.v.data(), hsp, hsp, r0, r1, b.o.data(), hsp);
  }
  scatter(b.o.data(), hsp, T, hs, 1.0f, out, ld_out);
}

RESYNC_VECTOR_CLONES void backward_head(const float* dout, size_t ld_dout, const float* qkv,
                                        size_t ld, size_t C, float scale, const float* att,
                                        float* dqkv, Padded& b) {
  const size_t T = b.T, Tp = b.Tp, hs = b.hs, hsp = b.hsp;
  float* dout_p = b.o.data();
  float* vt = b.v.data();     // V^T [hsp x Tp]
  float* ds = b.s.data();     // dp, then d scores (zeros above the diagonal)
  float* grad = b.extra1.data();
  gather(qkv, ld, T, hs, scale, b.q.data(), hsp);  // scaled: dk = ds^T (scale q)
  gather(qkv + C, ld, T, hs, 1.0f, b.k.data(), hsp);
  gather_transposed(qkv + 2 * C, ld, T, hs, vt, Tp);
  gather(dout, ld_dout, T, hs, 1.0f, dout_p, hsp);
  for (size_t t = 0; t < T; ++t) std::memcpy(b.p.data() + t * Tp, att + t * T, T * sizeof(float));
  const float* p = b.p.data();
  for (size_t r0 = 0; r0 < T; r0 += kRows) {
    const size_t r1 = r0 + kRows;
    // dp = dout v^T, then the softmax backward in place: ds = p * (dp - sum_j p dp).
    rows_by_columns(dout_p, hsp, vt, Tp, hs, r0, round_up(r1, kLanes), ds, Tp);
    for (size_t t = r0; t < std::min(r1, T); ++t) {
      const float* prow = p + t * Tp;
      float* row = ds + t * Tp;
      const float dot = simd::dot(prow, row, t + 1);
      for (size_t j = 0; j <= t; ++j) row[j] = prow[j] * (row[j] - dot);
      for (size_t j = t + 1; j < r1; ++j) row[j] = 0.0f;
    }
    // dq = scale * ds k.
    weighted_rows(ds, Tp, b.k.data(), hsp, hsp, r0, r1, grad, hsp);
  }
  scatter(grad, hsp, T, hs, scale, dqkv, ld);
  // Key and value rows j gather from the query rows t >= j: dk = ds^T (scale q), dv = p^T dout.
  float* grad2 = b.extra2.data();
  for (size_t j0 = 0; j0 < T; j0 += kRows) {
    weighted_rows_transposed(ds, Tp, b.q.data(), hsp, hsp, j0, T, grad, hsp);
    weighted_rows_transposed(p, Tp, dout_p, hsp, hsp, j0, T, grad2, hsp);
  }
  scatter(grad, hsp, T, hs, 1.0f, dqkv + C, ld);
  scatter(grad2, hsp, T, hs, 1.0f, dqkv + 2 * C, ld);
}

}  // namespace

void attention_forward(const float* qkv, float* out, float* att, const AttentionShape& s) {
  check_shape(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  if (s.batch == 0 || T == 0) return;
  const size_t ld = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  Padded buffers(s, false);
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t h = 0; h < NH; ++h) {
      forward_head(qkv + b * T * ld + h * hs, ld, C, scale, out + b * T * C + h * hs, C,
                   att + (b * NH + h) * T * T, buffers);
    }
  }
}

void attention_backward(const float* dout, const float* qkv, const float* att, float* dqkv,
                        float* /*scratch*/, const AttentionShape& s) {
  check_shape(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  if (s.batch == 0 || T == 0) return;
  const size_t ld = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  Padded buffers(s, true);
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t h = 0; h < NH; ++h) {
      const size_t at = b * T * ld + h * hs;
      backward_head(dout + b * T * C + h * hs, C, qkv + at, ld, C, scale,
                    att + (b * NH + h) * T * T, dqkv + at, buffers);
    }
  }
}

}  // namespace resync::kernels
