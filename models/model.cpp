#include "models/model.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <utility>

#include "base/error.h"
#include "models/cnn.h"
#include "models/gpt.h"
#include "models/mlp.h"

namespace resync::models {
namespace {

// The registry: the built-ins, then whatever a program registers before it trains. A function-
// local static so that registering from another static initialiser cannot see it unbuilt.
class Registry {
 public:
  static Registry& instance() {
    static Registry registry;
    return registry;
  }

  void add(const std::string& name, ModelBuilder build) {
    RESYNC_CHECK_ARG(!name.empty(), "register_model: empty model name");
    RESYNC_CHECK_ARG(static_cast<bool>(build),
                     fmt::format("register_model: model '{}' has no builder", name));
    const std::lock_guard lock(mutex_);
    for (const auto& entry : entries_) {
      RESYNC_CHECK_ARG(entry.first != name,
                       fmt::format("register_model: model '{}' is already registered", name));
    }
    entries_.emplace_back(name, std::move(build));
  }

  // A copy, so that a builder runs without the lock held (it may itself consult the registry).
  ModelBuilder find(const std::string& name) const {
    const std::lock_guard lock(mutex_);
    for (const auto& entry : entries_) {
      if (entry.first == name) return entry.second;
    }
    return {};
  }

  std::vector<std::string> names() const {
    const std::lock_guard lock(mutex_);
    std::vector<std::string> out;
    for (const auto& entry : entries_) out.push_back(entry.first);
    return out;
  }

 private:
  Registry() {
    add("mlp", &build_mlp);
    add("cnn", &build_cnn);
    add("gpt", &build_gpt);
  }

  mutable std::mutex mutex_;
  std::vector<std::pair<std::string, ModelBuilder>> entries_;
};

// Moves the live buffer `view` into `storage` (checked against the model's other buffer,
// `other`), repoints `view` at it and frees `owned`, the model's own buffer, if that held it.
void move_buffer(const char* what, std::span<float> storage, std::span<const float> other,
                 std::span<float>& view, std::vector<float>& owned) {
  const size_t n_params = view.size();
  RESYNC_CHECK_ARG(storage.size() >= n_params,
                   fmt::format("model: {} storage of {} floats for {} parameters", what,
                               storage.size(), n_params));
  storage = storage.first(n_params);
  RESYNC_CHECK_ARG(!overlap(storage, other),
                   fmt::format("model: {} storage overlaps the model's other buffer", what));
  // memmove: placing again into storage that overlaps the current one is allowed.
  if (n_params > 0 && storage.data() != view.data()) {
    std::memmove(storage.data(), view.data(), view.size_bytes());
  }
  view = storage;
  owned.clear();
  owned.shrink_to_fit();
}

void check_spec(const ModelSpec& spec) {
  RESYNC_CHECK_ARG(spec.in_channels > 0 && spec.in_height > 0 && spec.in_width > 0,
                   fmt::format("model input must be non-empty, got {}x{}x{}", spec.in_channels,
                               spec.in_height, spec.in_width));
  RESYNC_CHECK_ARG(spec.n_classes > 0, "model: number of classes must be > 0");
}

}  // namespace

bool overlap(std::span<const float> a, std::span<const float> b) {
  if (a.empty() || b.empty()) return false;
  const std::less<const float*> before;
  return before(a.data(), b.data() + b.size()) && before(b.data(), a.data() + a.size());
}

Model::Model(LayerStack stack, size_t n_classes, size_t max_batch, uint64_t seed)
    : label_(std::move(stack.label)),
      layers_(std::move(stack.layers)),
      loss_(n_classes),
      max_batch_(max_batch) {
  RESYNC_CHECK_ARG(!layers_.empty(), "model: no layers");
  RESYNC_CHECK_ARG(max_batch_ > 0, "model: max batch must be > 0");
  RESYNC_CHECK_ARG(n_classes > 0 && layers_.back()->out_size() % n_classes == 0,
                   fmt::format("model: last layer has {} outputs for {} classes",
                               layers_.back()->out_size(), n_classes));
  size_t total = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (i > 0) {
      RESYNC_CHECK_ARG(
          layers_[i]->in_size() == layers_[i - 1]->out_size(),
          fmt::format("model: {} cannot follow {}", layers_[i]->name(), layers_[i - 1]->name()));
    }
    total += layers_[i]->n_params();
  }
  params_.assign(total, 0.0f);
  grads_.assign(total, 0.0f);
  params_view_ = params_;
  grads_view_ = grads_;
  bind_layers();

  SplitMix64 rng(seed);
  for (auto& layer : layers_) {
    layer->init(rng);
    layer->reserve(max_batch_);
    acts_.emplace_back(max_batch_ * layer->out_size());
    dacts_.emplace_back(max_batch_ * layer->out_size());
  }
}

void Model::bind_layers() {
  size_t offset = 0;
  layer_offsets_.clear();
  for (auto& layer : layers_) {
    const size_t n = layer->n_params();
    layer_offsets_.push_back(offset);
    layer->bind(params_view_.subspan(offset, n), grads_view_.subspan(offset, n));
    offset += n;
  }
}

void Model::place_gradients(std::span<float> storage) {
  move_buffer("gradient", storage, params_view_, grads_view_, grads_);
  bind_layers();
}

void Model::place_parameters(std::span<float> storage) {
  move_buffer("parameter", storage, grads_view_, params_view_, params_);
  bind_layers();
}

void Model::check_batch(const float* x, const int32_t* labels, size_t batch) const {
  RESYNC_CHECK_ARG(batch <= max_batch_,
                   fmt::format("batch of {} exceeds the model's max batch {}", batch, max_batch_));
  RESYNC_CHECK_ARG(batch == 0 || (x != nullptr && labels != nullptr),
                   "model: inputs or labels are null");
}

float Model::forward_backward(const float* x, const int32_t* labels, size_t batch,
                              const GradientsFinalHook& on_final) {
  check_batch(x, labels, batch);
  RESYNC_CHECK_ARG(batch > 0, "model: empty training batch");
  const size_t n_layers = layers_.size();

  // Forward: each layer reads the previous layer's output; the last one writes the logits.
  for (size_t i = 0; i < n_layers; ++i) {
    layers_[i]->forward(input_of(i, x), acts_[i].data(), batch);
  }
  // Loss over every label (row of logits), and its gradient with respect to the logits.
  const float loss = loss_.forward_backward(acts_.back().data(), labels, dacts_.back().data(),
                                            batch * labels_per_sample());
  // Backward, mirrored: the first layer needs no gradient for the input batch.
  for (size_t i = n_layers; i-- > 0;) {
    float* dx = i == 0 ? nullptr : dacts_[i - 1].data();
    layers_[i]->backward(input_of(i, x), acts_[i].data(), dacts_[i].data(), dx, batch);
    if (on_final) on_final(layer_offsets_[i]);
  }
  return loss;
}

EvalResult Model::evaluate(const float* x, const int32_t* labels, size_t batch) {
  check_batch(x, labels, batch);
  EvalResult result;
  result.count = batch * labels_per_sample();
  if (batch == 0) return result;
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->forward(input_of(i, x), acts_[i].data(), batch);
  }
  result.loss_sum =
      loss_.loss_sum(acts_.back().data(), labels, result.count, &result.correct);
  return result;
}

std::span<const float> Model::logits(const float* x, size_t batch) {
  RESYNC_CHECK_ARG(batch > 0 && batch <= max_batch_ && x != nullptr,
                   fmt::format("model: logits of a batch of {} (max {})", batch, max_batch_));
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->forward(input_of(i, x), acts_[i].data(), batch);
  }
  return {acts_.back().data(), batch * layers_.back()->out_size()};
}

std::string Model::describe() const { return fmt::format("{} ({} params)", label_, n_params()); }

LayerStack build_layer_stack(const ModelSpec& spec) {
  check_spec(spec);
  const ModelBuilder build = Registry::instance().find(spec.name);
  if (!build) {
    throw InvalidArgument(
        fmt::format("unknown model '{}' (known: {})", spec.name, fmt::join(model_names(), ", ")));
  }
  return build(spec);
}

std::unique_ptr<Model> make_model(const ModelSpec& spec, size_t max_batch, uint64_t seed) {
  check_spec(spec);  // before max_batch, so that errors keep their order
  RESYNC_CHECK_ARG(max_batch > 0, "model: max batch must be > 0");
  return std::make_unique<Model>(build_layer_stack(spec), spec.n_classes, max_batch, seed);
}

void register_model(const std::string& name, ModelBuilder build) {
  Registry::instance().add(name, std::move(build));
}

std::vector<std::string> model_names() { return Registry::instance().names(); }

}  // namespace resync::models
