// The CUDA replica against the CPU replica on seeded inputs (label gpu): same initial parameters,
// close losses, gradients and parameters over several steps, state round trips, device-side
// gradients, evaluation, place_state declining, and the out-of-memory error; for mlp, cnn, a small
// gpt (one label per position, AdamW) and a model registered here (models::register_model), as
// an outside program would. Skips visibly without a device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/random.h"
#include "kernels/cuda/context.h"
#include "models/conv_layers.h"
#include "models/gpt.h"
#include "models/layers.h"
#include "runtime/train/replica.h"
#include "tests/models/custom_layers.h"
#include "tests/models/replica_test_util.h"

namespace resync::runtime {
namespace {

using testing::Batch;
using testing::seeded_batch;

// A registered model in shapes no built-in uses, which the device runs from its layers' shapes:
// a strided convolution and an overlapping, non-square pool (windows share inputs, so the
// backward pass adds up), then Flatten, Linear, ReLU, Linear.
models::LayerStack build_odd_conv(const models::ModelSpec& spec) {
  models::LayerStack stack;
  const size_t features = models::testing::add_odd_conv_features(spec, stack);
  stack.layers.push_back(std::make_unique<models::Linear>(features, spec.hidden.front()));
  stack.layers.push_back(std::make_unique<models::Relu>(spec.hidden.front()));
  stack.layers.push_back(std::make_unique<models::Linear>(spec.hidden.front(), spec.n_classes));
  return stack;
}

// Before any test runs, as a program registers its models at the top of main().
[[maybe_unused]] const bool kOddConvRegistered = [] {
  models::register_model("odd-conv", &build_odd_conv);
  return true;
}();

models::ModelSpec spec_for(const std::string& name) {
  // Two blocks of two heads, 8 positions over 12 tokens: every gpt layer, small enough that the
  // CPU twin runs these tests in moments.
  if (name == "gpt") return models::gpt_spec(2, 2, 16, 8, 12);
  models::ModelSpec spec;
  spec.name = name;
  spec.hidden = {64, 32};
  spec.in_channels = 1;
  spec.in_height = 12;
  spec.in_width = 12;
  spec.n_classes = 10;
  return spec;
}

// GEMMs sum in another order on the GPU (and nvcc fuses multiply-adds), so results agree to a
// tolerance, not in bits: |cuda - cpu| <= abs_tol + rel_tol * |cpu|.
void expect_close(std::span<const float> cuda, std::span<const float> cpu, double abs_tol,
                  double rel_tol, const std::string& what) {
  ASSERT_EQ(cuda.size(), cpu.size()) << what;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double tol = abs_tol + rel_tol * std::fabs(cpu[i]);
    ASSERT_LE(std::fabs(static_cast<double>(cuda[i]) - cpu[i]), tol)
        << what << ": index " << i << " expected (cpu) " << cpu[i] << " actual (cuda) " << cuda[i];
  }
}

class CudaReplicaTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const kernels::cuda::DeviceQuery query = kernels::cuda::query_devices();
    if (query.n_devices == 0) GTEST_SKIP() << "no CUDA device available: " << query.reason;
  }
  const kernels::SgdHyper hyper_{.lr = 0.05f, .momentum = 0.9f, .weight_decay = 1e-4f};
};

TEST_P(CudaReplicaTest, MatchesCpuReplicaOverSeveralSteps) {
  const models::ModelSpec spec = spec_for(GetParam());
  const size_t max_batch = 16;
  std::unique_ptr<Replica> gpu = make_replica("cuda", spec, max_batch, 7, hyper_, 0);
  std::unique_ptr<Replica> cpu = make_replica("cpu", spec, max_batch, 7, hyper_, 0);
  ASSERT_EQ(gpu->n_params(), cpu->n_params());
  EXPECT_EQ(gpu->cuda_device(), 0);
  EXPECT_NE(gpu->describe().find("on cuda:0"), std::string::npos) << gpu->describe();

  // Same starting point, bit for bit: the CPU model's parameters were copied up.
  gpu->download_state();
  expect_close(gpu->host_state()[0], cpu->host_state()[0], 0, 0, "initial parameters");

  for (int step = 0; step < 5; ++step) {
    const size_t n = step == 3 ? 5 : max_batch;
    const Batch b = seeded_batch(spec, n, 40 + step);
    const float loss_gpu = gpu->compute_gradients(b.x.data(), b.y.data(), n);
    const float loss_cpu = cpu->compute_gradients(b.x.data(), b.y.data(), n);
    EXPECT_NEAR(loss_gpu, loss_cpu, 1e-4 * std::fabs(loss_cpu) + 1e-5) << "step " << step;
    expect_close(gpu->gradient_buffer(), cpu->gradient_buffer(), 1e-5, 1e-3,
                 "gradient of step " + std::to_string(step));
    gpu->apply_gradients(1.0f, step);
    cpu->apply_gradients(1.0f, step);
  }
  gpu->download_state();
  expect_close(gpu->host_state()[0], cpu->host_state()[0], 1e-5, 1e-3, "parameters");
  expect_close(gpu->host_state()[1], cpu->host_state()[1], 1e-5, 1e-3, "velocity");

  const Batch test = seeded_batch(spec, 13, 77);
  const models::EvalResult eg = gpu->evaluate(test.x.data(), test.y.data(), 13);
  const models::EvalResult ec = cpu->evaluate(test.x.data(), test.y.data(), 13);
  EXPECT_EQ(eg.count, 13u * testing::labels_per_sample(spec));
  EXPECT_NEAR(eg.loss_sum, ec.loss_sum, 1e-4 * std::fabs(ec.loss_sum) + 1e-4);
  EXPECT_LE(eg.correct > ec.correct ? eg.correct - ec.correct : ec.correct - eg.correct, 1u)
      << "correct: cuda " << eg.correct << " cpu " << ec.correct;
  EXPECT_EQ(gpu->evaluate(nullptr, nullptr, 0).count, 0u);
}

// A catch-up or a resume writes the host mirror and uploads it; the device must then compute
// from exactly that state.
TEST_P(CudaReplicaTest, UploadedStateIsWhatTheDeviceUses) {
  const models::ModelSpec spec = spec_for(GetParam());
  std::unique_ptr<Replica> gpu = make_replica("cuda", spec, 8, 1, hyper_, 0);
  std::unique_ptr<Replica> cpu = make_replica("cpu", spec, 8, 2, hyper_, 0);  // another seed
  for (size_t k = 0; k < 2; ++k) {
    std::memcpy(gpu->host_state()[k].data(), cpu->host_state()[k].data(),
                cpu->host_state()[k].size_bytes());
  }
  gpu->upload_state();
  std::vector<float> uploaded(cpu->host_state()[0].begin(), cpu->host_state()[0].end());
  std::fill(gpu->host_state()[0].begin(), gpu->host_state()[0].end(), -1.0f);
  gpu->download_state();
  expect_close(gpu->host_state()[0], uploaded, 0, 0, "downloaded parameters");
  const Batch b = seeded_batch(spec, 8, 3);
  const float loss_gpu = gpu->compute_gradients(b.x.data(), b.y.data(), 8);
  const float loss_cpu = cpu->compute_gradients(b.x.data(), b.y.data(), 8);
  EXPECT_NEAR(loss_gpu, loss_cpu, 1e-4 * std::fabs(loss_cpu) + 1e-5);
}

// The state lives on the device: place_state declines and the host mirror stays where it was.
TEST_P(CudaReplicaTest, PlaceStateDeclinesAndChangesNothing) {
  const models::ModelSpec spec = spec_for(GetParam());
  std::unique_ptr<Replica> gpu = make_replica("cuda", spec, 8, 1, hyper_, 0);
  gpu->download_state();
  const auto before = gpu->host_state();
  const std::vector<float> params_before(before[0].begin(), before[0].end());
  std::vector<float> params(gpu->state_layout().n_floats(), -7.0f);
  EXPECT_FALSE(gpu->place_state(params));
  EXPECT_EQ(gpu->host_state()[0].data(), before[0].data());
  EXPECT_EQ(gpu->host_state()[1].data(), before[1].data());
  EXPECT_EQ(params.front(), -7.0f) << "place_state wrote the storage it declined";
  gpu->download_state();
  expect_close(gpu->host_state()[0], params_before, 0, 0, "parameters after place_state");
}

// GradientLocation::kDevice (NCCL): the gradient stays on the device and is applied from there.
TEST_P(CudaReplicaTest, DeviceGradientLocationSkipsTheHost) {
  const models::ModelSpec spec = spec_for(GetParam());
  std::unique_ptr<Replica> host = make_replica("cuda", spec, 8, 4, hyper_, 0);
  std::unique_ptr<Replica> dev = make_replica("cuda", spec, 8, 4, hyper_, 0);
  EXPECT_TRUE(dev->device_gradient_buffer().empty());
  dev->set_gradient_location(GradientLocation::kDevice);
  const std::span<float> device_grads = dev->device_gradient_buffer();
  ASSERT_EQ(device_grads.size(), dev->n_params());
  const Batch b = seeded_batch(spec, 8, 9);
  host->compute_gradients(b.x.data(), b.y.data(), 8);
  dev->compute_gradients(b.x.data(), b.y.data(), 8);
  std::vector<float> copied(device_grads.size());
  ASSERT_EQ(cudaMemcpy(copied.data(), device_grads.data(), device_grads.size_bytes(),
                       cudaMemcpyDeviceToHost),
            cudaSuccess);
  expect_close(copied, host->gradient_buffer(), 0, 0, "device gradient");
  host->apply_gradients(0.5f, 0);
  dev->apply_gradients(0.5f, 0);
  host->download_state();
  dev->download_state();
  expect_close(dev->host_state()[0], host->host_state()[0], 0, 0, "parameters");
}

OptimizerConfig adamw_config() {
  OptimizerConfig c;
  c.kind = OptimizerKind::kAdamW;
  c.lr = 1e-3f;
  c.weight_decay = 0.01f;
  c.grad_clip = 0.5f;
  c.schedule = {.kind = LrScheduleKind::kCosine, .warmup_steps = 2, .total_steps = 6};
  return c;
}

// AdamW on the device: two state buffers, close to the CPU replica over several steps (the
// gradients differ in the last bits, the update itself is the CPU's without fused
// multiply-adds).
TEST_P(CudaReplicaTest, AdamWMatchesCpuReplicaOverSeveralSteps) {
  const models::ModelSpec spec = spec_for(GetParam());
  std::unique_ptr<Replica> gpu = make_replica("cuda", spec, 16, 7, adamw_config(), 0);
  std::unique_ptr<Replica> cpu = make_replica("cpu", spec, 16, 7, adamw_config(), 0);
  ASSERT_EQ(gpu->state_layout().n_optimizer_buffers, 2u);
  for (int step = 0; step < 5; ++step) {
    const Batch b = seeded_batch(spec, 16, 140 + step);
    gpu->compute_gradients(b.x.data(), b.y.data(), 16);
    cpu->compute_gradients(b.x.data(), b.y.data(), 16);
    gpu->apply_gradients(1.0f, step);
    cpu->apply_gradients(1.0f, step);
  }
  gpu->download_state();
  expect_close(gpu->host_state()[0], cpu->host_state()[0], 1e-4, 1e-3, "parameters");
  expect_close(gpu->host_state()[1], cpu->host_state()[1], 1e-5, 1e-2, "first moment");
  expect_close(gpu->host_state()[2], cpu->host_state()[2], 1e-8, 1e-2, "second moment");
}

// The velocity-only catch-up with AdamW on GPUs: the late rank receives the moments into its
// host mirror and recomputes the parameters on the host, bit for bit what the donor's device
// update computed.
TEST_P(CudaReplicaTest, AdamWUpdateFromOptimizerStateMatchesTheDonorsDeviceUpdate) {
  const models::ModelSpec spec = spec_for(GetParam());
  std::unique_ptr<Replica> donor = make_replica("cuda", spec, 8, 3, adamw_config(), 0);
  std::unique_ptr<Replica> late = make_replica("cuda", spec, 8, 3, adamw_config(), 0);
  for (int step = 0; step < 4; ++step) {
    const Batch b = seeded_batch(spec, 8, 160 + step);
    donor->compute_gradients(b.x.data(), b.y.data(), 8);
    donor->apply_gradients(0.5f, step);
    donor->download_state();
    late->download_state();
    const auto from = donor->host_state();
    const auto to = late->host_state();
    for (size_t k = 1; k < from.size(); ++k) {
      std::copy(from[k].begin(), from[k].end(), to[k].begin());
    }
    late->apply_update_from_optimizer_state(step);
    late->upload_state();
    late->download_state();
    expect_close(late->host_state()[0], donor->host_state()[0], 0, 0,
                 "parameters after step " + std::to_string(step));
  }
}

// Test names end in the model's name ('-' is not allowed in them).
std::string model_name(const ::testing::TestParamInfo<std::string>& param) {
  std::string name = param.param;
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
}

INSTANTIATE_TEST_SUITE_P(Models, CudaReplicaTest,
                         ::testing::Values("mlp", "cnn", "odd-conv", "gpt"), model_name);

TEST(CudaReplicaErrors, OutOfMemoryIsOneLineDeviceError) {
  if (kernels::cuda::query_devices().n_devices == 0) GTEST_SKIP() << "no CUDA device available";
  models::ModelSpec spec = spec_for("mlp");
  spec.hidden = {200000, 200000};  // 160 GB per weight matrix
  std::string msg;
  try {
    make_replica("cuda", spec, 8, 1, {}, 0);
    FAIL() << "a 160 GB model fit on the device";
  } catch (const DeviceError& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("cannot allocate"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
}

}  // namespace
}  // namespace resync::runtime
