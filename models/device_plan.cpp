#include "models/device_plan.h"

#include <fmt/format.h>

#include <utility>

#include "base/error.h"
#include "models/conv_layers.h"
#include "models/layers.h"
#include "models/transformer_layers.h"

namespace resync::models {
namespace {

enum class Translation { kOk, kNoDeviceLayer, kShapeMismatch };

// A transformer layer's shape must account for every size it reports (a layer whose sizes
// changed meaning is refused in one line instead of misread).
bool sizes_fit(const Layer& layer, DeviceLayerKind kind, const SequenceShape& s) {
  const size_t in = layer.in_size(), out = layer.out_size(), n_params = layer.n_params();
  switch (kind) {
    case DeviceLayerKind::kEmbedding:
      return in == s.context && out == s.context * s.dim &&
             n_params == (s.vocab + s.context) * s.dim;
    case DeviceLayerKind::kLayerNorm:
      return in == s.context * s.dim && out == in && n_params == 2 * s.dim;
    case DeviceLayerKind::kTransformerBlock:
      return s.n_head > 0 && s.dim % s.n_head == 0 && in == s.context * s.dim && out == in &&
             n_params == 12 * s.dim * s.dim + 13 * s.dim;
    case DeviceLayerKind::kTiedLmHead:
      return in == s.context * s.dim && out == s.context * s.vocab && n_params == 0;
    default:
      return true;
  }
}

// The kind and shapes of one CPU layer. The built-in layer classes are final, so an exact type
// test cannot mistake a subclass for one.
Translation translate(const Layer& layer, DeviceLayerPlan& out) {
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
  } else if (const auto* embedding = dynamic_cast<const TokenPositionEmbedding*>(&layer)) {
    out.kind = DeviceLayerKind::kEmbedding;
    out.seq = embedding->shape();
  } else if (const auto* norm = dynamic_cast<const LayerNormLayer*>(&layer)) {
    out.kind = DeviceLayerKind::kLayerNorm;
    out.seq = norm->shape();
  } else if (const auto* block = dynamic_cast<const TransformerBlock*>(&layer)) {
    out.kind = DeviceLayerKind::kTransformerBlock;
    out.seq = block->shape();
  } else if (const auto* head = dynamic_cast<const TiedLmHead*>(&layer)) {
    out.kind = DeviceLayerKind::kTiedLmHead;
    out.seq = head->shape();
  } else {
    return Translation::kNoDeviceLayer;
  }
  return sizes_fit(layer, out.kind, out.seq) ? Translation::kOk : Translation::kShapeMismatch;
}

// Points every tied head at the embedding whose wte it shares. The CPU head holds a reference to
// its embedding that the plan cannot read; a stack with exactly one embedding (as build_gpt
// makes) leaves no doubt, any other is refused.
void resolve_ties(DevicePlan& plan, const std::string& device) {
  DeviceLayerPlan* embedding = nullptr;
  size_t n_embeddings = 0;
  for (DeviceLayerPlan& layer : plan.layers) {
    if (layer.kind == DeviceLayerKind::kEmbedding) {
      embedding = &layer;
      ++n_embeddings;
    }
  }
  for (size_t i = 0; i < plan.layers.size(); ++i) {
    DeviceLayerPlan& head = plan.layers[i];
    if (head.kind != DeviceLayerKind::kTiedLmHead) continue;
    if (n_embeddings != 1) {
      throw DeviceError(fmt::format(
          "model {}: layer {} of {}, '{}': {} runs a tied head only in a model with exactly one "
          "embedding (this one has {})",
          plan.label, i + 1, plan.layers.size(), head.name, device, n_embeddings));
    }
    if (embedding->seq.vocab != head.seq.vocab || embedding->seq.dim != head.seq.dim) {
      throw DeviceError(fmt::format("model {}: layer {} of {}, '{}', does not match '{}'",
                                    plan.label, i + 1, plan.layers.size(), head.name,
                                    embedding->name));
    }
    head.tied_offset = embedding->param_offset;
    embedding->tied = true;
  }
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
    case DeviceLayerKind::kEmbedding:
      return "embedding";
    case DeviceLayerKind::kLayerNorm:
      return "layernorm";
    case DeviceLayerKind::kTransformerBlock:
      return "block";
    case DeviceLayerKind::kTiedLmHead:
      return "tied head";
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
  plan.labels_per_sample = layers.back()->out_size() / n_classes;
  RESYNC_CHECK_ARG(plan.labels_per_sample > 0, "model: last layer has no outputs");
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& layer = *layers[i];
    if (i > 0) {
      RESYNC_CHECK_ARG(
          layer.in_size() == layers[i - 1]->out_size(),
          fmt::format("model: {} cannot follow {}", layer.name(), layers[i - 1]->name()));
    }
    DeviceLayerPlan step;
    switch (translate(layer, step)) {
      case Translation::kOk:
        break;
      case Translation::kNoDeviceLayer:
        throw DeviceError(fmt::format(
            "model {}: layer {} of {}, '{}', has no {} implementation ({} runs linear, relu, "
            "conv2d, maxpool2d, flatten and the gpt's embedding, layernorm, block and tied head "
            "layers)",
            stack.label, i + 1, layers.size(), layer.name(), device, device));
      case Translation::kShapeMismatch:
        throw DeviceError(fmt::format(
            "model {}: layer {} of {}, '{}': {} cannot run it: its shape does not match its "
            "sizes ({} -> {} floats, {} parameters)",
            stack.label, i + 1, layers.size(), layer.name(), device, layer.in_size(),
            layer.out_size(), layer.n_params()));
    }
    step.name = layer.name();
    step.in_size = layer.in_size();
    step.out_size = layer.out_size();
    step.param_offset = plan.n_params;  // as Model::bind_layers lays them out
    step.n_params = layer.n_params();
    plan.n_params += step.n_params;
    plan.layers.push_back(std::move(step));
  }
  resolve_ties(plan, device);
  return plan;
}

DevicePlan make_device_plan(const ModelSpec& spec, const std::string& device) {
  return make_device_plan(build_layer_stack(spec), spec.n_classes, device);
}

}  // namespace resync::models
