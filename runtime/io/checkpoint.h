// Checkpoints of a training run: what one holds, the file format (magic, format version, model
// description, CRC-32 over the contents), atomic writing, listing, pruning and validated loading.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/state_layout.h"

namespace resync::runtime {

// File layout, little-endian:
//   [0, 8)   magic "RSYNCKPT"
//   [8, 12)  u32 format version
//   [12, 16) u32 CRC-32 (zlib) of every byte of the file except these four
//   [16, 24) u64 body bytes (the file is exactly 24 + body bytes long)
//   body:    u64 step, u32 world size, u32 optimizer (0 sgd, 1 adamw), u64 seed, u64 batch size,
//            u32 model description length + its bytes,
//            u64 n_params + the parameters (f32), u64 n_state + the optimizer state (f32)
//   versions 2 and 3 (async mode): then u32 n_workers + n_workers u64, each worker's own step
//            count (CheckpointMeta::worker_steps; version 2: at least one; version 3: none in a
//            worker's copy)
//   version 3 only: then u32 n_shards (at least one) + n_shards u64, the shard versions
//            (CheckpointMeta::shard_versions)
// A checkpoint with shard versions is written as version 3, one with only worker steps as
// version 2 (builds before version 3 wrote async shards so), every synchronous one as version 1.
inline constexpr char kCheckpointMagic[8] = {'R', 'S', 'Y', 'N', 'C', 'K', 'P', 'T'};
inline constexpr uint32_t kCheckpointVersion = 3;  // the newest this build reads and writes
inline constexpr uint32_t kCheckpointVersionWorkerSteps = 2;
inline constexpr uint32_t kCheckpointVersionPlain = 1;
inline constexpr size_t kCheckpointHeaderBytes = 24;

// The run a checkpoint belongs to. `model` and the sizes must match to resume; the others
// decide whether the continuation repeats an uninterrupted run exactly (shards and batches are
// pure functions of seed, world size, batch size and step).
struct CheckpointMeta {
  uint64_t step = 0;    // steps completed: training continues with this step
  std::string model;    // models::Model::describe(), e.g. "mlp 784-64-10 (50890 params)"
  int world_size = 0;   // ranks of the run that wrote it
  uint64_t seed = 0;
  uint64_t batch_size = 0;  // per rank
  // "sgd" (optimizer state: the velocity) or "adamw" (the first, then the second moment). A
  // checkpoint resumes only with the optimizer that wrote it.
  std::string optimizer = "sgd";
  // An async server's shard only: the steps each worker (in rank order) has done as far as this
  // shard holds them, where each continues; `step` is their minimum. Empty otherwise.
  std::vector<uint64_t> worker_steps = {};
  // Async mode only: the version (updates applied since the run began) of each shard the state
  // holds: a server's shard checkpoint names its own, a worker's copy of the parameters
  // (async_checkpoint.h) one per shard. Empty otherwise.
  std::vector<uint64_t> shard_versions = {};
  bool operator==(const CheckpointMeta&) const = default;
};

// What a checkpoint holds: the state after `meta.step` steps (identical on every rank of a
// synchronous run at a step boundary).
struct Checkpoint {
  CheckpointMeta meta;
  std::vector<float> params;
  std::vector<float> optimizer_state;  // the optimizer's buffers one after another
};

struct CheckpointFile {
  uint64_t step = 0;
  std::string path;
};

// "ckpt-000000123.rsck": the name of the checkpoint after `step` steps.
std::string checkpoint_file_name(uint64_t step);

// Creates `dir` (and its parents) if needed, checks that files can be created in it, and removes
// temp files a writer killed mid-write left behind. Throws InvalidArgument naming
// --checkpoint-dir and the reason.
void prepare_checkpoint_dir(const std::string& dir);

// Writes the checkpoint after `meta.step` steps to dir/checkpoint_file_name(step) such that a
// crash at any moment leaves either the previous file or the complete new one: a temp file in
// the same directory, fsync, rename over the final name, fsync of the directory. Returns the
// path. Throws resync::Error (naming the file and errno) on an I/O failure.
std::string write_checkpoint(const std::string& dir, const CheckpointMeta& meta,
                             std::span<const float> params,
                             std::span<const float> optimizer_state);

// The same for a state given as StateLayout's parts (parameters, then each optimizer buffer,
// stored one after the other as the optimizer state).
std::string write_checkpoint(const std::string& dir, const CheckpointMeta& meta,
                             std::span<const std::span<float>> state);

// Reads and validates a checkpoint file. Throws DataError naming the file and what is wrong
// (unreadable, truncated, not a checkpoint, unsupported version, CRC mismatch, malformed: e.g.
// worker steps more than its ranks, or their minimum not its step).
Checkpoint read_checkpoint(const std::string& path);

// The checkpoint files in `dir` by name (temp files and anything else ignored), ascending step.
// A missing directory has none. Throws DataError if `dir` cannot be listed.
std::vector<CheckpointFile> list_checkpoints(const std::string& dir);

// Deletes all checkpoints of `dir` but the newest `keep` (keep >= 1). Returns what it removed.
std::vector<std::string> prune_checkpoints(const std::string& dir, size_t keep);

struct LoadedCheckpoint {
  std::string path;
  Checkpoint checkpoint;
};

// The newest checkpoint of `dir` that reads and validates; each invalid newer one is reported
// as a warning on the "ckpt" logger and skipped, never loaded. nullopt if there is none.
std::optional<LoadedCheckpoint> load_latest_checkpoint(const std::string& dir);

// Throws InvalidArgument, naming `path`, if `ckpt` cannot continue a run of `model` with
// `n_params` parameters and `n_state` optimizer values.
void check_resumable(const Checkpoint& ckpt, const std::string& path, const std::string& model,
                     size_t n_params, size_t n_state);

// check_resumable for `layout`, then copies the checkpoint into `state` (StateLayout's parts).
void restore_state(const Checkpoint& ckpt, const std::string& path, const std::string& model,
                   const StateLayout& layout, std::span<const std::span<float>> state);

}  // namespace resync::runtime
