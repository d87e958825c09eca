#include "models/device_plan.h"

#include <fmt/format.h>

#include <utility>

#include "base/error.h"
#include "models/conv_layers.h"
#include "models/layers.h"

namespace resync::models {
namespace {

// The kind and shapes of one CPU layer; false for a layer no device backend implements. The
// built-in layer classes are final, so an exact type test cannot mistake a subclass for one.
bool translate(const Layer& layer, DeviceLayerPlan& out) {
  if (dynamic_cast<const Linear*>(&layer) != nullptr) {
    out.kind = DeviceLayerKind::kLinear;
  } else if (dynamic_cast<const Relu*>(&layer) != nullptr) {
    out.kind = DeviceLayerKind::kRelu;
  } else if (const auto* conv = dynamic_cast<const Conv2d*>(&layer)) {
    out.kind = DeviceLayerKind::kConv2d;
    out.conv = conv->shape();
  } else if (const auto* pool = dynamic_cast<const MaxPool2d*>(&layer)) {
    out.kind = DeviceLayerKind::kMaxPool2d;
    out.pool = pool->shape();
  } else if (dynamic_cast<const Flatten*>(&layer) != nullptr) {
    out.kind = DeviceLayerKind::kFlatten;
  } else {
    return false;
  }
  return true;
}

}  // namespace

const char* kind_name(DeviceLayerKind kind) {
  switch (kind) {
    case DeviceLayerKind::kLinear:
      return "linear";
    case DeviceLayerKind::kRelu:
      return "relu";
    case DeviceLayerKind::kConv2d:
      return "conv2d";
    case DeviceLayerKind::kMaxPool2d:
      return "maxpool2d";
    case DeviceLayerKind::kFlatten:
      return "flatten";
  }
  return "?";
}

DevicePlan make_device_plan(const LayerStack& stack, size_t n_classes, const std::string& device) {
  const auto& layers = stack.layers;
  // The checks models::Model makes, so that a device never runs a stack the CPU would refuse.
  RESYNC_CHECK_ARG(!layers.empty(), "model: no layers");
  RESYNC_CHECK_ARG(n_classes > 0 && layers.back()->out_size() % n_classes == 0,
                   fmt::format("model: last layer has {} outputs for {} classes",
                               layers.back()->out_size(), n_classes));
  DevicePlan plan;
  plan.label = stack.label;
  plan.input_size = layers.front()->in_size();
  plan.n_classes = n_classes;
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& layer = *layers[i];
    if (i > 0) {
      RESYNC_CHECK_ARG(
          layer.in_size() == layers[i - 1]->out_size(),
          fmt::format("model: {} cannot follow {}", layer.name(), layers[i - 1]->name()));
    }
    DeviceLayerPlan step;
    if (!translate(layer, step)) {
      throw DeviceError(fmt::format(
          "model {}: layer {} of {}, '{}', has no {} implementation ({} runs linear, relu, "
          "conv2d, maxpool2d and flatten layers)",
          stack.label, i + 1, layers.size(), layer.name(), device, device));
    }
    step.name = layer.name();
    step.in_size = layer.in_size();
    step.out_size = layer.out_size();
    step.param_offset = plan.n_params;  // as Model::bind_layers lays them out
    step.n_params = layer.n_params();
    plan.n_params += step.n_params;
    plan.layers.push_back(std::move(step));
  }
  // Device models compute one label per sample (the gpt layers, which predict one per
  // position, are refused above).
  if (layers.back()->out_size() != n_classes) {
    throw DeviceError(fmt::format("model {}: {} labels per sample; {} runs one", stack.label,
                                  layers.back()->out_size() / n_classes, device));
  }
  return plan;
}

DevicePlan make_device_plan(const ModelSpec& spec, const std::string& device) {
  return make_device_plan(build_layer_stack(spec), spec.n_classes, device);
}

}  // namespace resync::models
