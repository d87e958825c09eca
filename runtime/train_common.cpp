#include "runtime/train_common.h"

#include <algorithm>
#include <exception>

#include "collectives/world.h"
#include "kernels/gemm.h"
#include "runtime/train.h"

namespace resync::runtime {

Setup::Setup(const TrainConfig& c, int rank_, int world_, ShardAssignment shard)
    : cfg(c),
      rank(rank_),
      world(world_),
      delay_spec(parse_delay_spec(c.inject_delay)),
      data(load_data(c.data, c.seed, c.synthetic_train, c.synthetic_test)),
      model(models::make_model(model_spec(), c.batch_size, c.seed)),
      optimizer(model->n_params(), {c.lr, c.momentum, c.weight_decay}),
      sampler(data.train.n_samples(), shard.count, shard.index, c.batch_size, c.seed),
      total_steps(c.steps > 0 ? c.steps : uint64_t(c.epochs) * sampler.steps_per_epoch()),
      metrics(rank_ == 0 ? c.metrics : std::string()),
      x(c.batch_size * data.train.n_features()),
      y(c.batch_size) {}

models::ModelSpec Setup::model_spec() const {
  models::ModelSpec spec;
  spec.name = cfg.model;
  spec.hidden = cfg.hidden;
  spec.in_channels = data.train.channels;
  spec.in_height = data.train.height;
  spec.in_width = data.train.width;
  spec.n_classes = data.train.n_classes;
  return spec;
}

std::unique_ptr<Setup> agreed_setup(const TrainConfig& cfg, int rank, int world,
                                    ShardAssignment shard,
                                    const std::function<void()>& extra_checks) {
  std::unique_ptr<Setup> setup;
  std::exception_ptr error;
  try {
    validate_for_world(cfg, world);
    if (extra_checks) extra_checks();
    kernels::set_blas_threads(cfg.threads);
    setup = std::make_unique<Setup>(cfg, rank, world, shard);
  } catch (const Error&) {
    error = std::current_exception();
  }
  const int first_failed = collectives::lowest_failed_rank(error != nullptr);
  if (first_failed == rank) std::rethrow_exception(error);
  if (first_failed < world) throw PeerSetupFailed();
  return setup;
}

bool is_quiet_peer_failure(const std::exception& e) {
  return dynamic_cast<const PeerSetupFailed*>(&e) != nullptr;
}

// Test-set loss and accuracy of the current parameters, in batches of the model's max batch.
EvalRecord evaluate(models::Model& model, const Dataset& test, size_t batch_size,
                    std::vector<float>& x, std::vector<int32_t>& y) {
  models::EvalResult total;
  std::vector<uint32_t> indices(batch_size);
  for (size_t begin = 0; begin < test.n_samples(); begin += batch_size) {
    const size_t n = std::min(batch_size, test.n_samples() - begin);
    for (size_t i = 0; i < n; ++i) indices[i] = static_cast<uint32_t>(begin + i);
    test.gather({indices.data(), n}, x.data(), y.data());
    models::EvalResult part = model.evaluate(x.data(), y.data(), n);
    total.loss_sum += part.loss_sum;
    total.correct += part.correct;
    total.count += part.count;
  }
  EvalRecord r;
  r.test_loss = total.count ? total.loss_sum / double(total.count) : 0;
  r.test_accuracy = total.count ? double(total.correct) / double(total.count) : 0;
  return r;
}

}  // namespace resync::runtime
