#include <climits>
#include <cmath>
#include <cstdio>
#include <span>
#include <string>

#include "base/error.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/transformer.h"
#include "kernels/elementwise.h"
#include "kernels/transformer_math.h"

namespace resync::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

__global__ void gelu_forward_kernel(const float* x, float* y, size_t n) {
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) y[i] = gelu(x[i]);
}

__global__ void gelu_backward_kernel(const float* x, const float* dy, float* dx, size_t n) {
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) {
    dx[i] = gelu_grad(x[i], dy[i]);
  }
}

__global__ void residual_forward_kernel(const float* a, const float* b, float* out, size_t n) {
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) out[i] = a[i] + b[i];
}

__global__ void residual_accumulate_kernel(float* acc, const float* d, size_t n) {
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) acc[i] += d[i];
}

__global__ void layernorm_forward_kernel(const float* x, const float* w, const float* b, float* y,
                                         float* mean, float* rstd, size_t rows, size_t cols) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (size_t r = launch::global_index(); r < rows; r += launch::grid_stride()) {
    const float* xr = x + r * cols;
    float sum = 0.0f;
    for (size_t c = 0; c < cols; ++c) sum += xr[c];
    const float m = sum * inv_cols;
    float sq = 0.0f;
    for (size_t c = 0; c < cols; ++c) {
      const float d = xr[c] - m;
      sq += d * d;
    }
    const float s = layernorm_rstd(sq * inv_cols);
    for (size_t c = 0; c < cols; ++c) y[r * cols + c] = layernorm_element(xr[c], m, s, w[c], b[c]);
    mean[r] = m;
    rstd[r] = s;
  }
}

__global__ void layernorm_dx_kernel(const float* dy, const float* x, const float* w,
                                    const float* mean, const float* rstd, float* dx, size_t rows,
                                    size_t cols) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (size_t r = launch::global_index(); r < rows; r += launch::grid_stride()) {
    const float* dyr = dy + r * cols;
    const float* xr = x + r * cols;
    const float m = mean[r], s = rstd[r];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
    for (size_t c = 0; c < cols; ++c) {
      const float dxhat = dyr[c] * w[c];
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * ((xr[c] - m) * s);
    }
    const float mean_dxhat = sum_dxhat * inv_cols;
    const float mean_dxhat_xhat = sum_dxhat_xhat * inv_cols;
    for (size_t c = 0; c < cols; ++c) {
      dx[r * cols + c] +=
          layernorm_dx(dyr[c] * w[c], (xr[c] - m) * s, s, mean_dxhat, mean_dxhat_xhat);
    }
  }
}

__global__ void layernorm_dparams_kernel(const float* dy, const float* x, const float* mean,
                                         const float* rstd, float* dw, float* db, size_t rows,
                                         size_t cols) {
  for (size_t c = launch::global_index(); c < cols; c += launch::grid_stride()) {
    float sw = dw[c], sb = db[c];
    for (size_t r = 0; r < rows; ++r) {
      const float g = dy[r * cols + c];
      sw += g * ((x[r * cols + c] - mean[r]) * rstd[r]);
      sb += g;
    }
    dw[c] = sw;
    db[c] = sb;
  }
}

// The CPU twin's test of a token: an integer in [0, V) (NaN fails it).
__device__ inline bool token_index(float t, size_t vocab, size_t* index) {
  if (!(t >= 0.0f && t < static_cast<float>(vocab) && floorf(t) == t)) return false;
  *index = static_cast<size_t>(t);
  return true;
}

__global__ void embedding_forward_kernel(const float* tokens, const float* wte, const float* wpe,
                                         float* out, size_t n_pos, size_t T, size_t C, size_t V,
                                         unsigned long long* first_bad) {
  for (size_t i = launch::global_index(); i < n_pos * C; i += launch::grid_stride()) {
    const size_t pos = i / C, c = i % C;
    size_t tok = 0;
    if (token_index(tokens[pos], V, &tok)) {
      out[i] = wte[tok * C + c] + wpe[(pos % T) * C + c];
    } else {
      out[i] = wpe[(pos % T) * C + c];
      if (c == 0 && first_bad != nullptr) {
        atomicMin(first_bad, static_cast<unsigned long long>(pos));
      }
    }
  }
}

__global__ void embedding_dwpe_kernel(const float* dout, float* dwpe, size_t B, size_t T,
                                      size_t C) {
  for (size_t i = launch::global_index(); i < T * C; i += launch::grid_stride()) {
    float sum = 0.0f;
    for (size_t b = 0; b < B; ++b) sum += dout[b * T * C + i];
    dwpe[i] = sum;
  }
}

// One thread per column: positions in order, so the sums are deterministic.
__global__ void embedding_dwte_kernel(const float* dout, const float* tokens, float* dwte,
                                      size_t n_pos, size_t C, size_t V) {
  for (size_t c = launch::global_index(); c < C; c += launch::grid_stride()) {
    for (size_t pos = 0; pos < n_pos; ++pos) {
      size_t tok = 0;
      if (token_index(tokens[pos], V, &tok)) dwte[tok * C + c] += dout[pos * C + c];
    }
  }
}

// One thread per row of scores [rows x T] (row index r, position t = r % T).
__global__ void causal_softmax_kernel(float* p, size_t rows, size_t T) {
  for (size_t r = launch::global_index(); r < rows; r += launch::grid_stride()) {
    const size_t t = r % T;
    float* row = p + r * T;
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
}

__global__ void causal_softmax_backward_kernel(const float* p, float* ds, size_t T) {
  for (size_t t = launch::global_index(); t < T; t += launch::grid_stride()) {
    const float* prow = p + t * T;
    float* row = ds + t * T;
    float dot = 0.0f;
    for (size_t j = 0; j <= t; ++j) dot += prow[j] * row[j];
    for (size_t j = 0; j <= t; ++j) row[j] = prow[j] * (row[j] - dot);
    for (size_t j = t + 1; j < T; ++j) row[j] = 0.0f;
  }
}

void check_attention(const AttentionShape& s) {
  RESYNC_CHECK_ARG(s.n_head > 0 && s.dim % s.n_head == 0,
                   "cuda attention: the heads must divide the width");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

void gelu_forward(cudaStream_t stream, const float* x, float* y, size_t n) {
  if (n == 0) return;
  gelu_forward_kernel<<<launch::blocks_for(n), launch::kBlock, 0, stream>>>(x, y, n);
  RESYNC_CHECK_LAUNCH("gelu_forward_kernel");
}

void gelu_backward(cudaStream_t stream, const float* x, const float* dy, float* dx, size_t n) {
  if (n == 0) return;
  gelu_backward_kernel<<<launch::blocks_for(n), launch::kBlock, 0, stream>>>(x, dy, dx, n);
  RESYNC_CHECK_LAUNCH("gelu_backward_kernel");
}

void residual_forward(cudaStream_t stream, const float* a, const float* b, float* out, size_t n) {
  if (n == 0) return;
  residual_forward_kernel<<<launch::blocks_for(n), launch::kBlock, 0, stream>>>(a, b, out, n);
  RESYNC_CHECK_LAUNCH("residual_forward_kernel");
}

void residual_accumulate(cudaStream_t stream, float* acc, const float* d, size_t n) {
  if (n == 0) return;
  residual_accumulate_kernel<<<launch::blocks_for(n), launch::kBlock, 0, stream>>>(acc, d, n);
  RESYNC_CHECK_LAUNCH("residual_accumulate_kernel");
}

void layernorm_forward(cudaStream_t stream, const float* x, const float* weight, const float* bias,
                       float* y, float* mean, float* rstd, size_t rows, size_t cols) {
  if (rows == 0) return;
  RESYNC_CHECK_ARG(cols > 0, "cuda layernorm_forward: zero columns");
  layernorm_forward_kernel<<<launch::blocks_for(rows), launch::kBlock, 0, stream>>>(
      x, weight, bias, y, mean, rstd, rows, cols);
  RESYNC_CHECK_LAUNCH("layernorm_forward_kernel");
}

void layernorm_backward(cudaStream_t stream, const float* dy, const float* x, const float* weight,
                        const float* mean, const float* rstd, float* dx, float* dweight,
                        float* dbias, size_t rows, size_t cols) {
  if (rows == 0 || cols == 0) return;
  layernorm_dx_kernel<<<launch::blocks_for(rows), launch::kBlock, 0, stream>>>(
      dy, x, weight, mean, rstd, dx, rows, cols);
  RESYNC_CHECK_LAUNCH("layernorm_dx_kernel");
  layernorm_dparams_kernel<<<launch::blocks_for(cols), launch::kBlock, 0, stream>>>(
      dy, x, mean, rstd, dweight, dbias, rows, cols);
  RESYNC_CHECK_LAUNCH("layernorm_dparams_kernel");
}

void embedding_forward(cudaStream_t stream, const float* tokens, const float* wte, const float* wpe,
                       float* out, const EmbeddingShape& s, unsigned long long* first_bad) {
  if (first_bad != nullptr) {  // all ones: ULLONG_MAX, no bad position yet
    RESYNC_CHECK_CUDA(cudaMemsetAsync(first_bad, 0xFF, sizeof(*first_bad), stream));
  }
  const size_t n = s.batch * s.seq_len * s.dim;
  if (n == 0) return;
  embedding_forward_kernel<<<launch::blocks_for(n), launch::kBlock, 0, stream>>>(
      tokens, wte, wpe, out, s.batch * s.seq_len, s.seq_len, s.dim, s.vocab, first_bad);
  RESYNC_CHECK_LAUNCH("embedding_forward_kernel");
}

void check_tokens(cudaStream_t stream, const unsigned long long* first_bad, const float* tokens,
                  size_t vocab) {
  unsigned long long pos = ULLONG_MAX;
  download(first_bad, std::span<unsigned long long>(&pos, 1), stream);
  synchronize(stream);
  if (pos == ULLONG_MAX) return;
  float token = 0.0f;
  download(tokens + pos, std::span<float>(&token, 1), stream);
  synchronize(stream);
  char text[32];  // (fmt stays out of nvcc's way: the CPU twin prints the shortest form)
  std::snprintf(text, sizeof(text), "%.9g", static_cast<double>(token));
  throw InvalidArgument("embedding: token " + std::string(text) + " at position " +
                        std::to_string(pos) + " is not an integer in [0, " +
                        std::to_string(vocab) + ")");
}

void embedding_backward(cudaStream_t stream, const float* dout, const float* tokens, float* dwte,
                        float* dwpe, const EmbeddingShape& s) {
  if (s.seq_len == 0 || s.dim == 0) return;
  embedding_dwpe_kernel<<<launch::blocks_for(s.seq_len * s.dim), launch::kBlock, 0, stream>>>(
      dout, dwpe, s.batch, s.seq_len, s.dim);
  RESYNC_CHECK_LAUNCH("embedding_dwpe_kernel");
  embedding_dwte_kernel<<<launch::blocks_for(s.dim), launch::kBlock, 0, stream>>>(
      dout, tokens, dwte, s.batch * s.seq_len, s.dim, s.vocab);
  RESYNC_CHECK_LAUNCH("embedding_dwte_kernel");
}

void attention_forward(cublasHandle_t handle, cudaStream_t stream, const float* qkv, float* out,
                       float* att, const AttentionShape& s) {
  check_attention(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  if (s.batch == 0 || T == 0) return;
  const size_t ld = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t h = 0; h < NH; ++h) {
      const float* q = qkv + b * T * ld + h * hs;
      float* p = att + (b * NH + h) * T * T;
      gemm(handle, stream, Transpose::kNo, Transpose::kYes, T, T, hs, scale, q, ld, q + C, ld, 0.0f,
           p, T);
    }
  }
  const size_t rows = s.batch * NH * T;
  causal_softmax_kernel<<<launch::blocks_for(rows), launch::kBlock, 0, stream>>>(att, rows, T);
  RESYNC_CHECK_LAUNCH("causal_softmax_kernel");
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t h = 0; h < NH; ++h) {
      const float* v = qkv + b * T * ld + h * hs + 2 * C;
      const float* p = att + (b * NH + h) * T * T;
      gemm(handle, stream, Transpose::kNo, Transpose::kNo, T, hs, T, 1.0f, p, T, v, ld, 0.0f,
           out + b * T * C + h * hs, C);
    }
  }
}

void attention_backward(cublasHandle_t handle, cudaStream_t stream, const float* dout,
                        const float* qkv, const float* att, float* dqkv, float* scratch,
                        const AttentionShape& s) {
  check_attention(s);
  const size_t T = s.seq_len, C = s.dim, NH = s.n_head, hs = s.head_size();
  if (s.batch == 0 || T == 0) return;
  const size_t ld = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t h = 0; h < NH; ++h) {
      const size_t at = b * T * ld + h * hs;
      const float* q = qkv + at;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* dq = dqkv + at;
      const float* p = att + (b * NH + h) * T * T;
      const float* dout_bh = dout + b * T * C + h * hs;
      gemm(handle, stream, Transpose::kNo, Transpose::kYes, T, T, hs, 1.0f, dout_bh, C, v, ld, 0.0f,
           scratch, T);
      gemm(handle, stream, Transpose::kYes, Transpose::kNo, T, hs, T, 1.0f, p, T, dout_bh, C, 0.0f,
           dq + 2 * C, ld);
      causal_softmax_backward_kernel<<<launch::blocks_for(T), launch::kBlock, 0, stream>>>(
          p, scratch, T);
      RESYNC_CHECK_LAUNCH("causal_softmax_backward_kernel");
      gemm(handle, stream, Transpose::kNo, Transpose::kNo, T, hs, T, scale, scratch, T, k, ld, 0.0f,
           dq, ld);
      gemm(handle, stream, Transpose::kYes, Transpose::kNo, T, hs, T, scale, scratch, T, q, ld,
           0.0f, dq + C, ld);
    }
  }
}

}  // namespace resync::kernels::cuda
