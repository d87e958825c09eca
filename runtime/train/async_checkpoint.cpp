// Per-server shard checkpoints of the asynchronous mode.
#include "runtime/train/async_checkpoint.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

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
      keep_(keep),
      worker_steps_(static_cast<size_t>(std::max(1, meta_.world_size - n_servers)), 0) {
  meta_.model = fmt::format("{} shard {} of {}", meta_.model, server, n_servers);
  prepare_checkpoint_dir(dir_);
}

std::optional<std::vector<uint64_t>> ShardCheckpoints::restore(int n_workers) {
  const std::optional<LoadedCheckpoint> latest = load_latest_checkpoint(dir_);
  if (!latest) return std::nullopt;
  const CheckpointMeta& saved = latest->checkpoint.meta;
  if (saved.optimizer != meta_.optimizer) {
    throw InvalidArgument(fmt::format("--resume: checkpoint {} was written with --optimizer {}, "
                                      "this run uses --optimizer {}",
                                      latest->path, saved.optimizer, meta_.optimizer));
  }
  // The file's own record must fit the run that wrote it (its world size less the servers).
  if (!saved.worker_steps.empty() &&
      int64_t(saved.worker_steps.size()) != int64_t(saved.world_size) - n_servers_) {
    throw InvalidArgument(fmt::format(
        "--resume: checkpoint {} records the steps of {} workers, its run had {} ranks and {} "
        "servers",
        latest->path, saved.worker_steps.size(), saved.world_size, n_servers_));
  }
  const StateLayout layout{.n_params = state_[0].size(), .n_optimizer_buffers = state_.size() - 1};
  restore_state(latest->checkpoint, latest->path, meta_.model, layout, state_);
  std::vector<uint64_t> steps(static_cast<size_t>(n_workers), saved.step);
  if (saved.worker_steps.size() == steps.size()) {
    steps = saved.worker_steps;
  } else {
    log::get("ckpt")->warn(
        "server {}: {} has {}; every worker continues at the slowest one's step {}", server_,
        latest->path,
        saved.worker_steps.empty()
            ? std::string("no steps of its own per worker (format version 1)")
            : fmt::format("the steps of {} workers, this run has {}", saved.worker_steps.size(),
                          n_workers),
        saved.step);
  }
  log::get("ckpt")->info("server {}: resumed its shard from {} (worker steps {})", server_,
                         latest->path, fmt::join(steps, ", "));
  return steps;
}

void ShardCheckpoints::resume_at(std::span<const uint64_t> worker_steps) {
  StableState::Change change(stable_);
  worker_steps_.assign(worker_steps.begin(), worker_steps.end());
  change.done(progress());
}

void ShardCheckpoints::note_steps(int worker, uint64_t steps_done) {
  const auto w = static_cast<size_t>(worker - n_servers_);
  if (w >= worker_steps_.size()) return;  // not a worker (rank 0 pulling to evaluate)
  worker_steps_[w] = std::max(worker_steps_[w], steps_done);
}

void ShardCheckpoints::saw(int worker, uint64_t steps_done) {
  StableState::Change change(stable_);
  note_steps(worker, steps_done);
  change.done(progress());
}

uint64_t ShardCheckpoints::progress() const {
  return *std::min_element(worker_steps_.begin(), worker_steps_.end());
}

CheckpointMeta ShardCheckpoints::meta_at(uint64_t progress) const {
  CheckpointMeta m = meta_;
  m.step = progress;
  m.worker_steps = worker_steps_;
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
