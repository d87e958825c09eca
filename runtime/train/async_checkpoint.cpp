// Per-server shard checkpoints of the asynchronous mode.
#include "runtime/train/async_checkpoint.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>

#include "base/error.h"
#include "base/log.h"

namespace resync::runtime {

std::string server_checkpoint_dir(const std::string& dir, int server) {
  return (std::filesystem::path(dir) / fmt::format("server-{}", server)).string();
}

ShardCheckpoints::ShardCheckpoints(std::string dir, int server, int n_servers,
                                   std::vector<std::span<float>> parts, CheckpointMeta meta,
                                   size_t keep)
    : dir_(server_checkpoint_dir(dir, server)),
      server_(server),
      n_servers_(n_servers),
      state_(std::move(parts)),
      meta_(std::move(meta)),
      keep_(keep) {
  meta_.model = fmt::format("{} shard {} of {}", meta_.model, server, n_servers);
  prepare_checkpoint_dir(dir_);
}

std::optional<uint64_t> ShardCheckpoints::restore() {
  const std::optional<LoadedCheckpoint> latest = load_latest_checkpoint(dir_);
  if (!latest) return std::nullopt;
  if (latest->checkpoint.meta.optimizer != meta_.optimizer) {
    throw InvalidArgument(fmt::format("--resume: checkpoint {} was written with --optimizer {}, "
                                      "this run uses --optimizer {}",
                                      latest->path, latest->checkpoint.meta.optimizer,
                                      meta_.optimizer));
  }
  const StateLayout layout{.n_params = state_[0].size(), .n_optimizer_buffers = state_.size() - 1};
  restore_state(latest->checkpoint, latest->path, meta_.model, layout, state_);
  const uint64_t progress = latest->checkpoint.meta.step;
  StableState::Change(stable_).done(progress);
  log::get("ckpt")->info("server {}: resumed its shard from {} (worker steps {})", server_,
                         latest->path, progress);
  return progress;
}

void ShardCheckpoints::saw_push(int worker, uint64_t step) {
  const auto w = static_cast<size_t>(worker);
  if (w >= worker_steps_.size()) worker_steps_.resize(w + 1, 0);
  worker_steps_[w] = std::max(worker_steps_[w], step + 1);
}

uint64_t ShardCheckpoints::progress() const {
  // Workers are the ranks from n_servers_ on; one that has not pushed yet counts as 0.
  uint64_t least = UINT64_MAX;
  for (size_t w = static_cast<size_t>(n_servers_); w < worker_steps_.size(); ++w) {
    least = std::min(least, worker_steps_[w]);
  }
  if (worker_steps_.size() < static_cast<size_t>(meta_.world_size)) least = 0;
  return least == UINT64_MAX ? 0 : least;
}

CheckpointMeta ShardCheckpoints::meta_at(uint64_t progress) const {
  CheckpointMeta m = meta_;
  m.step = progress;
  return m;
}

void ShardCheckpoints::save() {
  // Progress (the slowest worker's) may stand still while the shard moves on: a checkpoint of
  // the same progress is replaced (atomically, by rename).
  write_checkpoint(dir_, meta_at(progress()), state_);
  prune_checkpoints(dir_, keep_);
}

RescuePlan ShardCheckpoints::rescue_plan(int rank) {
  return {.checkpoint_dir = dir_,
          .rank = rank,
          .stable = &stable_,
          .meta = [this](uint64_t at) { return meta_at(at); },
          .state = [this] { return std::span<const std::span<float>>(state_); },
          .sole_writer = true};
}

}  // namespace resync::runtime
