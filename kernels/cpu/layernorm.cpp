#include "kernels/layernorm.h"

#include "kernels/transformer_math.h"

namespace resync::kernels {

void layernorm_forward(const float* x, const float* weight, const float* bias, float* y,
                       float* mean, float* rstd, size_t rows, size_t cols) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    // Two passes (mean, then squared deviations): no cancellation for rows far from zero.
    float sum = 0.0f;
    for (size_t c = 0; c < cols; ++c) sum += xr[c];
    const float m = sum * inv_cols;
    float sq = 0.0f;
    for (size_t c = 0; c < cols; ++c) {
      const float d = xr[c] - m;
      sq += d * d;
    }
    const float s = layernorm_rstd(sq * inv_cols);
    for (size_t c = 0; c < cols; ++c) yr[c] = layernorm_element(xr[c], m, s, weight[c], bias[c]);
    mean[r] = m;
    rstd[r] = s;
  }
}

void layernorm_backward(const float* dy, const float* x, const float* weight, const float* mean,
                        const float* rstd, float* dx, float* dweight, float* dbias, size_t rows,
                        size_t cols) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (size_t r = 0; r < rows; ++r) {
    const float* dyr = dy + r * cols;
    const float* xr = x + r * cols;
    float* dxr = dx + r * cols;
    const float m = mean[r], s = rstd[r];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
    for (size_t c = 0; c < cols; ++c) {
      const float xhat = (xr[c] - m) * s;
      const float dxhat = dyr[c] * weight[c];
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * xhat;
      dweight[c] += dyr[c] * xhat;
      dbias[c] += dyr[c];
    }
    const float mean_dxhat = sum_dxhat * inv_cols;
    const float mean_dxhat_xhat = sum_dxhat_xhat * inv_cols;
    for (size_t c = 0; c < cols; ++c) {
      const float xhat = (xr[c] - m) * s;
      dxr[c] += layernorm_dx(dyr[c] * weight[c], xhat, s, mean_dxhat, mean_dxhat_xhat);
    }
  }
}

}  // namespace resync::kernels
