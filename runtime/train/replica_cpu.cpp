// The CPU replica (a thin wrapper of models::Model and SgdOptimizer, so CPU training keeps its
// bits), make_replica and the GPU exchange choice. The CUDA replica is in replica_cuda.cpp.
#include <fmt/format.h>

#include <algorithm>
#include <functional>

#include "base/error.h"
#include "runtime/train/optimizer.h"
#include "runtime/train/replica.h"

namespace resync::runtime {

#ifdef RESYNC_WITH_CUDA
// replica_cuda.cpp
std::unique_ptr<Replica> make_cuda_replica(const models::ModelSpec& spec, size_t max_batch,
                                           uint64_t seed, const kernels::SgdHyper& hyper,
                                           int local_rank);
#endif

namespace {

using models::overlap;

class CpuReplica final : public Replica {
 public:
  CpuReplica(const models::ModelSpec& spec, size_t max_batch, uint64_t seed,
             const kernels::SgdHyper& hyper)
      : model_(models::make_model(spec, max_batch, seed)), optimizer_(model_->n_params(), hyper) {}

  std::string describe() const override { return model_->describe() + " on cpu"; }
  std::string model_description() const override { return model_->describe(); }
  size_t n_params() const override { return model_->n_params(); }
  size_t max_batch() const override { return model_->max_batch(); }

  float compute_gradients(const float* x, const int32_t* y, size_t n) override {
    return model_->forward_backward(x, y, n);
  }
  std::span<float> gradient_buffer() override { return model_->grads(); }
  bool place_gradients(std::span<float> storage) override {
    RESYNC_CHECK_ARG(!overlap(storage.first(std::min(storage.size(), n_params())),
                              optimizer_.state()),
                     "replica: gradient storage overlaps the velocity");
    model_->place_gradients(storage);
    return true;
  }
  bool place_state(std::span<float> params, std::span<float> velocity) override {
    // Every check before any move, so that a rejected placement leaves the replica as it was.
    const size_t n = n_params();
    RESYNC_CHECK_ARG(params.size() >= n && velocity.size() >= n,
                     fmt::format("replica: state storage of {} and {} floats for {} parameters",
                                 params.size(), velocity.size(), n));
    params = params.first(n);
    velocity = velocity.first(n);
    RESYNC_CHECK_ARG(!overlap(params, velocity),
                     "replica: parameter storage overlaps velocity storage");
    RESYNC_CHECK_ARG(!overlap(params, model_->grads()) && !overlap(velocity, model_->grads()),
                     "replica: state storage overlaps the gradient buffer");
    // Each half moves on its own: one landing on the other's current place would clobber it.
    RESYNC_CHECK_ARG(!overlap(params, optimizer_.state()) && !overlap(velocity, model_->params()),
                     "replica: state storage overlaps the other half of the current state");
    model_->place_parameters(params);
    optimizer_.place_state(velocity);
    return true;
  }
  void apply_gradients(float grad_scale) override {
    optimizer_.step(model_->params(), model_->grads(), grad_scale);
  }

  std::array<std::span<float>, 2> host_state() override {
    return {model_->params(), optimizer_.state()};
  }
  void download_state() override {}
  void upload_state() override {}

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
  std::unique_ptr<models::Model> model_;
  SgdOptimizer optimizer_;
};

}  // namespace

std::unique_ptr<Replica> make_replica(const std::string& device, const models::ModelSpec& spec,
                                      size_t max_batch, uint64_t seed,
                                      const kernels::SgdHyper& hyper, int local_rank) {
  if (device == "cpu") return std::make_unique<CpuReplica>(spec, max_batch, seed, hyper);
  if (device == "cuda") {
#ifdef RESYNC_WITH_CUDA
    return make_cuda_replica(spec, max_batch, seed, hyper, local_rank);
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
