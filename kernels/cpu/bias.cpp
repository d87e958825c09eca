#include "kernels/bias.h"

#include <algorithm>

namespace resync::kernels {

void bias_add(float* y, const float* bias, size_t rows, size_t cols) {
  for (size_t r = 0; r < rows; ++r) {
    float* row = y + r * cols;
    for (size_t c = 0; c < cols; ++c) row[c] += bias[c];
  }
}

void bias_grad(const float* dy, float* dbias, size_t rows, size_t cols) {
  std::fill(dbias, dbias + cols, 0.0f);
  // Row by row (not column by column) keeps the reads contiguous and the inner loop vectorised.
  for (size_t r = 0; r < rows; ++r) {
    const float* row = dy + r * cols;
    for (size_t c = 0; c < cols; ++c) dbias[c] += row[c];
  }
}

}  // namespace resync::kernels
