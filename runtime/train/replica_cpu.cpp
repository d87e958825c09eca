// The CPU replica (a thin wrapper of models::Model and Optimizer, so CPU training keeps its
// bits), make_replica and the GPU exchange choice. The CUDA replica is in replica_cuda.cpp.
#include <fmt/format.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "base/error.h"
#include "runtime/train/optimizer.h"
#include "runtime/train/replica.h"

namespace resync::runtime {

#ifdef RESYNC_WITH_CUDA
// replica_cuda.cpp
std::unique_ptr<Replica> make_cuda_replica(const models::ModelSpec& spec, size_t max_batch,
                                           uint64_t seed, const OptimizerConfig& optimizer,
                                           int local_rank);
#endif

namespace {

using models::overlap;

class CpuReplica final : public Replica {
 public:
  CpuReplica(const models::ModelSpec& spec, size_t max_batch, uint64_t seed,
             const OptimizerConfig& optimizer)
      : model_(models::make_model(spec, max_batch, seed)),
        optimizer_(model_->n_params(), optimizer) {
    update_state_views();
  }

  std::string describe() const override { return model_->describe() + " on cpu"; }
  std::string model_description() const override { return model_->describe(); }
  size_t n_params() const override { return model_->n_params(); }
  size_t max_batch() const override { return model_->max_batch(); }

  float compute_gradients(const float* x, const int32_t* y, size_t n) override {
    return model_->forward_backward(x, y, n, on_final_);
  }
  std::span<float> gradient_buffer() override { return model_->grads(); }
  bool set_gradients_final_hook(models::Model::GradientsFinalHook hook) override {
    on_final_ = std::move(hook);
    return true;
  }
  bool place_gradients(std::span<float> storage) override {
    RESYNC_CHECK_ARG(!overlap(storage.first(std::min(storage.size(), n_params())),
                              optimizer_.state()),
                     "replica: gradient storage overlaps the optimizer state");
    model_->place_gradients(storage);
    return true;
  }
  StateLayout state_layout() const override {
    return {.n_params = n_params(), .n_optimizer_buffers = optimizer_.n_buffers()};
  }
  bool place_state(std::span<float> storage) override {
    // Every check before any move, so that a rejected placement leaves the replica as it was.
    const StateLayout layout = state_layout();
    RESYNC_CHECK_ARG(storage.size() >= layout.n_floats(),
                     fmt::format("replica: state storage of {} floats for {} parameters and {} "
                                 "optimizer buffer(s)",
                                 storage.size(), layout.n_params, layout.n_optimizer_buffers));
    storage = storage.first(layout.n_floats());
    const std::span<float> params = layout.part(storage, 0);
    const std::span<float> optimizer_state = storage.subspan(layout.n_params);
    RESYNC_CHECK_ARG(!overlap(storage, model_->grads()),
                     "replica: state storage overlaps the gradient buffer");
    // Each part moves on its own: one landing on the other's current place would clobber it.
    RESYNC_CHECK_ARG(!overlap(params, optimizer_.state()) &&
                         !overlap(optimizer_state, model_->params()),
                     "replica: state storage overlaps the other half of the current state");
    model_->place_parameters(params);
    optimizer_.place_state(optimizer_state);
    update_state_views();
    return true;
  }
  void apply_gradients(float grad_scale, uint64_t step) override {
    optimizer_.step(model_->params(), model_->grads(), grad_scale, step);
  }

  std::span<const std::span<float>> host_state() override { return state_; }
  void download_state() override {}
  void upload_state() override {}
  void apply_update_from_optimizer_state(uint64_t step) override {
    optimizer_.apply_update_from_state(model_->params(), step);
  }

  models::EvalResult evaluate(const float* x, const int32_t* y, size_t n) override {
    return model_->evaluate(x, y, n);
  }

  void set_gradient_location(GradientLocation location) override {
    RESYNC_CHECK_ARG(location == GradientLocation::kHost,
                     "a cpu replica keeps its gradient on the host");
  }
  std::span<float> device_gradient_buffer() override { return {}; }
  int cuda_device() const override { return -1; }

 private:
  void update_state_views() {
    state_.assign(1, model_->params());
    for (size_t j = 0; j < optimizer_.n_buffers(); ++j) state_.push_back(optimizer_.buffer(j));
  }

  std::unique_ptr<models::Model> model_;
  Optimizer optimizer_;
  std::vector<std::span<float>> state_;  // host_state(): the parameters, each buffer
  models::Model::GradientsFinalHook on_final_;
};

}  // namespace

std::unique_ptr<Replica> make_replica(const std::string& device, const models::ModelSpec& spec,
                                      size_t max_batch, uint64_t seed,
                                      const OptimizerConfig& optimizer, int local_rank) {
  if (device == "cpu") return std::make_unique<CpuReplica>(spec, max_batch, seed, optimizer);
  if (device == "cuda") {
#ifdef RESYNC_WITH_CUDA
    return make_cuda_replica(spec, max_batch, seed, optimizer, local_rank);
#else
    (void)local_rank;
    throw DeviceError(
        "this build has no CUDA support (configure with -DRESYNC_CUDA=ON on a "
        "machine with the CUDA toolkit, cuBLAS and NCCL)");
#endif
  }
  throw InvalidArgument(fmt::format("unknown device '{}' (cpu, cuda)", device));
}

GpuExchangeChoice choose_gpu_exchange(const std::string& collective,
                                      const std::string& mpi_cuda_support) {
  if (collective == "nccl") {
    return {GpuExchange::kNccl, GradientLocation::kDevice,
            "gradients: NCCL all-reduce on the device (--collective nccl)"};
  }
  return {GpuExchange::kRingHostStaged, GradientLocation::kHost,
          fmt::format("gradients: resync ring with host staging through pinned buffers (MPI "
                      "CUDA-aware: {}; the ring reduces on the host, so it is never given "
                      "device pointers)",
                      mpi_cuda_support)};
}

}  // namespace resync::runtime
