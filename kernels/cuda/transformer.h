// The transformer kernels on device buffers: the CUDA twins of kernels/gelu.h, residual.h,
// layernorm.h, embedding.h and attention.h, with the same arguments plus an explicit stream
// (and the cuBLAS handle for attention's GEMMs). Elementwise math comes from
// kernels/transformer_math.h, as on the CPU.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#include "kernels/attention.h"
#include "kernels/embedding.h"

namespace resync::kernels::cuda {

void gelu_forward(cudaStream_t stream, const float* x, float* y, size_t n);
void gelu_backward(cudaStream_t stream, const float* x, const float* dy, float* dx, size_t n);

void residual_forward(cudaStream_t stream, const float* a, const float* b, float* out, size_t n);
void residual_accumulate(cudaStream_t stream, float* acc, const float* d, size_t n);

// One thread per row (forward, dx) and per column (dweight, dbias): sums run in the CPU's order.
void layernorm_forward(cudaStream_t stream, const float* x, const float* weight, const float* bias,
                       float* y, float* mean, float* rstd, size_t rows, size_t cols);
// Adds to dx, dweight and dbias, as kernels::layernorm_backward.
void layernorm_backward(cudaStream_t stream, const float* dy, const float* x, const float* weight,
                        const float* mean, const float* rstd, float* dx, float* dweight,
                        float* dbias, size_t rows, size_t cols);

// A token that is not an integer in [0, V) (the CPU twin throws for it) is never used as an
// index: the forward writes the position embedding alone for it and the backward skips it. With
// `first_bad` (one value of device memory), the forward also records the first such position
// there, for check_tokens. The backward sums each dwte column over the positions in order
// (deterministic, no atomics).
void embedding_forward(cudaStream_t stream, const float* tokens, const float* wte, const float* wpe,
                       float* out, const EmbeddingShape& s,
                       unsigned long long* first_bad = nullptr);
void embedding_backward(cudaStream_t stream, const float* dout, const float* tokens, float* dwte,
                        float* dwpe, const EmbeddingShape& s);
// Waits for `stream`; throws InvalidArgument, worded as the CPU twin, if the embedding_forward
// that wrote `first_bad` met a bad token in `tokens` (the same device tokens).
void check_tokens(cudaStream_t stream, const unsigned long long* first_bad, const float* tokens,
                  size_t vocab);

// GEMMs per (sequence, head) through cuBLAS on `stream`; softmax one thread per row.
void attention_forward(cublasHandle_t handle, cudaStream_t stream, const float* qkv, float* out,
                       float* att, const AttentionShape& s);
// scratch: T x T floats of device memory.
void attention_backward(cublasHandle_t handle, cudaStream_t stream, const float* dout,
                        const float* qkv, const float* att, float* dqkv, float* scratch,
                        const AttentionShape& s);

}  // namespace resync::kernels::cuda
