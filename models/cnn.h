// The "cnn" model, LeNet-style: two [conv 5x5 pad 2, ReLU, maxpool 2x2] stages, then Flatten,
// Linear, ReLU and a Linear to the class logits.
#pragma once

#include "models/model.h"

namespace resync::models {

// For a C x H x W input (1x28x28 on Fashion-MNIST):
//   conv 5x5 C->16 pad 2, relu, maxpool 2x2/2   -> 16 x H/2 x W/2
//   conv 5x5 16->32 pad 2, relu, maxpool 2x2/2  -> 32 x H/4 x W/4   (floor division)
//   flatten, linear ->128, relu, linear 128->n_classes
// The widths are fixed: spec.hidden describes the mlp and is ignored (its default {512, 512}
// would make the first linear layer 4x larger for no accuracy gain). H and W must be >= 4 so
// that both pools have a window to take. Throws InvalidArgument otherwise.
LayerStack build_cnn(const ModelSpec& spec);

}  // namespace resync::models
