// The Replica without a GPU: the CPU replica reproduces models::Model + Optimizer (SGD, AdamW)
// bit for bit, also with its state and gradient placed in caller storage; make_replica's
// argument and no-CUDA/no-device errors, and the GPU exchange choice.
#include "runtime/train/replica.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/random.h"
#include "runtime/train/optimizer.h"
#include "tests/models/replica_test_util.h"

#ifdef RESYNC_WITH_CUDA
#include "kernels/cuda/context.h"
#endif

namespace resync::runtime {
namespace {

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

void expect_same_bits(std::span<const float> actual, std::span<const float> expected,
                      const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_EQ(bits_of(actual[i]), bits_of(expected[i]))
        << what << ": index " << i << " expected " << expected[i] << " actual " << actual[i];
  }
}

using testing::Batch;
using testing::seeded_batch;

models::ModelSpec small_spec(const std::string& name) {
  models::ModelSpec spec;
  spec.name = name;
  spec.hidden = {24, 16};
  spec.in_channels = 1;
  spec.in_height = 8;
  spec.in_width = 8;
  spec.n_classes = 5;
  return spec;
}

class CpuReplicaTest : public ::testing::TestWithParam<std::string> {};

// The reference is what the training loop did before replicas: the Model and an SGD Optimizer.
TEST_P(CpuReplicaTest, BitIdenticalToModelAndOptimizer) {
  const models::ModelSpec spec = small_spec(GetParam());
  const size_t max_batch = 6;
  const kernels::SgdHyper hyper{.lr = 0.05f, .momentum = 0.9f, .weight_decay = 1e-4f};
  const uint64_t seed = 11;

  std::unique_ptr<Replica> replica = make_replica("cpu", spec, max_batch, seed, hyper, 0);
  std::unique_ptr<models::Model> model = models::make_model(spec, max_batch, seed);
  Optimizer optimizer(model->n_params(), hyper);
  ASSERT_EQ(replica->n_params(), model->n_params());
  ASSERT_EQ(replica->max_batch(), max_batch);
  expect_same_bits(replica->host_state()[0], model->params(), "initial parameters");

  for (int step = 0; step < 4; ++step) {
    const size_t n = step == 2 ? 3 : max_batch;  // a short batch too
    const Batch b = seeded_batch(spec, n, 100 + step);
    const float expected_loss = model->forward_backward(b.x.data(), b.y.data(), n);
    const float loss = replica->compute_gradients(b.x.data(), b.y.data(), n);
    ASSERT_EQ(bits_of(loss), bits_of(expected_loss))
        << "step " << step << ": expected loss " << expected_loss << " actual " << loss;
    expect_same_bits(replica->gradient_buffer(), model->grads(),
                     "gradient of step " + std::to_string(step));
    // The all-reduce sums in place in the gradient buffer: mimic a sum over two ranks.
    for (float& g : replica->gradient_buffer()) g *= 2.0f;
    for (float& g : model->grads()) g *= 2.0f;
    replica->apply_gradients(0.5f, step);
    optimizer.step(model->params(), model->grads(), 0.5f, step);
    replica->download_state();
    const auto state = replica->host_state();
    expect_same_bits(state[0], model->params(), "parameters after step " + std::to_string(step));
    expect_same_bits(state[1], optimizer.state(), "velocity after step " + std::to_string(step));
  }
  const Batch test = seeded_batch(spec, 5, 999);
  const models::EvalResult expected = model->evaluate(test.x.data(), test.y.data(), 5);
  const models::EvalResult actual = replica->evaluate(test.x.data(), test.y.data(), 5);
  EXPECT_EQ(actual.loss_sum, expected.loss_sum);
  EXPECT_EQ(actual.correct, expected.correct);
  EXPECT_EQ(actual.count, 5u);
}

// A repaired step computes its gradient again over the partial sum a failed all-reduce left in
// the buffer (runtime/train/train_sync.cpp): that must give the same bits as the first time.
TEST_P(CpuReplicaTest, ComputingAGradientAgainOverAPartialSumGivesTheSameBits) {
  const models::ModelSpec spec = small_spec(GetParam());
  const kernels::SgdHyper hyper{.lr = 0.05f, .momentum = 0.9f, .weight_decay = 1e-4f};
  std::unique_ptr<Replica> replica = make_replica("cpu", spec, 6, 5, hyper, 0);
  const Batch warm = seeded_batch(spec, 6, 40);
  replica->compute_gradients(warm.x.data(), warm.y.data(), 6);
  replica->apply_gradients(1.0f, 0);  // momentum and parameters away from their initial values
  const Batch b = seeded_batch(spec, 6, 41);
  const float loss = replica->compute_gradients(b.x.data(), b.y.data(), 6);
  const std::vector<float> first(replica->gradient_buffer().begin(),
                                 replica->gradient_buffer().end());
  for (float& g : replica->gradient_buffer()) g = g * 3.0f + 1.0f;  // a partial sum
  const float again = replica->compute_gradients(b.x.data(), b.y.data(), 6);
  EXPECT_EQ(bits_of(again), bits_of(loss));
  expect_same_bits(replica->gradient_buffer(), first, "gradient computed again");
}

// On the CPU the host views are the live state: a catch-up writes them and the next step uses it.
TEST_P(CpuReplicaTest, HostStateAliasesLiveState) {
  const models::ModelSpec spec = small_spec(GetParam());
  const kernels::SgdHyper hyper{.lr = 0.1f, .momentum = 0.5f, .weight_decay = 0.0f};
  std::unique_ptr<Replica> a = make_replica("cpu", spec, 4, 1, hyper, 0);
  std::unique_ptr<Replica> b = make_replica("cpu", spec, 4, 2, hyper, 0);
  const Batch batch = seeded_batch(spec, 4, 5);
  a->compute_gradients(batch.x.data(), batch.y.data(), 4);
  a->apply_gradients(1.0f, 0);
  // b catches up with a's state, then both take the same step.
  a->download_state();
  for (size_t k = 0; k < 2; ++k) {
    std::memcpy(b->host_state()[k].data(), a->host_state()[k].data(),
                a->host_state()[k].size_bytes());
  }
  b->upload_state();
  const float loss_a = a->compute_gradients(batch.x.data(), batch.y.data(), 4);
  const float loss_b = b->compute_gradients(batch.x.data(), batch.y.data(), 4);
  EXPECT_EQ(bits_of(loss_a), bits_of(loss_b));
  a->apply_gradients(1.0f, 1);
  b->apply_gradients(1.0f, 1);
  expect_same_bits(b->host_state()[0], a->host_state()[0], "parameters after catch-up");
  expect_same_bits(b->host_state()[1], a->host_state()[1], "velocity after catch-up");
}

// The catch-up of a rank one step behind: it receives only the optimizer buffers and recomputes
// the parameters from its own, bit for bit what the donor's update computed.
TEST_P(CpuReplicaTest, UpdateFromOptimizerStateMatchesTheDonorsUpdate) {
  const models::ModelSpec spec = small_spec(GetParam());
  const kernels::SgdHyper hyper{.lr = 0.05f, .momentum = 0.9f, .weight_decay = 1e-4f};
  std::unique_ptr<Replica> donor = make_replica("cpu", spec, 4, 1, hyper, 0);
  std::unique_ptr<Replica> late = make_replica("cpu", spec, 4, 1, hyper, 0);
  for (int step = 0; step < 3; ++step) {
    const Batch batch = seeded_batch(spec, 4, 60 + step);
    donor->compute_gradients(batch.x.data(), batch.y.data(), 4);
    donor->apply_gradients(1.0f, step);
    const auto from = donor->host_state();
    const auto to = late->host_state();
    for (size_t k = 1; k < from.size(); ++k) {
      std::copy(from[k].begin(), from[k].end(), to[k].begin());
    }
    late->apply_update_from_optimizer_state(step);
    expect_same_bits(to[0], from[0], "parameters after step " + std::to_string(step));
  }
}

// The straggler-mode layout: state and gradient in one window, placed before training (gradient
// first, as the all-reducer does) or after a step (state first); either way, no bit changes and
// host_state() is the window.
TEST_P(CpuReplicaTest, PlacedStateTrainsBitIdenticallyAndHostStateIsTheStorage) {
  const models::ModelSpec spec = small_spec(GetParam());
  const kernels::SgdHyper hyper{.lr = 0.05f, .momentum = 0.9f, .weight_decay = 1e-4f};
  const size_t max_batch = 5;
  for (const int at_step : {0, 1}) {
    const std::string what = GetParam() + ", placed before step " + std::to_string(at_step);
    std::unique_ptr<Replica> reference = make_replica("cpu", spec, max_batch, 3, hyper, 0);
    std::unique_ptr<Replica> placed = make_replica("cpu", spec, max_batch, 3, hyper, 0);
    const size_t n = placed->n_params();
    // [params][velocity][pad][gradient][pad] (StateLayout's parts back to back), pads poisoned
    // to catch stray writes.
    std::vector<float> window(3 * n + 2, -7.0f);
    ASSERT_EQ(placed->state_layout(), (StateLayout{.n_params = n, .n_optimizer_buffers = 1}));
    const std::span<float> params = std::span(window).first(n);
    const std::span<float> velocity = std::span(window).subspan(n, n + 1);
    const std::span<float> grads = std::span(window).subspan(2 * n + 1, n);
    for (int step = 0; step < 4; ++step) {
      if (step == at_step) {
        if (at_step == 0) {
          ASSERT_TRUE(placed->place_gradients(grads)) << what;
        }
        ASSERT_TRUE(placed->place_state(std::span(window).first(2 * n))) << what;
        if (at_step != 0) {
          ASSERT_TRUE(placed->place_gradients(grads)) << what;
        }
      }
      const Batch b = seeded_batch(spec, max_batch, 200 + step);
      const float expected_loss = reference->compute_gradients(b.x.data(), b.y.data(), max_batch);
      const float loss = placed->compute_gradients(b.x.data(), b.y.data(), max_batch);
      ASSERT_EQ(bits_of(loss), bits_of(expected_loss))
          << what << ", step " << step << ": expected loss " << expected_loss << " actual " << loss;
      reference->apply_gradients(0.5f, step);
      placed->apply_gradients(0.5f, step);
    }
    const auto state = placed->host_state();
    EXPECT_EQ(state[0].data(), params.data()) << what << ": parameters are not in the storage";
    EXPECT_EQ(state[1].data(), velocity.data()) << what << ": velocity is not in the storage";
    ASSERT_EQ(state[0].size(), n) << what;
    ASSERT_EQ(state[1].size(), n) << what;
    EXPECT_EQ(placed->gradient_buffer().data(), grads.data()) << what;
    expect_same_bits(params, reference->host_state()[0], what + ": parameters");
    expect_same_bits(velocity.first(n), reference->host_state()[1], what + ": velocity");
    EXPECT_EQ(window[2 * n], -7.0f) << what << ": wrote past the velocity";
    EXPECT_EQ(window.back(), -7.0f) << what << ": wrote past the gradient";

    // A catch-up writes the storage (here: a fresh replica's state, zero velocity): the next
    // step starts from what was written.
    std::unique_ptr<Replica> fresh = make_replica("cpu", spec, max_batch, 4, hyper, 0);
    std::copy(fresh->host_state()[0].begin(), fresh->host_state()[0].end(), params.begin());
    std::fill(velocity.begin(), velocity.end() - 1, 0.0f);
    const Batch b = seeded_batch(spec, max_batch, 300);
    const float loss_fresh = fresh->compute_gradients(b.x.data(), b.y.data(), max_batch);
    const float loss_placed = placed->compute_gradients(b.x.data(), b.y.data(), max_batch);
    EXPECT_EQ(bits_of(loss_placed), bits_of(loss_fresh))
        << what << ": a write to the parameter storage did not reach the model";
    fresh->apply_gradients(1.0f, 4);
    placed->apply_gradients(1.0f, 4);
    expect_same_bits(params, fresh->host_state()[0], what + ": parameters after catch-up");
    expect_same_bits(velocity.first(n), fresh->host_state()[1], what + ": velocity after catch-up");
  }
}

OptimizerConfig adamw_config() {
  OptimizerConfig c;
  c.kind = OptimizerKind::kAdamW;
  c.lr = 2e-3f;
  c.weight_decay = 0.1f;
  c.grad_clip = 0.5f;
  c.schedule = {.kind = LrScheduleKind::kCosine, .warmup_steps = 2, .min_lr = 1e-4f,
                .total_steps = 8};
  return c;
}

// AdamW: two optimizer buffers (first, second moment), the update the Optimizer makes.
TEST_P(CpuReplicaTest, AdamWBitIdenticalToModelAndOptimizer) {
  const models::ModelSpec spec = small_spec(GetParam());
  const size_t max_batch = 6;
  std::unique_ptr<Replica> replica = make_replica("cpu", spec, max_batch, 12, adamw_config(), 0);
  std::unique_ptr<models::Model> model = models::make_model(spec, max_batch, 12);
  Optimizer optimizer(model->n_params(), adamw_config());
  ASSERT_EQ(replica->state_layout(),
            (StateLayout{.n_params = model->n_params(), .n_optimizer_buffers = 2}));
  ASSERT_EQ(replica->host_state().size(), 3u);
  for (uint64_t step = 0; step < 6; ++step) {
    const Batch b = seeded_batch(spec, max_batch, 500 + step);
    model->forward_backward(b.x.data(), b.y.data(), max_batch);
    replica->compute_gradients(b.x.data(), b.y.data(), max_batch);
    replica->apply_gradients(0.5f, step);
    optimizer.step(model->params(), model->grads(), 0.5f, step);
    const auto state = replica->host_state();
    const std::string at = " after step " + std::to_string(step);
    expect_same_bits(state[0], model->params(), "parameters" + at);
    expect_same_bits(state[1], optimizer.buffer(0), "first moment" + at);
    expect_same_bits(state[2], optimizer.buffer(1), "second moment" + at);
  }
}

// The velocity-only catch-up's equivalent for AdamW: the late rank receives m and v after the
// update and recomputes the parameters (decay and bias-corrected step of that training step),
// bit for bit the donor's.
TEST_P(CpuReplicaTest, AdamWUpdateFromOptimizerStateMatchesTheDonorsUpdate) {
  const models::ModelSpec spec = small_spec(GetParam());
  std::unique_ptr<Replica> donor = make_replica("cpu", spec, 4, 1, adamw_config(), 0);
  std::unique_ptr<Replica> late = make_replica("cpu", spec, 4, 1, adamw_config(), 0);
  for (uint64_t step = 0; step < 5; ++step) {
    const Batch batch = seeded_batch(spec, 4, 600 + step);
    donor->compute_gradients(batch.x.data(), batch.y.data(), 4);
    donor->apply_gradients(1.0f, step);
    const auto from = donor->host_state();
    const auto to = late->host_state();
    for (size_t k = 1; k < from.size(); ++k) {
      std::copy(from[k].begin(), from[k].end(), to[k].begin());
    }
    late->apply_update_from_optimizer_state(step);
    expect_same_bits(to[0], from[0], "parameters after step " + std::to_string(step));
  }
  // The step matters: the parameter half of another step gives other bits.
  std::unique_ptr<Replica> wrong = make_replica("cpu", spec, 4, 1, adamw_config(), 0);
  const Batch batch = seeded_batch(spec, 4, 700);
  donor->compute_gradients(batch.x.data(), batch.y.data(), 4);
  std::copy(donor->host_state()[0].begin(), donor->host_state()[0].end(),
            wrong->host_state()[0].begin());
  donor->apply_gradients(1.0f, 5);
  for (size_t k = 1; k < 3; ++k) {
    std::copy(donor->host_state()[k].begin(), donor->host_state()[k].end(),
              wrong->host_state()[k].begin());
  }
  wrong->apply_update_from_optimizer_state(0);
  EXPECT_FALSE(std::equal(wrong->host_state()[0].begin(), wrong->host_state()[0].end(),
                          donor->host_state()[0].begin()));
}

// The straggler-mode window with AdamW: parameters and both moments placed back to back.
TEST_P(CpuReplicaTest, AdamWPlacedStateTrainsBitIdentically) {
  const models::ModelSpec spec = small_spec(GetParam());
  std::unique_ptr<Replica> reference = make_replica("cpu", spec, 5, 3, adamw_config(), 0);
  std::unique_ptr<Replica> placed = make_replica("cpu", spec, 5, 3, adamw_config(), 0);
  const size_t n = placed->n_params();
  std::vector<float> window(4 * n + 1, -7.0f);  // [gradient][params][m][v][pad]
  ASSERT_TRUE(placed->place_gradients(std::span(window).first(n)));
  EXPECT_THROW(placed->place_state(std::span(window).subspan(n, 3 * n - 1)), InvalidArgument);
  ASSERT_TRUE(placed->place_state(std::span(window).subspan(n, 3 * n)));
  for (uint64_t step = 0; step < 4; ++step) {
    const Batch b = seeded_batch(spec, 5, 800 + step);
    reference->compute_gradients(b.x.data(), b.y.data(), 5);
    placed->compute_gradients(b.x.data(), b.y.data(), 5);
    reference->apply_gradients(0.5f, step);
    placed->apply_gradients(0.5f, step);
  }
  const auto state = placed->host_state();
  for (size_t k = 0; k < 3; ++k) {
    EXPECT_EQ(state[k].data(), window.data() + (1 + k) * n) << "part " << k;
    expect_same_bits(state[k], reference->host_state()[k], "part " + std::to_string(k));
  }
  EXPECT_EQ(window.back(), -7.0f) << "wrote past the second moment";
}

// A rejected placement leaves the state where it was.
TEST_P(CpuReplicaTest, PlaceStateRejectsSmallOrOverlappingStorage) {
  const models::ModelSpec spec = small_spec(GetParam());
  std::unique_ptr<Replica> r = make_replica("cpu", spec, 4, 1, {}, 0);
  const size_t n = r->n_params();
  const auto before = r->host_state();
  const std::vector<float> params_before(before[0].begin(), before[0].end());
  std::vector<float> window(4 * n);
  const std::span<float> window_span(window);
  EXPECT_THROW(r->place_state(window_span.first(2 * n - 1)), InvalidArgument) << "too small";
  ASSERT_TRUE(r->place_gradients(window_span.subspan(3 * n, n)));
  EXPECT_THROW(r->place_state(window_span.subspan(n + 1, 2 * n)), InvalidArgument)
      << "velocity overlaps the gradient";
  const auto after = r->host_state();
  EXPECT_EQ(after[0].data(), before[0].data()) << "a rejected placement moved the parameters";
  EXPECT_EQ(after[1].data(), before[1].data()) << "a rejected placement moved the velocity";
  expect_same_bits(after[0], params_before, "parameters after rejected placements");

  ASSERT_TRUE(r->place_state(window_span.first(2 * n)));
  // Moving by one part would land the parameters on the current velocity before it moved.
  EXPECT_THROW(r->place_state(window_span.subspan(n, 2 * n)), InvalidArgument) << "shifted";
  EXPECT_THROW(r->place_gradients(window_span.subspan(n, n)), InvalidArgument)
      << "gradient onto the velocity";
  expect_same_bits(r->host_state()[0], params_before, "parameters after placement");
  EXPECT_EQ(r->host_state()[0].data(), window.data());
  EXPECT_EQ(r->host_state()[1].data(), window.data() + n);
}

INSTANTIATE_TEST_SUITE_P(Models, CpuReplicaTest, ::testing::Values("mlp", "cnn"));

TEST(MakeReplica, CpuDescribesItselfAndRejectsDeviceGradients) {
  std::unique_ptr<Replica> r = make_replica("cpu", small_spec("mlp"), 4, 1, {}, 0);
  const std::string d = r->describe();
  EXPECT_NE(d.find("mlp 64-24-16-5"), std::string::npos) << d;
  EXPECT_EQ(d.substr(d.size() - 7), " on cpu") << d;
  EXPECT_EQ(r->cuda_device(), -1);
  EXPECT_TRUE(r->device_gradient_buffer().empty());
  EXPECT_THROW(r->set_gradient_location(GradientLocation::kDevice), InvalidArgument);
  EXPECT_NO_THROW(r->set_gradient_location(GradientLocation::kHost));
}

TEST(MakeReplica, UnknownDeviceOrModelIsInvalidArgument) {
  EXPECT_THROW(make_replica("tpu", small_spec("mlp"), 4, 1, {}, 0), InvalidArgument);
  EXPECT_THROW(make_replica("cpu", small_spec("resnet"), 4, 1, {}, 0), InvalidArgument);
  EXPECT_THROW(make_replica("cpu", small_spec("mlp"), 0, 1, {}, 0), InvalidArgument);
}

// What `resync train --device cuda` and `resync bench step --device cuda` report on a machine
// without a GPU (or a build without CUDA): one line, DeviceError (exit code 1 in main).
TEST(MakeReplica, CudaWithoutDeviceThrowsOneLineDeviceError) {
  std::string expected_prefix;
#ifdef RESYNC_WITH_CUDA
  if (kernels::cuda::query_devices().n_devices > 0) {
    GTEST_SKIP() << "a CUDA device exists: the no-device path cannot be reached here";
  }
  expected_prefix = "no CUDA device is available (";
#else
  expected_prefix = "this build has no CUDA support";
#endif
  std::string msg;
  try {
    make_replica("cuda", small_spec("mlp"), 4, 1, {}, 0);
    FAIL() << "make_replica(\"cuda\") succeeded without a device";
  } catch (const DeviceError& e) {
    msg = e.what();
  }
  EXPECT_EQ(msg.rfind(expected_prefix, 0), 0u)
      << "expected prefix '" << expected_prefix << "', actual message: " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
}

TEST(ChooseGpuExchange, NcclOnDeviceRingStagedOnHost) {
  const GpuExchangeChoice nccl = choose_gpu_exchange("nccl", "no (x)");
  EXPECT_EQ(nccl.exchange, GpuExchange::kNccl);
  EXPECT_EQ(nccl.location, GradientLocation::kDevice);
  const GpuExchangeChoice ring = choose_gpu_exchange("ring", "yes (MPIX_Query_cuda_support)");
  EXPECT_EQ(ring.exchange, GpuExchange::kRingHostStaged);
  EXPECT_EQ(ring.location, GradientLocation::kHost);
  EXPECT_NE(ring.reason.find("yes (MPIX_Query_cuda_support)"), std::string::npos) << ring.reason;
  EXPECT_EQ(ring.reason.find('\n'), std::string::npos);
}

}  // namespace
}  // namespace resync::runtime
