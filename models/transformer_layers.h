// The layers of the decoder-only transformer (models/gpt.h): token + position embedding, the
// pre-LayerNorm block (causal multi-head self-attention and a GELU MLP, each with a residual),
// a LayerNorm and the output layer tied to the token embedding. Per sample a layer sees a
// sequence of T positions: sizes are T x width, row-major, one row per position.
#pragma once

#include <memory>
#include <vector>

#include "models/layer.h"

namespace resync::models {

// The sizes a transformer layer was built with (0 where it has none): what the device plan
// (models/device_plan.h) builds its twin from.
struct SequenceShape {
  size_t context = 0;  // T
  size_t dim = 0;      // C
  size_t vocab = 0;    // V
  size_t n_head = 0;   // NH
};

// Scratch that the blocks' backward passes share (they run one after another): sized by the
// first block that reserves it, for the largest batch.
struct TransformerScratch {
  std::vector<float> dres, d4, dln, datty, dqkv, dscores;
};

// in: T token ids (floats), out: T x C. Parameters: wte [V x C], then wpe [T x C]. Initialised
// N(0, 0.02) as GPT-2. Backward overwrites dwpe and ADDS to dwte when a TiedLmHead shares wte
// (the head, later in the forward list, runs its backward first and overwrites dwte), else
// overwrites it too.
class TokenPositionEmbedding final : public Layer {
 public:
  TokenPositionEmbedding(size_t vocab, size_t context, size_t dim);

  std::string name() const override;
  size_t in_size() const override { return T_; }
  size_t out_size() const override { return T_ * C_; }
  size_t n_params() const override { return (V_ + T_) * C_; }
  void bind(std::span<float> params, std::span<float> grads) override;
  void init(SplitMix64& rng) override;
  void forward(const float* x, float* y, size_t batch) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, size_t batch) override;

  SequenceShape shape() const { return {.context = T_, .dim = C_, .vocab = V_}; }
  // The token embedding and its gradient, for the tied output layer.
  const float* wte() const { return params_; }
  float* dwte() const { return grads_; }
  void set_tied() { tied_ = true; }

 private:
  size_t V_, T_, C_;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  bool tied_ = false;
};

// x -> LayerNorm over each position's C values (weight [C], then bias [C]; init 1 and 0).
class LayerNormLayer final : public Layer {
 public:
  LayerNormLayer(size_t context, size_t dim);

  std::string name() const override;
  size_t in_size() const override { return T_ * C_; }
  size_t out_size() const override { return T_ * C_; }
  size_t n_params() const override { return 2 * C_; }
  void bind(std::span<float> params, std::span<float> grads) override;
  void init(SplitMix64& rng) override;
  void reserve(size_t max_batch) override;
  void forward(const float* x, float* y, size_t batch) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, size_t batch) override;
  SequenceShape shape() const { return {.context = T_, .dim = C_}; }

 private:
  size_t T_, C_;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  std::vector<float> mean_, rstd_, dx_scratch_;
};

// Pointers into one block's slice of the parameters (or of the gradients), in the order the
// block lays them out (see TransformerBlock); the CPU block and its device twin both carve so.
struct BlockParams {
  float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b, *ln2_w, *ln2_b, *fc_w, *fc_b, *fcproj_w,
      *fcproj_b;
};
BlockParams carve_block_params(float* base, size_t dim);

// One pre-LayerNorm GPT-2 block over T x C:
//   r = x + proj(attention(qkv(ln1(x)))),   y = r + fcproj(gelu(fc(ln2(r)))).
// Parameters, in order (linear weights [out x in] as PyTorch's nn.Linear, then their bias):
//   ln1 w,b [C]; qkv [3C x C],[3C]; proj [C x C],[C]; ln2 w,b [C]; fc [4C x C],[4C];
//   fcproj [C x 4C],[C].
// Weights N(0, 0.02), the two projections into the residual N(0, 0.02 / sqrt(2 n_layer)).
class TransformerBlock final : public Layer {
 public:
  TransformerBlock(size_t context, size_t dim, size_t n_head, size_t n_layer,
                   std::shared_ptr<TransformerScratch> scratch);

  std::string name() const override;
  size_t in_size() const override { return T_ * C_; }
  size_t out_size() const override { return T_ * C_; }
  size_t n_params() const override { return 12 * C_ * C_ + 13 * C_; }
  void bind(std::span<float> params, std::span<float> grads) override;
  void init(SplitMix64& rng) override;
  void reserve(size_t max_batch) override;
  void forward(const float* x, float* y, size_t batch) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, size_t batch) override;
  SequenceShape shape() const { return {.context = T_, .dim = C_, .n_head = NH_}; }

 private:
  size_t T_, C_, NH_, n_layer_;
  BlockParams p_{}, g_{};
  std::shared_ptr<TransformerScratch> scratch_;
  // Activations kept for the backward pass, [batch x T x ...].
  std::vector<float> ln1_, mean1_, rstd1_, qkv_, atty_, att_, res1_, ln2_, mean2_, rstd2_, fch_,
      fch_gelu_;
};

// The output layer tied to the token embedding: logits [T x V] = x [T x C] wte^T. No parameters
// of its own; its backward OVERWRITES the embedding's dwte (see TokenPositionEmbedding).
class TiedLmHead final : public Layer {
 public:
  TiedLmHead(TokenPositionEmbedding& embedding, size_t vocab, size_t context, size_t dim);

  std::string name() const override;
  size_t in_size() const override { return T_ * C_; }
  size_t out_size() const override { return T_ * V_; }
  void forward(const float* x, float* y, size_t batch) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, size_t batch) override;
  SequenceShape shape() const { return {.context = T_, .dim = C_, .vocab = V_}; }

 private:
  TokenPositionEmbedding& embedding_;
  size_t V_, T_, C_;
};

}  // namespace resync::models
