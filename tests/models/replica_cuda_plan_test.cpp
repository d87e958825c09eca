// What make_replica("cuda", ...) decides from the device plan before it touches a device: a
// registered model with a layer that has no device twin is refused in one DeviceError line
// naming the layer; one made of supported layers gets past the plan. Runs without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>

#include "base/error.h"
#include "kernels/cuda/context.h"
#include "models/gpt.h"
#include "models/layers.h"
#include "models/model.h"
#include "runtime/train/replica.h"
#include "tests/models/custom_layers.h"

namespace resync::runtime {
namespace {

using models::testing::build_tanh_net;  // Tanh has no device twin

models::LayerStack build_linear_relu(const models::ModelSpec& spec) {
  models::LayerStack stack;
  stack.label = "linear-relu";
  stack.layers.push_back(std::make_unique<models::Linear>(spec.input_size(), 8));
  stack.layers.push_back(std::make_unique<models::Relu>(8));
  stack.layers.push_back(std::make_unique<models::Linear>(8, spec.n_classes));
  return stack;
}

models::ModelSpec spec_for(const std::string& name) {
  models::ModelSpec spec;
  spec.name = name;
  spec.in_height = 4;
  spec.in_width = 4;
  spec.n_classes = 3;
  return spec;
}

TEST(CudaReplicaPlan, UnsupportedLayerIsOneLineDeviceErrorNamingIt) {
  models::register_model("cuda-plan-tanh-net", &build_tanh_net);
  std::string msg;
  try {
    make_replica("cuda", spec_for("cuda-plan-tanh-net"), 4, 1, {}, 0);
    FAIL() << "make_replica(\"cuda\") accepted a tanh layer";
  } catch (const DeviceError& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("'tanh 16'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("no cuda implementation"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
  // The CPU replica runs the same model.
  EXPECT_NO_THROW(make_replica("cpu", spec_for("cuda-plan-tanh-net"), 4, 1, {}, 0));
}

// Supported layers pass the plan: without a device the next refusal is the missing device, with
// one the replica is built with the CPU model's parameter count.
TEST(CudaReplicaPlan, SupportedRegisteredModelGetsPastThePlan) {
  models::register_model("cuda-plan-linear-relu", &build_linear_relu);
  const models::ModelSpec spec = spec_for("cuda-plan-linear-relu");
  if (kernels::cuda::query_devices().n_devices == 0) {
    try {
      make_replica("cuda", spec, 4, 1, {}, 0);
      FAIL() << "make_replica(\"cuda\") succeeded without a device";
    } catch (const DeviceError& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA device is available"), std::string::npos)
          << e.what();
    }
  } else {
    const auto gpu = make_replica("cuda", spec, 4, 1, {}, 0);
    EXPECT_EQ(gpu->n_params(), make_replica("cpu", spec, 4, 1, {}, 0)->n_params());
  }
}

// The gpt's layers (embedding, blocks, LayerNorm, tied head) all have device twins: `--model gpt
// --device cuda` gets past the plan, so without a device the refusal is the missing device.
TEST(CudaReplicaPlan, GptGetsPastThePlan) {
  const models::ModelSpec spec = models::gpt_spec(1, 2, 8, 4, 16);
  if (kernels::cuda::query_devices().n_devices == 0) {
    try {
      make_replica("cuda", spec, 2, 1, {}, 0);
      FAIL() << "make_replica(\"cuda\") succeeded without a device";
    } catch (const DeviceError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("no CUDA device is available"), std::string::npos) << msg;
      EXPECT_EQ(msg.find("implementation"), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
    }
  } else {
    const auto gpu = make_replica("cuda", spec, 2, 1, {}, 0);
    EXPECT_EQ(gpu->n_params(), make_replica("cpu", spec, 2, 1, {}, 0)->n_params());
  }
}

}  // namespace
}  // namespace resync::runtime
