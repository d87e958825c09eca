// The Model: whole-MLP gradient check, deterministic init, registry, training, workspace limits.
#include "models/model.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "base/error.h"
#include "kernels/gemm.h"
#include "kernels/sgd.h"
#include "tests/models/grad_check.h"

namespace resync::models {
namespace {

using testing::expect_grad_matches;
using testing::random_floats;

ModelSpec tiny_spec() {
  ModelSpec spec;
  spec.hidden = {5, 4};
  spec.in_channels = 1;
  spec.in_height = 2;
  spec.in_width = 3;
  spec.n_classes = 3;
  return spec;
}

std::vector<int32_t> cyclic_labels(size_t batch, size_t n_classes) {
  std::vector<int32_t> labels(batch);
  for (size_t i = 0; i < batch; ++i) labels[i] = static_cast<int32_t>((i * 7 + 1) % n_classes);
  return labels;
}

TEST(Mlp, DescribeAndRegistry) {
  const auto model = make_model(ModelSpec{}, 64, 1);
  EXPECT_EQ(model->describe(), "mlp 784-512-512-10 (669706 params)");
  EXPECT_EQ(model->n_params(), 669706u);
  EXPECT_EQ(model->params().size(), model->n_params());
  EXPECT_EQ(model->grads().size(), model->n_params());
  EXPECT_EQ(model->input_size(), 784u);
  EXPECT_EQ(model->n_classes(), 10u);
  EXPECT_EQ(model_names(), (std::vector<std::string>{"mlp", "cnn", "gpt"}));
}

TEST(Mlp, RejectsBadSpecs) {
  ModelSpec unknown;
  unknown.name = "transformer";
  EXPECT_THROW(make_model(unknown, 8, 1), InvalidArgument);
  ModelSpec spec = tiny_spec();
  spec.hidden = {};
  EXPECT_THROW(make_model(spec, 8, 1), InvalidArgument);
  spec.hidden = {4, 0};
  EXPECT_THROW(make_model(spec, 8, 1), InvalidArgument);
  spec = tiny_spec();
  spec.n_classes = 0;
  EXPECT_THROW(make_model(spec, 8, 1), InvalidArgument);
  spec = tiny_spec();
  spec.in_width = 0;
  EXPECT_THROW(make_model(spec, 8, 1), InvalidArgument);
  EXPECT_THROW(make_model(tiny_spec(), 0, 1), InvalidArgument);
}

TEST(Mlp, InitIsDeterministicAndLayerBounded) {
  const auto a = make_model(ModelSpec{}, 4, 42);
  const auto b = make_model(ModelSpec{}, 4, 42);
  const auto c = make_model(ModelSpec{}, 4, 43);
  ASSERT_EQ(std::memcmp(a->params().data(), b->params().data(), a->n_params() * sizeof(float)), 0)
      << "same seed must give bitwise-identical parameters";
  size_t n_same = 0;
  for (size_t i = 0; i < a->n_params(); ++i) n_same += a->params()[i] == c->params()[i] ? 1 : 0;
  EXPECT_LT(n_same, a->n_params() / 100) << "seeds 42 and 43 give nearly the same parameters";
  // Layout: layer after layer, each U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  const size_t sizes[] = {784 * 512 + 512, 512 * 512 + 512, 512 * 10 + 10};
  const double fan_in[] = {784, 512, 512};
  size_t offset = 0;
  for (int l = 0; l < 3; ++l) {
    const float bound = static_cast<float>(1.0 / std::sqrt(fan_in[l]));
    float max_abs = 0;
    for (size_t i = offset; i < offset + sizes[l]; ++i) {
      max_abs = std::max(max_abs, std::fabs(a->params()[i]));
    }
    EXPECT_LE(max_abs, bound) << "layer " << l;
    EXPECT_GT(max_abs, 0.9f * bound) << "layer " << l << " does not span its init range";
    offset += sizes[l];
  }
}

TEST(Mlp, WholeModelBackwardMatchesFiniteDifferences) {
  const size_t batch = 4;
  const auto model = make_model(tiny_spec(), batch, 3);
  const auto x = random_floats(batch * model->input_size(), 11, -2.0f, 2.0f);
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
  expect_grad_matches("mlp params", model->params(), analytic, mean_loss, 1e-3f, 2e-4, 1e-2);
}

TEST(Mlp, GradsAreOverwrittenNotAccumulatedAndEvaluateAgrees) {
  const size_t batch = 8;
  const auto model = make_model(tiny_spec(), batch, 5);
  const auto x = random_floats(batch * model->input_size(), 12);
  const auto labels = cyclic_labels(batch, model->n_classes());
  const float loss1 = model->forward_backward(x.data(), labels.data(), batch);
  const std::vector<float> g1(model->grads().begin(), model->grads().end());
  const float loss2 = model->forward_backward(x.data(), labels.data(), batch);
  EXPECT_EQ(loss1, loss2);
  for (size_t i = 0; i < g1.size(); ++i) ASSERT_EQ(model->grads()[i], g1[i]) << "grad " << i;

  const EvalResult r = model->evaluate(x.data(), labels.data(), batch);
  EXPECT_EQ(r.count, batch);
  EXPECT_LE(r.correct, batch);
  EXPECT_NEAR(r.loss_sum / batch, loss1, 1e-6);
  // A smaller batch uses a prefix of the workspace: rows are independent.
  const EvalResult first = model->evaluate(x.data(), labels.data(), 1);
  const EvalResult one = make_model(tiny_spec(), 1, 5)->evaluate(x.data(), labels.data(), 1);
  EXPECT_EQ(first.loss_sum, one.loss_sum);
  EXPECT_EQ(model->evaluate(x.data(), labels.data(), 0).count, 0u);
}

TEST(Mlp, PlacedGradientsLandInTheGivenStorageWithTheSameValues) {
  const size_t batch = 8;
  for (const std::string name : {"mlp", "cnn"}) {
    ModelSpec spec = tiny_spec();
    spec.name = name;
    if (name == "cnn") spec.in_height = spec.in_width = 12;
    const auto plain = make_model(spec, batch, 5);
    const auto placed = make_model(spec, batch, 5);
    const auto x = random_floats(batch * plain->input_size(), 3);
    const auto labels = cyclic_labels(batch, plain->n_classes());
    placed->forward_backward(x.data(), labels.data(), batch);  // values move along
    const std::vector<float> before(placed->grads().begin(), placed->grads().end());
    std::vector<float> storage(placed->n_params() + 3, -7.0f);
    placed->place_gradients(storage);
    ASSERT_EQ(placed->grads().data(), storage.data()) << name;
    ASSERT_EQ(placed->grads().size(), placed->n_params()) << name;
    for (size_t i = 0; i < before.size(); ++i) ASSERT_EQ(storage[i], before[i]) << name << " " << i;
    EXPECT_EQ(storage.back(), -7.0f) << name << ": wrote past the parameters";

    const float loss_plain = plain->forward_backward(x.data(), labels.data(), batch);
    const float loss_placed = placed->forward_backward(x.data(), labels.data(), batch);
    EXPECT_EQ(loss_plain, loss_placed) << name;
    for (size_t i = 0; i < plain->n_params(); ++i) {
      ASSERT_EQ(storage[i], plain->grads()[i]) << name << ": gradient " << i;
    }
    std::vector<float> too_small(placed->n_params() - 1);
    EXPECT_THROW(placed->place_gradients(too_small), InvalidArgument) << name;
  }
}

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

ModelSpec tiny_spec_named(const std::string& name) {
  ModelSpec spec = tiny_spec();
  spec.name = name;
  if (name == "cnn") spec.in_height = spec.in_width = 12;
  return spec;
}

// Where a test moves a model's buffers, and when (before training step `at_step`).
enum class Placement { kNone, kParams, kParamsThenGrads, kGradsThenParams };

struct Trained {
  std::vector<uint32_t> loss_bits;
  std::vector<float> params;
};

// SGD-momentum training on fixed batches, placing the buffers (with some slack around them) into
// `window` before step at_step, as a rank places them into its shared-memory window.
Trained train_placed(const ModelSpec& spec, Placement placement, int at_step,
                     std::vector<float>& window, const std::string& what) {
  const size_t batch = 6;
  const auto model = make_model(spec, batch, 17);
  const size_t n = model->n_params();
  std::vector<float> velocity(n, 0.0f);
  const kernels::SgdHyper hyper{0.05f, 0.9f, 1e-4f};
  // Layout: [1 pad][params][1 pad][grads][1 pad], the pads poisoned to catch stray writes.
  window.assign(2 * n + 3, -7.0f);
  const std::span<float> params_storage = std::span(window).subspan(1, n);
  const std::span<float> grads_storage = std::span(window).subspan(n + 2, n + 1);
  Trained out;
  for (int step = 0; step < 5; ++step) {
    if (step == at_step) {
      if (placement == Placement::kGradsThenParams) model->place_gradients(grads_storage);
      if (placement != Placement::kNone) model->place_parameters(params_storage);
      if (placement == Placement::kParamsThenGrads) model->place_gradients(grads_storage);
    }
    const auto x = random_floats(batch * model->input_size(), 50 + step);
    const auto labels = cyclic_labels(batch, model->n_classes());
    out.loss_bits.push_back(bits_of(model->forward_backward(x.data(), labels.data(), batch)));
    kernels::sgd_momentum_update(model->params(), velocity, model->grads(), 1.0f, hyper);
  }
  if (placement != Placement::kNone) {
    EXPECT_EQ(model->params().data(), params_storage.data()) << what;
    EXPECT_EQ(model->params().size(), n) << what;
    if (placement != Placement::kParams) {
      EXPECT_EQ(model->grads().data(), grads_storage.data()) << what;
      EXPECT_EQ(model->grads().size(), n) << what;
    }
    EXPECT_EQ(window[0], -7.0f) << what << ": wrote before the parameters";
    EXPECT_EQ(window[n + 1], -7.0f) << what << ": wrote past the parameters";
    EXPECT_EQ(window.back(), -7.0f) << what << ": wrote past the gradients";
  }
  out.params.assign(model->params().begin(), model->params().end());
  return out;
}

// Placing the parameters, alone or with the gradients in either order, before training or in the
// middle of it, changes no bit of the losses or of the trained parameters.
TEST(Mlp, PlacedParametersTrainBitIdentically) {
  for (const std::string name : {"mlp", "cnn"}) {
    const ModelSpec spec = tiny_spec_named(name);
    std::vector<float> unused;
    const Trained expected = train_placed(spec, Placement::kNone, 0, unused, name);
    const std::pair<Placement, const char*> placements[] = {
        {Placement::kParams, "params"},
        {Placement::kParamsThenGrads, "params then grads"},
        {Placement::kGradsThenParams, "grads then params"}};
    for (const auto& [placement, label] : placements) {
      for (const int at_step : {0, 2}) {
        const std::string what = name + ", " + label + " before step " + std::to_string(at_step);
        std::vector<float> window;
        const Trained actual = train_placed(spec, placement, at_step, window, what);
        ASSERT_EQ(actual.loss_bits, expected.loss_bits) << what << ": losses differ";
        ASSERT_EQ(actual.params.size(), expected.params.size()) << what;
        for (size_t i = 0; i < expected.params.size(); ++i) {
          ASSERT_EQ(bits_of(actual.params[i]), bits_of(expected.params[i]))
              << what << ": parameter " << i << " expected " << expected.params[i] << " actual "
              << actual.params[i];
          // The window holds the live parameters themselves.
          ASSERT_EQ(bits_of(window[1 + i]), bits_of(expected.params[i])) << what << ": " << i;
        }
      }
    }
  }
}

// Writes through the storage reach forward and params(); after a second placement the first
// storage is no longer read.
TEST(Mlp, PlacedParameterStorageIsTheLiveParameters) {
  const size_t batch = 8;
  for (const std::string name : {"mlp", "cnn"}) {
    const auto model = make_model(tiny_spec_named(name), batch, 5);
    const size_t n = model->n_params();
    const auto x = random_floats(batch * model->input_size(), 4);
    const auto labels = cyclic_labels(batch, model->n_classes());
    const std::vector<float> initial(model->params().begin(), model->params().end());
    const double loss_before = model->evaluate(x.data(), labels.data(), batch).loss_sum;

    std::vector<float> first(n);
    model->place_parameters(first);
    ASSERT_EQ(model->params().data(), first.data()) << name;
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(first[i], initial[i]) << name << ": param " << i;
    EXPECT_EQ(model->evaluate(x.data(), labels.data(), batch).loss_sum, loss_before) << name;

    // All-zero weights and biases give all-zero logits: the loss is exactly log(classes) each.
    std::fill(first.begin(), first.end(), 0.0f);
    EXPECT_EQ(model->params()[n / 2], 0.0f) << name;
    const double zero_loss = model->evaluate(x.data(), labels.data(), batch).loss_sum;
    EXPECT_NEAR(zero_loss / batch, std::log(double(model->n_classes())), 1e-6) << name;
    EXPECT_NE(zero_loss, loss_before) << name << ": a write through the storage changed nothing";

    // Moving on: the values move along, the old storage is left behind.
    std::copy(initial.begin(), initial.end(), first.begin());
    std::vector<float> second(n + 5, -7.0f);
    model->place_parameters(second);
    ASSERT_EQ(model->params().data(), second.data()) << name;
    std::fill(first.begin(), first.end(), 0.0f);
    EXPECT_EQ(model->evaluate(x.data(), labels.data(), batch).loss_sum, loss_before)
        << name << ": the model still reads the storage it left";
    EXPECT_EQ(second[n], -7.0f) << name << ": wrote past the parameters";
    // Placing into the storage it already uses is allowed and keeps the values.
    model->place_parameters(second);
    EXPECT_EQ(model->evaluate(x.data(), labels.data(), batch).loss_sum, loss_before) << name;
  }
}

TEST(Mlp, PlaceParametersRejectsSmallOrOverlappingStorage) {
  const auto model = make_model(tiny_spec(), 4, 5);
  const size_t n = model->n_params();
  const std::vector<float> initial(model->params().begin(), model->params().end());
  std::vector<float> too_small(n - 1);
  EXPECT_THROW(model->place_parameters(too_small), InvalidArgument);
  EXPECT_THROW(model->place_parameters({}), InvalidArgument);
  // Parameters and gradients must not share floats, whichever is placed first.
  std::vector<float> window(2 * n);
  model->place_gradients(std::span(window).subspan(n));
  EXPECT_THROW(model->place_parameters(std::span(window).subspan(1, n)), InvalidArgument);
  model->place_parameters(std::span(window).first(n));
  EXPECT_THROW(model->place_gradients(std::span(window).subspan(n - 1)), InvalidArgument);
  EXPECT_EQ(model->grads().data(), window.data() + n) << "a rejected placement moved the buffer";
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(model->params()[i], initial[i]) << "param " << i;
}

TEST(Mlp, RejectsBatchesBeyondWorkspaceAndBadLabels) {
  const auto model = make_model(tiny_spec(), 2, 1);
  const auto x = random_floats(3 * model->input_size(), 1);
  std::vector<int32_t> labels = {0, 1, 2};
  EXPECT_THROW(model->forward_backward(x.data(), labels.data(), 3), InvalidArgument);
  EXPECT_THROW(model->evaluate(x.data(), labels.data(), 3), InvalidArgument);
  EXPECT_THROW(model->forward_backward(x.data(), labels.data(), 0), InvalidArgument);
  labels[1] = 3;
  EXPECT_THROW(model->forward_backward(x.data(), labels.data(), 2), InvalidArgument);
}

TEST(Mlp, SgdStepsLowerTheLossOnSeparableData) {
  // Three Gaussian-ish blobs in 8 dimensions, one per class.
  ModelSpec spec;
  spec.hidden = {16};
  spec.in_height = 1;
  spec.in_width = 8;
  spec.n_classes = 3;
  const size_t batch = 48, dim = 8;
  const auto centers = random_floats(3 * dim, 21, -1.0f, 1.0f);
  const auto noise = random_floats(batch * dim, 22, -0.3f, 0.3f);
  std::vector<float> x(batch * dim);
  const auto labels = cyclic_labels(batch, 3);
  for (size_t i = 0; i < batch; ++i) {
    for (size_t d = 0; d < dim; ++d)
      x[i * dim + d] = centers[labels[i] * dim + d] + noise[i * dim + d];
  }
  const auto model = make_model(spec, batch, 9);
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

TEST(Mlp, StepTimeOfTheReferenceModel) {
  // PyTorch reference on one core: ~3.8 ms per forward+backward of 784-512-512-10 at batch 64.
  // Reported, and asserted only against a pathological (>50x) slowdown: the machine is shared.
  const size_t batch = 64;
  const int threads = kernels::blas_threads();
  kernels::set_blas_threads(1);
  const auto model = make_model(ModelSpec{}, batch, 1);
  const auto x = random_floats(batch * model->input_size(), 3, 0.0f, 1.0f);
  const auto labels = cyclic_labels(batch, 10);
  for (int i = 0; i < 3; ++i) model->forward_backward(x.data(), labels.data(), batch);
  const int n_steps = 20;
  double best_ms = 1e9;
  for (int i = 0; i < n_steps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    model->forward_backward(x.data(), labels.data(), batch);
    const auto t1 = std::chrono::steady_clock::now();
    best_ms = std::min(best_ms, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  kernels::set_blas_threads(threads);
  std::printf(
      "mlp 784-512-512-10 batch 64, 1 BLAS thread (%s kernels): best %.2f ms per "
      "forward+backward\n",
      kernels::blas_core().c_str(), best_ms);
  if (const std::string advice = kernels::blas_core_advice(); !advice.empty()) {
    std::printf("note: %s\n", advice.c_str());
  }
  RecordProperty("step_ms", std::to_string(best_ms));
  EXPECT_LT(best_ms, 200.0);
}

}  // namespace
}  // namespace resync::models
