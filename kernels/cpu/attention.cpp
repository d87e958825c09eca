#include "kernels/attention.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "base/error.h"
#include "kernels/cpu/simd.h"
#include "kernels/transformer_math.h"

// One sequence at a time, in cache-sized buffers: its heads' query, key and value rows are copied
// out of qkv (front to back) into contiguous per-head buffers padded with zeros (positions to a
// multiple of 16, the head size to a multiple of 16); then, head by head, every product runs as
// a register-blocked loop over 16-float vectors, 4 query (or key) rows at a time, only on and
// below the diagonal. Per-head GEMM calls through the BLAS cost more in packing and call
// overhead than they compute at these sizes (T x T x head size, head size 32 in the default gpt).

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

// The heads' column blocks [h*hs, h*hs + hs) of rows [0, T) of a strided matrix, times
// `scale`, into per-head padded buffers (head h at dst + h * stride, rows of ld floats): row by
// row, so that the reads run along each row of qkv rather than down a column block.
void gather_heads(const float* src, size_t ld_src, size_t T, size_t NH, size_t hs, float scale,
                  float* dst, size_t stride, size_t ld) {
  for (size_t t = 0; t < T; ++t) {
    const float* row = src + t * ld_src;
    for (size_t h = 0; h < NH; ++h) {
      float* out = dst + h * stride + t * ld;
      for (size_t d = 0; d < hs; ++d) out[d] = scale * row[h * hs + d];
    }
  }
}

// As gather_heads, transposed: head h's buffer holds dst[d * ld + t] = src[t][h * hs + d]. In
// blocks of 16 rows, so that each write fills one cache line of dst (row by row, every write
// would touch another line, more than L1 holds for all heads).
void gather_heads_transposed(const float* src, size_t ld_src, size_t T, size_t NH, size_t hs,
                             float* dst, size_t stride, size_t ld) {
  for (size_t t0 = 0; t0 < T; t0 += kLanes) {
    const size_t t1 = std::min(T, t0 + kLanes);
    for (size_t h = 0; h < NH; ++h) {
      for (size_t d = 0; d < hs; ++d) {
        float* out = dst + h * stride + d * ld;
        const float* in = src + h * hs + d;
        for (size_t t = t0; t < t1; ++t) out[t] = in[t * ld_src];
      }
    }
  }
}

// The inverse of gather_heads: per-head buffers back into the column blocks of dst's rows.
void scatter_heads(const float* src, size_t stride, size_t ld, size_t T, size_t NH, size_t hs,
                   float scale, float* dst, size_t ld_dst) {
  for (size_t t = 0; t < T; ++t) {
    float* row = dst + t * ld_dst;
    for (size_t h = 0; h < NH; ++h) {
      const float* in = src + h * stride + t * ld;
      for (size_t d = 0; d < hs; ++d) row[h * hs + d] = scale * in[d];
    }
  }
}

// Per-thread storage of one direction's buffers, kept between calls (freed and re-faulted
// buffers of this size cost a page fault and a page clear per 4 KiB every step), zeroed when
// the shape changes.
struct Arena {
  std::vector<float> data;
  size_t T = 0, NH = 0, hs = 0;
};

// One sequence's padded per-head buffers. Their padding is zero: inputs are only ever written
// inside [T x hs] (or [hs x T]), and outputs are never read as inputs in the same direction, so
// the zeros from the arena's (re)sizing last.
struct Padded {
  // ldt: the row stride of the position-wide buffers (K^T, V^T, scores, probabilities), one
  // vector more than Tp: an odd number of cache lines, so that walking down a column of them
  // touches every L1 set (a stride of a power of two, 512 bytes for T = 128, uses one in eight).
  size_t T, Tp, NH, hs, hsp, ldt, stride;  // stride: from one head's buffer to the next
  float *q, *k, *v, *o, *dq, *dk, *dv;     // NH buffers each of Tp x hsp (or hsp x ldt)
  float *s, *p;                            // Tp x ldt, one head at a time
  Padded(const AttentionShape& sh, Arena& arena)
      : T(sh.seq_len),
        Tp(round_up(sh.seq_len, kLanes)),
        NH(sh.n_head),
        hs(sh.head_size()),
        hsp(round_up(sh.head_size(), kLanes)),
        ldt(Tp + kLanes),
        stride(hsp * ldt) {
    const size_t square = Tp * ldt;
    if (arena.T != T || arena.NH != NH || arena.hs != hs) {
      arena.data.assign(7 * NH * stride + 2 * square, 0.0f);
      arena.T = T;
      arena.NH = NH;
      arena.hs = hs;
    }
    float* at = arena.data.data();
    for (float** buffer : {&q, &k, &v, &o, &dq, &dk, &dv}) {
      *buffer = at;
      at += NH * stride;
    }
    s = at;
    p = at + square;
  }
};

// Causal softmax of row t of s (its first t + 1 scores) into row t of p; zeros in p from t + 1
// to `zero_to`.
RESYNC_ALWAYS_INLINE void causal_softmax_row(const float* s, float* p, size_t t, size_t zero_to) {
  const size_t n = t + 1;
  const float row_max = simd::max(s, n);
  for (size_t j = 0; j < n; ++j) p[j] = exp_nonpositive(s[j] - row_max);
  const float inv_sum = 1.0f / simd::sum(p, n);
  for (size_t j = 0; j < n; ++j) p[j] *= inv_sum;
  for (size_t j = n; j < zero_to; ++j) p[j] = 0.0f;
}

// One head: q (scaled), k^T, v in, o out (padded buffers), att [T x T] out.
RESYNC_ALWAYS_INLINE void forward_head(const float* q, const float* kt, const float* v, float* o,
                                       float* att, const Padded& b) {
  const size_t T = b.T, ldt = b.ldt, hs = b.hs, hsp = b.hsp;
  // With T a whole number of row blocks, att's rows serve as the probabilities' buffer (its
  // 4-row blocks are read where they were written; its zeros above the diagonal are the padding).
  const bool in_place = T % kRows == 0;
  for (size_t r0 = 0; r0 < T; r0 += kRows) {
    const size_t r1 = r0 + kRows;  // <= Tp
    // Scores of the block's rows against keys [0, r1), rounded up to whole vectors.
    rows_by_columns(q, hsp, kt, ldt, hs, r0, round_up(r1, kLanes), b.s, ldt);
    for (size_t t = r0; t < std::min(r1, T); ++t) {
      if (in_place) {
        causal_softmax_row(b.s + t * ldt, att + t * T, t, T);
      } else {
        float* prow = b.p + t * ldt;
        causal_softmax_row(b.s + t * ldt, prow, t, r1);
        float* arow = att + t * T;
        std::memcpy(arow, prow, (t + 1) * sizeof(float));
        std::fill(arow + t + 1, arow + T, 0.0f);
      }
    }
    // Rows past T, and columns past each row's diagonal, are zeros in p.
    if (in_place) {
      weighted_rows(att, T, v, hsp, hsp, r0, r1, o, hsp);
    } else {
      weighted_rows(b.p, ldt, v, hsp, hsp, r0, r1, o, hsp);
    }
  }
}

// One head: q (scaled), k, v^T, dout and att in; dq (unscaled), dk, dv out (padded buffers).
RESYNC_ALWAYS_INLINE void backward_head(const float* q, const float* k, const float* vt,
                                        const float* dout, const float* att, float* dq, float* dk,
                                        float* dv, const Padded& b) {
  const size_t T = b.T, ldt = b.ldt, hs = b.hs, hsp = b.hsp;
  float* ds = b.s;  // dp, then d scores (zeros above the diagonal)
  // The probabilities: att itself when T is a whole number of row blocks (the blocks of
  // weighted_rows_transposed then stay inside its rows), else a copy padded with zeros.
  const float* p = att;
  size_t ldp = T;
  if (T % kRows != 0) {
    for (size_t t = 0; t < T; ++t) std::memcpy(b.p + t * ldt, att + t * T, T * sizeof(float));
    p = b.p;
    ldp = ldt;
  }
  for (size_t r0 = 0; r0 < T; r0 += kRows) {
    const size_t r1 = r0 + kRows;
    // dp = dout v^T, then the softmax backward in place: ds = p * (dp - sum_j p dp).
    rows_by_columns(dout, hsp, vt, ldt, hs, r0, round_up(r1, kLanes), ds, ldt);
    for (size_t t = r0; t < std::min(r1, T); ++t) {
      const float* prow = p + t * ldp;
      float* row = ds + t * ldt;
      const float dot = simd::dot(prow, row, t + 1);
      for (size_t j = 0; j <= t; ++j) row[j] = prow[j] * (row[j] - dot);
      for (size_t j = t + 1; j < r1; ++j) row[j] = 0.0f;
    }
    // dq = ds k (scaled when scattered).
    weighted_rows(ds, ldt, k, hsp, hsp, r0, r1, dq, hsp);
  }
  // Key and value rows j gather from the query rows t >= j: dk = ds^T (scale q), dv = p^T dout.
  for (size_t j0 = 0; j0 < T; j0 += kRows) {
    weighted_rows_transposed(ds, ldt, q, hsp, hsp, j0, T, dk, hsp);
    weighted_rows_transposed(p, ldp, dout, hsp, hsp, j0, T, dv, hsp);
  }
}

// One sequence (qkv [T x 3C], out [T x C], att [NH x T x T]).
RESYNC_VECTOR_CLONES void forward_sequence(const float* qkv, size_t C, float scale, float* out,
                                           float* att, Padded& b) {
  const size_t T = b.T, NH = b.NH, hs = b.hs, hsp = b.hsp, stride = b.stride;
  // In blocks of 16 rows, so that the sequence's qkv is read front to back once (q, k and v of
  // a block are in L1 after the first of them).
  for (size_t t0 = 0; t0 < T; t0 += kLanes) {
    const size_t n = std::min(kLanes, T - t0);
    const float* rows = qkv + t0 * 3 * C;
    gather_heads(rows, 3 * C, n, NH, hs, scale, b.q + t0 * hsp, stride, hsp);
    gather_heads_transposed(rows + C, 3 * C, n, NH, hs, b.k + t0, stride, b.ldt);  // K^T
    gather_heads(rows + 2 * C, 3 * C, n, NH, hs, 1.0f, b.v + t0 * hsp, stride, hsp);
  }
  for (size_t h = 0; h < NH; ++h) {
    forward_head(b.q + h * stride, b.k + h * stride, b.v + h * stride, b.o + h * stride,
                 att + h * T * T, b);
  }
  scatter_heads(b.o, stride, hsp, T, NH, hs, 1.0f, out, C);
}

// One sequence (dout [T x C], qkv and dqkv [T x 3C], att [NH x T x T]).
RESYNC_VECTOR_CLONES void backward_sequence(const float* dout, const float* qkv, size_t C,
                                            float scale, const float* att, float* dqkv, Padded& b) {
  const size_t T = b.T, NH = b.NH, hs = b.hs, hsp = b.hsp, stride = b.stride;
  float* dout_p = b.o;
  float* vt = b.v;  // V^T [hsp x ldt]
  // Blocks of 16 rows, as in forward_sequence. q is scaled: dk = ds^T (scale q).
  for (size_t t0 = 0; t0 < T; t0 += kLanes) {
    const size_t n = std::min(kLanes, T - t0);
    const float* rows = qkv + t0 * 3 * C;
    gather_heads(rows, 3 * C, n, NH, hs, scale, b.q + t0 * hsp, stride, hsp);
    gather_heads(rows + C, 3 * C, n, NH, hs, 1.0f, b.k + t0 * hsp, stride, hsp);
    gather_heads_transposed(rows + 2 * C, 3 * C, n, NH, hs, vt + t0, stride, b.ldt);
  }
  gather_heads(dout, C, T, NH, hs, 1.0f, dout_p, stride, hsp);
  for (size_t h = 0; h < NH; ++h) {
    const size_t at = h * stride;
    backward_head(b.q + at, b.k + at, vt + at, dout_p + at, att + h * T * T, b.dq + at, b.dk + at,
                  b.dv + at, b);
  }
  // Written front to back in blocks of 16 rows.
  for (size_t t0 = 0; t0 < T; t0 += kLanes) {
    const size_t n = std::min(kLanes, T - t0), at = t0 * hsp;
    float* rows = dqkv + t0 * 3 * C;
    scatter_heads(b.dq + at, stride, hsp, n, NH, hs, scale, rows, 3 * C);
    scatter_heads(b.dk + at, stride, hsp, n, NH, hs, 1.0f, rows + C, 3 * C);
    scatter_heads(b.dv + at, stride, hsp, n, NH, hs, 1.0f, rows + 2 * C, 3 * C);
  }
}

}  // namespace

void attention_forward(const float* qkv, float* out, float* att, const AttentionShape& s) {
  check_shape(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  if (s.batch == 0 || T == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  thread_local Arena arena;
  Padded buffers(s, arena);
  for (size_t b = 0; b < s.batch; ++b) {
    forward_sequence(qkv + b * T * 3 * C, C, scale, out + b * T * C, att + b * NH * T * T, buffers);
  }
}

void attention_backward(const float* dout, const float* qkv, const float* att, float* dqkv,
                        float* /*scratch*/, const AttentionShape& s) {
  check_shape(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  if (s.batch == 0 || T == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  thread_local Arena arena;  // not the forward's: the buffers' roles (and padding) differ
  Padded buffers(s, arena);
  for (size_t b = 0; b < s.batch; ++b) {
    backward_sequence(dout + b * T * C, qkv + b * T * 3 * C, C, scale, att + b * NH * T * T,
                      dqkv + b * T * 3 * C, buffers);
  }
}

}  // namespace resync::kernels
