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

std::string worker_copy_dir(const std::string& dir, int rank) {
  return (std::filesystem::path(dir) / fmt::format("worker-{}", rank)).string();
}

ShardCheckpoints::ShardCheckpoints(std::string dir, int server, int n_servers,
                                   size_t shard_offset, std::vector<std::span<float>> parts,
                                   CheckpointMeta meta, size_t keep)
    : root_(std::move(dir)),
      dir_(server_checkpoint_dir(root_, server)),
      server_(server),
      n_servers_(n_servers),
      shard_offset_(shard_offset),
      model_(meta.model),
      state_(std::move(parts)),
      meta_(std::move(meta)),
      keep_(keep),
      worker_steps_(static_cast<size_t>(std::max(1, meta_.world_size - n_servers)), 0) {
  meta_.model = fmt::format("{} shard {} of {}", meta_.model, server, n_servers);
  prepare_checkpoint_dir(dir_);
}

std::optional<std::vector<uint64_t>> ShardCheckpoints::restore(int n_workers) {
  std::optional<std::vector<uint64_t>> steps = restore_own(n_workers);
  adopt_worker_copies(n_workers, steps);
  return steps;
}

std::optional<std::vector<uint64_t>> ShardCheckpoints::restore_own(int n_workers) {
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
  // Format version 2 has no version of its own: a worker's copy of a later update supersedes it.
  version_ = saved.shard_versions.empty() ? 0 : saved.shard_versions[0];
  log::get("ckpt")->info("server {}: resumed its shard from {} (version {}, worker steps {})",
                         server_, latest->path, version_, fmt::join(steps, ", "));
  return steps;
}

void ShardCheckpoints::adopt_worker_copies(int n_workers,
                                           std::optional<std::vector<uint64_t>>& steps) {
  auto log = log::get("ckpt");
  struct Copy {
    int worker;
    LoadedCheckpoint loaded;
  };
  std::vector<Copy> copies;
  const size_t n_params = shard_offset_ + state_[0].size();  // at least: the shard must fit
  for (int w = 0; w < n_workers; ++w) {
    std::optional<LoadedCheckpoint> c = load_latest_checkpoint(worker_copy_dir(root_, n_servers_ + w));
    if (!c) continue;
    const CheckpointMeta& m = c->checkpoint.meta;
    // Only a copy from a run of this shape names versions of these shards.
    if (m.model != model_ || m.world_size != meta_.world_size ||
        m.shard_versions.size() != size_t(n_servers_) || c->checkpoint.params.size() < n_params) {
      log->info("server {}: {} is a copy of another run's parameters ({}, {} ranks): ignored",
                server_, c->path, m.model, m.world_size);
      continue;
    }
    copies.push_back({w, std::move(*c)});
  }
  const auto freshest = std::max_element(copies.begin(), copies.end(), [&](auto& a, auto& b) {
    return a.loaded.checkpoint.meta.shard_versions[server_] <
           b.loaded.checkpoint.meta.shard_versions[server_];
  });
  if (freshest == copies.end()) return;
  const uint64_t fresh_version = freshest->loaded.checkpoint.meta.shard_versions[server_];
  if (steps && fresh_version <= version_) return;  // this server saved its shard when it ended
  const std::vector<float>& p = freshest->loaded.checkpoint.params;
  std::copy_n(p.begin() + std::ptrdiff_t(shard_offset_), state_[0].size(), state_[0].begin());
  // Every step a worker's own copy counts reached this shard by `fresh_version` (a worker's
  // copy is of the reply to its push; the freshest is at least as new).
  if (!steps) steps.emplace(static_cast<size_t>(n_workers), 0);
  for (const Copy& c : copies) {
    uint64_t& s = (*steps)[static_cast<size_t>(c.worker)];
    s = std::max(s, c.loaded.checkpoint.meta.step);
  }
  log->warn(
      "server {}: its shard's parameters come from {} (version {}; its own checkpoint had {}), "
      "its optimizer state from its own checkpoint; worker steps {}",
      server_, freshest->loaded.path, fresh_version, version_, fmt::join(*steps, ", "));
  version_ = fresh_version;
  from_copy_ = true;
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
  m.shard_versions = {version_};
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


WorkerCopy::WorkerCopy(const std::string& dir, int rank, size_t n_params, int n_shards,
                       CheckpointMeta meta)
    : dir_(worker_copy_dir(dir, rank)),
      params_(n_params),
      versions_(static_cast<size_t>(n_shards), 0),
      meta_(std::move(meta)) {
  parts_ = {std::span<float>(params_)};
  prepare_checkpoint_dir(dir_);
  for (const CheckpointFile& f : list_checkpoints(dir_)) {
    std::error_code ec;
    if (!std::filesystem::remove(f.path, ec) && ec) {
      throw InvalidArgument(fmt::format("--checkpoint-dir: cannot remove {}, an earlier run's copy "
                                        "of the parameters ({})",
                                        f.path, ec.message()));
    }
  }
}

void WorkerCopy::note(uint64_t steps_done, std::span<const float> params,
                      std::span<const uint64_t> versions) {
  StableState::Change change(stable_);
  std::copy(params.begin(), params.end(), params_.begin());
  versions_.assign(versions.begin(), versions.end());
  change.done(steps_done);
}

RescuePlan WorkerCopy::rescue_plan(int rank) {
  return {.checkpoint_dir = dir_,
          .rank = rank,
          .stable = &stable_,
          .meta =
              [this](uint64_t at) {
                CheckpointMeta m = meta_;
                m.step = at;
                m.shard_versions = versions_;
                return m;
              },
          .state = [this] { return std::span<const std::span<float>>(parts_); },
          .sole_writer = true};
}

}  // namespace resync::runtime
