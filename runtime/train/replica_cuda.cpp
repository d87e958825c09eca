// The CUDA replica: a device-resident model (parameters, gradients, velocity and activations in
// device memory) built layer by layer from the CPU model's layer list, run with the kernels/cuda
// launchers and cuBLAS on one stream, with pinned host buffers for the batch and the gradient.
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "base/error.h"
#include "kernels/cuda/bias.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/conv2d.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/maxpool.h"
#include "kernels/cuda/relu.h"
#include "kernels/cuda/sgd.h"
#include "kernels/cuda/softmax_xent.h"
#include "models/cnn.h"
#include "models/conv_layers.h"
#include "models/layers.h"
#include "models/mlp.h"
#include "runtime/train/replica.h"

namespace resync::runtime {

std::unique_ptr<Replica> make_cuda_replica(const models::ModelSpec& spec, size_t max_batch,
                                           uint64_t seed, const kernels::SgdHyper& hyper,
                                           int local_rank);

namespace {

namespace cuda = kernels::cuda;
using kernels::Transpose;

// ---- host staging ---------------------------------------------------------------------------

struct PinnedFree {
  void operator()(void* p) const noexcept { (void)cudaFreeHost(p); }
};

// Page-locked host memory: copies from and to it run truly asynchronously (DMA, no staging
// copy by the driver), which is what the batch upload and the gradient exchange need.
template <typename T>
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t n_elems) : n_elems_(n_elems) {
    if (n_elems == 0) return;
    void* p = nullptr;
    const cudaError_t rc = cudaMallocHost(&p, n_elems * sizeof(T));
    if (rc != cudaSuccess) {
      (void)cudaGetLastError();
      throw DeviceError(fmt::format("cannot allocate {} bytes of pinned host memory: {} ({})",
                                    n_elems * sizeof(T), cudaGetErrorString(rc),
                                    cudaGetErrorName(rc)));
    }
    ptr_.reset(static_cast<T*>(p));
  }
  std::span<T> span() { return {ptr_.get(), n_elems_}; }
  std::span<T> first(size_t n) { return span().first(n); }
  T* data() { return ptr_.get(); }

 private:
  size_t n_elems_;
  std::unique_ptr<T, PinnedFree> ptr_;
};

// ---- device layers --------------------------------------------------------------------------

// The device twin of a models::Layer, same sizes and parameter layout (so the CPU model's
// parameters can be copied up as they are). Pointers are device memory; all work goes to the
// context's stream.
class DeviceLayer {
 public:
  virtual ~DeviceLayer() = default;
  virtual size_t out_size() const = 0;
  virtual void bind(float* /*params*/, float* /*grads*/) {}
  virtual void forward(const cuda::CudaContext& ctx, const float* x, float* y, size_t batch) = 0;
  // Overwrites this layer's parameter gradients and, unless dx is null, writes dx.
  virtual void backward(const cuda::CudaContext& ctx, const float* x, const float* dy, float* dx,
                        size_t batch) = 0;
};

class DeviceLinear final : public DeviceLayer {
 public:
  DeviceLinear(size_t in, size_t out) : in_(in), out_(out) {}
  size_t out_size() const override { return out_; }
  void bind(float* params, float* grads) override {
    w_ = params;  // W [out x in], then b [out], as models::Linear
    b_ = params + out_ * in_;
    dw_ = grads;
    db_ = grads + out_ * in_;
  }
  void forward(const cuda::CudaContext& ctx, const float* x, float* y, size_t batch) override {
    cuda::gemm(ctx.cublas(), ctx.stream(), Transpose::kNo, Transpose::kYes, batch, out_, in_, 1.0f,
               x, in_, w_, in_, 0.0f, y, out_);
    cuda::bias_add(ctx.stream(), y, b_, batch, out_);
  }
  void backward(const cuda::CudaContext& ctx, const float* x, const float* dy, float* dx,
                size_t batch) override {
    cuda::gemm(ctx.cublas(), ctx.stream(), Transpose::kYes, Transpose::kNo, out_, in_, batch, 1.0f,
               dy, out_, x, in_, 0.0f, dw_, in_);
    cuda::bias_grad(ctx.stream(), dy, db_, batch, out_);
    if (dx != nullptr) {
      cuda::gemm(ctx.cublas(), ctx.stream(), Transpose::kNo, Transpose::kNo, batch, in_, out_, 1.0f,
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
  size_t out_size() const override { return size_; }
  void forward(const cuda::CudaContext& ctx, const float* x, float* y, size_t batch) override {
    cuda::relu_forward(ctx.stream(), x, y, batch * size_);
  }
  void backward(const cuda::CudaContext& ctx, const float* x, const float* dy, float* dx,
                size_t batch) override {
    if (dx != nullptr) cuda::relu_backward(ctx.stream(), x, dy, dx, batch * size_);
  }

 private:
  size_t size_;
};

// Shares one workspace between the convolutions: they run one after another on one stream.
class DeviceConv2d final : public DeviceLayer {
 public:
  DeviceConv2d(const kernels::Conv2dShape& shape, std::span<float>* workspace)
      : shape_(shape), workspace_(workspace) {}
  size_t out_size() const override { return shape_.out_size(); }
  void bind(float* params, float* grads) override {
    w_ = params;  // W [out_c x in_c x k_h x k_w], then b [out_c], as models::Conv2d
    b_ = params + shape_.n_weights();
    dw_ = grads;
    db_ = grads + shape_.n_weights();
  }
  void forward(const cuda::CudaContext& ctx, const float* x, float* y, size_t batch) override {
    cuda::conv2d_forward(ctx.cublas(), ctx.stream(), shape_, x, w_, b_, y, batch, *workspace_);
  }
  void backward(const cuda::CudaContext& ctx, const float* x, const float* dy, float* dx,
                size_t batch) override {
    cuda::conv2d_backward(ctx.cublas(), ctx.stream(), shape_, x, w_, dy, dw_, db_, dx, batch,
                          *workspace_);
  }

 private:
  kernels::Conv2dShape shape_;
  std::span<float>* workspace_;
  float* w_ = nullptr;
  float* b_ = nullptr;
  float* dw_ = nullptr;
  float* db_ = nullptr;
};

class DeviceMaxPool2d final : public DeviceLayer {
 public:
  DeviceMaxPool2d(const kernels::Pool2dShape& shape, size_t max_batch)
      : shape_(shape), argmax_(max_batch * shape.out_size()) {}
  size_t out_size() const override { return shape_.out_size(); }
  void forward(const cuda::CudaContext& ctx, const float* x, float* y, size_t batch) override {
    cuda::maxpool_forward(ctx.stream(), shape_, x, y, argmax_.data(), batch);
  }
  void backward(const cuda::CudaContext& ctx, const float* /*x*/, const float* dy, float* dx,
                size_t batch) override {
    if (dx != nullptr) cuda::maxpool_backward(ctx.stream(), shape_, dy, argmax_.data(), dx, batch);
  }

 private:
  kernels::Pool2dShape shape_;
  cuda::DeviceBuffer<uint32_t> argmax_;
};

// models::Flatten: the same bytes under another shape, a device-to-device copy each way.
class DeviceCopy final : public DeviceLayer {
 public:
  explicit DeviceCopy(size_t size) : size_(size) {}
  size_t out_size() const override { return size_; }
  void forward(const cuda::CudaContext& ctx, const float* x, float* y, size_t batch) override {
    RESYNC_CHECK_CUDA(cudaMemcpyAsync(y, x, batch * size_ * sizeof(float), cudaMemcpyDeviceToDevice,
                                      ctx.stream()));
  }
  void backward(const cuda::CudaContext& ctx, const float* /*x*/, const float* dy, float* dx,
                size_t batch) override {
    if (dx == nullptr) return;
    RESYNC_CHECK_CUDA(cudaMemcpyAsync(dx, dy, batch * size_ * sizeof(float),
                                      cudaMemcpyDeviceToDevice, ctx.stream()));
  }

 private:
  size_t size_;
};

[[noreturn]] void unsupported(const models::ModelSpec& spec, const std::string& why) {
  throw DeviceError(fmt::format("model {} is not yet supported on cuda ({})", spec.name, why));
}

// The layer list of the registered model, as the CPU model builds it (models/model.cpp's
// registry), to mirror it on the device.
models::LayerStack build_stack(const models::ModelSpec& spec) {
  if (spec.name == "mlp") return models::build_mlp(spec);
  if (spec.name == "cnn") return models::build_cnn(spec);
  unsupported(spec, "no device layer list for it");
}

// The CPU layer's device twin. MaxPool2d does not expose its shape: the pool is taken to be the
// cnn's 2x2/2 over the preceding convolution's output and accepted only if a CPU pool of that
// shape has the same name (which spells out window, stride and both shapes).
std::unique_ptr<DeviceLayer> device_twin(const models::ModelSpec& spec, const models::Layer& layer,
                                         const kernels::Conv2dShape* last_conv, size_t max_batch,
                                         std::span<float>* conv_workspace) {
  if (const auto* linear = dynamic_cast<const models::Linear*>(&layer)) {
    return std::make_unique<DeviceLinear>(linear->in_size(), linear->out_size());
  }
  if (dynamic_cast<const models::Relu*>(&layer) != nullptr) {
    return std::make_unique<DeviceRelu>(layer.out_size());
  }
  if (const auto* conv = dynamic_cast<const models::Conv2d*>(&layer)) {
    return std::make_unique<DeviceConv2d>(conv->shape(), conv_workspace);
  }
  if (dynamic_cast<const models::Flatten*>(&layer) != nullptr) {
    return std::make_unique<DeviceCopy>(layer.out_size());
  }
  if (dynamic_cast<const models::MaxPool2d*>(&layer) != nullptr && last_conv != nullptr) {
    const kernels::Pool2dShape pool{.channels = last_conv->out_c,
                                    .in_h = last_conv->out_h(),
                                    .in_w = last_conv->out_w(),
                                    .k_h = 2,
                                    .k_w = 2,
                                    .stride_h = 2,
                                    .stride_w = 2};
    if (pool.in_size() == layer.in_size() && pool.out_size() == layer.out_size() &&
        models::MaxPool2d(pool).name() == layer.name()) {
      return std::make_unique<DeviceMaxPool2d>(pool, max_batch);
    }
  }
  unsupported(spec, "layer '" + layer.name() + "' has no device twin");
}

class CudaReplica final : public Replica {
 public:
  CudaReplica(const models::ModelSpec& spec, size_t max_batch, uint64_t seed,
              const kernels::SgdHyper& hyper, int device)
      : ctx_(device),
        hyper_(hyper),
        max_batch_(max_batch),
        n_classes_(spec.n_classes),
        input_size_(spec.input_size()) {
    RESYNC_CHECK_ARG(max_batch > 0, "model: max batch must be > 0");
    // Device memory first: a model too large for the GPU fails here, before the host copy of it
    // below is allocated.
    build_layers(spec);
    params_ = cuda::DeviceBuffer<float>(n_params_);
    grads_ = cuda::DeviceBuffer<float>(n_params_);
    velocity_ = cuda::DeviceBuffer<float>(n_params_);
    bind_layers();
    x_ = cuda::DeviceBuffer<float>(max_batch * input_size_);
    labels_ = cuda::DeviceBuffer<int32_t>(max_batch);
    xent_ = cuda::DeviceBuffer<cuda::XentDeviceResult>(1);

    x_host_ = std::make_unique<PinnedBuffer<float>>(max_batch * input_size_);
    labels_host_ = std::make_unique<PinnedBuffer<int32_t>>(max_batch);
    grads_host_ = std::make_unique<PinnedBuffer<float>>(n_params_);
    params_host_ = std::make_unique<PinnedBuffer<float>>(n_params_);
    velocity_host_ = std::make_unique<PinnedBuffer<float>>(n_params_);

    // The CPU model draws the initial parameters: copying them up makes a CUDA run start
    // exactly where a CPU run with the same seed does.
    const std::unique_ptr<models::Model> cpu = models::make_model(spec, max_batch, seed);
    RESYNC_CHECK(cpu->n_params() == n_params_,
                 fmt::format("cuda replica: {} device parameters for {} on the cpu", n_params_,
                             cpu->n_params()));
    cudaDeviceProp prop{};
    const std::string device_name =
        cudaGetDeviceProperties(&prop, device) == cudaSuccess ? prop.name : "?";
    (void)cudaGetLastError();
    model_description_ = cpu->describe();
    description_ = fmt::format("{} on cuda:{} ({})", model_description_, device, device_name);

    const std::span<const float> initial = cpu->params();
    std::memcpy(params_host_->data(), initial.data(), initial.size_bytes());
    std::memset(velocity_host_->data(), 0, n_params_ * sizeof(float));
    std::memset(grads_host_->data(), 0, n_params_ * sizeof(float));
    upload_state();
  }

  std::string describe() const override { return description_; }
  std::string model_description() const override { return model_description_; }
  size_t n_params() const override { return n_params_; }
  size_t max_batch() const override { return max_batch_; }

  float compute_gradients(const float* x, const int32_t* y, size_t n) override {
    RESYNC_CHECK_ARG(n > 0, "model: empty training batch");
    stage_batch(x, y, n);
    forward(n);
    cuda::softmax_xent_forward_backward(ctx_.stream(), acts_.back().data(), labels_.data(),
                                        dacts_.back().data(), n, n_classes_, xent_.data());
    // Backward, mirrored: the first layer needs no gradient for the input batch.
    for (size_t i = layers_.size(); i-- > 0;) {
      float* dx = i == 0 ? nullptr : dacts_[i - 1].data();
      layers_[i]->backward(ctx_, input_of(i), dacts_[i].data(), dx, n);
    }
    if (location_ == GradientLocation::kHost) {
      cuda::download(static_cast<const float*>(grads_.data()), grads_host_->span(), ctx_.stream());
    }
    // Synchronises the stream: the gradient download is complete once the sums are read.
    const kernels::XentSums sums = cuda::read_xent_result(xent_.data(), ctx_.stream());
    return static_cast<float>(sums.loss_sum / static_cast<double>(n));
  }

  std::span<float> gradient_buffer() override { return grads_host_->span(); }
  bool place_gradients(std::span<float> /*storage*/) override { return false; }
  // The live state is device memory; peers get it through download_state() and host_state().
  StateLayout state_layout() const override {
    return {.n_params = n_params_, .n_optimizer_buffers = 1};  // SGD's velocity
  }
  bool place_state(std::span<float> /*storage*/) override { return false; }

  void apply_gradients(float grad_scale) override {
    ctx_.make_current();
    if (location_ == GradientLocation::kHost) {
      cuda::upload(std::span<const float>(grads_host_->span()), grads_.data(), ctx_.stream());
    }
    cuda::sgd_momentum_update(ctx_.stream(), params_.data(), velocity_.data(), grads_.data(),
                              n_params_, grad_scale, hyper_);
    // Waiting here keeps the contract simple: once this returns, the host may write the
    // gradient buffer again and a kernel fault is reported by the step that caused it.
    ctx_.synchronize();
  }

  std::span<const std::span<float>> host_state() override {
    host_state_ = {params_host_->span(), velocity_host_->span()};
    return host_state_;
  }
  void apply_update_from_optimizer_state() override {
    kernels::sgd_apply_velocity(params_host_->span(), velocity_host_->span(), hyper_.lr);
  }

  void download_state() override {
    ctx_.make_current();
    cuda::download(static_cast<const float*>(params_.data()), params_host_->span(), ctx_.stream());
    cuda::download(static_cast<const float*>(velocity_.data()), velocity_host_->span(),
                   ctx_.stream());
    ctx_.synchronize();
  }

  void upload_state() override {
    ctx_.make_current();
    cuda::upload(std::span<const float>(params_host_->span()), params_.data(), ctx_.stream());
    cuda::upload(std::span<const float>(velocity_host_->span()), velocity_.data(), ctx_.stream());
    ctx_.synchronize();
  }

 private:
  std::array<std::span<float>, 2> host_state_;  // what host_state() returns

 public:
  models::EvalResult evaluate(const float* x, const int32_t* y, size_t n) override {
    models::EvalResult result;
    result.count = n;
    if (n == 0) return result;
    stage_batch(x, y, n);
    forward(n);
    cuda::softmax_xent_forward(ctx_.stream(), acts_.back().data(), labels_.data(), n, n_classes_,
                               xent_.data());
    const kernels::XentSums sums = cuda::read_xent_result(xent_.data(), ctx_.stream());
    result.loss_sum = sums.loss_sum;
    result.correct = sums.n_correct;
    return result;
  }

  void set_gradient_location(GradientLocation location) override { location_ = location; }
  std::span<float> device_gradient_buffer() override {
    if (location_ != GradientLocation::kDevice) return {};
    return {grads_.data(), grads_.size()};
  }
  int cuda_device() const override { return ctx_.device(); }

 private:
  // Mirrors the model's layers on the device and allocates their activations.
  void build_layers(const models::ModelSpec& spec) {
    const models::LayerStack stack = build_stack(spec);
    const kernels::Conv2dShape* last_conv = nullptr;
    size_t workspace_elems = 0;
    size_t n_params = 0;
    for (const auto& layer : stack.layers) {
      if (const auto* conv = dynamic_cast<const models::Conv2d*>(layer.get())) {
        last_conv = &conv->shape();
        workspace_elems =
            std::max(workspace_elems, cuda::conv2d_workspace_elems(conv->shape(), max_batch_));
      }
      layers_.push_back(device_twin(spec, *layer, last_conv, max_batch_, &workspace_view_));
      layer_params_.push_back(layer->n_params());
      n_params += layer->n_params();
      acts_.emplace_back(max_batch_ * layer->out_size());
      dacts_.emplace_back(max_batch_ * layer->out_size());
    }
    n_params_ = n_params;
    workspace_ = cuda::DeviceBuffer<float>(workspace_elems);
    workspace_view_ = {workspace_.data(), workspace_.size()};
  }

  void bind_layers() {
    size_t offset = 0;
    for (size_t i = 0; i < layers_.size(); ++i) {
      layers_[i]->bind(params_.data() + offset, grads_.data() + offset);
      offset += layer_params_[i];
    }
  }

  // Copies the batch into the pinned staging buffers, then to the device on the stream.
  void stage_batch(const float* x, const int32_t* y, size_t n) {
    RESYNC_CHECK_ARG(n <= max_batch_,
                     fmt::format("batch of {} exceeds the model's max batch {}", n, max_batch_));
    RESYNC_CHECK_ARG(x != nullptr && y != nullptr, "model: inputs or labels are null");
    ctx_.make_current();
    // The previous call synchronised the stream, so no copy still reads the staging buffers.
    std::memcpy(x_host_->data(), x, n * input_size_ * sizeof(float));
    std::memcpy(labels_host_->data(), y, n * sizeof(int32_t));
    cuda::upload(std::span<const float>(x_host_->first(n * input_size_)), x_.data(), ctx_.stream());
    cuda::upload(std::span<const int32_t>(labels_host_->first(n)), labels_.data(), ctx_.stream());
  }

  void forward(size_t n) {
    for (size_t i = 0; i < layers_.size(); ++i) {
      layers_[i]->forward(ctx_, input_of(i), acts_[i].data(), n);
    }
  }

  const float* input_of(size_t layer) const {
    return layer == 0 ? x_.data() : acts_[layer - 1].data();
  }

  cuda::CudaContext ctx_;  // first: the device buffers below are freed before the stream
  kernels::SgdHyper hyper_;
  size_t max_batch_;
  size_t n_classes_;
  size_t input_size_;
  size_t n_params_ = 0;
  std::string description_;
  std::string model_description_;
  GradientLocation location_ = GradientLocation::kHost;

  std::vector<std::unique_ptr<DeviceLayer>> layers_;
  std::vector<size_t> layer_params_;
  cuda::DeviceBuffer<float> params_, grads_, velocity_;
  std::vector<cuda::DeviceBuffer<float>> acts_;   // acts_[i]: output of layer i (logits last)
  std::vector<cuda::DeviceBuffer<float>> dacts_;  // dacts_[i]: d loss / d acts_[i]
  cuda::DeviceBuffer<float> workspace_;           // the convolutions' im2col scratch
  std::span<float> workspace_view_;
  cuda::DeviceBuffer<float> x_;
  cuda::DeviceBuffer<int32_t> labels_;
  cuda::DeviceBuffer<cuda::XentDeviceResult> xent_;

  std::unique_ptr<PinnedBuffer<float>> x_host_;
  std::unique_ptr<PinnedBuffer<int32_t>> labels_host_;
  std::unique_ptr<PinnedBuffer<float>> grads_host_;
  std::unique_ptr<PinnedBuffer<float>> params_host_;
  std::unique_ptr<PinnedBuffer<float>> velocity_host_;
};

}  // namespace

std::unique_ptr<Replica> make_cuda_replica(const models::ModelSpec& spec, size_t max_batch,
                                           uint64_t seed, const kernels::SgdHyper& hyper,
                                           int local_rank) {
  const cuda::DeviceQuery query = cuda::query_devices();
  if (query.n_devices == 0) {
    throw DeviceError(fmt::format("no CUDA device is available ({})", query.reason));
  }
  RESYNC_CHECK_ARG(local_rank >= 0, fmt::format("local rank {} is negative", local_rank));
  // Ranks of a node take the visible devices round robin: with more ranks than GPUs they share.
  return std::make_unique<CudaReplica>(spec, max_batch, seed, hyper, local_rank % query.n_devices);
}

}  // namespace resync::runtime
