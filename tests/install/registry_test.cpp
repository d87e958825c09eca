// The model registry as an outside project uses it (docs/examples/custom_model): register a
// model, build it by name, and the errors a bad registration gives.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "base/error.h"
#include "models/layers.h"
#include "models/model.h"

namespace resync::models {
namespace {

LayerStack build_linear_only(const ModelSpec& spec) {
  LayerStack stack;
  stack.label = "linear-only";
  stack.layers.push_back(std::make_unique<Linear>(spec.input_size(), spec.n_classes));
  return stack;
}

ModelSpec tiny(const std::string& name) {
  ModelSpec spec;
  spec.name = name;
  spec.in_height = 2;
  spec.in_width = 3;
  spec.n_classes = 4;
  return spec;
}

TEST(ModelRegistry, RegisteredModelIsBuiltByNameAfterTheBuiltIns) {
  register_model("linear-only", &build_linear_only);
  const std::vector<std::string> names = model_names();
  ASSERT_GE(names.size(), 3u);
  EXPECT_EQ(names[0], "mlp");
  EXPECT_EQ(names[1], "cnn");
  EXPECT_EQ(names.back(), "linear-only");

  const auto model = make_model(tiny("linear-only"), 8, 1);
  EXPECT_EQ(model->n_params(), 6u * 4u + 4u) << model->describe();
  EXPECT_EQ(model->describe(), "linear-only (28 params)");
  // The built-ins still build.
  EXPECT_NO_THROW(make_model(tiny("mlp"), 8, 1));
}

TEST(ModelRegistry, BuilderMayCaptureState) {
  // Shared, not a reference to a local: the registration outlives this test.
  auto calls = std::make_shared<int>(0);
  register_model("counted", [calls](const ModelSpec& spec) {
    ++*calls;
    return build_linear_only(spec);
  });
  make_model(tiny("counted"), 2, 1);
  make_model(tiny("counted"), 2, 1);
  EXPECT_EQ(*calls, 2);
}

TEST(ModelRegistry, BadRegistrationsThrowInvalidArgument) {
  EXPECT_THROW(register_model("", &build_linear_only), InvalidArgument);
  EXPECT_THROW(register_model("mlp", &build_linear_only), InvalidArgument);  // taken
  EXPECT_THROW(register_model("no-builder", ModelBuilder{}), InvalidArgument);
  const auto names = model_names();
  EXPECT_EQ(std::count(names.begin(), names.end(), "mlp"), 1);
  EXPECT_EQ(std::count(names.begin(), names.end(), "no-builder"), 0);
}

TEST(ModelRegistry, UnknownNameListsTheRegisteredOnes) {
  try {
    make_model(tiny("no-such-model"), 2, 1);
    FAIL() << "make_model accepted an unknown name";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("mlp, cnn"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace resync::models
