// Each layer's backward against central finite differences of its forward.
#include "models/layers.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "base/error.h"
#include "tests/models/grad_check.h"

namespace resync::models {
namespace {

using testing::expect_grad_matches;
using testing::random_floats;

// L = sum_i y_i * r_i, so dL/dy = r: probes every output with a different weight.
double weighted_sum(const std::vector<float>& y, const std::vector<float>& r) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += double(y[i]) * double(r[i]);
  return s;
}

TEST(LinearLayer, BackwardMatchesFiniteDifferences) {
  struct Shape {
    size_t in, out, batch;
  };
  for (const auto [in, out, batch] : {Shape{5, 3, 4}, Shape{1, 1, 1}, Shape{7, 2, 3}}) {
    Linear layer(in, out);
    std::vector<float> params(layer.n_params()), grads(layer.n_params());
    layer.bind(params, grads);
    SplitMix64 rng(1);
    layer.init(rng);
    auto x = random_floats(batch * in, 2);
    const auto r = random_floats(batch * out, 3);
    std::vector<float> y(batch * out), dx(batch * in);
    const auto loss = [&] {
      layer.forward(x.data(), y.data(), batch);
      return weighted_sum(y, r);
    };
    loss();
    layer.backward(x.data(), y.data(), r.data(), dx.data(), batch);
    // Linear in every variable: only float rounding of the loss (~1e-6) over 2 eps = 2e-2.
    const std::string shape = fmt::format("[{}->{} x{}]", in, out, batch);
    expect_grad_matches("linear dW,db " + shape, params, grads, loss, 1e-2f, 1e-3, 1e-3);
    expect_grad_matches("linear dx " + shape, x, dx, loss, 1e-2f, 1e-3, 1e-3);
  }
}

TEST(LinearLayer, BiasLayoutAndInitBounds) {
  const size_t in = 16, out = 4;
  Linear layer(in, out);
  std::vector<float> params(layer.n_params()), grads(layer.n_params());
  layer.bind(params, grads);
  SplitMix64 rng(7);
  layer.init(rng);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_LE(std::fabs(params[i]), 0.25f) << "param " << i << " outside U(-1/sqrt(16), ..)";
  }
  // With x = 0 the output is the bias, stored after the [out x in] weights.
  std::vector<float> x(in, 0.0f), y(out);
  layer.forward(x.data(), y.data(), 1);
  for (size_t o = 0; o < out; ++o) EXPECT_EQ(y[o], params[out * in + o]) << "output " << o;
  EXPECT_THROW(Linear(0, 3), InvalidArgument);
}

TEST(ReluLayer, BackwardMatchesFiniteDifferences) {
  const size_t size = 9, batch = 3;
  Relu layer(size);
  auto x = random_floats(size * batch, 4);
  for (auto& v : x) {
    if (std::fabs(v) < 0.05f) v = 0.5f;  // keep finite differences away from the kink
  }
  const auto r = random_floats(size * batch, 5);
  std::vector<float> y(size * batch), dx(size * batch);
  const auto loss = [&] {
    layer.forward(x.data(), y.data(), batch);
    return weighted_sum(y, r);
  };
  loss();
  layer.backward(x.data(), y.data(), r.data(), dx.data(), batch);
  expect_grad_matches("relu dx", x, dx, loss, 1e-2f, 1e-4, 1e-4);
}

TEST(SoftmaxCrossEntropyLoss, BackwardMatchesFiniteDifferences) {
  const size_t n_classes = 5, batch = 4;
  SoftmaxCrossEntropy xent(n_classes);
  auto logits = random_floats(n_classes * batch, 6, -3.0f, 3.0f);
  const std::vector<int32_t> labels = {0, 4, 2, 2};
  std::vector<float> dlogits(logits.size());
  const auto loss = [&] {
    return xent.loss_sum(logits.data(), labels.data(), batch, nullptr) / double(batch);
  };
  const float mean = xent.forward_backward(logits.data(), labels.data(), dlogits.data(), batch);
  EXPECT_NEAR(mean, loss(), 1e-6);
  // Smooth: central differences err by O(eps^2) ~ 1e-5, plus float rounding of the loss.
  expect_grad_matches("softmax-xent dlogits", logits, dlogits, loss, 1e-2f, 1e-4, 1e-2);
}

}  // namespace
}  // namespace resync::models
