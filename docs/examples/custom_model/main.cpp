// custom_model: a model defined outside resync (one hidden layer with tanh), trained by the resync
// runtime. main() registers it under the name "tanh-net" and hands the command line to resync,
// so `custom_model train --model tanh-net ...` behaves like `resync train` (and `mlp`/`cnn` still
// work).
#include <cmath>
#include <memory>
#include <string>

#include "base/error.h"
#include "models/layer.h"
#include "models/layers.h"
#include "models/model.h"
#include "runtime/io/cli.h"

namespace {

namespace models = resync::models;

// y = tanh(x), elementwise. No parameters, so it needs no bind/init: a model's parameters are the
// ones its layers ask for (here, only the two Linear layers').
class Tanh final : public models::Layer {
 public:
  explicit Tanh(size_t size) : size_(size) {}

  std::string name() const override { return "tanh " + std::to_string(size_); }
  size_t in_size() const override { return size_; }
  size_t out_size() const override { return size_; }

  void forward(const float* x, float* y, size_t batch) override {
    for (size_t i = 0; i < batch * size_; ++i) y[i] = std::tanh(x[i]);
  }

  // tanh' = 1 - tanh^2: the saved output is all the backward pass needs.
  void backward(const float* /*x*/, const float* y, const float* dy, float* dx,
                size_t batch) override {
    if (dx == nullptr) return;
    for (size_t i = 0; i < batch * size_; ++i) dx[i] = dy[i] * (1.0f - y[i] * y[i]);
  }

 private:
  size_t size_;
};

// input -> linear -> tanh -> linear -> n_classes logits; the width is the first --hidden value.
// The runtime adds the softmax cross-entropy loss and averages the gradients across ranks.
models::LayerStack build_tanh_net(const models::ModelSpec& spec) {
  RESYNC_CHECK_ARG(!spec.hidden.empty() && spec.hidden.front() > 0,
                   "tanh-net: needs a hidden width (--hidden N)");
  const size_t width = spec.hidden.front();
  models::LayerStack stack;
  stack.label = "tanh-net " + std::to_string(spec.input_size()) + "-" + std::to_string(width) +
                "-" + std::to_string(spec.n_classes);
  stack.layers.push_back(std::make_unique<models::Linear>(spec.input_size(), width));
  stack.layers.push_back(std::make_unique<Tanh>(width));
  stack.layers.push_back(std::make_unique<models::Linear>(width, spec.n_classes));
  return stack;
}

}  // namespace

int main(int argc, char** argv) {
  models::register_model("tanh-net", &build_tanh_net);
  return resync::runtime::run_cli(argc, argv);
}
