// 2-D convolution on NCHW device batches, lowered to one cuBLAS GEMM per product by a batched
// im2col/col2im: the CUDA twins of kernels/conv2d.h (the ConvLowering::kBatched scheme).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>

#include "kernels/conv2d.h"

namespace resync::kernels::cuda {

// Floats of device scratch conv2d_forward/backward need for up to max_batch samples: the batch's
// im2col matrix [col_rows x batch*col_cols] and the output gathered by channel
// [out_c x batch*col_cols]. Padding is applied on the fly, so no padded copy is needed.
size_t conv2d_workspace_elems(const Conv2dShape& s, size_t max_batch);

// im2col of a whole batch of unpadded samples x [batch x in_c x in_h x in_w]: element (r, n, p)
// goes to col[r * ld_col + n * col_cols + p] with the layout of kernels::im2col (0 in the
// padding). ld_col >= batch * col_cols; the gap after each row is not written.
void im2col(cudaStream_t stream, const Conv2dShape& s, const float* x, size_t batch, float* col,
            size_t ld_col);

// The adjoint: overwrites dx [batch x in_c x in_h x in_w] with the sum of the col elements copied
// from each input element (the padding's share is dropped). Each element adds its terms in the
// order of kernels::col2im, so the result equals the CPU's bit for bit.
void col2im(cudaStream_t stream, const Conv2dShape& s, const float* col, size_t ld_col,
            size_t batch, float* dx);

// y = conv(x, w) + bias as kernels::conv2d_forward; every pointer is device memory and workspace
// holds at least conv2d_workspace_elems(s, batch) floats of it (InvalidArgument otherwise).
void conv2d_forward(cublasHandle_t handle, cudaStream_t stream, const Conv2dShape& s,
                    const float* x, const float* w, const float* bias, float* y, size_t batch,
                    std::span<float> workspace);

// Overwrites dw and dbias and, unless dx is null, writes dx, as kernels::conv2d_backward.
void conv2d_backward(cublasHandle_t handle, cudaStream_t stream, const Conv2dShape& s,
                     const float* x, const float* w, const float* dy, float* dw, float* dbias,
                     float* dx, size_t batch, std::span<float> workspace);

}  // namespace resync::kernels::cuda
