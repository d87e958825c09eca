// Fused softmax cross-entropy against a double-precision reference; stability on huge logits.
#include "kernels/softmax_xent.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "base/error.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::random_floats;

struct Reference {
  std::vector<double> dlogits;
  double loss_sum = 0;
  size_t correct = 0;
};

Reference reference(const std::vector<float>& z, const std::vector<int32_t>& labels, size_t batch,
                    size_t n_classes) {
  Reference ref;
  ref.dlogits.resize(batch * n_classes);
  for (size_t r = 0; r < batch; ++r) {
    const float* row = &z[r * n_classes];
    const size_t argmax = std::max_element(row, row + n_classes) - row;  // first maximum
    const double mx = row[argmax];
    double sum = 0;
    for (size_t c = 0; c < n_classes; ++c) sum += std::exp(double(row[c]) - mx);
    const size_t label = static_cast<size_t>(labels[r]);
    ref.loss_sum += std::log(sum) - (double(row[label]) - mx);
    for (size_t c = 0; c < n_classes; ++c) {
      const double p = std::exp(double(row[c]) - mx) / sum;
      ref.dlogits[r * n_classes + c] = (p - (c == label ? 1.0 : 0.0)) / double(batch);
    }
    ref.correct += argmax == label ? 1 : 0;
  }
  return ref;
}

std::vector<int32_t> make_labels(size_t batch, size_t n_classes, uint64_t seed) {
  const auto u = random_floats(batch, seed, 0.0f, 1.0f);
  std::vector<int32_t> labels(batch);
  for (size_t r = 0; r < batch; ++r) {
    labels[r] = static_cast<int32_t>(std::min<size_t>(n_classes - 1, size_t(u[r] * n_classes)));
  }
  return labels;
}

void check(size_t batch, size_t n_classes, float scale) {
  auto z = random_floats(batch * n_classes, batch * 31 + n_classes, -scale, scale);
  auto labels = make_labels(batch, n_classes, batch + n_classes);
  // Make some rows predict their label so the accuracy count is exercised both ways.
  for (size_t r = 0; r < batch; r += 2) z[r * n_classes + labels[r]] = 2 * scale;
  const Reference ref = reference(z, labels, batch, n_classes);

  std::vector<float> dz(batch * n_classes);
  size_t correct = 0;
  const float mean =
      softmax_xent_forward_backward(z.data(), labels.data(), dz.data(), batch, n_classes, &correct);
  const XentSums sums = softmax_xent_forward(z.data(), labels.data(), batch, n_classes);

  // Tolerances: float exp/log on max-subtracted inputs give ~1e-6 relative per row.
  const double ref_mean = ref.loss_sum / double(batch);
  EXPECT_NEAR(mean, ref_mean, 1e-5 * (1 + std::fabs(ref_mean)))
      << "batch " << batch << " classes " << n_classes << " scale " << scale;
  EXPECT_NEAR(sums.loss_sum, ref.loss_sum, 1e-5 * (1 + std::fabs(ref.loss_sum)));
  EXPECT_EQ(correct, ref.correct);
  EXPECT_EQ(sums.n_correct, ref.correct);
  for (size_t i = 0; i < dz.size(); ++i) {
    ASSERT_TRUE(std::isfinite(dz[i])) << "dlogits[" << i << "] = " << dz[i];
    ASSERT_NEAR(dz[i], ref.dlogits[i], 1e-6 / double(batch) + 1e-6 * std::fabs(ref.dlogits[i]))
        << "dlogits[" << i << "] batch " << batch << " classes " << n_classes << " scale " << scale;
  }
}

TEST(SoftmaxXent, MatchesDoubleReference) {
  check(1, 1, 1.0f);
  check(1, 10, 1.0f);
  check(3, 7, 3.0f);
  check(64, 10, 5.0f);
  check(5, 1000, 2.0f);
}

TEST(SoftmaxXent, HugeLogitsStayFinite) {
  check(16, 10, 1e4f);
  // A row of equal huge logits: uniform softmax, loss log(n), argmax = first class.
  const size_t n = 10;
  std::vector<float> z(n, 1e4f), dz(n);
  std::vector<int32_t> label = {0};
  size_t correct = 0;
  const float loss =
      softmax_xent_forward_backward(z.data(), label.data(), dz.data(), 1, n, &correct);
  EXPECT_NEAR(loss, std::log(10.0), 1e-6);
  EXPECT_EQ(correct, 1u);
  // And a confidently wrong huge row: the loss is the logit gap, exactly representable.
  std::vector<float> w = {-1e4f, 1e4f};
  std::vector<float> dw(2);
  EXPECT_EQ(softmax_xent_forward_backward(w.data(), label.data(), dw.data(), 1, 2), 2e4f);
  EXPECT_EQ(dw[0], -1.0f);
  EXPECT_EQ(dw[1], 1.0f);
}

TEST(SoftmaxXent, GradientRowsSumToZero) {
  const size_t batch = 8, n = 10;
  const auto z = random_floats(batch * n, 99, -4, 4);
  const auto labels = make_labels(batch, n, 5);
  std::vector<float> dz(batch * n);
  softmax_xent_forward_backward(z.data(), labels.data(), dz.data(), batch, n);
  for (size_t r = 0; r < batch; ++r) {
    double s = 0;
    for (size_t c = 0; c < n; ++c) s += dz[r * n + c];
    EXPECT_NEAR(s, 0.0, 1e-7) << "row " << r;
  }
}

TEST(SoftmaxXent, RejectsBadLabelsAndEmptyTrainingBatch) {
  std::vector<float> z(6), dz(6);
  for (const int32_t bad : {-1, 3, 1000}) {
    std::vector<int32_t> labels = {0, bad};
    EXPECT_THROW(softmax_xent_forward_backward(z.data(), labels.data(), dz.data(), 2, 3),
                 InvalidArgument)
        << "label " << bad;
    EXPECT_THROW(softmax_xent_forward(z.data(), labels.data(), 2, 3), InvalidArgument)
        << "label " << bad;
  }
  std::vector<int32_t> ok = {0, 2};
  EXPECT_THROW(softmax_xent_forward_backward(z.data(), ok.data(), dz.data(), 0, 3),
               InvalidArgument);
  const XentSums empty = softmax_xent_forward(z.data(), ok.data(), 0, 3);
  EXPECT_EQ(empty.loss_sum, 0.0);
  EXPECT_EQ(empty.n_correct, 0u);
}

}  // namespace
}  // namespace resync::kernels
