// Checkpoints of an asynchronous run (--mode async): each parameter server keeps its own shard
// (parameters and optimizer state) in its own directory, CHECKPOINT_DIR/server-K/ckpt-N.rsck, written
// by that server every --checkpoint-every updates, at the end, and by the rescue after a death
// (rescue.h). N is the run's progress: the steps every worker had pushed when the shard was
// saved (the smallest worker's count), where a resumed run's workers continue.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "runtime/io/checkpoint.h"
#include "runtime/train/rescue.h"

namespace resync::runtime {

std::string server_checkpoint_dir(const std::string& dir, int server);

// One server's shard and its checkpoints.
class ShardCheckpoints {
 public:
  // `parts`: the server's slices of the parameters and of each optimizer buffer; `meta`: the
  // run's (model, world, seed, batch, optimizer).
  ShardCheckpoints(std::string dir, int server, int n_servers, std::vector<std::span<float>> parts,
                   CheckpointMeta meta, size_t keep);

  // Loads the newest valid checkpoint of this shard, if any; returns its progress. Throws
  // InvalidArgument (exit 2) if it belongs to another model, shard layout or optimizer.
  std::optional<uint64_t> restore();

  // Every push seen (the observer's event): tracks each worker's progress.
  void saw_push(int worker, uint64_t step);
  // After every update applied to the shard (under the StableState::Change of apply()).
  uint64_t progress() const;
  // Writes a checkpoint of the shard now (the server's own thread, between updates).
  void save();

  StableState& stable() { return stable_; }
  // What the rescue of this server saves.
  RescuePlan rescue_plan(int rank);

 private:
  CheckpointMeta meta_at(uint64_t progress) const;

  std::string dir_;
  int server_;
  int n_servers_;
  std::vector<std::span<float>> state_;  // parameters, then each optimizer buffer
  CheckpointMeta meta_;
  size_t keep_;
  std::vector<uint64_t> worker_steps_;  // per worker rank (index by rank): steps pushed
  StableState stable_{0};
};

}  // namespace resync::runtime
