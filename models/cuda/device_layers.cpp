#include "models/cuda/device_layers.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include "base/error.h"
#include "kernels/cuda/bias.h"
#include "kernels/cuda/conv2d.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/maxpool.h"
#include "kernels/cuda/relu.h"
#include "models/cuda/device_transformer_layers.h"

namespace resync::models::cuda {
namespace {

namespace kc = kernels::cuda;
using kc::CudaContext;
using kernels::Transpose;

// models::Linear: W [out x in] row-major, then b [out]; y = x W^T + b.
class DeviceLinear final : public DeviceLayer {
 public:
  DeviceLinear(size_t in, size_t out) : in_(in), out_(out) {}
  void bind(float* params, float* grads) override {
    w_ = params;
    b_ = params + out_ * in_;
    dw_ = grads;
    db_ = grads + out_ * in_;
  }
  void forward(const CudaContext& ctx, const float* x, float* y, size_t batch) override {
    kc::gemm(ctx.cublas(), ctx.stream(), Transpose::kNo, Transpose::kYes, batch, out_, in_, 1.0f, x,
             in_, w_, in_, 0.0f, y, out_);
    kc::bias_add(ctx.stream(), y, b_, batch, out_);
  }
  void backward(const CudaContext& ctx, const float* x, const float* /*y*/, const float* dy,
                float* dx, size_t batch) override {
    kc::gemm(ctx.cublas(), ctx.stream(), Transpose::kYes, Transpose::kNo, out_, in_, batch, 1.0f,
             dy, out_, x, in_, 0.0f, dw_, in_);
    kc::bias_grad(ctx.stream(), dy, db_, batch, out_);
    if (dx != nullptr) {
      kc::gemm(ctx.cublas(), ctx.stream(), Transpose::kNo, Transpose::kNo, batch, in_, out_, 1.0f,
               dy, out_, w_, in_, 0.0f, dx, in_);
    }
  }

 private:
  size_t in_, out_;
  float* w_ = nullptr;
  float* b_ = nullptr;
  float* dw_ = nullptr;
  float* db_ = nullptr;
};

class DeviceRelu final : public DeviceLayer {
 public:
  explicit DeviceRelu(size_t size) : size_(size) {}
  void forward(const CudaContext& ctx, const float* x, float* y, size_t batch) override {
    kc::relu_forward(ctx.stream(), x, y, batch * size_);
  }
  void backward(const CudaContext& ctx, const float* x, const float* /*y*/, const float* dy,
                float* dx, size_t batch) override {
    if (dx != nullptr) kc::relu_backward(ctx.stream(), x, dy, dx, batch * size_);
  }

 private:
  size_t size_;
};

// models::Conv2d: W [out_c x in_c x k_h x k_w], then b [out_c]. The device lowers the whole
// batch at once (kernels/cuda/conv2d.h), whatever lowering the CPU layer uses.
class DeviceConv2d final : public DeviceLayer {
 public:
  DeviceConv2d(const kernels::Conv2dShape& shape, size_t max_batch)
      : shape_(shape), max_batch_(max_batch) {}
  size_t workspace_elems() const override { return kc::conv2d_workspace_elems(shape_, max_batch_); }
  void set_workspace(std::span<float> workspace) override { workspace_ = workspace; }
  void bind(float* params, float* grads) override {
    w_ = params;
    b_ = params + shape_.n_weights();
    dw_ = grads;
    db_ = grads + shape_.n_weights();
  }
  void forward(const CudaContext& ctx, const float* x, float* y, size_t batch) override {
    kc::conv2d_forward(ctx.cublas(), ctx.stream(), shape_, x, w_, b_, y, batch, workspace_);
  }
  void backward(const CudaContext& ctx, const float* x, const float* /*y*/, const float* dy,
                float* dx, size_t batch) override {
    kc::conv2d_backward(ctx.cublas(), ctx.stream(), shape_, x, w_, dy, dw_, db_, dx, batch,
                        workspace_);
  }

 private:
  kernels::Conv2dShape shape_;
  size_t max_batch_;
  std::span<float> workspace_;
  float* w_ = nullptr;
  float* b_ = nullptr;
  float* dw_ = nullptr;
  float* db_ = nullptr;
};

// models::MaxPool2d, with the shape the CPU layer was built with: any window and stride.
class DeviceMaxPool2d final : public DeviceLayer {
 public:
  DeviceMaxPool2d(const kernels::Pool2dShape& shape, size_t max_batch)
      : shape_(shape), argmax_(max_batch * shape.out_size()) {}
  void forward(const CudaContext& ctx, const float* x, float* y, size_t batch) override {
    kc::maxpool_forward(ctx.stream(), shape_, x, y, argmax_.data(), batch);
  }
  void backward(const CudaContext& ctx, const float* /*x*/, const float* /*y*/, const float* dy,
                float* dx, size_t batch) override {
    if (dx != nullptr) kc::maxpool_backward(ctx.stream(), shape_, dy, argmax_.data(), dx, batch);
  }

 private:
  kernels::Pool2dShape shape_;
  kc::DeviceBuffer<uint32_t> argmax_;
};

// models::Flatten: the same bytes under another shape, a device-to-device copy each way.
class DeviceFlatten final : public DeviceLayer {
 public:
  explicit DeviceFlatten(size_t size) : size_(size) {}
  void forward(const CudaContext& ctx, const float* x, float* y, size_t batch) override {
    RESYNC_CHECK_CUDA(cudaMemcpyAsync(y, x, batch * size_ * sizeof(float), cudaMemcpyDeviceToDevice,
                                      ctx.stream()));
  }
  void backward(const CudaContext& ctx, const float* /*x*/, const float* /*y*/, const float* dy,
                float* dx, size_t batch) override {
    if (dx == nullptr) return;
    RESYNC_CHECK_CUDA(cudaMemcpyAsync(dx, dy, batch * size_ * sizeof(float),
                                      cudaMemcpyDeviceToDevice, ctx.stream()));
  }

 private:
  size_t size_;
};

// The parameter count the twin's layout implies, checked against the plan: bind() relies on it.
size_t expected_params(const DeviceLayerPlan& layer) {
  switch (layer.kind) {
    case DeviceLayerKind::kLinear:
      return layer.out_size * layer.in_size + layer.out_size;
    case DeviceLayerKind::kConv2d:
      return layer.conv.n_weights() + layer.conv.out_c;
    case DeviceLayerKind::kEmbedding:
      return (layer.seq.vocab + layer.seq.context) * layer.seq.dim;
    case DeviceLayerKind::kLayerNorm:
      return 2 * layer.seq.dim;
    case DeviceLayerKind::kTransformerBlock:
      return 12 * layer.seq.dim * layer.seq.dim + 13 * layer.seq.dim;
    case DeviceLayerKind::kRelu:
    case DeviceLayerKind::kMaxPool2d:
    case DeviceLayerKind::kFlatten:
    case DeviceLayerKind::kTiedLmHead:  // shares the embedding's wte
      return 0;
  }
  return 0;
}

}  // namespace

std::unique_ptr<DeviceLayer> make_device_layer(const DeviceLayerPlan& layer, size_t max_batch) {
  RESYNC_CHECK(
      layer.n_params == expected_params(layer),
      fmt::format("device layer '{}': the plan gives {} parameters, the {} layout {}", layer.name,
                  layer.n_params, kind_name(layer.kind), expected_params(layer)));
  switch (layer.kind) {
    case DeviceLayerKind::kLinear:
      return std::make_unique<DeviceLinear>(layer.in_size, layer.out_size);
    case DeviceLayerKind::kRelu:
      return std::make_unique<DeviceRelu>(layer.out_size);
    case DeviceLayerKind::kConv2d:
      return std::make_unique<DeviceConv2d>(layer.conv, max_batch);
    case DeviceLayerKind::kMaxPool2d:
      return std::make_unique<DeviceMaxPool2d>(layer.pool, max_batch);
    case DeviceLayerKind::kFlatten:
      return std::make_unique<DeviceFlatten>(layer.out_size);
    case DeviceLayerKind::kEmbedding:
    case DeviceLayerKind::kLayerNorm:
    case DeviceLayerKind::kTransformerBlock:
    case DeviceLayerKind::kTiedLmHead:
      return make_transformer_device_layer(layer, max_batch);
  }
  RESYNC_CHECK(false, fmt::format("device layer '{}': unknown kind", layer.name));
  return nullptr;
}

}  // namespace resync::models::cuda
