#include "models/gpt.h"

#include <fmt/format.h>

#include "base/error.h"
#include "models/transformer_layers.h"

namespace resync::models {

ModelSpec gpt_spec(size_t n_layer, size_t n_head, size_t n_embd, size_t context, size_t vocab) {
  ModelSpec spec;
  spec.name = "gpt";
  spec.in_channels = 1;
  spec.in_height = 1;
  spec.in_width = context;
  spec.n_classes = vocab;
  spec.n_layer = n_layer;
  spec.n_head = n_head;
  spec.n_embd = n_embd;
  return spec;
}

LayerStack build_gpt(const ModelSpec& spec) {
  const size_t V = spec.n_classes, T = spec.input_size(), C = spec.n_embd;
  const size_t L = spec.n_layer, NH = spec.n_head;
  RESYNC_CHECK_ARG(
      L > 0 && NH > 0 && C > 0,
      fmt::format("gpt: --n-layer, --n-head and --n-embd must be > 0, got {} {} {}", L, NH, C));
  RESYNC_CHECK_ARG(C % NH == 0, fmt::format("gpt: --n-head {} must divide --n-embd {}", NH, C));
  LayerStack stack;
  stack.label = fmt::format("gpt L{} H{} C{} T{} V{}", L, NH, C, T, V);
  auto embedding = std::make_unique<TokenPositionEmbedding>(V, T, C);
  TokenPositionEmbedding& wte_owner = *embedding;
  stack.layers.push_back(std::move(embedding));
  auto scratch = std::make_shared<TransformerScratch>();
  for (size_t l = 0; l < L; ++l) {
    stack.layers.push_back(std::make_unique<TransformerBlock>(T, C, NH, L, scratch));
  }
  stack.layers.push_back(std::make_unique<LayerNormLayer>(T, C));
  stack.layers.push_back(std::make_unique<TiedLmHead>(wte_owner, V, T, C));
  return stack;
}

size_t gpt_n_params(size_t vocab, size_t context, size_t n_layer, size_t n_embd) {
  const size_t C = n_embd;
  return (vocab + context) * C + n_layer * (12 * C * C + 13 * C) + 2 * C;
}

}  // namespace resync::models
