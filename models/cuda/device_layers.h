// DeviceLayer: the CUDA twin of models::Layer, and make_device_layer, which builds the twin of one
// DevicePlan layer (Linear, ReLU, Conv2d, MaxPool2d, Flatten here; the gpt's layers in
// device_transformer_layers.h) over the kernels/cuda launchers. Built with RESYNC_WITH_CUDA only.
#pragma once

#include <cstddef>
#include <memory>
#include <span>

#include "kernels/cuda/context.h"
#include "models/device_plan.h"

namespace resync::models::cuda {

// Same sizes and parameter layout as the CPU layer it twins, so parameters copy between them as
// they are. Like models::Layer it owns no parameters: bind() points it at its slices of the
// model's device buffers. All work is issued on the context's stream.
class DeviceLayer {
 public:
  virtual ~DeviceLayer() = default;

  // Floats of scratch forward/backward need; the model allocates the largest once and shares it
  // (its layers run one after another on one stream).
  virtual size_t workspace_elems() const { return 0; }
  virtual void set_workspace(std::span<float> /*workspace*/) {}
  // params and grads: this layer's n_params floats of device memory each (a tied head: the
  // embedding's wte and its gradient, DeviceLayerPlan::tied_offset).
  virtual void bind(float* /*params*/, float* /*grads*/) {}

  virtual void forward(const kernels::cuda::CudaContext& ctx, const float* x, float* y,
                       size_t batch) = 0;
  // As models::Layer::backward: overwrites this layer's parameter gradients and, unless dx is
  // null, writes dx. Must follow the forward call on the same x (the pool keeps its argmax).
  virtual void backward(const kernels::cuda::CudaContext& ctx, const float* x, const float* y,
                        const float* dy, float* dx, size_t batch) = 0;
  // After the stream has passed the last forward: throws InvalidArgument, as the CPU layer's
  // forward would have, if that forward's inputs were bad (the embedding's tokens).
  virtual void check_inputs(const kernels::cuda::CudaContext& /*ctx*/) {}
};

// The twin of `layer` for up to max_batch samples, allocating its own device state (the pool's
// argmax) on the current device. Throws Error if the plan's parameter count disagrees with
// the layer's layout.
std::unique_ptr<DeviceLayer> make_device_layer(const DeviceLayerPlan& layer, size_t max_batch);

}  // namespace resync::models::cuda
