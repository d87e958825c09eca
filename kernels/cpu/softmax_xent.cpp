#include "kernels/softmax_xent.h"

#include <fmt/format.h>

#include <cmath>
#include <vector>

#include "base/error.h"
#include "kernels/cpu/simd.h"
#include "kernels/elementwise.h"
#include "kernels/transformer_math.h"

namespace resync::kernels {
namespace {

struct RowMax {
  float value;
  size_t index;  // first maximum: the argmax used for accuracy
};

RESYNC_ALWAYS_INLINE RowMax row_max(const float* row, size_t n_classes) {
  const float value = simd::max(row, n_classes);
  size_t index = 0;
  while (index < n_classes && !(row[index] == value)) ++index;
  return {value, index == n_classes ? 0 : index};
}

// e[c] = exp(z[c] - max) (vectorised: every exponent is <= 0), and their sum.
RESYNC_ALWAYS_INLINE float shifted_exps(const float* z, float z_max, float* e, size_t n_classes) {
  for (size_t c = 0; c < n_classes; ++c) e[c] = exp_nonpositive(z[c] - z_max);
  return simd::sum(e, n_classes);
}

size_t checked_label(const int32_t* labels, size_t r, size_t n_classes) {
  const int32_t label = labels[r];
  RESYNC_CHECK_ARG(
      label >= 0 && static_cast<size_t>(label) < n_classes,
      fmt::format("softmax_xent: label {} of row {} is outside [0, {})", label, r, n_classes));
  return static_cast<size_t>(label);
}

void check_shape(const float* logits, const int32_t* labels, size_t batch, size_t n_classes) {
  RESYNC_CHECK_ARG(n_classes > 0, "softmax_xent: n_classes must be > 0");
  RESYNC_CHECK_ARG(batch == 0 || (logits != nullptr && labels != nullptr),
                   "softmax_xent: logits or labels is null");
}

}  // namespace

RESYNC_VECTOR_CLONES float softmax_xent_forward_backward(const float* logits, const int32_t* labels,
                                                         float* dlogits, size_t batch,
                                                         size_t n_classes, size_t* n_correct) {
  check_shape(logits, labels, batch, n_classes);
  RESYNC_CHECK_ARG(batch > 0, "softmax_xent: the mean loss of an empty batch is undefined");
  RESYNC_CHECK_ARG(dlogits != nullptr, "softmax_xent: dlogits is null");
  const float inv_batch = 1.0f / static_cast<float>(batch);
  double loss_sum = 0;
  size_t correct = 0;
  for (size_t r = 0; r < batch; ++r) {
    const float* z = logits + r * n_classes;
    float* dz = dlogits + r * n_classes;
    const size_t label = checked_label(labels, r, n_classes);
    const RowMax m = row_max(z, n_classes);
    // dz holds the shifted exponentials until the sum is known.
    const float sum = shifted_exps(z, m.value, dz, n_classes);
    // loss = log(sum_c exp(z_c)) - z_label, with the max taken out of both terms.
    loss_sum += static_cast<double>(std::log(sum)) - static_cast<double>(z[label] - m.value);
    const float inv_sum = 1.0f / sum;
    for (size_t c = 0; c < n_classes; ++c) dz[c] = xent_grad(dz[c], inv_sum, c == label, inv_batch);
    correct += m.index == label ? 1 : 0;
  }
  if (n_correct != nullptr) *n_correct = correct;
  return static_cast<float>(loss_sum / static_cast<double>(batch));
}

RESYNC_VECTOR_CLONES XentSums softmax_xent_forward(const float* logits, const int32_t* labels,
                                                   size_t batch, size_t n_classes) {
  check_shape(logits, labels, batch, n_classes);
  XentSums sums;
  std::vector<float> e(n_classes);
  for (size_t r = 0; r < batch; ++r) {
    const float* z = logits + r * n_classes;
    const size_t label = checked_label(labels, r, n_classes);
    const RowMax m = row_max(z, n_classes);
    const float sum = shifted_exps(z, m.value, e.data(), n_classes);
    sums.loss_sum += static_cast<double>(std::log(sum)) - static_cast<double>(z[label] - m.value);
    sums.n_correct += m.index == label ? 1 : 0;
  }
  return sums;
}

}  // namespace resync::kernels
