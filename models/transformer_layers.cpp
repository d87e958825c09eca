#include "models/transformer_layers.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>

#include "base/error.h"
#include "kernels/attention.h"
#include "kernels/bias.h"
#include "kernels/embedding.h"
#include "kernels/gelu.h"
#include "kernels/gemm.h"
#include "kernels/layernorm.h"
#include "kernels/residual.h"

namespace resync::models {
namespace {

using kernels::Transpose;

constexpr double kInitStd = 0.02;  // GPT-2's initializer range

void check_bind(const Layer& layer, std::span<float> params, std::span<float> grads) {
  RESYNC_CHECK(params.size() == layer.n_params() && grads.size() == layer.n_params(),
               fmt::format("{}: bound to {} params / {} grads, needs {}", layer.name(),
                           params.size(), grads.size(), layer.n_params()));
}

void fill_normal(float* p, size_t n, double stddev, SplitMix64& rng) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<float>(stddev * rng.normal());
}

void fill(float* p, size_t n, float value) {
  for (size_t i = 0; i < n; ++i) p[i] = value;
}

// y [rows x out] = x [rows x in] W^T + b (+ residual [rows x out] unless null), W [out x in]
// (nn.Linear). The bias (and residual) are written first and the GEMM adds to them (beta = 1):
// one pass over y instead of the BLAS zeroing it, then a bias pass, then a residual pass.
void linear_forward(const float* x, const float* w, const float* b, float* y, size_t rows,
                    size_t in, size_t out, const float* residual = nullptr) {
  for (size_t r = 0; r < rows; ++r) {
    float* yr = y + r * out;
    if (residual != nullptr) {
      kernels::residual_forward(residual + r * out, b, yr, out);
    } else {
      std::memcpy(yr, b, out * sizeof(float));
    }
  }
  kernels::gemm(Transpose::kNo, Transpose::kYes, rows, out, in, 1.0f, x, in, w, in, 1.0f, y, out);
}

// dW = dy^T x and db = column sums of dy (both overwritten; db null: computed elsewhere);
// dx = dy W unless null.
void linear_backward(const float* x, const float* w, const float* dy, float* dw, float* db,
                     float* dx, size_t rows, size_t in, size_t out) {
  kernels::gemm(Transpose::kYes, Transpose::kNo, out, in, rows, 1.0f, dy, out, x, in, 0.0f, dw, in);
  if (db != nullptr) kernels::bias_grad(dy, db, rows, out);
  if (dx != nullptr) {
    kernels::gemm(Transpose::kNo, Transpose::kNo, rows, in, out, 1.0f, dy, out, w, in, 0.0f, dx,
                  in);
  }
}

void grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

// ---- TokenPositionEmbedding -------------------------------------------------------------------

TokenPositionEmbedding::TokenPositionEmbedding(size_t vocab, size_t context, size_t dim)
    : V_(vocab), T_(context), C_(dim) {
  RESYNC_CHECK_ARG(
      V_ > 0 && T_ > 0 && C_ > 0,
      fmt::format("embedding sizes must be > 0, got vocab {} context {} width {}", V_, T_, C_));
}

std::string TokenPositionEmbedding::name() const {
  return fmt::format("embedding V{} T{} C{}", V_, T_, C_);
}

void TokenPositionEmbedding::bind(std::span<float> params, std::span<float> grads) {
  check_bind(*this, params, grads);
  params_ = params.data();
  grads_ = grads.data();
}

void TokenPositionEmbedding::init(SplitMix64& rng) {
  fill_normal(params_, n_params(), kInitStd, rng);
}

void TokenPositionEmbedding::forward(const float* x, float* y, size_t batch) {
  kernels::embedding_forward(x, params_, params_ + V_ * C_, y, {batch, T_, C_, V_});
}

void TokenPositionEmbedding::backward(const float* x, const float* /*y*/, const float* dy,
                                      float* /*dx*/, size_t batch) {
  if (!tied_) std::memset(grads_, 0, V_ * C_ * sizeof(float));
  kernels::embedding_backward(dy, x, grads_, grads_ + V_ * C_, {batch, T_, C_, V_});
}

// ---- LayerNormLayer ---------------------------------------------------------------------------

LayerNormLayer::LayerNormLayer(size_t context, size_t dim) : T_(context), C_(dim) {
  RESYNC_CHECK_ARG(T_ > 0 && C_ > 0, "layernorm sizes must be > 0");
}

std::string LayerNormLayer::name() const { return fmt::format("layernorm T{} C{}", T_, C_); }

void LayerNormLayer::bind(std::span<float> params, std::span<float> grads) {
  check_bind(*this, params, grads);
  params_ = params.data();
  grads_ = grads.data();
}

void LayerNormLayer::init(SplitMix64& /*rng*/) {
  fill(params_, C_, 1.0f);
  fill(params_ + C_, C_, 0.0f);
}

void LayerNormLayer::reserve(size_t max_batch) {
  mean_.resize(max_batch * T_);
  rstd_.resize(max_batch * T_);
  dx_scratch_.resize(max_batch * T_ * C_);
}

void LayerNormLayer::forward(const float* x, float* y, size_t batch) {
  kernels::layernorm_forward(x, params_, params_ + C_, y, mean_.data(), rstd_.data(), batch * T_,
                             C_);
}

void LayerNormLayer::backward(const float* x, const float* /*y*/, const float* dy, float* dx,
                              size_t batch) {
  const size_t rows = batch * T_;
  std::memset(grads_, 0, 2 * C_ * sizeof(float));
  // As a model's first layer (no dx wanted) the input gradient goes to scratch.
  if (dx == nullptr) dx = dx_scratch_.data();
  kernels::layernorm_backward_into(dy, x, params_, mean_.data(), rstd_.data(), nullptr, dx, grads_,
                                   grads_ + C_, rows, C_);
}

// ---- TransformerBlock -------------------------------------------------------------------------

TransformerBlock::TransformerBlock(size_t context, size_t dim, size_t n_head, size_t n_layer,
                                   std::shared_ptr<TransformerScratch> scratch)
    : T_(context), C_(dim), NH_(n_head), n_layer_(n_layer), scratch_(std::move(scratch)) {
  RESYNC_CHECK_ARG(T_ > 0 && C_ > 0 && NH_ > 0 && n_layer_ > 0, "transformer sizes must be > 0");
  RESYNC_CHECK_ARG(C_ % NH_ == 0, fmt::format("--n-head {} must divide --n-embd {}", NH_, C_));
  RESYNC_CHECK_ARG(scratch_ != nullptr, "transformer block: no scratch");
}

std::string TransformerBlock::name() const { return fmt::format("block T{} C{} H{}", T_, C_, NH_); }

BlockParams carve_block_params(float* base, size_t C) {
  float* at = base;
  const auto take = [&](size_t n) {
    float* out = at;
    at += n;
    return out;
  };
  BlockParams p{};
  p.ln1_w = take(C);
  p.ln1_b = take(C);
  p.qkv_w = take(3 * C * C);
  p.qkv_b = take(3 * C);
  p.proj_w = take(C * C);
  p.proj_b = take(C);
  p.ln2_w = take(C);
  p.ln2_b = take(C);
  p.fc_w = take(4 * C * C);
  p.fc_b = take(4 * C);
  p.fcproj_w = take(4 * C * C);
  p.fcproj_b = take(C);
  return p;
}

void TransformerBlock::bind(std::span<float> params, std::span<float> grads) {
  check_bind(*this, params, grads);
  p_ = carve_block_params(params.data(), C_);
  g_ = carve_block_params(grads.data(), C_);
}

void TransformerBlock::init(SplitMix64& rng) {
  const size_t C = C_;
  const double residual_std = kInitStd / std::sqrt(2.0 * static_cast<double>(n_layer_));
  fill(p_.ln1_w, C, 1.0f);
  fill(p_.ln1_b, C, 0.0f);
  fill_normal(p_.qkv_w, 3 * C * C, kInitStd, rng);
  fill(p_.qkv_b, 3 * C, 0.0f);
  fill_normal(p_.proj_w, C * C, residual_std, rng);
  fill(p_.proj_b, C, 0.0f);
  fill(p_.ln2_w, C, 1.0f);
  fill(p_.ln2_b, C, 0.0f);
  fill_normal(p_.fc_w, 4 * C * C, kInitStd, rng);
  fill(p_.fc_b, 4 * C, 0.0f);
  fill_normal(p_.fcproj_w, 4 * C * C, residual_std, rng);
  fill(p_.fcproj_b, C, 0.0f);
}

void TransformerBlock::reserve(size_t max_batch) {
  const size_t N = max_batch * T_, C = C_;
  for (auto* v : {&ln1_, &atty_, &res1_, &ln2_}) v->resize(N * C);
  for (auto* v : {&mean1_, &rstd1_, &mean2_, &rstd2_}) v->resize(N);
  qkv_.resize(N * 3 * C);
  att_.resize(max_batch * NH_ * T_ * T_);
  fch_.resize(N * 4 * C);
  fch_gelu_.resize(N * 4 * C);
  TransformerScratch& s = *scratch_;
  grow(s.dres, N * C);
  grow(s.d4, N * 4 * C);
  grow(s.dln, N * C);
  grow(s.datty, N * C);
  grow(s.dqkv, N * 3 * C);
  grow(s.dscores, T_ * T_);
}

void TransformerBlock::forward(const float* x, float* y, size_t batch) {
  const size_t N = batch * T_, C = C_;
  const kernels::AttentionShape shape{batch, T_, C, NH_};
  // Attention half: res1 = x + proj(attention(qkv(ln1(x)))).
  kernels::layernorm_forward(x, p_.ln1_w, p_.ln1_b, ln1_.data(), mean1_.data(), rstd1_.data(), N,
                             C);
  linear_forward(ln1_.data(), p_.qkv_w, p_.qkv_b, qkv_.data(), N, C, 3 * C);
  kernels::attention_forward(qkv_.data(), atty_.data(), att_.data(), shape);
  linear_forward(atty_.data(), p_.proj_w, p_.proj_b, res1_.data(), N, C, C, x);
  // MLP half: y = res1 + fcproj(gelu(fc(ln2(res1)))).
  kernels::layernorm_forward(res1_.data(), p_.ln2_w, p_.ln2_b, ln2_.data(), mean2_.data(),
                             rstd2_.data(), N, C);
  linear_forward(ln2_.data(), p_.fc_w, p_.fc_b, fch_.data(), N, C, 4 * C);
  kernels::gelu_forward(fch_.data(), fch_gelu_.data(), N * 4 * C);
  linear_forward(fch_gelu_.data(), p_.fcproj_w, p_.fcproj_b, y, N, 4 * C, C, res1_.data());
}

void TransformerBlock::backward(const float* x, const float* /*y*/, const float* dy, float* dx,
                                size_t batch) {
  const size_t N = batch * T_, C = C_;
  const kernels::AttentionShape shape{batch, T_, C, NH_};
  TransformerScratch& s = *scratch_;
  // MLP half, mirrored. dres = d loss / d res1, from the residual (dy) and from ln2.
  linear_backward(fch_gelu_.data(), p_.fcproj_w, dy, g_.fcproj_w, g_.fcproj_b, s.d4.data(), N,
                  4 * C, C);
  // fc's bias gradient in the GELU's pass (one read of d4 fewer).
  kernels::gelu_backward_bias(fch_.data(), s.d4.data(), s.d4.data(), g_.fc_b, N, 4 * C);
  linear_backward(ln2_.data(), p_.fc_w, s.d4.data(), g_.fc_w, nullptr, s.dln.data(), N, C, 4 * C);
  std::memset(g_.ln2_w, 0, 2 * C * sizeof(float));  // ln2 w and b are adjacent
  kernels::layernorm_backward_into(s.dln.data(), res1_.data(), p_.ln2_w, mean2_.data(),
                                   rstd2_.data(), dy, s.dres.data(), g_.ln2_w, g_.ln2_b, N, C);
  // Attention half. dx gathers d loss / d x from the residual and from ln1.
  linear_backward(atty_.data(), p_.proj_w, s.dres.data(), g_.proj_w, g_.proj_b, s.datty.data(), N,
                  C, C);
  kernels::attention_backward(s.datty.data(), qkv_.data(), att_.data(), s.dqkv.data(),
                              s.dscores.data(), shape);
  linear_backward(ln1_.data(), p_.qkv_w, s.dqkv.data(), g_.qkv_w, g_.qkv_b, s.dln.data(), N, C,
                  3 * C);
  std::memset(g_.ln1_w, 0, 2 * C * sizeof(float));
  // dx = dres + ln1's input gradient (into dres itself for a first block, which has no dx).
  kernels::layernorm_backward_into(s.dln.data(), x, p_.ln1_w, mean1_.data(), rstd1_.data(),
                                   s.dres.data(), dx != nullptr ? dx : s.dres.data(), g_.ln1_w,
                                   g_.ln1_b, N, C);
}

// ---- TiedLmHead -------------------------------------------------------------------------------

TiedLmHead::TiedLmHead(TokenPositionEmbedding& embedding, size_t vocab, size_t context, size_t dim)
    : embedding_(embedding), V_(vocab), T_(context), C_(dim) {
  embedding_.set_tied();
}

std::string TiedLmHead::name() const { return fmt::format("tied head C{} V{}", C_, V_); }

void TiedLmHead::forward(const float* x, float* y, size_t batch) {
  kernels::gemm(Transpose::kNo, Transpose::kYes, batch * T_, V_, C_, 1.0f, x, C_, embedding_.wte(),
                C_, 0.0f, y, V_);
}

void TiedLmHead::backward(const float* x, const float* /*y*/, const float* dy, float* dx,
                          size_t batch) {
  const size_t N = batch * T_;
  kernels::gemm(Transpose::kYes, Transpose::kNo, V_, C_, N, 1.0f, dy, V_, x, C_, 0.0f,
                embedding_.dwte(), C_);
  if (dx != nullptr) {
    kernels::gemm(Transpose::kNo, Transpose::kNo, N, C_, V_, 1.0f, dy, V_, embedding_.wte(), C_,
                  0.0f, dx, C_);
  }
}

}  // namespace resync::models
