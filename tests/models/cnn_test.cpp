// Conv2d, MaxPool2d and Flatten layers against finite differences, and the "cnn" model: whole-
// model gradient check, registry, deterministic init, training on a tiny problem, step time.
#include "models/cnn.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "kernels/gemm.h"
#include "kernels/sgd.h"
#include "models/conv_layers.h"
#include "models/model.h"
#include "tests/models/grad_check.h"

namespace resync::models {
namespace {

using kernels::Conv2dShape;
using kernels::ConvLowering;
using kernels::Pool2dShape;
using testing::expect_grad_matches;
using testing::random_floats;

// L = sum_i y_i * r_i, so dL/dy = r: probes every output with a different weight.
double weighted_sum(const std::vector<float>& y, const std::vector<float>& r) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += double(y[i]) * double(r[i]);
  return s;
}

std::vector<int32_t> cyclic_labels(size_t batch, size_t n_classes) {
  std::vector<int32_t> labels(batch);
  for (size_t i = 0; i < batch; ++i) labels[i] = static_cast<int32_t>((i * 7 + 1) % n_classes);
  return labels;
}

// Finite differences robust to kinks. ReLU and max are piecewise linear, and a cnn of ~18k
// parameters nearly always has some ReLU input or max tie within 1e-3 of moving for some
// parameter: the central difference across such a kink is an average of two slopes, while
// backward returns the slope of the piece holding the current value. So an element passes if the
// analytic gradient matches the central difference at eps or at eps/10, or one of the one-sided
// differences at eps (the side without the kink). A wrong gradient matches none of them.
void expect_grad_matches_piecewise(const std::string& what, std::span<float> v,
                                   std::span<const float> analytic,
                                   const std::function<double()>& loss, float eps, double abs_tol,
                                   double rel_tol) {
  ASSERT_EQ(v.size(), analytic.size()) << what;
  const double l0 = loss();
  struct Diffs {
    double central, forward, backward;
  };
  const auto diffs = [&](size_t i, float h) {
    const float saved = v[i];
    const float plus = saved + h, minus = saved - h;
    v[i] = plus;
    const double l_plus = loss();
    v[i] = minus;
    const double l_minus = loss();
    v[i] = saved;
    return Diffs{(l_plus - l_minus) / (double(plus) - double(minus)),
                 (l_plus - l0) / (double(plus) - double(saved)),
                 (l0 - l_minus) / (double(saved) - double(minus))};
  };
  const auto close = [&](size_t i, double numeric) {
    return std::fabs(analytic[i] - numeric) <= abs_tol + rel_tol * std::fabs(numeric);
  };
  size_t n_bad = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    const Diffs d = diffs(i, eps);
    if (close(i, d.central)) continue;
    const Diffs fine = diffs(i, eps / 10);
    if (close(i, fine.central) || close(i, d.forward) || close(i, d.backward)) continue;
    if (++n_bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "]: expected (finite differences at eps " << eps
                    << ": central " << d.central << ", forward " << d.forward << ", backward "
                    << d.backward << "; central at eps/10 " << fine.central
                    << "), actual (backward) " << analytic[i];
    }
  }
  EXPECT_EQ(n_bad, 0u) << what << ": " << n_bad << " of " << v.size() << " elements differ";
}

TEST(Conv2dLayer, BackwardMatchesFiniteDifferences) {
  struct Case {
    Conv2dShape s;
    size_t batch;
  };
  const Case cases[] = {
      {{.in_c = 2, .in_h = 5, .in_w = 4, .out_c = 3, .k_h = 3, .k_w = 3, .pad_h = 1, .pad_w = 1},
       2},
      {{.in_c = 1, .in_h = 6, .in_w = 7, .out_c = 2, .k_h = 3, .k_w = 2, .stride_h = 2,
        .stride_w = 1, .pad_h = 0, .pad_w = 1},
       3},
      {{.in_c = 3, .in_h = 5, .in_w = 5, .out_c = 2, .k_h = 2, .k_w = 3, .stride_h = 2,
        .stride_w = 2, .pad_h = 1, .pad_w = 2},
       1},
  };
  for (const auto& [s, batch] : cases) {
    for (const ConvLowering lowering : {ConvLowering::kPerSample, ConvLowering::kBatched}) {
      Conv2d layer(s, lowering);
      std::vector<float> params(layer.n_params()), grads(layer.n_params());
      layer.bind(params, grads);
      SplitMix64 rng(1);
      layer.init(rng);
      layer.reserve(batch);
      auto x = random_floats(batch * layer.in_size(), 2);
      const auto r = random_floats(batch * layer.out_size(), 3);
      std::vector<float> y(batch * layer.out_size()), dx(batch * layer.in_size());
      const auto loss = [&] {
        layer.forward(x.data(), y.data(), batch);
        return weighted_sum(y, r);
      };
      loss();
      layer.backward(x.data(), y.data(), r.data(), dx.data(), batch);
      // Linear in every variable: only float rounding of the loss (~1e-6) over 2 eps = 2e-2.
      const std::string what = layer.name() + " batch " + std::to_string(batch) +
                               (lowering == ConvLowering::kPerSample ? " per-sample" : " batched");
      expect_grad_matches(what + " dW,db", params, grads, loss, 1e-2f, 1e-3, 1e-3);
      expect_grad_matches(what + " dx", x, dx, loss, 1e-2f, 1e-3, 1e-3);
    }
  }
}

TEST(Conv2dLayer, LayoutInitBoundsAndName) {
  const Conv2dShape s{.in_c = 4, .in_h = 6, .in_w = 6, .out_c = 3, .k_h = 3, .k_w = 3,
                      .stride_h = 1, .stride_w = 1, .pad_h = 1, .pad_w = 1};
  Conv2d layer(s);
  EXPECT_EQ(layer.name(), "conv 3x3 4->3 pad 1 (6x6->6x6)");
  EXPECT_EQ(layer.n_params(), 3u * 4 * 9 + 3);
  std::vector<float> params(layer.n_params()), grads(layer.n_params());
  layer.bind(params, grads);
  SplitMix64 rng(7);
  layer.init(rng);
  layer.reserve(1);
  const float bound = 1.0f / 6.0f;  // 1/sqrt(fan_in), fan_in = 4 * 3 * 3
  float max_abs = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    ASSERT_LE(std::fabs(params[i]), bound) << "param " << i << " outside U(-1/6, 1/6)";
    max_abs = std::max(max_abs, std::fabs(params[i]));
  }
  EXPECT_GT(max_abs, 0.8f * bound) << "init does not span its range";
  // With x = 0 every output pixel of channel c is the bias b[c], stored after the weights.
  std::vector<float> x(layer.in_size(), 0.0f), y(layer.out_size());
  layer.forward(x.data(), y.data(), 1);
  for (size_t i = 0; i < y.size(); ++i) {
    ASSERT_EQ(y[i], params[s.n_weights() + i / 36]) << "output " << i;
  }
  EXPECT_EQ(Conv2d({.in_c = 1, .in_h = 9, .in_w = 8, .out_c = 2, .k_h = 3, .k_w = 2,
                    .stride_h = 2, .stride_w = 3, .pad_h = 0, .pad_w = 1})
                .name(),
            "conv 3x2 1->2 stride 2x3 pad 0x1 (9x8->4x3)");
  EXPECT_THROW(Conv2d({.in_c = 1, .in_h = 2, .in_w = 2, .out_c = 1, .k_h = 3, .k_w = 3}),
               InvalidArgument);
  // Forward beyond the reserved batch is refused, not a buffer overrun.
  std::vector<float> x2(2 * layer.in_size()), y2(2 * layer.out_size());
  EXPECT_THROW(Conv2d(s, ConvLowering::kBatched).forward(x2.data(), y2.data(), 2),
               InvalidArgument);
}

TEST(MaxPoolLayer, BackwardMatchesFiniteDifferences) {
  // 7x5 input with 2x2/2 pooling: the last row and column are dropped (gradient 0), and
  // distinct values 0.01 apart keep the argmax fixed under perturbations of 1e-3.
  const size_t batch = 2;
  MaxPool2d layer({.channels = 2, .in_h = 7, .in_w = 5});
  EXPECT_EQ(layer.name(), "maxpool 2x2/2 2x7x5->2x3x2");
  layer.reserve(batch);
  const size_t n = batch * layer.in_size();  // 70, coprime with 31
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = 0.01f * static_cast<float>((i * 31) % n) - 0.3f;
  const auto r = random_floats(batch * layer.out_size(), 5);
  std::vector<float> y(batch * layer.out_size()), dx(n);
  const auto loss = [&] {
    layer.forward(x.data(), y.data(), batch);
    return weighted_sum(y, r);
  };
  loss();
  layer.backward(x.data(), y.data(), r.data(), dx.data(), batch);
  expect_grad_matches("maxpool dx", x, dx, loss, 1e-3f, 1e-4, 1e-3);
  for (size_t c = 0; c < batch * 2; ++c) {
    for (size_t w = 0; w < 5; ++w) EXPECT_EQ(dx[c * 35 + 6 * 5 + w], 0.0f) << "dropped row";
    for (size_t h = 0; h < 7; ++h) EXPECT_EQ(dx[c * 35 + h * 5 + 4], 0.0f) << "dropped column";
  }
  EXPECT_THROW(layer.forward(x.data(), y.data(), batch + 1), InvalidArgument);
}

TEST(FlattenLayer, CopiesBothWays) {
  Flatten layer(2, 3, 2);
  EXPECT_EQ(layer.name(), "flatten 2x3x2->12");
  EXPECT_EQ(layer.in_size(), 12u);
  EXPECT_EQ(layer.out_size(), 12u);
  const auto x = random_floats(24, 6);
  const auto dy = random_floats(24, 7);
  std::vector<float> y(24), dx(24);
  layer.forward(x.data(), y.data(), 2);
  layer.backward(x.data(), y.data(), dy.data(), dx.data(), 2);
  EXPECT_EQ(y, x);
  EXPECT_EQ(dx, dy);
  EXPECT_THROW(Flatten(0, 1, 1), InvalidArgument);
}

ModelSpec cnn_spec(size_t channels, size_t height, size_t width, size_t n_classes) {
  ModelSpec spec;
  spec.name = "cnn";
  spec.in_channels = channels;
  spec.in_height = height;
  spec.in_width = width;
  spec.n_classes = n_classes;
  return spec;
}

TEST(Cnn, DescribeAndRegistry) {
  const auto model = make_model(cnn_spec(1, 28, 28, 10), 64, 1);
  // conv 1->16: 400 + 16; conv 16->32: 12800 + 32; linear 1568->128; linear 128->10.
  EXPECT_EQ(model->n_params(), 416u + 12832u + (1568u * 128 + 128) + (128u * 10 + 10));
  EXPECT_EQ(model->describe(), "cnn 1x28x28-c16-c32-128-10 (215370 params)");
  EXPECT_EQ(model->input_size(), 784u);
  EXPECT_EQ(model->n_classes(), 10u);
  const auto names = model_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "cnn"), names.end());

  const LayerStack stack = build_cnn(cnn_spec(1, 28, 28, 10));
  std::vector<std::string> layer_names;
  for (const auto& layer : stack.layers) layer_names.push_back(layer->name());
  const std::vector<std::string> expected = {
      "conv 5x5 1->16 pad 2 (28x28->28x28)", "relu 12544", "maxpool 2x2/2 16x28x28->16x14x14",
      "conv 5x5 16->32 pad 2 (14x14->14x14)", "relu 6272", "maxpool 2x2/2 32x14x14->32x7x7",
      "flatten 32x7x7->1568", "linear 1568->128", "relu 128", "linear 128->10"};
  EXPECT_EQ(layer_names, expected);

  // spec.hidden belongs to the mlp and does not change the cnn.
  ModelSpec other = cnn_spec(1, 28, 28, 10);
  other.hidden = {7};
  EXPECT_EQ(make_model(other, 1, 1)->n_params(), model->n_params());
}

TEST(Cnn, OtherInputShapesAndRejectsTooSmall) {
  const auto rgb = make_model(cnn_spec(3, 32, 30, 4), 2, 1);
  EXPECT_EQ(rgb->input_size(), 3u * 32 * 30);
  EXPECT_EQ(rgb->describe(), "cnn 3x32x30-c16-c32-128-4 (" +
                                 std::to_string(1216 + 12832 + 32 * 8 * 7 * 128 + 128 + 516) +
                                 " params)");
  EXPECT_NO_THROW(make_model(cnn_spec(1, 4, 5, 2), 2, 1));  // pools to 1x1
  EXPECT_THROW(make_model(cnn_spec(1, 3, 28, 2), 2, 1), InvalidArgument);
  EXPECT_THROW(make_model(cnn_spec(1, 28, 3, 2), 2, 1), InvalidArgument);
}

TEST(Cnn, InitIsDeterministicAndLayerBounded) {
  const ModelSpec spec = cnn_spec(1, 28, 28, 10);
  const auto a = make_model(spec, 2, 42);
  const auto b = make_model(spec, 2, 42);
  const auto c = make_model(spec, 2, 43);
  ASSERT_EQ(std::memcmp(a->params().data(), b->params().data(), a->n_params() * sizeof(float)), 0)
      << "same seed must give bitwise-identical parameters";
  size_t n_same = 0;
  for (size_t i = 0; i < a->n_params(); ++i) n_same += a->params()[i] == c->params()[i] ? 1 : 0;
  EXPECT_LT(n_same, a->n_params() / 100) << "seeds 42 and 43 give nearly the same parameters";
  // Layout: layer after layer, weights then bias, each U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  const size_t sizes[] = {416, 12832, 1568 * 128 + 128, 128 * 10 + 10};
  const double fan_in[] = {25, 400, 1568, 128};
  size_t offset = 0;
  for (int l = 0; l < 4; ++l) {
    const float bound = static_cast<float>(1.0 / std::sqrt(fan_in[l]));
    float max_abs = 0;
    for (size_t i = offset; i < offset + sizes[l]; ++i) {
      max_abs = std::max(max_abs, std::fabs(a->params()[i]));
    }
    EXPECT_LE(max_abs, bound) << "parametrised layer " << l;
    EXPECT_GT(max_abs, 0.9f * bound) << "parametrised layer " << l << " does not span its range";
    offset += sizes[l];
  }
  EXPECT_EQ(offset, a->n_params());
}

TEST(Cnn, WholeModelBackwardMatchesFiniteDifferences) {
  // 1x5x4 input: conv 16x5x4, pool 16x2x2 (the odd last row is dropped), conv 32x2x2, pool
  // 32x1x1, then 32 -> 128 -> 3. Every one of the 17859 parameters is checked.
  const size_t batch = 2;
  const auto model = make_model(cnn_spec(1, 5, 4, 3), batch, 3);
  const auto x = random_floats(batch * model->input_size(), 11, 0.0f, 1.0f);
  const auto labels = cyclic_labels(batch, model->n_classes());
  std::fill(model->grads().begin(), model->grads().end(), std::numeric_limits<float>::quiet_NaN());
  const float loss = model->forward_backward(x.data(), labels.data(), batch);
  for (size_t i = 0; i < model->n_params(); ++i) {
    ASSERT_TRUE(std::isfinite(model->grads()[i])) << "grad " << i << " was not written";
  }
  const std::vector<float> analytic(model->grads().begin(), model->grads().end());
  const auto mean_loss = [&] {
    return model->evaluate(x.data(), labels.data(), batch).loss_sum / double(batch);
  };
  EXPECT_NEAR(loss, mean_loss(), 1e-6);
  // Kinks within eps of the current parameters are told apart from errors by the piecewise
  // check; with this seed every element passes (so do seeds 1-9, checked when written).
  expect_grad_matches_piecewise("cnn params", model->params(), analytic, mean_loss, 1e-3f, 2e-4,
                                1e-2);
}

TEST(Cnn, GradsAreOverwrittenNotAccumulatedAndEvaluateAgrees) {
  const size_t batch = 5;
  const auto model = make_model(cnn_spec(1, 9, 7, 4), batch, 5);
  const auto x = random_floats(batch * model->input_size(), 12, 0.0f, 1.0f);
  const auto labels = cyclic_labels(batch, model->n_classes());
  const float loss1 = model->forward_backward(x.data(), labels.data(), batch);
  const std::vector<float> g1(model->grads().begin(), model->grads().end());
  const float loss2 = model->forward_backward(x.data(), labels.data(), batch);
  EXPECT_EQ(loss1, loss2);
  for (size_t i = 0; i < g1.size(); ++i) ASSERT_EQ(model->grads()[i], g1[i]) << "grad " << i;
  const EvalResult r = model->evaluate(x.data(), labels.data(), batch);
  EXPECT_EQ(r.count, batch);
  EXPECT_NEAR(r.loss_sum / batch, loss1, 1e-6);
  // A smaller batch uses a prefix of the workspaces: samples are independent.
  const EvalResult first = model->evaluate(x.data(), labels.data(), 1);
  const EvalResult one = make_model(cnn_spec(1, 9, 7, 4), 1, 5)->evaluate(x.data(), labels.data(), 1);
  EXPECT_EQ(first.loss_sum, one.loss_sum);
}

// 1x8x8 images of three classes: a horizontal bar, a vertical bar or a 2x2 block, at a random
// position, on noise. Not linearly separable by position, but easy for a convolution.
void make_bars(size_t batch, std::vector<float>& x, std::vector<int32_t>& labels) {
  const size_t side = 8;
  x = random_floats(batch * side * side, 31, 0.0f, 0.3f);
  labels = cyclic_labels(batch, 3);
  const auto pos = random_floats(batch * 2, 32, 0.0f, 1.0f);
  for (size_t i = 0; i < batch; ++i) {
    float* img = x.data() + i * side * side;
    const size_t a = static_cast<size_t>(pos[2 * i] * 6) + 1;  // 1..6
    const size_t b = static_cast<size_t>(pos[2 * i + 1] * 6) + 1;
    for (size_t t = 0; t < side; ++t) {
      if (labels[i] == 0) img[a * side + t] = 1.0f;
      if (labels[i] == 1) img[t * side + a] = 1.0f;
    }
    if (labels[i] == 2) {
      for (size_t dh = 0; dh < 2; ++dh)
        for (size_t dw = 0; dw < 2; ++dw) img[(a + dh - 1) * side + (b + dw - 1)] = 1.0f;
    }
  }
}

TEST(Cnn, SgdStepsLowerTheLossOnATinyProblem) {
  const size_t batch = 30;
  std::vector<float> x;
  std::vector<int32_t> labels;
  make_bars(batch, x, labels);
  const auto model = make_model(cnn_spec(1, 8, 8, 3), batch, 9);
  std::vector<float> velocity(model->n_params(), 0.0f);
  const kernels::SgdHyper hyper{0.1f, 0.9f, 0.0f};
  const float initial = model->forward_backward(x.data(), labels.data(), batch);
  float loss = initial;
  for (int step = 0; step < 40; ++step) {
    kernels::sgd_momentum_update(model->params(), velocity, model->grads(), 1.0f, hyper);
    loss = model->forward_backward(x.data(), labels.data(), batch);
  }
  EXPECT_LT(loss, 0.25f * initial) << "initial " << initial << ", after 40 steps " << loss;
  EXPECT_EQ(model->evaluate(x.data(), labels.data(), batch).correct, batch);
}

TEST(Cnn, StepTimeAtBatch64) {
  // Reported (median of 15), and asserted only against a pathological slowdown: the machine is
  // shared. See tests/kernels/bench_conv.cpp for the conv layers' GFLOP/s.
  const size_t batch = 64;
  const int threads = kernels::blas_threads();
  kernels::set_blas_threads(1);
  const auto model = make_model(cnn_spec(1, 28, 28, 10), batch, 1);
  const auto x = random_floats(batch * model->input_size(), 3, 0.0f, 1.0f);
  const auto labels = cyclic_labels(batch, 10);
  for (int i = 0; i < 2; ++i) model->forward_backward(x.data(), labels.data(), batch);
  std::vector<double> ms;
  for (int i = 0; i < 15; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    model->forward_backward(x.data(), labels.data(), batch);
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  kernels::set_blas_threads(threads);
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  const double median_ms = ms[ms.size() / 2];
  std::printf("%s batch 64, 1 BLAS thread (%s kernels): median %.2f ms per forward+backward\n",
              model->describe().c_str(), kernels::blas_core().c_str(), median_ms);
  if (const std::string advice = kernels::blas_core_advice(); !advice.empty()) {
    std::printf("note: %s\n", advice.c_str());
  }
  RecordProperty("step_ms", std::to_string(median_ms));
  EXPECT_LT(median_ms, 1000.0);
}

}  // namespace
}  // namespace resync::models
