// Models over one flat float32 parameter buffer and one flat gradient buffer: the spec, the
// Model (layers in forward order ending in softmax cross-entropy) and the registry by name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "models/layer.h"
#include "models/layers.h"

namespace resync::models {

struct ModelSpec {
  std::string name = "mlp";
  std::vector<size_t> hidden = {512, 512};  // mlp: widths of the hidden layers
  size_t in_channels = 1, in_height = 28, in_width = 28, n_classes = 10;
  // gpt (models/gpt.h): blocks, heads and width; the context is input_size(), the vocabulary
  // n_classes.
  size_t n_layer = 4, n_head = 4, n_embd = 128;

  size_t input_size() const { return in_channels * in_height * in_width; }
};

// Counts are of labels: samples for mlp/cnn, positions (tokens) for a sequence model.
struct EvalResult {
  double loss_sum = 0;  // summed over labels: add results up, divide by count at the end
  size_t correct = 0;
  size_t count = 0;
};

// What a registered builder produces: the layers in forward order and a short label.
struct LayerStack {
  std::string label;  // e.g. "mlp 784-512-512-10"
  std::vector<std::unique_ptr<Layer>> layers;
};

// True if two buffers share any element (where place_parameters/place_gradients may put them).
bool overlap(std::span<const float> a, std::span<const float> b);

// A feed-forward network and its loss. The last layer's outputs per sample are
// labels_per_sample() rows of n_classes logits (1 for a classifier, T for a sequence model that
// predicts each next token): the loss is the mean over batch x labels_per_sample() rows. Owns the parameter and gradient buffers (layers hold
// views into them) and every activation buffer, sized once for max_batch: a step allocates
// nothing. Parameters are laid out layer after layer, in forward order.
class Model {
 public:
  // Binds the layers to the buffers and initialises the parameters from seed: the same seed
  // gives bitwise-identical parameters on every rank.
  Model(LayerStack stack, size_t n_classes, size_t max_batch, uint64_t seed);

  size_t n_params() const { return params_view_.size(); }
  std::span<float> params() { return params_view_; }
  std::span<const float> params() const { return params_view_; }
  std::span<float> grads() { return grads_view_; }
  std::span<const float> grads() const { return grads_view_; }

  // Moves the gradient buffer into `storage` (at least n_params() floats, kept alive by the
  // caller), e.g. the all-reducer's shared-memory window, where peers sum it without staging
  // copies. The current gradient values move along; grads() then returns
  // storage.first(n_params()). Throws InvalidArgument if storage is too small or overlaps the
  // parameters.
  void place_gradients(std::span<float> storage);
  // The same for the parameters, e.g. so that a late peer can copy them straight out of the
  // node's shared-memory window. Either buffer may be placed first, and placed again later.
  void place_parameters(std::span<float> storage);

  size_t input_size() const { return layers_.front()->in_size(); }  // floats per sample
  size_t n_classes() const { return loss_.n_classes(); }
  size_t labels_per_sample() const { return layers_.back()->out_size() / n_classes(); }
  size_t max_batch() const { return max_batch_; }

  // Called during the backward pass after each layer's, with `first_final`: the gradients of
  // parameters [first_final, n_params()) are final (layers run backward from the last and lie
  // in forward order). For overlapping the gradient exchange with the rest of the backward pass.
  using GradientsFinalHook = std::function<void(size_t first_final)>;

  // Forward, loss and backward on one batch (1 <= batch <= max_batch); x is [batch x
  // input_size()], labels [batch x labels_per_sample()]. Overwrites grads() with the gradient
  // of the mean loss, which it returns.
  float forward_backward(const float* x, const int32_t* labels, size_t batch,
                         const GradientsFinalHook& on_final = {});

  // Forward only (0 <= batch <= max_batch): summed loss, correct predictions and count, over
  // batch x labels_per_sample() labels.
  EvalResult evaluate(const float* x, const int32_t* labels, size_t batch);

  // Forward only (1 <= batch <= max_batch): the logits, [batch x labels_per_sample() x
  // n_classes()], valid until the next call (e.g. for sampling text from a gpt).
  std::span<const float> logits(const float* x, size_t batch);

  std::string describe() const;  // e.g. "mlp 784-512-512-10 (669706 params)"

 private:
  const float* input_of(size_t layer, const float* x) const {
    return layer == 0 ? x : acts_[layer - 1].data();
  }
  void check_batch(const float* x, const int32_t* labels, size_t batch) const;
  // Points every layer at its slices of params_view_ and grads_view_.
  void bind_layers();

  std::string label_;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<size_t> layer_offsets_;  // where each layer's parameters begin
  SoftmaxCrossEntropy loss_;
  size_t max_batch_;
  std::vector<float> params_;      // the parameter buffer unless placed elsewhere
  std::vector<float> grads_;       // the gradient buffer unless placed elsewhere
  std::span<float> params_view_;   // where the layers' parameter views point
  std::span<float> grads_view_;    // where the layers' gradient views point
  std::vector<std::vector<float>> acts_;   // acts_[i]: output of layer i; the last are logits
  std::vector<std::vector<float>> dacts_;  // dacts_[i]: d loss / d acts_[i]
};

// Builds a model's layers for a spec: input of spec.input_size() floats, last layer a multiple
// of spec.n_classes wide (labels_per_sample() rows of logits). Throws InvalidArgument for a
// spec it cannot build.
using ModelBuilder = std::function<LayerStack(const ModelSpec& spec)>;

// Adds a model to the registry that make_model() and `resync train --model` consult, so that a
// program linking the runtime can train its own model. The built-ins ("mlp", "cnn", "gpt") are
// registered the same way. Call before training starts (e.g. at the top of main()); safe from
// any thread. Throws InvalidArgument for an empty name, a name already taken or an empty builder.
void register_model(const std::string& name, ModelBuilder build);

// The layer list make_model builds for spec, from the registered builder, not yet bound to any
// buffer (layers allocate nothing before a Model binds and reserves them): what device backends
// translate (models/device_plan.h). Throws InvalidArgument as make_model does for the spec.
LayerStack build_layer_stack(const ModelSpec& spec);

// Builds a registered model (see model_names()). An unknown name or a bad spec (zero sizes, empty
// or zero hidden widths) or max_batch == 0 throws InvalidArgument.
std::unique_ptr<Model> make_model(const ModelSpec& spec, size_t max_batch, uint64_t seed);

// Registered model names, built-ins first, then in registration order.
std::vector<std::string> model_names();

}  // namespace resync::models
