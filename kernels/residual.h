// The residual connection of a transformer block: out = a + b over a flat buffer, and the
// accumulation of a gradient into another (the backward of a sum sends dy to both inputs).
#pragma once

#include <cstddef>

namespace resync::kernels {

// out[i] = a[i] + b[i]. out may alias a or b.
void residual_forward(const float* a, const float* b, float* out, size_t n);

// acc[i] += d[i].
void residual_accumulate(float* acc, const float* d, size_t n);

}  // namespace resync::kernels
