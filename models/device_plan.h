// DevicePlan: a model's layer list translated for a device backend (layer kinds, shapes and
// parameter offsets), read from the same LayerStack the CPU Model is built from. Needs no CUDA,
// so the translation is tested on any machine; models/cuda/device_model.h runs a plan.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "kernels/conv2d.h"
#include "kernels/maxpool.h"
#include "models/model.h"

namespace resync::models {

// The layers a device backend implements: every built-in CPU layer. The softmax cross-entropy
// that ends every Model is implied.
enum class DeviceLayerKind { kLinear, kRelu, kConv2d, kMaxPool2d, kFlatten };

// "linear", "relu", "conv2d", "maxpool2d", "flatten".
const char* kind_name(DeviceLayerKind kind);

struct DeviceLayerPlan {
  DeviceLayerKind kind = DeviceLayerKind::kLinear;
  std::string name;    // the CPU layer's name(), e.g. "linear 784->512"
  size_t in_size = 0;  // floats per sample, as the CPU layer reports them
  size_t out_size = 0;
  // This layer's slice of the flat parameter (and gradient) buffer: the CPU Model binds its
  // layers in the same order, so CPU parameters copy to the device as they are.
  size_t param_offset = 0;
  size_t n_params = 0;
  kernels::Conv2dShape conv;  // kConv2d only
  kernels::Pool2dShape pool;  // kMaxPool2d only
};

struct DevicePlan {
  std::string label;  // the stack's label, e.g. "mlp 784-512-512-10"
  size_t input_size = 0;
  size_t n_classes = 0;
  size_t n_params = 0;
  std::vector<DeviceLayerPlan> layers;  // forward order
};

// Translates `stack` (as build_layer_stack returns it) for `device` (named in errors only).
// Throws DeviceError with one line naming the first layer the device cannot run, and
// InvalidArgument for a stack no Model accepts (empty, mismatched sizes, last layer not
// n_classes wide).
DevicePlan make_device_plan(const LayerStack& stack, size_t n_classes,
                            const std::string& device = "cuda");

// The plan of a registered model: make_device_plan(build_layer_stack(spec), spec.n_classes).
DevicePlan make_device_plan(const ModelSpec& spec, const std::string& device = "cuda");

}  // namespace resync::models
