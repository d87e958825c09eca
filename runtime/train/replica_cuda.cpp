// The CUDA replica: a models::cuda::DeviceModel run from the device plan of the registered model
// (models/device_plan.h), with parameters, gradients and optimizer state (SGD's velocity or
// AdamW's moments) in device memory, the update on the device, and pinned host buffers for the
// batch, the gradient and the state mirror.
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "base/error.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/sgd.h"
#include "models/cuda/device_model.h"
#include "models/device_plan.h"
#include "runtime/train/replica.h"

namespace resync::runtime {

std::unique_ptr<Replica> make_cuda_replica(const models::ModelSpec& spec, size_t max_batch,
                                           uint64_t seed, const OptimizerConfig& optimizer,
                                           int local_rank);

namespace {

namespace cuda = kernels::cuda;

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

class CudaReplica final : public Replica {
 public:
  // plan: models::make_device_plan(spec), the layers of the model that make_model builds.
  CudaReplica(models::DevicePlan plan, const models::ModelSpec& spec, size_t max_batch,
              uint64_t seed, const OptimizerConfig& optimizer, int device)
      // Device memory first: a model too large for the GPU fails here, before the host copy of
      // it below is allocated.
      : ctx_(device),
        optimizer_(optimizer),
        model_(std::move(plan), max_batch),
        max_batch_(max_batch),
        input_size_(model_.input_size()),
        labels_per_sample_(model_.labels_per_sample()),
        n_params_(model_.n_params()) {
    params_ = cuda::DeviceBuffer<float>(n_params_);
    grads_ = cuda::DeviceBuffer<float>(n_params_);
    for (size_t j = 0; j < optimizer_.n_buffers(); ++j) state_.emplace_back(n_params_);
    model_.bind(params_.data(), grads_.data());
    x_ = cuda::DeviceBuffer<float>(max_batch * input_size_);
    labels_ = cuda::DeviceBuffer<int32_t>(max_batch * labels_per_sample_);

    x_host_ = std::make_unique<PinnedBuffer<float>>(max_batch * input_size_);
    labels_host_ = std::make_unique<PinnedBuffer<int32_t>>(max_batch * labels_per_sample_);
    grads_host_ = std::make_unique<PinnedBuffer<float>>(n_params_);
    params_host_ = std::make_unique<PinnedBuffer<float>>(n_params_);
    host_state_ = {params_host_->span()};
    for (size_t j = 0; j < optimizer_.n_buffers(); ++j) {
      state_host_.push_back(std::make_unique<PinnedBuffer<float>>(n_params_));
      host_state_.push_back(state_host_.back()->span());
    }

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
    for (auto& buffer : state_host_) std::memset(buffer->data(), 0, n_params_ * sizeof(float));
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
    model_.forward_backward(ctx_, x_.data(), labels_.data(), n);
    if (location_ == GradientLocation::kHost) {
      cuda::download(static_cast<const float*>(grads_.data()), grads_host_->span(), ctx_.stream());
    }
    // Synchronises the stream: the gradient download is complete once the sums are read.
    const kernels::XentSums sums = model_.read_loss(ctx_);
    return static_cast<float>(sums.loss_sum / static_cast<double>(n * labels_per_sample_));
  }

  std::span<float> gradient_buffer() override { return grads_host_->span(); }
  bool place_gradients(std::span<float> /*storage*/) override { return false; }
  bool set_gradients_final_hook(models::Model::GradientsFinalHook /*hook*/) override {
    return false;
  }
  // The live state is device memory; peers get it through download_state() and host_state().
  StateLayout state_layout() const override {
    return {.n_params = n_params_, .n_optimizer_buffers = optimizer_.n_buffers()};
  }
  bool place_state(std::span<float> /*storage*/) override { return false; }

  void apply_gradients(float grad_scale, uint64_t step) override {
    ctx_.make_current();
    if (location_ == GradientLocation::kHost) {
      cuda::upload(std::span<const float>(grads_host_->span()), grads_.data(), ctx_.stream());
    }
    if (optimizer_.grad_clip > 0) {
      grad_scale = optimizer_.clipped_scale(
          cuda::sum_of_squares(ctx_.stream(), grads_.data(), n_params_), grad_scale);
    }
    if (optimizer_.kind == OptimizerKind::kAdamW) {
      cuda::adamw_update(ctx_.stream(), params_.data(), state_[0].data(), state_[1].data(),
                         grads_.data(), n_params_, grad_scale, optimizer_.adamw_at(step));
    } else {
      cuda::sgd_momentum_update(ctx_.stream(), params_.data(), state_[0].data(), grads_.data(),
                                n_params_, grad_scale, optimizer_.sgd_at(step));
    }
    // Waiting here keeps the contract simple: once this returns, the host may write the
    // gradient buffer again and a kernel fault is reported by the step that caused it.
    ctx_.synchronize();
  }

  std::span<const std::span<float>> host_state() override {
    return host_state_;
  }
  // On the host mirror with the CPU kernels. AdamW's device kernels are built without fused
  // multiply-adds, so this repeats the device update bit for bit; SGD's may differ in the last
  // bits (a catch-up then leaves the late rank within rounding of the donor).
  void apply_update_from_optimizer_state(uint64_t step) override {
    if (optimizer_.kind == OptimizerKind::kAdamW) {
      kernels::adamw_apply_moments(params_host_->span(), host_state_[1], host_state_[2],
                                   optimizer_.adamw_at(step));
    } else {
      kernels::sgd_apply_velocity(params_host_->span(), host_state_[1], optimizer_.lr_at(step));
    }
  }

  void download_state() override {
    ctx_.make_current();
    cuda::download(static_cast<const float*>(params_.data()), params_host_->span(), ctx_.stream());
    for (size_t j = 0; j < state_.size(); ++j) {
      cuda::download(static_cast<const float*>(state_[j].data()), state_host_[j]->span(),
                     ctx_.stream());
    }
    ctx_.synchronize();
  }

  void upload_state() override {
    ctx_.make_current();
    cuda::upload(std::span<const float>(params_host_->span()), params_.data(), ctx_.stream());
    for (size_t j = 0; j < state_.size(); ++j) {
      cuda::upload(std::span<const float>(state_host_[j]->span()), state_[j].data(),
                   ctx_.stream());
    }
    ctx_.synchronize();
  }

  models::EvalResult evaluate(const float* x, const int32_t* y, size_t n) override {
    models::EvalResult result;
    result.count = n * labels_per_sample_;
    if (n == 0) return result;
    stage_batch(x, y, n);
    model_.forward_loss(ctx_, x_.data(), labels_.data(), n);
    const kernels::XentSums sums = model_.read_loss(ctx_);
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
  // Copies the batch into the pinned staging buffers, then to the device on the stream.
  void stage_batch(const float* x, const int32_t* y, size_t n) {
    RESYNC_CHECK_ARG(n <= max_batch_,
                     fmt::format("batch of {} exceeds the model's max batch {}", n, max_batch_));
    RESYNC_CHECK_ARG(x != nullptr && y != nullptr, "model: inputs or labels are null");
    ctx_.make_current();
    // The previous call synchronised the stream, so no copy still reads the staging buffers.
    std::memcpy(x_host_->data(), x, n * input_size_ * sizeof(float));
    const size_t n_labels = n * labels_per_sample_;
    std::memcpy(labels_host_->data(), y, n_labels * sizeof(int32_t));
    cuda::upload(std::span<const float>(x_host_->first(n * input_size_)), x_.data(), ctx_.stream());
    cuda::upload(std::span<const int32_t>(labels_host_->first(n_labels)), labels_.data(),
                 ctx_.stream());
  }

  cuda::CudaContext ctx_;  // first: the device buffers below are freed before the stream
  OptimizerConfig optimizer_;
  models::cuda::DeviceModel model_;  // holds views of params_ and grads_
  size_t max_batch_;
  size_t input_size_;
  size_t labels_per_sample_;  // 1, or T for gpt (one label per position)
  size_t n_params_;
  std::string description_;
  std::string model_description_;
  GradientLocation location_ = GradientLocation::kHost;

  cuda::DeviceBuffer<float> params_, grads_;
  std::vector<cuda::DeviceBuffer<float>> state_;  // the optimizer's buffers
  cuda::DeviceBuffer<float> x_;
  cuda::DeviceBuffer<int32_t> labels_;

  std::unique_ptr<PinnedBuffer<float>> x_host_;
  std::unique_ptr<PinnedBuffer<int32_t>> labels_host_;
  std::unique_ptr<PinnedBuffer<float>> grads_host_;
  std::unique_ptr<PinnedBuffer<float>> params_host_;
  std::vector<std::unique_ptr<PinnedBuffer<float>>> state_host_;
  std::vector<std::span<float>> host_state_;  // what host_state() returns
};

}  // namespace

std::unique_ptr<Replica> make_cuda_replica(const models::ModelSpec& spec, size_t max_batch,
                                           uint64_t seed, const OptimizerConfig& optimizer,
                                           int local_rank) {
  // The plan first: a layer cuda cannot run is named in the error, with or without a device.
  models::DevicePlan plan = models::make_device_plan(spec, "cuda");
  const cuda::DeviceQuery query = cuda::query_devices();
  if (query.n_devices == 0) {
    throw DeviceError(fmt::format("no CUDA device is available ({})", query.reason));
  }
  RESYNC_CHECK_ARG(local_rank >= 0, fmt::format("local rank {} is negative", local_rank));
  // Ranks of a node take the visible devices round robin: with more ranks than GPUs they share.
  return std::make_unique<CudaReplica>(std::move(plan), spec, max_batch, seed, optimizer,
                                       local_rank % query.n_devices);
}

}  // namespace resync::runtime
