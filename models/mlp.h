// The "mlp" model: [Linear, ReLU] per hidden width, then a Linear to the class logits.
#pragma once

#include "models/model.h"

namespace resync::models {

// Throws InvalidArgument if spec.hidden is empty or holds a zero width.
LayerStack build_mlp(const ModelSpec& spec);

}  // namespace resync::models
