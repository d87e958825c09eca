#include "models/cuda/device_transformer_layers.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include "base/error.h"
#include "kernels/cuda/bias.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/transformer.h"

namespace resync::models::cuda {
namespace {

namespace kc = kernels::cuda;
using kc::CudaContext;
using kernels::Transpose;

void zero(const CudaContext& ctx, float* p, size_t n_elems) {
  RESYNC_CHECK_CUDA(cudaMemsetAsync(p, 0, n_elems * sizeof(float), ctx.stream()));
}

void copy(const CudaContext& ctx, float* dst, const float* src, size_t n_elems) {
  RESYNC_CHECK_CUDA(
      cudaMemcpyAsync(dst, src, n_elems * sizeof(float), cudaMemcpyDeviceToDevice, ctx.stream()));
}

// y [rows x out] = x [rows x in] W^T + b, W [out x in] (nn.Linear), as the CPU block's.
void linear_forward(const CudaContext& ctx, const float* x, const float* w, const float* b,
                    float* y, size_t rows, size_t in, size_t out) {
  kc::gemm(ctx.cublas(), ctx.stream(), Transpose::kNo, Transpose::kYes, rows, out, in, 1.0f, x, in,
           w, in, 0.0f, y, out);
  kc::bias_add(ctx.stream(), y, b, rows, out);
}

// dW = dy^T x and db = column sums of dy (both overwritten); dx = dy W unless null.
void linear_backward(const CudaContext& ctx, const float* x, const float* w, const float* dy,
                     float* dw, float* db, float* dx, size_t rows, size_t in, size_t out) {
  kc::gemm(ctx.cublas(), ctx.stream(), Transpose::kYes, Transpose::kNo, out, in, rows, 1.0f, dy,
           out, x, in, 0.0f, dw, in);
  kc::bias_grad(ctx.stream(), dy, db, rows, out);
  if (dx != nullptr) {
    kc::gemm(ctx.cublas(), ctx.stream(), Transpose::kNo, Transpose::kNo, rows, in, out, 1.0f, dy,
             out, w, in, 0.0f, dx, in);
  }
}

// ---- embedding ----------------------------------------------------------------------------

// wte [V x C], then wpe [T x C]. Backward overwrites dwpe; dwte is overwritten too unless a tied
// head wrote it first (plan.tied), then the embedding adds its part.
class DeviceEmbedding final : public DeviceLayer {
 public:
  DeviceEmbedding(const SequenceShape& s, bool tied) : s_(s), tied_(tied) {}
  void bind(float* params, float* grads) override {
    wte_ = params;
    wpe_ = params + s_.vocab * s_.dim;
    dwte_ = grads;
    dwpe_ = grads + s_.vocab * s_.dim;
  }
  void forward(const CudaContext& ctx, const float* x, float* y, size_t batch) override {
    kc::embedding_forward(ctx.stream(), x, wte_, wpe_, y, shape(batch), first_bad_.data());
    last_tokens_ = x;
  }
  // The tokens are checked on the device (kernels/cuda/transformer.h); a bad one is reported
  // here, once, as the CPU layer reports it.
  void check_inputs(const CudaContext& ctx) override {
    if (last_tokens_ == nullptr) return;
    const float* tokens = last_tokens_;
    last_tokens_ = nullptr;
    kc::check_tokens(ctx.stream(), first_bad_.data(), tokens, s_.vocab);
  }
  void backward(const CudaContext& ctx, const float* x, const float* /*y*/, const float* dy,
                float* /*dx*/, size_t batch) override {
    if (!tied_) zero(ctx, dwte_, s_.vocab * s_.dim);
    kc::embedding_backward(ctx.stream(), dy, x, dwte_, dwpe_, shape(batch));
  }

 private:
  kernels::EmbeddingShape shape(size_t batch) const {
    return {.batch = batch, .seq_len = s_.context, .dim = s_.dim, .vocab = s_.vocab};
  }
  SequenceShape s_;
  bool tied_;
  float *wte_ = nullptr, *wpe_ = nullptr, *dwte_ = nullptr, *dwpe_ = nullptr;
  kc::DeviceBuffer<unsigned long long> first_bad_{1};  // first bad token's position
  const float* last_tokens_ = nullptr;                 // the last forward's, until checked
};

// ---- LayerNorm ----------------------------------------------------------------------------

// weight [C], then bias [C]. The backward kernel adds to dx: dx is zeroed first, and as a
// model's first layer (no dx wanted) it writes into the shared workspace.
class DeviceLayerNorm final : public DeviceLayer {
 public:
  DeviceLayerNorm(const SequenceShape& s, size_t max_batch)
      : s_(s), max_batch_(max_batch), mean_(max_batch * s.context), rstd_(max_batch * s.context) {}
  size_t workspace_elems() const override { return max_batch_ * s_.context * s_.dim; }
  void set_workspace(std::span<float> workspace) override { workspace_ = workspace; }
  void bind(float* params, float* grads) override {
    w_ = params;
    dw_ = grads;
  }
  void forward(const CudaContext& ctx, const float* x, float* y, size_t batch) override {
    kc::layernorm_forward(ctx.stream(), x, w_, w_ + s_.dim, y, mean_.data(), rstd_.data(),
                          batch * s_.context, s_.dim);
  }
  void backward(const CudaContext& ctx, const float* x, const float* /*y*/, const float* dy,
                float* dx, size_t batch) override {
    const size_t rows = batch * s_.context;
    zero(ctx, dw_, 2 * s_.dim);
    if (dx == nullptr) dx = workspace_.data();
    zero(ctx, dx, rows * s_.dim);
    kc::layernorm_backward(ctx.stream(), dy, x, w_, mean_.data(), rstd_.data(), dx, dw_,
                           dw_ + s_.dim, rows, s_.dim);
  }

 private:
  SequenceShape s_;
  size_t max_batch_;
  kc::DeviceBuffer<float> mean_, rstd_;
  std::span<float> workspace_;
  float *w_ = nullptr, *dw_ = nullptr;
};

// ---- the block ----------------------------------------------------------------------------

// models::TransformerBlock on the device:
//   r = x + proj(attention(qkv(ln1(x)))),   y = r + fcproj(gelu(fc(ln2(r)))).
// Parameters, in order: ln1 w,b [C]; qkv [3C x C],[3C]; proj [C x C],[C]; ln2 w,b [C];
// fc [4C x C],[4C]; fcproj [C x 4C],[C]. Its activations are its own; the backward pass's
// gradients of activations live in the model's shared workspace.
class DeviceTransformerBlock final : public DeviceLayer {
 public:
  DeviceTransformerBlock(const SequenceShape& s, size_t max_batch) : s_(s), max_batch_(max_batch) {
    const size_t N = max_batch * s.context, C = s.dim;
    for (auto* v : {&ln1_, &atty_, &res1_, &ln2_}) *v = kc::DeviceBuffer<float>(N * C);
    for (auto* v : {&mean1_, &rstd1_, &mean2_, &rstd2_}) *v = kc::DeviceBuffer<float>(N);
    qkv_ = kc::DeviceBuffer<float>(N * 3 * C);
    att_ = kc::DeviceBuffer<float>(max_batch * s.n_head * s.context * s.context);
    fch_ = kc::DeviceBuffer<float>(N * 4 * C);
    fch_gelu_ = kc::DeviceBuffer<float>(N * 4 * C);
  }

  // dres, dln, datty [N x C]; d4 [N x 4C]; dqkv [N x 3C]; dscores [T x T].
  size_t workspace_elems() const override {
    const size_t N = max_batch_ * s_.context, C = s_.dim;
    return N * C * 3 + N * 4 * C + N * 3 * C + s_.context * s_.context;
  }
  void set_workspace(std::span<float> workspace) override {
    const size_t N = max_batch_ * s_.context, C = s_.dim;
    float* at = workspace.data();
    const auto take = [&](size_t n) {
      float* out = at;
      at += n;
      return out;
    };
    dres_ = take(N * C);
    dln_ = take(N * C);
    datty_ = take(N * C);
    d4_ = take(N * 4 * C);
    dqkv_ = take(N * 3 * C);
    dscores_ = take(s_.context * s_.context);
  }

  void bind(float* params, float* grads) override {
    p_ = carve_block_params(params, s_.dim);
    g_ = carve_block_params(grads, s_.dim);
  }

  void forward(const CudaContext& ctx, const float* x, float* y, size_t batch) override {
    const size_t N = batch * s_.context, C = s_.dim;
    const cudaStream_t stream = ctx.stream();
    // Attention half: res1 = x + proj(attention(qkv(ln1(x)))).
    kc::layernorm_forward(stream, x, p_.ln1_w, p_.ln1_b, ln1_.data(), mean1_.data(), rstd1_.data(),
                          N, C);
    linear_forward(ctx, ln1_.data(), p_.qkv_w, p_.qkv_b, qkv_.data(), N, C, 3 * C);
    kc::attention_forward(ctx.cublas(), stream, qkv_.data(), atty_.data(), att_.data(),
                          attention(batch));
    linear_forward(ctx, atty_.data(), p_.proj_w, p_.proj_b, res1_.data(), N, C, C);
    kc::residual_forward(stream, res1_.data(), x, res1_.data(), N * C);
    // MLP half: y = res1 + fcproj(gelu(fc(ln2(res1)))).
    kc::layernorm_forward(stream, res1_.data(), p_.ln2_w, p_.ln2_b, ln2_.data(), mean2_.data(),
                          rstd2_.data(), N, C);
    linear_forward(ctx, ln2_.data(), p_.fc_w, p_.fc_b, fch_.data(), N, C, 4 * C);
    kc::gelu_forward(stream, fch_.data(), fch_gelu_.data(), N * 4 * C);
    linear_forward(ctx, fch_gelu_.data(), p_.fcproj_w, p_.fcproj_b, y, N, 4 * C, C);
    kc::residual_forward(stream, y, res1_.data(), y, N * C);
  }

  void backward(const CudaContext& ctx, const float* x, const float* /*y*/, const float* dy,
                float* dx, size_t batch) override {
    const size_t N = batch * s_.context, C = s_.dim;
    const cudaStream_t stream = ctx.stream();
    // MLP half, mirrored. dres gathers d loss / d res1 from the residual and from ln2.
    copy(ctx, dres_, dy, N * C);
    linear_backward(ctx, fch_gelu_.data(), p_.fcproj_w, dy, g_.fcproj_w, g_.fcproj_b, d4_, N, 4 * C,
                    C);
    kc::gelu_backward(stream, fch_.data(), d4_, d4_, N * 4 * C);
    linear_backward(ctx, ln2_.data(), p_.fc_w, d4_, g_.fc_w, g_.fc_b, dln_, N, C, 4 * C);
    zero(ctx, g_.ln2_w, 2 * C);  // ln2 w and b are adjacent
    kc::layernorm_backward(stream, dln_, res1_.data(), p_.ln2_w, mean2_.data(), rstd2_.data(),
                           dres_, g_.ln2_w, g_.ln2_b, N, C);
    // Attention half. dx gathers d loss / d x from the residual and from ln1.
    linear_backward(ctx, atty_.data(), p_.proj_w, dres_, g_.proj_w, g_.proj_b, datty_, N, C, C);
    kc::attention_backward(ctx.cublas(), stream, datty_, qkv_.data(), att_.data(), dqkv_, dscores_,
                           attention(batch));
    linear_backward(ctx, ln1_.data(), p_.qkv_w, dqkv_, g_.qkv_w, g_.qkv_b, dln_, N, C, 3 * C);
    zero(ctx, g_.ln1_w, 2 * C);
    float* dx_acc = dres_;  // as a model's first layer: accumulate into scratch
    if (dx != nullptr) {
      copy(ctx, dx, dres_, N * C);
      dx_acc = dx;
    }
    kc::layernorm_backward(stream, dln_, x, p_.ln1_w, mean1_.data(), rstd1_.data(), dx_acc,
                           g_.ln1_w, g_.ln1_b, N, C);
  }

 private:
  kernels::AttentionShape attention(size_t batch) const {
    return {.batch = batch, .seq_len = s_.context, .dim = s_.dim, .n_head = s_.n_head};
  }

  SequenceShape s_;
  size_t max_batch_;
  BlockParams p_{}, g_{};  // in the CPU block's layout (carve_block_params)
  // Activations kept for the backward pass, [batch x T x ...].
  kc::DeviceBuffer<float> ln1_, mean1_, rstd1_, qkv_, atty_, att_, res1_, ln2_, mean2_, rstd2_,
      fch_, fch_gelu_;
  // The backward pass's scratch, in the model's workspace.
  float *dres_ = nullptr, *dln_ = nullptr, *datty_ = nullptr, *d4_ = nullptr, *dqkv_ = nullptr,
        *dscores_ = nullptr;
};

// ---- the tied head ------------------------------------------------------------------------

// logits [T x V] = x [T x C] wte^T, wte being the embedding's (bind() gets its slice). Its
// backward OVERWRITES dwte; the embedding's, which runs later, adds to it.
class DeviceTiedLmHead final : public DeviceLayer {
 public:
  explicit DeviceTiedLmHead(const SequenceShape& s) : s_(s) {}
  void bind(float* wte, float* dwte) override {
    wte_ = wte;
    dwte_ = dwte;
  }
  void forward(const CudaContext& ctx, const float* x, float* y, size_t batch) override {
    kc::gemm(ctx.cublas(), ctx.stream(), Transpose::kNo, Transpose::kYes, batch * s_.context,
             s_.vocab, s_.dim, 1.0f, x, s_.dim, wte_, s_.dim, 0.0f, y, s_.vocab);
  }
  void backward(const CudaContext& ctx, const float* x, const float* /*y*/, const float* dy,
                float* dx, size_t batch) override {
    const size_t N = batch * s_.context, C = s_.dim, V = s_.vocab;
    kc::gemm(ctx.cublas(), ctx.stream(), Transpose::kYes, Transpose::kNo, V, C, N, 1.0f, dy, V, x,
             C, 0.0f, dwte_, C);
    if (dx != nullptr) {
      kc::gemm(ctx.cublas(), ctx.stream(), Transpose::kNo, Transpose::kNo, N, C, V, 1.0f, dy, V,
               wte_, C, 0.0f, dx, C);
    }
  }

 private:
  SequenceShape s_;
  const float* wte_ = nullptr;
  float* dwte_ = nullptr;
};

}  // namespace

std::unique_ptr<DeviceLayer> make_transformer_device_layer(const DeviceLayerPlan& layer,
                                                           size_t max_batch) {
  switch (layer.kind) {
    case DeviceLayerKind::kEmbedding:
      return std::make_unique<DeviceEmbedding>(layer.seq, layer.tied);
    case DeviceLayerKind::kLayerNorm:
      return std::make_unique<DeviceLayerNorm>(layer.seq, max_batch);
    case DeviceLayerKind::kTransformerBlock:
      return std::make_unique<DeviceTransformerBlock>(layer.seq, max_batch);
    case DeviceLayerKind::kTiedLmHead:
      return std::make_unique<DeviceTiedLmHead>(layer.seq);
    default:
      break;
  }
  RESYNC_CHECK(false, fmt::format("device layer '{}': not a transformer layer", layer.name));
  return nullptr;
}

}  // namespace resync::models::cuda
