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
#include "models/transformer_layers.h"

namespace resync::models {

// The layers a device backend implements: every built-in CPU layer (models/layers.h,
// conv_layers.h, transformer_layers.h). The softmax cross-entropy that ends every Model is
// implied.
enum class DeviceLayerKind {
  kLinear,
  kRelu,
  kConv2d,
  kMaxPool2d,
  kFlatten,
  kEmbedding,         // TokenPositionEmbedding
  kLayerNorm,         // LayerNormLayer
  kTransformerBlock,  // TransformerBlock
  kTiedLmHead,        // TiedLmHead
};

// "linear", "relu", "conv2d", "maxpool2d", "flatten", "embedding", "layernorm", "block",
// "tied head".
const char* kind_name(DeviceLayerKind kind);

// The shape of a transformer layer: per sample, T positions of width C; V tokens in the
// vocabulary (embedding, tied head); NH heads (block).
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
  SequenceShape seq;          // kEmbedding, kLayerNorm, kTransformerBlock, kTiedLmHead
  // kEmbedding: a tied head shares its wte and runs its backward first (overwriting dwte), so
  // this layer's backward adds to dwte instead of overwriting it, as the CPU layer does.
  bool tied = false;
  // kTiedLmHead: where the embedding's wte [V x C] begins in the flat buffer (that layer's
  // param_offset); the head reads it and writes its gradient there.
  size_t tied_offset = 0;
};

struct DevicePlan {
  std::string label;  // the stack's label, e.g. "mlp 784-512-512-10"
  size_t input_size = 0;
  size_t n_classes = 0;
  // Rows of n_classes logits per sample (1 for a classifier, T for gpt): the loss is the mean
  // over batch x labels_per_sample rows, as models::Model computes it.
  size_t labels_per_sample = 1;
  size_t n_params = 0;
  std::vector<DeviceLayerPlan> layers;  // forward order
};

// Translates `stack` (as build_layer_stack returns it) for `device` (named in errors only).
// Throws DeviceError with one line naming the first layer the device cannot run (an unknown
// layer class, a transformer layer whose shape cannot be read, a tied head whose embedding is
// ambiguous), and InvalidArgument for a stack no Model accepts (empty, mismatched sizes, last
// layer not a multiple of n_classes wide).
DevicePlan make_device_plan(const LayerStack& stack, size_t n_classes,
                            const std::string& device = "cuda");

// The plan of a registered model: make_device_plan(build_layer_stack(spec), spec.n_classes).
DevicePlan make_device_plan(const ModelSpec& spec, const std::string& device = "cuda");

}  // namespace resync::models
