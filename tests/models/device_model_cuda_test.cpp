// The device gpt (models/cuda, label gpu) against the CPU Model on small shapes: from the CPU
// model's parameters, the mean loss over every position and EVERY gradient tensor (wte with the
// tied head's part, wpe, each block's twelve, the final LayerNorm), named in a failure; the
// evaluation sums; and the transformer layers in arrangements the gpt does not use (an untied
// embedding, a block or a LayerNorm as the first layer, whose input gradient goes to scratch).
// The gradient buffer is filled with NaN before each step, so a gradient the device forgets to
// write fails. A bad token is refused as on the CPU. Skips visibly without a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/random.h"
#include "kernels/cuda/context.h"
#include "models/cuda/device_model.h"
#include "models/device_plan.h"
#include "models/gpt.h"
#include "models/layers.h"
#include "models/model.h"
#include "models/transformer_layers.h"

namespace resync::models {
namespace {

namespace kc = kernels::cuda;

// A named slice of the flat parameter buffer.
struct Tensor {
  std::string name;
  size_t offset, n_elems;
};

// Every parameter tensor of a plan, in the CPU layers' documented layouts.
std::vector<Tensor> tensors_of(const DevicePlan& plan) {
  std::vector<Tensor> out;
  for (size_t i = 0; i < plan.layers.size(); ++i) {
    const DeviceLayerPlan& layer = plan.layers[i];
    const std::string prefix = "layer " + std::to_string(i) + " (" + layer.name + ") ";
    size_t at = layer.param_offset;
    const auto add = [&](const std::string& name, size_t n) {
      out.push_back({prefix + name, at, n});
      at += n;
    };
    const size_t C = layer.seq.dim;
    switch (layer.kind) {
      case DeviceLayerKind::kEmbedding:
        add("wte", layer.seq.vocab * C);
        add("wpe", layer.seq.context * C);
        break;
      case DeviceLayerKind::kLayerNorm:
        add("weight", C);
        add("bias", C);
        break;
      case DeviceLayerKind::kTransformerBlock:
        add("ln1 weight", C);
        add("ln1 bias", C);
        add("qkv weight", 3 * C * C);
        add("qkv bias", 3 * C);
        add("proj weight", C * C);
        add("proj bias", C);
        add("ln2 weight", C);
        add("ln2 bias", C);
        add("fc weight", 4 * C * C);
        add("fc bias", 4 * C);
        add("fcproj weight", 4 * C * C);
        add("fcproj bias", C);
        break;
      case DeviceLayerKind::kLinear:
        add("weight", layer.in_size * layer.out_size);
        add("bias", layer.out_size);
        break;
      default:
        if (layer.n_params > 0) add("parameters", layer.n_params);
        break;
    }
  }
  return out;
}

// cuBLAS and OpenBLAS sum in other orders and the device may round tanh/exp/rsqrt differently,
// so values agree to a tolerance scaled by the tensor: |cuda - cpu| <= 1e-3 |cpu| + 1e-4 max|cpu|
// + 1e-9. A missing term, a wrong offset or a forgotten write (NaN) is far outside it.
void expect_tensor_close(std::span<const float> cuda, std::span<const float> cpu, const Tensor& t) {
  float scale = 0.0f;
  for (size_t i = 0; i < t.n_elems; ++i) scale = std::max(scale, std::fabs(cpu[t.offset + i]));
  for (size_t i = 0; i < t.n_elems; ++i) {
    const float want = cpu[t.offset + i], got = cuda[t.offset + i];
    const double tol = 1e-3 * std::fabs(want) + 1e-4 * scale + 1e-9;
    ASSERT_TRUE(std::isfinite(got) && std::fabs(static_cast<double>(got) - want) <= tol)
        << t.name << ": index " << i << " expected (cpu) " << want << " actual (cuda) " << got
        << " (tolerance " << tol << ")";
  }
  if (t.n_elems > 0) {
    EXPECT_GT(scale, 0.0f) << t.name << ": the CPU gradient is all zeros";
  }
}

struct Batch {
  std::vector<float> x;
  std::vector<int32_t> y;
};

// Tokens (integral floats in [0, vocab)) or, for a model that does not start with an embedding,
// values in [-1, 1); labels_per_sample labels per sample in [0, n_classes).
Batch make_batch(size_t n, size_t input_size, size_t labels_per_sample, size_t n_classes,
                 bool tokens, uint64_t seed) {
  SplitMix64 rng(seed);
  Batch b{std::vector<float>(n * input_size), std::vector<int32_t>(n * labels_per_sample)};
  for (float& v : b.x) {
    v = tokens ? static_cast<float>(rng.next() % n_classes)
               : static_cast<float>(2.0 * rng.uniform() - 1.0);
  }
  for (int32_t& label : b.y) label = static_cast<int32_t>(rng.next() % n_classes);
  return b;
}

class DeviceModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const kc::DeviceQuery query = kc::query_devices();
    if (query.n_devices == 0) GTEST_SKIP() << "no CUDA device available: " << query.reason;
    ctx_.emplace(0);
  }

  template <typename T>
  kc::DeviceBuffer<T> to_device(std::span<const T> host) {
    kc::DeviceBuffer<T> buf(host.size());
    kc::upload(host, buf.data(), ctx_->stream());
    return buf;
  }
  std::vector<float> to_host(const kc::DeviceBuffer<float>& buf) {
    std::vector<float> host(buf.size());
    kc::download(buf.data(), std::span<float>(host), ctx_->stream());
    ctx_->synchronize();
    return host;
  }

  // One forward/backward of `batch` samples (of max_batch) on the CPU Model and on the device
  // model of the same spec and parameters; then an evaluation of the same batch.
  void expect_step_matches_cpu(const ModelSpec& spec, size_t max_batch, size_t batch,
                               uint64_t seed) {
    const std::unique_ptr<Model> cpu = make_model(spec, max_batch, seed);
    const DevicePlan plan = make_device_plan(spec);
    ASSERT_EQ(plan.n_params, cpu->n_params());
    ASSERT_EQ(plan.labels_per_sample, cpu->labels_per_sample());
    cuda::DeviceModel dev(plan, max_batch);
    ASSERT_EQ(dev.labels_per_sample(), cpu->labels_per_sample());

    const std::span<const float> params = cpu->params();
    kc::DeviceBuffer<float> d_params = to_device(params);
    const std::vector<float> poison(cpu->n_params(), std::numeric_limits<float>::quiet_NaN());
    kc::DeviceBuffer<float> d_grads = to_device(std::span<const float>(poison));
    dev.bind(d_params.data(), d_grads.data());

    const bool tokens = plan.layers.front().kind == DeviceLayerKind::kEmbedding;
    const Batch b = make_batch(batch, cpu->input_size(), cpu->labels_per_sample(), cpu->n_classes(),
                               tokens, seed + 100);
    kc::DeviceBuffer<float> d_x = to_device(std::span<const float>(b.x));
    kc::DeviceBuffer<int32_t> d_y = to_device(std::span<const int32_t>(b.y));

    const size_t rows = batch * cpu->labels_per_sample();
    dev.forward_backward(*ctx_, d_x.data(), d_y.data(), batch);
    const kernels::XentSums sums = dev.read_loss(*ctx_);
    const float cpu_loss = cpu->forward_backward(b.x.data(), b.y.data(), batch);
    const double dev_loss = sums.loss_sum / static_cast<double>(rows);
    EXPECT_NEAR(dev_loss, cpu_loss, 1e-5 * std::fabs(cpu_loss) + 1e-6) << plan.label;

    const std::vector<float> grads = to_host(d_grads);
    const std::vector<Tensor> tensors = tensors_of(plan);
    size_t covered = 0;
    for (const Tensor& t : tensors) covered += t.n_elems;
    ASSERT_EQ(covered, plan.n_params) << "the named tensors must cover every parameter";
    for (const Tensor& t : tensors) {
      expect_tensor_close(grads, cpu->grads(), t);
      if (::testing::Test::HasFatalFailure()) return;
    }
    // The parameters are only read.
    const std::vector<float> params_after = to_host(d_params);
    EXPECT_TRUE(std::equal(params_after.begin(), params_after.end(), params.begin()))
        << "the step wrote the parameters";

    const EvalResult cpu_eval = cpu->evaluate(b.x.data(), b.y.data(), batch);
    dev.forward_loss(*ctx_, d_x.data(), d_y.data(), batch);
    const kernels::XentSums eval = dev.read_loss(*ctx_);
    EXPECT_EQ(cpu_eval.count, rows);
    EXPECT_NEAR(eval.loss_sum, cpu_eval.loss_sum, 1e-5 * std::fabs(cpu_eval.loss_sum) + 1e-5);
    // Near-ties of the argmax may fall either way: at most 1 in 50 rows, and 1 anyway.
    const size_t diff = eval.n_correct > cpu_eval.correct ? eval.n_correct - cpu_eval.correct
                                                          : cpu_eval.correct - eval.n_correct;
    EXPECT_LE(diff, std::max<size_t>(1, rows / 50))
        << "correct: cuda " << eval.n_correct << " cpu " << cpu_eval.correct;
  }

  std::optional<kc::CudaContext> ctx_;
};

TEST_F(DeviceModelTest, GptTwoBlocksThreeHeadsPartialBatch) {
  // A batch smaller than the model's maximum: the device must not read the rest.
  expect_step_matches_cpu(gpt_spec(2, 3, 12, 7, 23), 4, 3, 1);
}

TEST_F(DeviceModelTest, GptOnePositionOneHead) {
  expect_step_matches_cpu(gpt_spec(1, 1, 8, 1, 5), 2, 2, 2);
}

TEST_F(DeviceModelTest, GptThreeBlocksFourHeads) {
  expect_step_matches_cpu(gpt_spec(3, 4, 16, 16, 64), 4, 4, 3);
}

TEST_F(DeviceModelTest, GptByteVocabulary) {
  // The shape of text data: 256 byte tokens, as `resync train --model gpt` builds it.
  expect_step_matches_cpu(gpt_spec(2, 2, 32, 32, 256), 3, 3, 4);
}

// Transformer layers arranged as no built-in does, registered as an outside program would.
LayerStack build_untied(const ModelSpec& spec) {
  LayerStack stack;
  stack.label = "untied";
  const size_t T = spec.input_size();
  stack.layers.push_back(std::make_unique<TokenPositionEmbedding>(spec.n_classes, T, 8));
  stack.layers.push_back(std::make_unique<LayerNormLayer>(T, 8));
  stack.layers.push_back(std::make_unique<Linear>(T * 8, spec.n_classes));
  return stack;
}

LayerStack build_block_first(const ModelSpec& spec) {
  LayerStack stack;
  stack.label = "block-first";
  const size_t T = 4, C = spec.input_size() / T;
  stack.layers.push_back(
      std::make_unique<TransformerBlock>(T, C, 2, 1, std::make_shared<TransformerScratch>()));
  stack.layers.push_back(std::make_unique<LayerNormLayer>(T, C));
  stack.layers.push_back(std::make_unique<Linear>(T * C, spec.n_classes));
  return stack;
}

LayerStack build_layernorm_first(const ModelSpec& spec) {
  LayerStack stack;
  stack.label = "layernorm-first";
  const size_t T = 3, C = spec.input_size() / T;
  stack.layers.push_back(std::make_unique<LayerNormLayer>(T, C));
  stack.layers.push_back(std::make_unique<Linear>(T * C, spec.n_classes));
  return stack;
}

[[maybe_unused]] const bool kRegistered = [] {
  register_model("device-untied", &build_untied);
  register_model("device-block-first", &build_block_first);
  register_model("device-layernorm-first", &build_layernorm_first);
  return true;
}();

ModelSpec flat_spec(const std::string& name, size_t input_size, size_t n_classes) {
  ModelSpec spec;
  spec.name = name;
  spec.in_channels = 1;
  spec.in_height = 1;
  spec.in_width = input_size;
  spec.n_classes = n_classes;
  return spec;
}

TEST_F(DeviceModelTest, UntiedEmbeddingOverwritesItsGradient) {
  expect_step_matches_cpu(flat_spec("device-untied", 5, 9), 3, 3, 5);
}

TEST_F(DeviceModelTest, BlockAsFirstLayer) {
  expect_step_matches_cpu(flat_spec("device-block-first", 4 * 8, 6), 3, 2, 6);
}

TEST_F(DeviceModelTest, LayerNormAsFirstLayer) {
  expect_step_matches_cpu(flat_spec("device-layernorm-first", 3 * 10, 4), 5, 5, 7);
}

// Two steps in a row on one device model: activations of the first step must not leak into
// the second (the same batch gives the same gradient, bit for bit).
TEST_F(DeviceModelTest, RepeatedStepIsDeterministic) {
  const ModelSpec spec = gpt_spec(2, 2, 8, 6, 11);
  const std::unique_ptr<Model> cpu = make_model(spec, 3, 9);
  cuda::DeviceModel dev(make_device_plan(spec), 3);
  kc::DeviceBuffer<float> d_params = to_device(std::span<const float>(cpu->params()));
  kc::DeviceBuffer<float> d_grads(cpu->n_params());
  dev.bind(d_params.data(), d_grads.data());
  const Batch a = make_batch(3, 6, 6, 11, true, 10), other = make_batch(2, 6, 6, 11, true, 11);
  kc::DeviceBuffer<float> d_xa = to_device(std::span<const float>(a.x));
  kc::DeviceBuffer<int32_t> d_ya = to_device(std::span<const int32_t>(a.y));
  kc::DeviceBuffer<float> d_xo = to_device(std::span<const float>(other.x));
  kc::DeviceBuffer<int32_t> d_yo = to_device(std::span<const int32_t>(other.y));
  dev.forward_backward(*ctx_, d_xa.data(), d_ya.data(), 3);
  const double loss1 = dev.read_loss(*ctx_).loss_sum;
  const std::vector<float> first = to_host(d_grads);
  dev.forward_backward(*ctx_, d_xo.data(), d_yo.data(), 2);
  dev.forward_backward(*ctx_, d_xa.data(), d_ya.data(), 3);
  const double loss2 = dev.read_loss(*ctx_).loss_sum;
  const std::vector<float> second = to_host(d_grads);
  EXPECT_EQ(loss1, loss2);
  for (size_t i = 0; i < first.size(); ++i) {
    ASSERT_EQ(first[i], second[i]) << "gradient index " << i;
  }
}

// A token that is not an integer in [0, V) is refused as on the CPU (InvalidArgument naming it
// and its position) when the loss is read, in training and in evaluation; the device never
// indexes with it, and the next good batch trains normally.
TEST_F(DeviceModelTest, BadTokenIsInvalidArgumentAsOnTheCpu) {
  const ModelSpec spec = gpt_spec(1, 2, 8, 4, 10);
  const std::unique_ptr<Model> cpu = make_model(spec, 2, 1);
  cuda::DeviceModel dev(make_device_plan(spec), 2);
  kc::DeviceBuffer<float> d_params = to_device(std::span<const float>(cpu->params()));
  kc::DeviceBuffer<float> d_grads(cpu->n_params());
  dev.bind(d_params.data(), d_grads.data());
  const auto message = [&](const Batch& b, bool train) {
    kc::DeviceBuffer<float> d_x = to_device(std::span<const float>(b.x));
    kc::DeviceBuffer<int32_t> d_y = to_device(std::span<const int32_t>(b.y));
    try {
      if (train) {
        dev.forward_backward(*ctx_, d_x.data(), d_y.data(), 2);
      } else {
        dev.forward_loss(*ctx_, d_x.data(), d_y.data(), 2);
      }
      dev.read_loss(*ctx_);
    } catch (const InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  Batch bad = make_batch(2, 4, 4, 10, true, 3);
  bad.x[5] = 3.5f;
  std::string cpu_msg;
  try {
    cpu->forward_backward(bad.x.data(), bad.y.data(), 2);
  } catch (const InvalidArgument& e) {
    cpu_msg = e.what();
  }
  EXPECT_NE(cpu_msg.find("token 3.5 at position 5"), std::string::npos) << cpu_msg;
  const std::string train_msg = message(bad, true);
  EXPECT_NE(train_msg.find("embedding: token 3.5 at position 5 is not an integer in [0, 10)"),
            std::string::npos)
      << "'" << train_msg << "'";
  bad.x[5] = 1.0f;
  bad.x[7] = 10.0f;  // == V
  const std::string eval_msg = message(bad, false);
  EXPECT_NE(eval_msg.find("token 10 at position 7"), std::string::npos) << "'" << eval_msg << "'";
  const Batch good = make_batch(2, 4, 4, 10, true, 4);
  EXPECT_EQ(message(good, true), "");
  EXPECT_EQ(message(good, false), "");
}

}  // namespace
}  // namespace resync::models
