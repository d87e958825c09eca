// Token + position embedding of a batch of sequences: out[b][t] = wte[token[b][t]] + wpe[t],
// forward and backward. Tokens travel as floats (the models' input type; exact below 2^24).
#pragma once

#include <cstddef>

namespace resync::kernels {

struct EmbeddingShape {
  size_t batch = 0, seq_len = 0;  // B sequences of T tokens
  size_t dim = 0;                 // C, the embedding width
  size_t vocab = 0;               // V rows of wte
};

// tokens [B x T] (integral floats in [0, V)), wte [V x C], wpe [T x C] -> out [B x T x C].
// A token that is not an integer in [0, V) throws InvalidArgument.
void embedding_forward(const float* tokens, const float* wte, const float* wpe, float* out,
                       const EmbeddingShape& s);

// Given dout [B x T x C]: ADDS dout[b][t] to dwte[token[b][t]] (the tied output layer writes
// dwte first, see models/gpt.h) and OVERWRITES dwpe [T x C] with the sum over the batch.
void embedding_backward(const float* dout, const float* tokens, float* dwte, float* dwpe,
                        const EmbeddingShape& s);

}  // namespace resync::kernels
