// 2-D convolution (cross-correlation, as in PyTorch) on NCHW float batches, lowered to GEMM by
// im2col/col2im: the shape, the lowering choices, forward and backward.
#pragma once

#include <cstddef>
#include <span>

namespace resync::kernels {

// One convolution's geometry. Output size per axis: (in + 2 pad - kernel) / stride + 1, floor.
struct Conv2dShape {
  size_t in_c = 1, in_h = 1, in_w = 1;
  size_t out_c = 1;
  size_t k_h = 1, k_w = 1;
  size_t stride_h = 1, stride_w = 1;
  size_t pad_h = 0, pad_w = 0;

  size_t out_h() const { return (in_h + 2 * pad_h - k_h) / stride_h + 1; }
  size_t out_w() const { return (in_w + 2 * pad_w - k_w) / stride_w + 1; }
  size_t in_size() const { return in_c * in_h * in_w; }         // floats per input sample
  size_t out_size() const { return out_c * out_h() * out_w(); }  // floats per output sample
  size_t col_rows() const { return in_c * k_h * k_w; }  // GEMM k: one row per (c, ki, kj)
  size_t col_cols() const { return out_h() * out_w(); }  // one column per output pixel
  size_t n_weights() const { return out_c * col_rows(); }
  size_t padded_h() const { return in_h + 2 * pad_h; }
  size_t padded_w() const { return in_w + 2 * pad_w; }
  size_t padded_size() const { return in_c * padded_h() * padded_w(); }  // one padded sample
};

// Throws InvalidArgument on a zero size or stride, or a kernel larger than the padded input.
void check_conv2d_shape(const Conv2dShape& s);

// How the batch is lowered to GEMM.
//   kPerSample: im2col of one sample at a time into a [col_rows x col_cols] buffer that stays in
//               cache, one GEMM per sample (Caffe's scheme). Workspace independent of the batch.
//   kBatched:   im2col of the whole batch into [col_rows x batch*col_cols], one large GEMM per
//               product, plus a transpose between [out_c x batch*pixels] and NCHW.
enum class ConvLowering { kPerSample, kBatched };

// Floats of scratch that forward and backward need for up to max_batch samples.
size_t conv2d_workspace_elems(const Conv2dShape& s, ConvLowering lowering, size_t max_batch);

// im2col works on one explicitly zero-padded sample [in_c x padded_h x padded_w]: every window
// then lies inside the buffer, so the rows are plain (vectorised) copies without bounds tests.

// xp = x [in_c x in_h x in_w] with pad_h rows / pad_w columns of zeros around every plane.
void pad_sample(const Conv2dShape& s, const float* x, float* xp);

// The interior of a padded sample: x = xp without its border (the inverse of pad_sample).
void crop_sample(const Conv2dShape& s, const float* xp, float* x);

// Writes the im2col matrix of one padded sample xp: element (r, p), with
// r = (c * k_h + ki) * k_w + kj and p = oh * out_w + ow, is xp[c][oh * stride_h + ki]
// [ow * stride_w + kj], i.e. x[c][oh*sh - ph + ki][ow*sw - pw + kj] or 0 in the padding.
// Row r starts at col + r * ld_col (ld_col >= col_cols); the gap after each row is not written.
void im2col(const Conv2dShape& s, const float* xp, float* col, size_t ld_col);

// The adjoint of im2col: dxp (padded layout) = 0, then every col element is added to the element
// it was copied from (overlapping windows add up, the border receives the padding's share).
// Fixed loop order, so the bits are reproducible.
void col2im(const Conv2dShape& s, const float* col, size_t ld_col, float* dxp);

// y [batch x out_c x out_h x out_w] = conv(x, w) + bias, for x [batch x in_c x in_h x in_w],
// w [out_c x in_c x k_h x k_w] and bias [out_c]. workspace holds at least
// conv2d_workspace_elems(s, lowering, batch) floats (InvalidArgument otherwise).
void conv2d_forward(const Conv2dShape& s, ConvLowering lowering, const float* x, const float* w,
                    const float* bias, float* y, size_t batch, std::span<float> workspace);

// Overwrites dw and dbias with the gradients for dy = dL/dy and, unless dx is null, writes
// dx = dL/dx. Stateless: im2col of x is recomputed, so it does not depend on a previous forward.
void conv2d_backward(const Conv2dShape& s, ConvLowering lowering, const float* x, const float* w,
                     const float* dy, float* dw, float* dbias, float* dx, size_t batch,
                     std::span<float> workspace);

}  // namespace resync::kernels
