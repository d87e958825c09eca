// Causal multi-head self-attention on a batch of sequences, forward and backward, with a
// max-subtracted softmax (CPU: per-head vector loops, kernels/cpu/attention.cpp; CUDA: cuBLAS).
//
// qkv [B x T x 3C] holds, per position, the query, key and value vectors (C each, head h at
// columns h*hs .. h*hs+hs-1 of each, hs = C / NH). Position t attends to positions 0..t.
#pragma once

#include <cstddef>

namespace resync::kernels {

struct AttentionShape {
  size_t batch = 0, seq_len = 0;  // B, T
  size_t dim = 0;                 // C
  size_t n_head = 0;              // NH, dividing C
  size_t head_size() const { return dim / n_head; }
};

// out [B x T x C] = softmax(q k^T / sqrt(hs), causal) v per head; att [B x NH x T x T] keeps
// the probabilities for the backward (zeros above the diagonal).
void attention_forward(const float* qkv, float* out, float* att, const AttentionShape& s);

// Given dout [B x T x C] and the forward's qkv and att: OVERWRITES dqkv [B x T x 3C].
// scratch: T x T floats (the CPU kernel keeps its own per-thread buffers and ignores it).
void attention_backward(const float* dout, const float* qkv, const float* att, float* dqkv,
                        float* scratch, const AttentionShape& s);

}  // namespace resync::kernels
