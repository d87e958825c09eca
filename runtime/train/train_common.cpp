#include "runtime/train/train_common.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <exception>

#include "base/error.h"
#include "collectives/transport/world.h"
#include "kernels/gemm.h"
#include "runtime/train/train.h"

namespace resync::runtime {

Setup::Setup(const TrainConfig& c, int rank_, int world_, ShardAssignment shard, int local_rank)
    : cfg(c),
      rank(rank_),
      world(world_),
      delay_spec(parse_delay_spec(c.inject_delay)),
      data(load_data(c.data, c.seed, c.synthetic_train, c.synthetic_test, c.context)),
      sampler(data.train.n_samples(), shard.count, shard.index, c.batch_size, c.seed),
      total_steps(c.steps > 0 ? c.steps : uint64_t(c.epochs) * sampler.steps_per_epoch()),
      model(c.mode == "sync" ? nullptr : models::make_model(model_spec(), c.batch_size, c.seed)),
      // Async: every push is an update of each server's shard, so a server makes about
      // total_steps x workers of them.
      optimizer(model ? model->n_params() : 0,
                [&] {
                  OptimizerConfig o = optimizer_config(c, total_steps * uint64_t(shard.count));
                  o.grad_clip = 0;
                  return o;
                }()),
      replica(c.mode == "sync" ? make_replica(c.device, model_spec(), c.batch_size, c.seed,
                                              optimizer_config(c, total_steps), local_rank)
                               : nullptr),
      metrics(rank_ == 0 ? c.metrics : std::string(), c.resume),
      x(c.batch_size * data.train.n_features()),
      y(c.batch_size * data.train.labels_per_sample()) {}

OptimizerConfig optimizer_config(const TrainConfig& cfg, uint64_t total_updates) {
  OptimizerConfig o;
  o.kind = parse_optimizer(cfg.optimizer);
  o.lr = cfg.lr;
  o.momentum = cfg.momentum;
  o.beta1 = cfg.beta1;
  o.beta2 = cfg.beta2;
  o.eps = cfg.eps;
  o.weight_decay = cfg.weight_decay;
  o.grad_clip = cfg.grad_clip;
  o.schedule = {.kind = cfg.lr_schedule == "cosine" ? LrScheduleKind::kCosine
                                                     : LrScheduleKind::kConstant,
                .warmup_steps = cfg.warmup_steps,
                .min_lr = cfg.min_lr,
                .total_steps = total_updates};
  return o;
}

models::ModelSpec Setup::model_spec() const {
  // The gpt reads byte tokens; image pixels would fail at its first step instead.
  if (cfg.model == "gpt" && data.train.context == 0) {
    throw InvalidArgument(fmt::format(
        "--model gpt trains on text (--data bible-kjv or text:FILE); --data {} holds images",
        cfg.data));
  }
  models::ModelSpec spec;
  spec.name = cfg.model;
  spec.hidden = cfg.hidden;
  spec.in_channels = data.train.channels;
  spec.in_height = data.train.height;
  spec.in_width = data.train.width;
  spec.n_classes = data.train.n_classes;
  spec.n_layer = cfg.n_layer;
  spec.n_head = cfg.n_head;
  spec.n_embd = cfg.n_embd;
  return spec;
}

std::unique_ptr<Setup> agreed_setup(const TrainConfig& cfg, int rank, int world,
                                    ShardAssignment shard,
                                    const std::function<void()>& extra_checks) {
  // Collective, so every rank calls it before anything can fail.
  const int local_rank = cfg.device == "cuda" ? collectives::node_local_rank().rank : 0;
  std::unique_ptr<Setup> setup;
  std::exception_ptr error;
  bool device_error = false;
  try {
    validate_for_world(cfg, world);
    if (extra_checks) extra_checks();
    kernels::set_blas_threads(cfg.threads);
    setup = std::make_unique<Setup>(cfg, rank, world, shard, local_rank);
  } catch (const DeviceError&) {
    error = std::current_exception();
    device_error = true;
  } catch (const Error&) {
    error = std::current_exception();
  }
  const int first_failed = collectives::lowest_failed_rank(error != nullptr);
  if (first_failed >= world) return setup;
  // The reporting rank tells the others which exit code the job ends with.
  const bool peer_device_error =
      collectives::broadcast_string(device_error ? "device" : "input", first_failed) == "device";
  if (first_failed == rank) {
    try {
      std::rethrow_exception(error);
    } catch (const DeviceError& e) {
      throw SetupDeviceError(e.what());
    }
  }
  if (peer_device_error) throw PeerDeviceFailed();
  throw PeerSetupFailed();
}

void agreed(int rank, int world, const std::function<void()>& fn) {
  std::exception_ptr error;
  try {
    fn();
  } catch (const Error&) {
    error = std::current_exception();
  }
  const int first_failed = collectives::lowest_failed_rank(error != nullptr);
  if (first_failed == rank) std::rethrow_exception(error);
  if (first_failed < world) throw PeerSetupFailed();
}

bool is_quiet_peer_failure(const std::exception& e) {
  return dynamic_cast<const PeerSetupFailed*>(&e) != nullptr ||
         dynamic_cast<const PeerDeviceFailed*>(&e) != nullptr;
}

// Test-set loss and accuracy of the current parameters, in batches of the model's max batch.
namespace {

// Evaluation over any forward pass `eval(x, y, n)` returning models::EvalResult.
template <typename Eval>
EvalRecord evaluate_with(Eval&& eval, const Dataset& test, size_t batch_size,
                         std::vector<float>& x, std::vector<int32_t>& y) {
  models::EvalResult total;
  std::vector<uint32_t> indices(batch_size);
  for (size_t begin = 0; begin < test.n_samples(); begin += batch_size) {
    const size_t n = std::min(batch_size, test.n_samples() - begin);
    for (size_t i = 0; i < n; ++i) indices[i] = static_cast<uint32_t>(begin + i);
    test.gather({indices.data(), n}, x.data(), y.data());
    models::EvalResult part = eval(x.data(), y.data(), n);
    total.loss_sum += part.loss_sum;
    total.correct += part.correct;
    total.count += part.count;
  }
  EvalRecord r;
  r.test_loss = total.count ? total.loss_sum / double(total.count) : 0;
  r.test_accuracy = total.count ? double(total.correct) / double(total.count) : 0;
  // Byte tokens: a loss in nats per byte is loss / ln 2 bits per byte.
  if (test.context > 0) r.test_bits_per_byte = r.test_loss / std::log(2.0);
  return r;
}

}  // namespace

EvalRecord evaluate(models::Model& model, const Dataset& test, size_t batch_size,
                    std::vector<float>& x, std::vector<int32_t>& y) {
  return evaluate_with(
      [&](const float* xs, const int32_t* ys, size_t n) { return model.evaluate(xs, ys, n); },
      test, batch_size, x, y);
}

EvalRecord evaluate(Replica& replica, const Dataset& test, size_t batch_size,
                    std::vector<float>& x, std::vector<int32_t>& y) {
  return evaluate_with(
      [&](const float* xs, const int32_t* ys, size_t n) { return replica.evaluate(xs, ys, n); },
      test, batch_size, x, y);
}

}  // namespace resync::runtime
