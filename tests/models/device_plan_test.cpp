// The device plan (models/device_plan.h) on the CPU: the kinds, shapes and parameter offsets of
// mlp, cnn, gpt and registered custom models read from the CPU layers, agreement with the CPU
// Model, and the one-line refusals (a layer no device implements, an ambiguous tie). Its own
// binary: it registers models, which models_test's registry checks must not see.
#include "models/device_plan.h"
#include "models/gpt.h"

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "base/error.h"
#include "models/conv_layers.h"
#include "models/layers.h"
#include "models/model.h"
#include "models/transformer_layers.h"
#include "tests/models/custom_layers.h"

namespace resync::models {
namespace {

using Kind = DeviceLayerKind;

ModelSpec spec_for(const std::string& name, size_t c = 1, size_t h = 12, size_t w = 12,
                   size_t n_classes = 10) {
  ModelSpec spec;
  spec.name = name;
  spec.hidden = {64, 32};
  spec.in_channels = c;
  spec.in_height = h;
  spec.in_width = w;
  spec.n_classes = n_classes;
  return spec;
}

struct Expected {
  Kind kind;
  std::string name;
  size_t in_size, out_size, param_offset, n_params;
};

void expect_layers(const DevicePlan& plan, const std::vector<Expected>& expected) {
  ASSERT_EQ(plan.layers.size(), expected.size()) << plan.label;
  size_t total = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const DeviceLayerPlan& got = plan.layers[i];
    const Expected& want = expected[i];
    SCOPED_TRACE("layer " + std::to_string(i) + " (" + want.name + ")");
    EXPECT_EQ(got.kind, want.kind) << kind_name(got.kind);
    EXPECT_EQ(got.name, want.name);
    EXPECT_EQ(got.in_size, want.in_size);
    EXPECT_EQ(got.out_size, want.out_size);
    EXPECT_EQ(got.param_offset, want.param_offset);
    EXPECT_EQ(got.n_params, want.n_params);
    total += want.n_params;
  }
  EXPECT_EQ(plan.n_params, total);
}

// The CPU Model of the same spec: same parameter count, input and classes.
void expect_matches_cpu_model(const DevicePlan& plan, const ModelSpec& spec) {
  const auto cpu = make_model(spec, 4, 1);
  EXPECT_EQ(plan.n_params, cpu->n_params());
  EXPECT_EQ(plan.input_size, cpu->input_size());
  EXPECT_EQ(plan.n_classes, cpu->n_classes());
  EXPECT_EQ(cpu->describe(), plan.label + " (" + std::to_string(plan.n_params) + " params)");
}

TEST(DevicePlan, Mlp) {
  const ModelSpec spec = spec_for("mlp");
  const DevicePlan plan = make_device_plan(spec);
  EXPECT_EQ(plan.label, "mlp 144-64-32-10");
  EXPECT_EQ(plan.input_size, 144u);
  EXPECT_EQ(plan.n_classes, 10u);
  expect_layers(plan, {{Kind::kLinear, "linear 144->64", 144, 64, 0, 144 * 64 + 64},
                       {Kind::kRelu, "relu 64", 64, 64, 9280, 0},
                       {Kind::kLinear, "linear 64->32", 64, 32, 9280, 64 * 32 + 32},
                       {Kind::kRelu, "relu 32", 32, 32, 11360, 0},
                       {Kind::kLinear, "linear 32->10", 32, 10, 11360, 32 * 10 + 10}});
  expect_matches_cpu_model(plan, spec);
}

TEST(DevicePlan, CnnShapesComeFromTheLayers) {
  const ModelSpec spec = spec_for("cnn");
  const DevicePlan plan = make_device_plan(spec);
  const size_t conv1 = 16 * 25 + 16, conv2 = 32 * 16 * 25 + 32, fc1 = 288 * 128 + 128;
  expect_layers(plan,
                {{Kind::kConv2d, "conv 5x5 1->16 pad 2 (12x12->12x12)", 144, 2304, 0, conv1},
                 {Kind::kRelu, "relu 2304", 2304, 2304, conv1, 0},
                 {Kind::kMaxPool2d, "maxpool 2x2/2 16x12x12->16x6x6", 2304, 576, conv1, 0},
                 {Kind::kConv2d, "conv 5x5 16->32 pad 2 (6x6->6x6)", 576, 1152, conv1, conv2},
                 {Kind::kRelu, "relu 1152", 1152, 1152, conv1 + conv2, 0},
                 {Kind::kMaxPool2d, "maxpool 2x2/2 32x6x6->32x3x3", 1152, 288, conv1 + conv2, 0},
                 {Kind::kFlatten, "flatten 32x3x3->288", 288, 288, conv1 + conv2, 0},
                 {Kind::kLinear, "linear 288->128", 288, 128, conv1 + conv2, fc1},
                 {Kind::kRelu, "relu 128", 128, 128, conv1 + conv2 + fc1, 0},
                 {Kind::kLinear, "linear 128->10", 128, 10, conv1 + conv2 + fc1, 128 * 10 + 10}});
  const kernels::Conv2dShape& c1 = plan.layers[0].conv;
  EXPECT_EQ(c1.in_c, 1u);
  EXPECT_EQ(c1.out_c, 16u);
  EXPECT_EQ(c1.k_h, 5u);
  EXPECT_EQ(c1.pad_w, 2u);
  EXPECT_EQ(plan.layers[3].conv.in_c, 16u);
  EXPECT_EQ(plan.layers[3].conv.in_h, 6u);
  const kernels::Pool2dShape& p2 = plan.layers[5].pool;
  EXPECT_EQ(p2.channels, 32u);
  EXPECT_EQ(p2.in_h, 6u);
  EXPECT_EQ(p2.in_w, 6u);
  EXPECT_EQ(p2.k_h, 2u);
  EXPECT_EQ(p2.stride_w, 2u);
  expect_matches_cpu_model(plan, spec);
}

// A model an outside program registers, with shapes no built-in uses: a non-square multi-channel
// input, a strided convolution, an overlapping non-square pool. All read from its layers.
LayerStack build_odd_conv(const ModelSpec& spec) {
  LayerStack stack;
  const size_t features = testing::add_odd_conv_features(spec, stack);
  stack.layers.push_back(std::make_unique<Linear>(features, spec.n_classes));
  return stack;
}

using testing::build_tanh_net;

TEST(DevicePlan, RegisteredCustomModel) {
  register_model("plan-odd-conv", &build_odd_conv);
  const ModelSpec spec = spec_for("plan-odd-conv", 3, 9, 7, 6);
  const DevicePlan plan = make_device_plan(spec);
  // conv: (9+2-3)/2+1 = 5 rows, (7+2-3)/2+1 = 4 columns; pool 3x2/1x2: 3 rows, 2 columns.
  expect_layers(plan,
                {{Kind::kConv2d, "conv 3x3 3->4 stride 2 pad 1 (9x7->5x4)", 189, 80, 0, 4 * 27 + 4},
                 {Kind::kRelu, "relu 80", 80, 80, 112, 0},
                 {Kind::kMaxPool2d, "maxpool 3x2/1x2 4x5x4->4x3x2", 80, 24, 112, 0},
                 {Kind::kFlatten, "flatten 4x3x2->24", 24, 24, 112, 0},
                 {Kind::kLinear, "linear 24->6", 24, 6, 112, 24 * 6 + 6}});
  const kernels::Pool2dShape& pool = plan.layers[2].pool;
  EXPECT_EQ(pool.channels, 4u);
  EXPECT_EQ(pool.in_h, 5u);
  EXPECT_EQ(pool.in_w, 4u);
  EXPECT_EQ(pool.k_h, 3u);
  EXPECT_EQ(pool.k_w, 2u);
  EXPECT_EQ(pool.stride_h, 1u);
  EXPECT_EQ(pool.stride_w, 2u);
  EXPECT_EQ(plan.layers[0].conv.stride_h, 2u);
  EXPECT_EQ(plan.layers[0].conv.in_c, 3u);
  expect_matches_cpu_model(plan, spec);
}

TEST(DevicePlan, UnsupportedLayerIsRefusedByName) {
  register_model("plan-tanh-net", &build_tanh_net);
  const ModelSpec spec = spec_for("plan-tanh-net");
  EXPECT_NO_THROW(make_model(spec, 4, 1));  // the CPU runs it
  std::string msg;
  try {
    make_device_plan(spec, "cuda");
    FAIL() << "a plan for a tanh layer";
  } catch (const DeviceError& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("'tanh 16'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("layer 2 of 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("tanh-net"), std::string::npos) << msg;
  EXPECT_NE(msg.find("no cuda implementation"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
}

// The gpt's layers: shapes read from each layer, offsets as the CPU Model binds them, the tied
// head pointed at the embedding's wte, one label per position.
TEST(DevicePlan, GptLayersShapesAndTie) {
  const size_t V = 16, T = 6, C = 8, NH = 2, L = 2;
  const ModelSpec spec = gpt_spec(L, NH, C, T, V);
  const DevicePlan plan = make_device_plan(spec);
  const size_t emb = (V + T) * C, block = 12 * C * C + 13 * C;
  expect_layers(
      plan, {{Kind::kEmbedding, "embedding V16 T6 C8", T, T * C, 0, emb},
             {Kind::kTransformerBlock, "block T6 C8 H2", T * C, T * C, emb, block},
             {Kind::kTransformerBlock, "block T6 C8 H2", T * C, T * C, emb + block, block},
             {Kind::kLayerNorm, "layernorm T6 C8", T * C, T * C, emb + 2 * block, 2 * C},
             {Kind::kTiedLmHead, "tied head C8 V16", T * C, T * V, emb + 2 * block + 2 * C, 0}});
  EXPECT_EQ(plan.labels_per_sample, T);
  EXPECT_EQ(plan.input_size, T);
  for (const DeviceLayerPlan& layer : plan.layers) {
    SCOPED_TRACE(layer.name);
    EXPECT_EQ(layer.seq.context, T);
    EXPECT_EQ(layer.seq.dim, C);
  }
  EXPECT_EQ(plan.layers[0].seq.vocab, V);
  EXPECT_TRUE(plan.layers[0].tied) << "the head writes dwte first: the embedding must add";
  EXPECT_EQ(plan.layers[1].seq.n_head, NH);
  EXPECT_EQ(plan.layers[2].seq.n_head, NH);
  EXPECT_EQ(plan.layers[4].seq.vocab, V);
  EXPECT_EQ(plan.layers[4].tied_offset, 0u) << "wte starts the embedding's slice";
  expect_matches_cpu_model(plan, spec);
  const auto cpu = make_model(spec, 2, 1);
  EXPECT_EQ(plan.labels_per_sample, cpu->labels_per_sample());

  // Another shape: one block of four heads, a vocabulary larger than the context.
  const DevicePlan other = make_device_plan(gpt_spec(1, 4, 12, 3, 40));
  ASSERT_EQ(other.layers.size(), 4u);
  EXPECT_EQ(other.layers[1].seq.n_head, 4u);
  EXPECT_EQ(other.layers[1].seq.dim, 12u);
  EXPECT_EQ(other.layers[3].seq.vocab, 40u);
  EXPECT_EQ(other.layers[3].seq.context, 3u);
  EXPECT_EQ(other.labels_per_sample, 3u);
  expect_matches_cpu_model(other, gpt_spec(1, 4, 12, 3, 40));
}

// A registered stack of transformer layers in another arrangement: a LayerNorm first, an
// untied embedding (no head: its backward overwrites dwte).
LayerStack build_untied_embedding(const ModelSpec& spec) {
  LayerStack stack;
  stack.label = "untied";
  const size_t T = spec.input_size();
  stack.layers.push_back(std::make_unique<TokenPositionEmbedding>(spec.n_classes, T, 4));
  stack.layers.push_back(std::make_unique<LayerNormLayer>(T, 4));
  stack.layers.push_back(std::make_unique<Linear>(T * 4, spec.n_classes));
  return stack;
}

TEST(DevicePlan, UntiedEmbeddingAndSeveralLabelsPerSample) {
  register_model("plan-untied", &build_untied_embedding);
  const DevicePlan plan = make_device_plan(spec_for("plan-untied", 1, 1, 5, 7));
  ASSERT_EQ(plan.layers.size(), 3u);
  EXPECT_EQ(plan.layers[0].kind, Kind::kEmbedding);
  EXPECT_FALSE(plan.layers[0].tied);
  EXPECT_EQ(plan.layers[1].param_offset, (7u + 5u) * 4u);
  EXPECT_EQ(plan.labels_per_sample, 1u);

  // Any supported stack whose last layer is k x n_classes wide has k labels per sample.
  LayerStack two_labels;
  two_labels.label = "two-labels";
  two_labels.layers.push_back(std::make_unique<Linear>(8, 6));
  EXPECT_EQ(make_device_plan(std::move(two_labels), 3).labels_per_sample, 2u);
}

// A tied head in a stack of two embeddings: the plan cannot tell whose wte it shares (the CPU
// head keeps that to itself), so the device refuses it in one line.
TEST(DevicePlan, TiedHeadWithTwoEmbeddingsIsRefused) {
  LayerStack stack;
  stack.label = "two-embeddings";
  auto first = std::make_unique<TokenPositionEmbedding>(10, 4, 4);
  auto second = std::make_unique<TokenPositionEmbedding>(10, 4, 4);
  TokenPositionEmbedding& tied_to = *second;
  stack.layers.push_back(std::move(first));
  stack.layers.push_back(std::make_unique<Linear>(16, 4));  // back to 4 "tokens"
  stack.layers.push_back(std::move(second));
  stack.layers.push_back(std::make_unique<TiedLmHead>(tied_to, 10, 4, 4));
  std::string msg;
  try {
    make_device_plan(stack, 10, "cuda");
    FAIL() << "a plan for a tied head with two embeddings";
  } catch (const DeviceError& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("'tied head C4 V10'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("exactly one embedding (this one has 2)"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
}

TEST(DevicePlan, StacksTheCpuModelRefusesAreRefused) {
  EXPECT_THROW(make_device_plan(spec_for("no-such-model")), InvalidArgument);
  EXPECT_THROW(make_device_plan(spec_for("mlp", 0)), InvalidArgument);
  EXPECT_THROW(make_device_plan(LayerStack{}, 10), InvalidArgument);

  LayerStack mismatched;
  mismatched.layers.push_back(std::make_unique<Linear>(8, 4));
  mismatched.layers.push_back(std::make_unique<Linear>(5, 3));
  EXPECT_THROW(make_device_plan(mismatched, 3), InvalidArgument);

  LayerStack wrong_width;
  wrong_width.layers.push_back(std::make_unique<Linear>(8, 4));
  EXPECT_THROW(make_device_plan(wrong_width, 3), InvalidArgument);
}

// build_layer_stack is what make_model builds: the same layers, unbound.
TEST(BuildLayerStack, IsTheStackMakeModelBuilds) {
  const ModelSpec spec = spec_for("cnn");
  const LayerStack stack = build_layer_stack(spec);
  size_t n_params = 0;
  for (const auto& layer : stack.layers) n_params += layer->n_params();
  const auto model = make_model(spec, 2, 3);
  EXPECT_EQ(n_params, model->n_params());
  EXPECT_EQ(stack.layers.front()->in_size(), model->input_size());
  EXPECT_EQ(model->describe(), stack.label + " (" + std::to_string(n_params) + " params)");
}

}  // namespace
}  // namespace resync::models
