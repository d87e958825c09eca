// The "gpt" model: a decoder-only transformer as GPT-2 (llm.c), over byte (or any) tokens.
//   embedding (wte + wpe) -> n_layer x TransformerBlock -> LayerNorm -> logits = h wte^T
// A sample is a sequence of T = spec.input_size() token ids (floats) with T labels, the next
// tokens; the vocabulary is spec.n_classes. spec.n_layer, n_head, n_embd set the shape.
//
// The tie and the gradients-final hook (models::Model::GradientsFinalHook): wte belongs to the
// embedding, the first layer, so it lies at the start of the parameter buffer. The tied head,
// the last layer, runs its backward first and overwrites dwte; the embedding's backward, the
// last to run, adds its part. The hook after a layer declares [its offset, n) final, which never
// includes wte before the embedding's backward has run, so an overlapped all-reduce sees the
// complete dwte.
#pragma once

#include "models/model.h"

namespace resync::models {

// Throws InvalidArgument for zero sizes or heads that do not divide the width.
LayerStack build_gpt(const ModelSpec& spec);

// The spec of a gpt: n_layer blocks of n_head heads, width n_embd, `context` tokens per sample
// from a vocabulary of `vocab`.
ModelSpec gpt_spec(size_t n_layer, size_t n_head, size_t n_embd, size_t context, size_t vocab);

// Parameters of the gpt shape (what build_gpt's model holds).
size_t gpt_n_params(size_t vocab, size_t context, size_t n_layer, size_t n_embd);

}  // namespace resync::models
