#include "kernels/cuda/maxpool.h"

#include "base/error.h"
#include "kernels/cuda/launch.h"

namespace resync::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// The shape fields the kernels need, passed by value.
struct PoolDims {
  size_t in_h, in_w, k_h, k_w, stride_h, stride_w, out_h, out_w;
};

// One thread per output: the window in row-major order, first element first, replaced only when
// pool_takes says so (the CPU kernel's rule), so value and argmax match it exactly.
__global__ void maxpool_forward_kernel(PoolDims d, const float* x, float* y, uint32_t* argmax,
                                       size_t n_planes) {
  const size_t out_plane = d.out_h * d.out_w, n_out = n_planes * out_plane;
  for (size_t o = launch::global_index(); o < n_out; o += launch::grid_stride()) {
    const size_t plane = o / out_plane, oh = o % out_plane / d.out_w, ow = o % d.out_w;
    const float* in = x + plane * d.in_h * d.in_w;
    const size_t first = oh * d.stride_h * d.in_w + ow * d.stride_w;
    float best = in[first];
    size_t best_index = first;
    for (size_t ki = 0; ki < d.k_h; ++ki) {
      for (size_t kj = 0; kj < d.k_w; ++kj) {
        if (ki == 0 && kj == 0) continue;
        const size_t index = first + ki * d.in_w + kj;
        const float v = in[index];
        if (pool_takes(v, best)) {
          best = v;
          best_index = index;
        }
      }
    }
    y[o] = best;
    argmax[o] = static_cast<uint32_t>(best_index);
  }
}

// One thread per input element gathers the gradients of the windows that chose it, visiting the
// windows in output order: the same additions in the same order as the CPU's scatter, without
// atomics (whose order would vary from run to run).
__global__ void maxpool_backward_kernel(PoolDims d, const float* dy, const uint32_t* argmax,
                                        float* dx, size_t n_planes) {
  const size_t in_plane = d.in_h * d.in_w, out_plane = d.out_h * d.out_w;
  const size_t n_in = n_planes * in_plane;
  for (size_t i = launch::global_index(); i < n_in; i += launch::grid_stride()) {
    const size_t plane = i / in_plane, index = i % in_plane;
    const size_t ih = index / d.in_w, iw = index % d.in_w;
    // Windows oh with oh * stride_h <= ih < oh * stride_h + k_h, likewise for ow.
    const size_t oh_begin = ih < d.k_h ? 0 : (ih - d.k_h) / d.stride_h + 1;
    const size_t oh_last = ih / d.stride_h, ow_last = iw / d.stride_w;
    const size_t oh_end = oh_last < d.out_h ? oh_last + 1 : d.out_h;
    const size_t ow_begin = iw < d.k_w ? 0 : (iw - d.k_w) / d.stride_w + 1;
    const size_t ow_end = ow_last < d.out_w ? ow_last + 1 : d.out_w;
    const float* d_out = dy + plane * out_plane;
    const uint32_t* arg = argmax + plane * out_plane;
    float sum = 0.0f;
    for (size_t oh = oh_begin; oh < oh_end; ++oh) {
      for (size_t ow = ow_begin; ow < ow_end; ++ow) {
        const size_t o = oh * d.out_w + ow;
        if (arg[o] == index) sum += d_out[o];
      }
    }
    dx[i] = sum;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

namespace {
PoolDims dims_of(const Pool2dShape& s) {
  return {s.in_h, s.in_w, s.k_h, s.k_w, s.stride_h, s.stride_w, s.out_h(), s.out_w()};
}
}  // namespace

void maxpool_forward(cudaStream_t stream, const Pool2dShape& s, const float* x, float* y,
                     uint32_t* argmax, size_t batch) {
  check_pool2d_shape(s);
  if (batch == 0) return;
  RESYNC_CHECK_ARG(x != nullptr && y != nullptr && argmax != nullptr,
                   "cuda maxpool_forward: null pointer");
  const size_t n_planes = batch * s.channels;
  maxpool_forward_kernel<<<launch::blocks_for(n_planes * s.out_h() * s.out_w()), launch::kBlock,
                           0, stream>>>(dims_of(s), x, y, argmax, n_planes);
  RESYNC_CHECK_LAUNCH("maxpool_forward_kernel");
}

void maxpool_backward(cudaStream_t stream, const Pool2dShape& s, const float* dy,
                      const uint32_t* argmax, float* dx, size_t batch) {
  check_pool2d_shape(s);
  if (batch == 0) return;
  RESYNC_CHECK_ARG(dy != nullptr && argmax != nullptr && dx != nullptr,
                   "cuda maxpool_backward: null pointer");
  const size_t n_planes = batch * s.channels;
  maxpool_backward_kernel<<<launch::blocks_for(n_planes * s.in_h * s.in_w), launch::kBlock, 0,
                            stream>>>(dims_of(s), dy, argmax, dx, n_planes);
  RESYNC_CHECK_LAUNCH("maxpool_backward_kernel");
}

}  // namespace resync::kernels::cuda
