// DeviceModel: the CUDA twin of models::Model, run from a DevicePlan (models/device_plan.h): its
// device layers, their activations and scratch, and the softmax cross-entropy that ends it.
// Built with RESYNC_WITH_CUDA only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/cuda/context.h"
#include "kernels/cuda/softmax_xent.h"
#include "models/cuda/device_layers.h"
#include "models/device_plan.h"

namespace resync::models::cuda {

// Owns every activation buffer, sized once for max_batch, so a step allocates nothing. Like the
// CPU Model's layers, it holds views of the parameter and gradient buffers, which the caller
// owns (a replica keeps them next to the optimizer state) and hands over with bind().
// Not copyable or movable: the layers point into its workspace.
class DeviceModel {
 public:
  // Builds the plan's device layers and allocates their buffers on the current device. Throws
  // InvalidArgument for max_batch == 0 and DeviceError with one line when memory runs out.
  DeviceModel(DevicePlan plan, size_t max_batch);
  DeviceModel(const DeviceModel&) = delete;
  DeviceModel& operator=(const DeviceModel&) = delete;
  ~DeviceModel();

  const DevicePlan& plan() const { return plan_; }
  size_t n_params() const { return plan_.n_params; }
  size_t input_size() const { return plan_.input_size; }  // floats per sample
  size_t n_classes() const { return plan_.n_classes; }
  // Labels (rows of logits) per sample: 1 for a classifier, T for gpt.
  size_t labels_per_sample() const { return plan_.labels_per_sample; }
  size_t max_batch() const { return max_batch_; }

  // Points the layers at device buffers of n_params() floats each, laid out as the CPU model's
  // (DeviceLayerPlan::param_offset). Call before the first step, and again to move them.
  void bind(float* params, float* grads);

  // Issues forward, loss and backward of one batch (1 <= batch <= max_batch) on ctx's stream;
  // x [batch x input_size()] and labels [batch x labels_per_sample()] are device memory.
  // Overwrites the gradient buffer with the gradient of the mean loss over the batch's labels;
  // read_loss() returns the summed loss (divide by batch x labels_per_sample()).
  void forward_backward(const kernels::cuda::CudaContext& ctx, const float* x,
                        const int32_t* labels, size_t batch);
  // Forward and loss only (0 <= batch <= max_batch), for evaluation.
  void forward_loss(const kernels::cuda::CudaContext& ctx, const float* x, const int32_t* labels,
                    size_t batch);
  // Waits for ctx's stream and returns the last call's summed loss and correct count. Throws
  // InvalidArgument for a label outside [0, n_classes()), as the CPU loss does, and for a token
  // that is not an integer in [0, vocabulary), as the CPU embedding does.
  kernels::XentSums read_loss(const kernels::cuda::CudaContext& ctx) const;

 private:
  const float* input_of(size_t layer, const float* x) const {
    return layer == 0 ? x : acts_[layer - 1].data();
  }
  void check_batch(size_t batch) const;
  void forward(const kernels::cuda::CudaContext& ctx, const float* x, size_t batch);

  DevicePlan plan_;
  size_t max_batch_;
  std::vector<std::unique_ptr<DeviceLayer>> layers_;
  std::vector<kernels::cuda::DeviceBuffer<float>> acts_;   // acts_[i]: output of layer i
  std::vector<kernels::cuda::DeviceBuffer<float>> dacts_;  // dacts_[i]: d loss / d acts_[i]
  kernels::cuda::DeviceBuffer<float> workspace_;           // shared by the layers that need it
  kernels::cuda::DeviceBuffer<kernels::cuda::XentDeviceResult> xent_;
};

}  // namespace resync::models::cuda
