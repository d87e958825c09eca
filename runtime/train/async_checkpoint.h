// Checkpoints of an asynchronous run (--mode async): each parameter server keeps its own shard
// (parameters and optimizer state) in its own directory, CHECKPOINT_DIR/server-K/ckpt-N.rsck,
// written by that server every --checkpoint-every updates, at the end, and by the rescue after a
// death (rescue.h). Next to the shard it records each worker's own step count as far as the shard
// holds it (format version 2, CheckpointMeta::worker_steps): a resumed run's workers each continue
// at their own step. N is the slowest worker's count (the run's progress, for `resync launch`).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "runtime/io/checkpoint.h"
#include "runtime/train/rescue.h"

namespace resync::runtime {

std::string server_checkpoint_dir(const std::string& dir, int server);
std::string worker_copy_dir(const std::string& dir, int rank);

// One server's shard and its checkpoints.
class ShardCheckpoints {
 public:
  // `parts`: the server's slices of the parameters and of each optimizer buffer, the first
  // starting at `shard_offset` of the parameters; `meta`: the run's (model, world, seed, batch,
  // optimizer).
  ShardCheckpoints(std::string dir, int server, int n_servers, size_t shard_offset,
                   std::vector<std::span<float>> parts, CheckpointMeta meta, size_t keep);

  // Loads the newest valid checkpoint of this shard, if any, then the workers' copies that are
  // fresher (see the header comment); returns the steps each of the `n_workers` workers of this
  // run has done as far as the restored shard holds them. Throws InvalidArgument (exit 2) if the
  // checkpoint belongs to another model, shard layout or optimizer, or its worker steps do not
  // fit the run that wrote it. One written by a run of another worker count (a relaunch with
  // fewer ranks), or by an older build (format version 1), resumes every worker at its step.
  std::optional<std::vector<uint64_t>> restore(int n_workers);
  // Whether restore() took the shard's parameters from a worker's copy (then save() at once:
  // the copies are gone once the workers start).
  bool restored_from_copy() const { return from_copy_; }
  // The updates applied to the shard since the run began (across relaunches).
  uint64_t version() const { return version_; }
  // Where this run's workers continue (the servers' agreed steps, at most the restored ones).
  void resume_at(std::span<const uint64_t> worker_steps);

  // A push of `worker`'s (its rank's) `step` applied to the shard by `update()`: the shard and the
  // worker's count change together, under one StableState::Change (a rescue saves both or neither).
  template <typename Update>
  void apply(int worker, uint64_t step, Update&& update) {
    StableState::Change change(stable_);
    update();
    ++version_;
    note_steps(worker, step + 1);
    change.done(progress());
  }
  // A request that left the shard as it was: a dropped push (`steps_done` = its step + 1) or a
  // query (its step: the worker has done the steps before it).
  void saw(int worker, uint64_t steps_done);

  // The slowest worker's count.
  uint64_t progress() const;
  // Writes a checkpoint of the shard now (the server's own thread, between updates).
  void save();

  // What the rescue of this server saves.
  RescuePlan rescue_plan(int rank);

 private:
  CheckpointMeta meta_at(uint64_t progress) const;
  void note_steps(int worker, uint64_t steps_done);  // `worker`: its rank
  std::optional<std::vector<uint64_t>> restore_own(int n_workers);
  void adopt_worker_copies(int n_workers, std::optional<std::vector<uint64_t>>& steps);

  std::string root_;  // --checkpoint-dir
  std::string dir_;
  int server_;
  int n_servers_;
  size_t shard_offset_;
  std::string model_;  // the whole model's description
  std::vector<std::span<float>> state_;  // parameters, then each optimizer buffer
  CheckpointMeta meta_;
  size_t keep_;

  std::vector<uint64_t> worker_steps_;  // per worker (rank - n_servers): steps done; changed
                                        // under a StableState::Change only
  uint64_t version_ = 0;  // changed under a StableState::Change only
  bool from_copy_ = false;
  StableState stable_{0};
};

// A worker's copy of the parameters as of its last completed exchange with the servers, what
// its rescue saves (see the header comment).
class WorkerCopy {
 public:
  // Removes the copies an earlier run of this worker left (the servers have read them).
  WorkerCopy(const std::string& dir, int rank, size_t n_params, int n_shards, CheckpointMeta meta);

  // After an exchange: `params` hold the shards at `versions`, the worker has done `steps_done`.
  void note(uint64_t steps_done, std::span<const float> params,
            std::span<const uint64_t> versions);

  RescuePlan rescue_plan(int rank);

 private:
  std::string dir_;
  std::vector<float> params_;
  std::vector<std::span<float>> parts_;  // the parameters alone: no optimizer state
  std::vector<uint64_t> versions_;
  CheckpointMeta meta_;
  StableState stable_{0};
};

}  // namespace resync::runtime
