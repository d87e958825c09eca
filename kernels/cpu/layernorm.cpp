#include "kernels/layernorm.h"

#include "kernels/cpu/simd.h"
#include "kernels/transformer_math.h"

// Rows are a transformer's width (128 in the default gpt): each pass over a row runs on 16-float
// vectors with lane-wise sums in a fixed order.

namespace resync::kernels {

using simd::kLanes;
using simd::load;
using simd::store;
using simd::Vec;

RESYNC_VECTOR_CLONES void layernorm_forward(const float* x, const float* weight, const float* bias,
                                            float* y, float* mean, float* rstd, size_t rows,
                                            size_t cols) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    // Two passes (mean, then squared deviations): no cancellation for rows far from zero.
    const float m = simd::sum(xr, cols) * inv_cols;
    Vec acc{};
    size_t c = 0;
    for (; c + kLanes <= cols; c += kLanes) {
      const Vec d = load(xr + c) - m;
      acc += d * d;
    }
    float sq = simd::hsum(acc);
    for (; c < cols; ++c) {
      const float d = xr[c] - m;
      sq += d * d;
    }
    const float s = layernorm_rstd(sq * inv_cols);
    for (c = 0; c < cols; ++c) yr[c] = layernorm_element(xr[c], m, s, weight[c], bias[c]);
    mean[r] = m;
    rstd[r] = s;
  }
}

RESYNC_VECTOR_CLONES void layernorm_backward_into(const float* dy, const float* x,
                                                  const float* weight, const float* mean,
                                                  const float* rstd, const float* dres, float* dx,
                                                  float* dweight, float* dbias, size_t rows,
                                                  size_t cols) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (size_t r = 0; r < rows; ++r) {
    const float* dyr = dy + r * cols;
    const float* xr = x + r * cols;
    float* dxr = dx + r * cols;
    const float m = mean[r], s = rstd[r];
    // One pass: the row sums of dxhat and dxhat * xhat, and the weight and bias gradients.
    Vec acc_dxhat{}, acc_dxhat_xhat{};
    size_t c = 0;
    for (; c + kLanes <= cols; c += kLanes) {
      const Vec xhat = (load(xr + c) - m) * s;
      const Vec dyv = load(dyr + c);
      const Vec dxhat = dyv * load(weight + c);
      acc_dxhat += dxhat;
      acc_dxhat_xhat += dxhat * xhat;
      store(dweight + c, load(dweight + c) + dyv * xhat);
      store(dbias + c, load(dbias + c) + dyv);
    }
    float sum_dxhat = simd::hsum(acc_dxhat), sum_dxhat_xhat = simd::hsum(acc_dxhat_xhat);
    for (; c < cols; ++c) {
      const float xhat = (xr[c] - m) * s;
      const float dxhat = dyr[c] * weight[c];
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * xhat;
      dweight[c] += dyr[c] * xhat;
      dbias[c] += dyr[c];
    }
    const float mean_dxhat = sum_dxhat * inv_cols;
    const float mean_dxhat_xhat = sum_dxhat_xhat * inv_cols;
    if (dres != nullptr) {
      const float* dr = dres + r * cols;
      for (c = 0; c < cols; ++c) {
        const float xhat = (xr[c] - m) * s;
        dxr[c] = dr[c] + layernorm_dx(dyr[c] * weight[c], xhat, s, mean_dxhat, mean_dxhat_xhat);
      }
    } else {
      for (c = 0; c < cols; ++c) {
        const float xhat = (xr[c] - m) * s;
        dxr[c] = layernorm_dx(dyr[c] * weight[c], xhat, s, mean_dxhat, mean_dxhat_xhat);
      }
    }
  }
}

void layernorm_backward(const float* dy, const float* x, const float* weight, const float* mean,
                        const float* rstd, float* dx, float* dweight, float* dbias, size_t rows,
                        size_t cols) {
  layernorm_backward_into(dy, x, weight, mean, rstd, dx, dx, dweight, dbias, rows, cols);
}

}  // namespace resync::kernels
