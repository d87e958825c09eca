// The CUDA twins of the gpt's layers (models/transformer_layers.h): token + position embedding,
// LayerNorm, the pre-LayerNorm block and the tied output head, over kernels/cuda/transformer.h,
// gemm.h and bias.h. Same math, order of operations and parameter layout as the CPU layers.
// Built with RESYNC_WITH_CUDA only; make_device_layer (device_layers.h) builds them.
#pragma once

#include <cstddef>
#include <memory>

#include "models/cuda/device_layers.h"

namespace resync::models::cuda {

// The twin of a kEmbedding, kLayerNorm, kTransformerBlock or kTiedLmHead plan layer for up to
// max_batch samples, allocating its activations on the current device. A tied head's bind()
// takes the embedding's wte slice (DeviceLayerPlan::tied_offset), not a slice of its own.
std::unique_ptr<DeviceLayer> make_transformer_device_layer(const DeviceLayerPlan& layer,
                                                           size_t max_batch);

}  // namespace resync::models::cuda
