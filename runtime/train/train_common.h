// What both training loops (sync ring, async parameter servers) build and share: the per-rank
// Setup (data, model, optimizer, sampler, metrics), agreed on by every rank before training,
// and the test-set evaluation.
#pragma once

#include <cstdint>
#include <functional>
#include <chrono>
#include <memory>
#include <vector>

#include "base/error.h"
#include "models/model.h"
#include "runtime/io/config.h"
#include "runtime/io/dataset.h"
#include "runtime/train/inject_delay.h"
#include "runtime/observe/metrics.h"
#include "runtime/train/optimizer.h"
#include "runtime/train/replica.h"

namespace resync::runtime {

// Milliseconds since `t0` on the steady clock (step phases, elapsed times).
inline double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Which shard of the training set this rank reads: sync mode shards over all ranks, async mode
// over the workers only.
struct ShardAssignment {
  int index = 0;
  int count = 1;
};

// Everything one rank trains with, built once. Construction is where bad input shows up.
struct Setup {
  // `local_rank`: this rank's index on its node (picks the GPU with --device cuda).
  Setup(const TrainConfig& c, int rank_, int world_, ShardAssignment shard, int local_rank);

  models::ModelSpec model_spec() const;

  const TrainConfig& cfg;
  int rank;
  int world;
  DelaySpec delay_spec;
  DataSplits data;
  ShardSampler sampler;
  uint64_t total_steps;  // steps of this rank's shard (--steps or --epochs)
  std::unique_ptr<models::Model> model;  // async mode: the host model it computes on
  // Async mode: the servers' optimizer over the whole parameter buffer, each server updating
  // its shard (empty in sync mode). Its clipping is off: each worker clips its own gradient.
  Optimizer optimizer;
  std::unique_ptr<Replica> replica;      // sync mode: model + optimizer on --device
  MetricsWriter metrics;  // rank 0 only; a no-op elsewhere
  std::vector<float> x;  // one mini-batch of inputs
  std::vector<int32_t> y;
};

// Raised on every rank but one when set-up failed somewhere: the lowest failing rank reports
// its reason, the others exit quietly with the same code (see is_quiet_peer_failure): 2 for bad
// input, 1 when a device could not be used (no GPU, out of memory).
class PeerSetupFailed : public InvalidArgument {
 public:
  PeerSetupFailed() : InvalidArgument("another rank rejected its set-up") {}
};
// A device that could not be set up (no GPU, out of memory), agreed on by every rank like bad
// input, so the job ends with exit code 1 and one line instead of an MPI abort.
class SetupDeviceError : public DeviceError {
 public:
  using DeviceError::DeviceError;
};
class PeerDeviceFailed : public SetupDeviceError {
 public:
  PeerDeviceFailed() : SetupDeviceError("another rank could not set up its device") {}
};

// The optimizer of `cfg` for a run of `total_updates` updates (the end of the cosine schedule).
OptimizerConfig optimizer_config(const TrainConfig& cfg, uint64_t total_updates);

// Builds the Setup on every rank and agrees on success (collective over MPI_COMM_WORLD), so that
// no rank starts training while another one has already given up. `extra_checks` runs first,
// for the mode's own validation; it throws InvalidArgument.
std::unique_ptr<Setup> agreed_setup(const TrainConfig& cfg, int rank, int world,
                                    ShardAssignment shard,
                                    const std::function<void()>& extra_checks = {});

// Runs `fn` on every rank and agrees on success, as agreed_setup does (collective): the lowest
// failing rank rethrows its error (one report), the others throw PeerSetupFailed.
void agreed(int rank, int world, const std::function<void()>& fn);

// Test-set loss and accuracy of the model's current parameters, in batches of `batch_size`
// (x and y are scratch buffers of one batch).
EvalRecord evaluate(models::Model& model, const Dataset& test, size_t batch_size,
                    std::vector<float>& x, std::vector<int32_t>& y);
EvalRecord evaluate(Replica& replica, const Dataset& test, size_t batch_size,
                    std::vector<float>& x, std::vector<int32_t>& y);

}  // namespace resync::runtime
