#include "models/mlp.h"

#include <fmt/format.h>

#include "base/error.h"

namespace resync::models {

LayerStack build_mlp(const ModelSpec& spec) {
  RESYNC_CHECK_ARG(!spec.hidden.empty(), "mlp: needs at least one hidden layer");
  LayerStack stack;
  stack.label = fmt::format("mlp {}", spec.input_size());
  size_t width = spec.input_size();
  for (const size_t h : spec.hidden) {
    RESYNC_CHECK_ARG(h > 0, "mlp: hidden layer widths must be > 0");
    stack.layers.push_back(std::make_unique<Linear>(width, h));
    stack.layers.push_back(std::make_unique<Relu>(h));
    stack.label += fmt::format("-{}", h);
    width = h;
  }
  stack.layers.push_back(std::make_unique<Linear>(width, spec.n_classes));
  stack.label += fmt::format("-{}", spec.n_classes);
  return stack;
}

}  // namespace resync::models
