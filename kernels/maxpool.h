// 2-D max pooling on NCHW float batches (no padding, floor mode as PyTorch's default), forward
// with the argmax of each window and backward routing each gradient to its argmax.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/elementwise.h"

namespace resync::kernels {

// Output size per axis: (in - kernel) / stride + 1, floor: trailing rows/columns that do not fill
// a whole window are dropped (a 2x2 stride-2 pool maps 7x7 to 3x3).
struct Pool2dShape {
  size_t channels = 1, in_h = 1, in_w = 1;
  size_t k_h = 2, k_w = 2;
  size_t stride_h = 2, stride_w = 2;

  size_t out_h() const { return (in_h - k_h) / stride_h + 1; }
  size_t out_w() const { return (in_w - k_w) / stride_w + 1; }
  size_t in_size() const { return channels * in_h * in_w; }
  size_t out_size() const { return channels * out_h() * out_w(); }
};

// Throws InvalidArgument on a zero size or stride, a window larger than the input, or an input
// plane too large for 32-bit argmax indices.
void check_pool2d_shape(const Pool2dShape& s);

// Whether a window element replaces the running maximum: strictly greater keeps the first
// maximum on ties; a NaN always wins, so a NaN input shows in the output (as in PyTorch).
// Bitwise `|`, not `||`: both sides are cheap, and without the branch the CPU loops vectorise.
RESYNC_HOST_DEVICE inline bool pool_takes(float candidate, float current) {
  return (candidate > current) | std::isnan(candidate);
}

// y [batch x channels x out_h x out_w] = window maxima of x [batch x channels x in_h x in_w];
// argmax (same shape as y) receives each maximum's index ih * in_w + iw within its input plane.
void maxpool_forward(const Pool2dShape& s, const float* x, float* y, uint32_t* argmax,
                     size_t batch);

// dx = 0, then dx[plane][argmax[o]] += dy[o] for every output o (overlapping windows add up).
// argmax must come from the forward call on the same x.
void maxpool_backward(const Pool2dShape& s, const float* dy, const uint32_t* argmax, float* dx,
                      size_t batch);

}  // namespace resync::kernels
