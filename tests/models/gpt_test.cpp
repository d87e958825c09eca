// The gpt layers' backward against central finite differences of their forward, and the gpt
// model as a whole: per-position labels, the tie and the gradients-final hook, determinism.
#include "models/gpt.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "base/error.h"
#include "models/model.h"
#include "models/transformer_layers.h"
#include "tests/models/grad_check.h"

namespace resync::models {
namespace {

using testing::expect_grad_matches;
using testing::random_floats;

double weighted_sum(const std::vector<float>& y, const std::vector<float>& r) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += double(y[i]) * double(r[i]);
  return s;
}

std::vector<float> random_tokens(size_t n, size_t vocab, uint64_t seed) {
  std::vector<float> t = random_floats(n, seed, 0.0f, static_cast<float>(vocab));
  for (float& v : t) v = std::floor(v);
  return t;
}

// Binds a layer to fresh buffers and initialises it; perturbs the parameters so that LayerNorm
// weights of 1 and zero biases do not hide a wrong gradient.
struct Bound {
  std::vector<float> params, grads;
  explicit Bound(Layer& layer, uint64_t seed) : params(layer.n_params()), grads(layer.n_params()) {
    layer.bind(params, grads);
    SplitMix64 rng(seed);
    layer.init(rng);
    const auto noise = random_floats(params.size(), seed + 100, -0.1f, 0.1f);
    for (size_t i = 0; i < params.size(); ++i) params[i] += noise[i];
  }
};

TEST(GptLayers, LayerNormBackwardMatchesFiniteDifferences) {
  const size_t T = 3, C = 7, batch = 2;
  LayerNormLayer layer(T, C);
  Bound b(layer, 1);
  layer.reserve(batch);
  auto x = random_floats(batch * T * C, 2, -2.0f, 2.0f);
  const auto r = random_floats(batch * T * C, 3);
  std::vector<float> y(x.size()), dx(x.size(), 123.0f);  // dx is overwritten, not added to
  const auto loss = [&] {
    layer.forward(x.data(), y.data(), batch);
    return weighted_sum(y, r);
  };
  loss();
  layer.backward(x.data(), y.data(), r.data(), dx.data(), batch);
  // Smooth; float rounding of the loss (~1e-6) over 2 eps = 2e-3 dominates.
  expect_grad_matches("layernorm dw,db", b.params, b.grads, loss, 1e-2f, 2e-3, 1e-2);
  expect_grad_matches("layernorm dx", x, dx, loss, 1e-2f, 2e-3, 1e-2);
}

TEST(GptLayers, EmbeddingBackwardMatchesFiniteDifferences) {
  const size_t V = 5, T = 4, C = 3, batch = 3;
  TokenPositionEmbedding layer(V, T, C);
  Bound b(layer, 4);
  const auto tokens = random_tokens(batch * T, V, 5);
  const auto r = random_floats(batch * T * C, 6);
  std::vector<float> y(batch * T * C);
  const auto loss = [&] {
    layer.forward(tokens.data(), y.data(), batch);
    return weighted_sum(y, r);
  };
  loss();
  std::fill(b.grads.begin(), b.grads.end(), 99.0f);  // untied: both parts are overwritten
  layer.backward(tokens.data(), y.data(), r.data(), nullptr, batch);
  expect_grad_matches("embedding dwte,dwpe", b.params, b.grads, loss, 1e-2f, 1e-3, 1e-3);
  std::vector<float> bad = tokens;
  bad[3] = static_cast<float>(V);
  EXPECT_THROW(layer.forward(bad.data(), y.data(), batch), InvalidArgument);
  bad[3] = 1.5f;
  EXPECT_THROW(layer.forward(bad.data(), y.data(), batch), InvalidArgument);
}

TEST(GptLayers, BlockBackwardMatchesFiniteDifferences) {
  const size_t T = 5, C = 8, NH = 2, batch = 2;
  TransformerBlock layer(T, C, NH, 2, std::make_shared<TransformerScratch>());
  Bound b(layer, 7);
  // Larger weights than GPT-2's 0.02, so that attention is far from uniform and GELU curved.
  for (float& p : b.params) p *= 3.0f;
  layer.reserve(batch);
  auto x = random_floats(batch * T * C, 8, -1.0f, 1.0f);
  const auto r = random_floats(batch * T * C, 9);
  std::vector<float> y(x.size()), dx(x.size(), 7.0f);
  const auto loss = [&] {
    layer.forward(x.data(), y.data(), batch);
    return weighted_sum(y, r);
  };
  loss();
  layer.backward(x.data(), y.data(), r.data(), dx.data(), batch);
  expect_grad_matches("block params", b.params, b.grads, loss, 1e-2f, 3e-3, 2e-2);
  expect_grad_matches("block dx", x, dx, loss, 1e-2f, 3e-3, 2e-2);
}

TEST(GptLayers, BlockIsCausal) {
  // Changing the last position's input changes no earlier position's output.
  const size_t T = 6, C = 8, NH = 4;
  TransformerBlock layer(T, C, NH, 1, std::make_shared<TransformerScratch>());
  Bound b(layer, 10);
  layer.reserve(1);
  auto x = random_floats(T * C, 11);
  std::vector<float> y1(T * C), y2(T * C);
  layer.forward(x.data(), y1.data(), 1);
  for (size_t c = 0; c < C; ++c) x[(T - 1) * C + c] += 1.0f;
  layer.forward(x.data(), y2.data(), 1);
  for (size_t i = 0; i < (T - 1) * C; ++i) ASSERT_EQ(y1[i], y2[i]) << "output " << i;
  bool last_changed = false;
  for (size_t i = (T - 1) * C; i < T * C; ++i) last_changed |= y1[i] != y2[i];
  EXPECT_TRUE(last_changed);
}

TEST(GptLayers, TiedHeadBackwardMatchesFiniteDifferences) {
  const size_t V = 6, T = 3, C = 4, batch = 2;
  TokenPositionEmbedding embedding(V, T, C);
  Bound b(embedding, 12);
  TiedLmHead head(embedding, V, T, C);
  auto x = random_floats(batch * T * C, 13);
  const auto r = random_floats(batch * T * V, 14);
  std::vector<float> y(batch * T * V), dx(x.size());
  const auto loss = [&] {
    head.forward(x.data(), y.data(), batch);
    return weighted_sum(y, r);
  };
  loss();
  std::fill(b.grads.begin(), b.grads.end(), 5.0f);
  head.backward(x.data(), y.data(), r.data(), dx.data(), batch);
  // The head overwrites dwte (the first V x C parameters) and leaves dwpe alone.
  const std::span<float> wte(b.params.data(), V * C);
  const std::span<const float> dwte(b.grads.data(), V * C);
  expect_grad_matches("head dwte", wte, dwte, loss, 1e-2f, 1e-3, 1e-3);
  expect_grad_matches("head dx", x, dx, loss, 1e-2f, 1e-3, 1e-3);
  for (size_t i = V * C; i < b.grads.size(); ++i) ASSERT_EQ(b.grads[i], 5.0f) << "dwpe " << i;
}

ModelSpec tiny_spec() {
  ModelSpec spec;
  spec.name = "gpt";
  spec.in_channels = 1;
  spec.in_height = 1;
  spec.in_width = 6;   // T
  spec.n_classes = 7;  // V
  spec.n_layer = 2;
  spec.n_head = 2;
  spec.n_embd = 8;
  return spec;
}

TEST(GptModel, LabelsPerPositionAndParameterCount) {
  const ModelSpec spec = tiny_spec();
  auto model = make_model(spec, 3, 1);
  EXPECT_EQ(model->labels_per_sample(), 6u);
  EXPECT_EQ(model->input_size(), 6u);
  EXPECT_EQ(model->n_params(), gpt_n_params(7, 6, 2, 8));
  EXPECT_EQ(model->describe(), fmt::format("gpt L2 H2 C8 T6 V7 ({} params)", model->n_params()));
  ModelSpec bad = spec;
  bad.n_head = 3;
  EXPECT_THROW(make_model(bad, 1, 1), InvalidArgument);
  bad = spec;
  bad.n_layer = 0;
  EXPECT_THROW(make_model(bad, 1, 1), InvalidArgument);
}

TEST(GptModel, WholeModelGradientMatchesFiniteDifferences) {
  const ModelSpec spec = tiny_spec();
  const size_t batch = 2, T = 6, V = 7;
  auto model = make_model(spec, batch, 3);
  for (float& p : model->params()) p *= 2.0f;  // away from the near-uniform initial softmax
  const auto x = random_tokens(batch * T, V, 4);
  std::vector<int32_t> y(batch * T);
  for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<int32_t>((i * 5 + 1) % V);
  const float loss0 = model->forward_backward(x.data(), y.data(), batch);
  const std::vector<float> analytic(model->grads().begin(), model->grads().end());
  // The mean loss over all batch x T positions, as evaluate() sums it.
  const EvalResult e = model->evaluate(x.data(), y.data(), batch);
  EXPECT_EQ(e.count, batch * T);
  EXPECT_NEAR(e.loss_sum / double(e.count), loss0, 1e-5);
  const auto loss = [&] {
    const EvalResult r = model->evaluate(x.data(), y.data(), batch);
    return r.loss_sum / double(r.count);
  };
  expect_grad_matches("gpt params", model->params(), analytic, loss, 3e-3f, 1e-3, 2e-2);
}

TEST(GptModel, GradientsDeclaredFinalNeverChangeAfterwards) {
  // The tied wte: the hook must not declare it final before the embedding's backward has added
  // its part (models/gpt.h).
  const ModelSpec spec = tiny_spec();
  const size_t batch = 2, T = 6, V = 7;
  auto model = make_model(spec, batch, 5);
  const auto x = random_tokens(batch * T, V, 6);
  std::vector<int32_t> y(batch * T);
  for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<int32_t>((i * 3 + 2) % V);
  std::vector<std::pair<size_t, std::vector<float>>> seen;
  model->forward_backward(x.data(), y.data(), batch, [&](size_t first_final) {
    const auto g = model->grads();
    seen.emplace_back(first_final, std::vector<float>(g.begin() + first_final, g.end()));
  });
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back().first, 0u);
  const auto g = model->grads();
  for (const auto& [first, copy] : seen) {
    for (size_t i = 0; i < copy.size(); ++i) {
      ASSERT_EQ(copy[i], g[first + i]) << "gradient " << first + i << " changed after the hook "
                                       << "declared [" << first << ", n) final";
    }
  }
}

TEST(GptModel, SameSeedSameBits) {
  const ModelSpec spec = tiny_spec();
  auto a = make_model(spec, 2, 9), b = make_model(spec, 2, 9), c = make_model(spec, 2, 10);
  EXPECT_TRUE(std::equal(a->params().begin(), a->params().end(), b->params().begin()));
  EXPECT_FALSE(std::equal(a->params().begin(), a->params().end(), c->params().begin()));
}

}  // namespace
}  // namespace resync::models
