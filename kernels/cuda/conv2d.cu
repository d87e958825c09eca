#include "kernels/cuda/conv2d.h"

#include <string>

#include "base/error.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/launch.h"

namespace resync::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// The shape fields the kernels need, passed by value (Conv2dShape's helpers are host-only).
struct ConvDims {
  size_t in_c, in_h, in_w, out_c, k_h, k_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w;
  __host__ __device__ size_t n_pixels() const { return out_h * out_w; }
};

// One thread per col element (r, n, p), in col order: writes are coalesced along the pixels.
// The padding is tested per element instead of materialising a padded copy of the batch.
__global__ void im2col_kernel(ConvDims d, const float* x, size_t batch, float* col,
                              size_t ld_col) {
  const size_t n_pixels = d.n_pixels(), row_len = batch * n_pixels;
  const size_t n_elems = d.in_c * d.k_h * d.k_w * row_len;
  for (size_t i = launch::global_index(); i < n_elems; i += launch::grid_stride()) {
    const size_t r = i / row_len, rest = i % row_len;
    const size_t n = rest / n_pixels, p = rest % n_pixels;
    const size_t c = r / (d.k_h * d.k_w), ki = r / d.k_w % d.k_h, kj = r % d.k_w;
    // Coordinates in the padded sample; inside the real input iff pad <= coordinate < pad + size.
    const size_t hp = p / d.out_w * d.stride_h + ki, wp = p % d.out_w * d.stride_w + kj;
    float v = 0.0f;
    if (hp >= d.pad_h && hp - d.pad_h < d.in_h && wp >= d.pad_w && wp - d.pad_w < d.in_w) {
      v = x[((n * d.in_c + c) * d.in_h + hp - d.pad_h) * d.in_w + wp - d.pad_w];
    }
    col[r * ld_col + rest] = v;
  }
}

// One thread per input element gathers the col elements copied from it. Terms are added in
// (ki, kj) order starting from 0, which is the order kernels::col2im adds them in, so no atomics
// are needed and the bits equal the CPU's.
__global__ void col2im_kernel(ConvDims d, const float* col, size_t ld_col, size_t batch,
                              float* dx) {
  const size_t n_pixels = d.n_pixels(), plane = d.in_h * d.in_w;
  const size_t n_elems = batch * d.in_c * plane;
  for (size_t i = launch::global_index(); i < n_elems; i += launch::grid_stride()) {
    const size_t n = i / (d.in_c * plane), c = i / plane % d.in_c;
    const size_t hp = i % plane / d.in_w + d.pad_h, wp = i % d.in_w + d.pad_w;
    float sum = 0.0f;
    for (size_t ki = 0; ki < d.k_h && ki <= hp; ++ki) {
      const size_t dh = hp - ki;
      if (dh % d.stride_h != 0 || dh / d.stride_h >= d.out_h) continue;
      for (size_t kj = 0; kj < d.k_w && kj <= wp; ++kj) {
        const size_t dw = wp - kj;
        if (dw % d.stride_w != 0 || dw / d.stride_w >= d.out_w) continue;
        const size_t r = (c * d.k_h + ki) * d.k_w + kj;
        const size_t p = dh / d.stride_h * d.out_w + dw / d.stride_w;
        sum += col[r * ld_col + n * n_pixels + p];
      }
    }
    dx[i] = sum;
  }
}

// y[n][c][p] = t[c][n * P + p] + bias[c]: the GEMM's channel-major result back to NCHW.
__global__ void scatter_bias_kernel(const float* t, const float* bias, float* y, size_t batch,
                                    size_t out_c, size_t n_pixels) {
  const size_t n_elems = batch * out_c * n_pixels, ld = batch * n_pixels;
  for (size_t i = launch::global_index(); i < n_elems; i += launch::grid_stride()) {
    const size_t n = i / (out_c * n_pixels), c = i / n_pixels % out_c, p = i % n_pixels;
    y[i] = t[c * ld + n * n_pixels + p] + bias[c];
  }
}

// t[c][n * P + p] = dy[n][c][p]: NCHW gradients to the GEMM's channel-major layout.
__global__ void gather_channels_kernel(const float* dy, float* t, size_t batch, size_t out_c,
                                       size_t n_pixels) {
  const size_t n_elems = batch * out_c * n_pixels, ld = batch * n_pixels;
  for (size_t i = launch::global_index(); i < n_elems; i += launch::grid_stride()) {
    const size_t n = i / (out_c * n_pixels), c = i / n_pixels % out_c, p = i % n_pixels;
    t[c * ld + n * n_pixels + p] = dy[i];
  }
}

// sums[row] = sum of t[row][0 .. len): one block per row, strided partial sums, then a fixed
// tree, so the result is the same on every run.
constexpr unsigned kSumThreads = 256;
__global__ void __launch_bounds__(kSumThreads)
    row_sums_kernel(const float* t, size_t len, float* sums) {
  __shared__ float partial[kSumThreads];
  const float* row = t + blockIdx.x * len;
  float s = 0.0f;
  for (size_t j = threadIdx.x; j < len; j += kSumThreads) s += row[j];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (unsigned half = kSumThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[blockIdx.x] = partial[0];
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

namespace {

ConvDims dims_of(const Conv2dShape& s) {
  return {s.in_c,     s.in_h,     s.in_w,  s.out_c, s.k_h,     s.k_w,
          s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.out_h(), s.out_w()};
}

// The two scratch matrices inside the caller's workspace (see conv2d_workspace_elems).
struct Scratch {
  float* col;  // [col_rows x batch * col_cols]
  float* t;    // [out_c x batch * col_cols]
};

Scratch carve(const Conv2dShape& s, size_t batch, std::span<float> workspace) {
  const size_t needed = conv2d_workspace_elems(s, batch);
  RESYNC_CHECK_ARG(workspace.size() >= needed,
                   "cuda conv2d: workspace of " + std::to_string(workspace.size()) +
                       " floats, batch " + std::to_string(batch) + " needs " +
                       std::to_string(needed));
  float* col = workspace.data();
  return {col, col + s.col_rows() * batch * s.col_cols()};
}

void launch_im2col(cudaStream_t stream, const Conv2dShape& s, const float* x, size_t batch,
                   float* col, size_t ld_col) {
  im2col_kernel<<<launch::blocks_for(s.col_rows() * batch * s.col_cols()), launch::kBlock, 0,
                  stream>>>(dims_of(s), x, batch, col, ld_col);
  RESYNC_CHECK_LAUNCH("im2col_kernel");
}

void launch_col2im(cudaStream_t stream, const Conv2dShape& s, const float* col, size_t ld_col,
                   size_t batch, float* dx) {
  col2im_kernel<<<launch::blocks_for(batch * s.in_size()), launch::kBlock, 0, stream>>>(
      dims_of(s), col, ld_col, batch, dx);
  RESYNC_CHECK_LAUNCH("col2im_kernel");
}

void check_col_args(const Conv2dShape& s, size_t batch, size_t ld_col, const void* a,
                    const void* b, const char* op) {
  check_conv2d_shape(s);
  RESYNC_CHECK_ARG(ld_col >= batch * s.col_cols(),
                   std::string("cuda ") + op + ": ld_col = " + std::to_string(ld_col) + " < " +
                       std::to_string(batch * s.col_cols()) + " (batch x output pixels)");
  RESYNC_CHECK_ARG(batch == 0 || (a != nullptr && b != nullptr),
                   std::string("cuda ") + op + ": null pointer");
}

}  // namespace

size_t conv2d_workspace_elems(const Conv2dShape& s, size_t max_batch) {
  return (s.col_rows() + s.out_c) * max_batch * s.col_cols();
}

void im2col(cudaStream_t stream, const Conv2dShape& s, const float* x, size_t batch, float* col,
            size_t ld_col) {
  check_col_args(s, batch, ld_col, x, col, "im2col");
  if (batch == 0) return;
  launch_im2col(stream, s, x, batch, col, ld_col);
}

void col2im(cudaStream_t stream, const Conv2dShape& s, const float* col, size_t ld_col,
            size_t batch, float* dx) {
  check_col_args(s, batch, ld_col, col, dx, "col2im");
  if (batch == 0) return;
  launch_col2im(stream, s, col, ld_col, batch, dx);
}

void conv2d_forward(cublasHandle_t handle, cudaStream_t stream, const Conv2dShape& s,
                    const float* x, const float* w, const float* bias, float* y, size_t batch,
                    std::span<float> workspace) {
  check_conv2d_shape(s);
  const Scratch ws = carve(s, batch, workspace);
  if (batch == 0) return;
  RESYNC_CHECK_ARG(x != nullptr && w != nullptr && bias != nullptr && y != nullptr,
                   "cuda conv2d_forward: null pointer");
  const size_t k = s.col_rows(), n_pixels = s.col_cols(), ld = batch * n_pixels;
  launch_im2col(stream, s, x, batch, ws.col, ld);
  // t [out_c x batch*P] = W [out_c x K] * col [K x batch*P]
  gemm(handle, stream, Transpose::kNo, Transpose::kNo, s.out_c, ld, k, 1.0f, w, k, ws.col, ld,
       0.0f, ws.t, ld);
  scatter_bias_kernel<<<launch::blocks_for(s.out_c * ld), launch::kBlock, 0, stream>>>(
      ws.t, bias, y, batch, s.out_c, n_pixels);
  RESYNC_CHECK_LAUNCH("scatter_bias_kernel");
}

void conv2d_backward(cublasHandle_t handle, cudaStream_t stream, const Conv2dShape& s,
                     const float* x, const float* w, const float* dy, float* dw, float* dbias,
                     float* dx, size_t batch, std::span<float> workspace) {
  check_conv2d_shape(s);
  const Scratch ws = carve(s, batch, workspace);
  RESYNC_CHECK_ARG(dw != nullptr && dbias != nullptr, "cuda conv2d_backward: null dw or dbias");
  if (batch == 0) {
    RESYNC_CHECK_CUDA(cudaMemsetAsync(dw, 0, s.n_weights() * sizeof(float), stream));
    RESYNC_CHECK_CUDA(cudaMemsetAsync(dbias, 0, s.out_c * sizeof(float), stream));
    return;
  }
  RESYNC_CHECK_ARG(x != nullptr && w != nullptr && dy != nullptr,
                   "cuda conv2d_backward: null x, w or dy");
  const size_t k = s.col_rows(), n_pixels = s.col_cols(), ld = batch * n_pixels;
  gather_channels_kernel<<<launch::blocks_for(s.out_c * ld), launch::kBlock, 0, stream>>>(
      dy, ws.t, batch, s.out_c, n_pixels);
  RESYNC_CHECK_LAUNCH("gather_channels_kernel");
  RESYNC_CHECK_ARG(s.out_c <= launch::kMaxBlocks,
                   "cuda conv2d_backward: more than 65535 output channels");
  row_sums_kernel<<<static_cast<unsigned>(s.out_c), kSumThreads, 0, stream>>>(ws.t, ld, dbias);
  RESYNC_CHECK_LAUNCH("row_sums_kernel");
  launch_im2col(stream, s, x, batch, ws.col, ld);
  // dW [out_c x K] = t [out_c x batch*P] * col^T [batch*P x K]
  gemm(handle, stream, Transpose::kNo, Transpose::kYes, s.out_c, k, ld, 1.0f, ws.t, ld, ws.col,
       ld, 0.0f, dw, k);
  if (dx != nullptr) {
    // dcol [K x batch*P] = W^T [K x out_c] * t [out_c x batch*P], into the buffer col no longer
    // needs (the stream orders it after the dW GEMM).
    gemm(handle, stream, Transpose::kYes, Transpose::kNo, k, ld, s.out_c, 1.0f, w, k, ws.t, ld,
         0.0f, ws.col, ld);
    launch_col2im(stream, s, ws.col, ld, batch, dx);
  }
}

}  // namespace resync::kernels::cuda
