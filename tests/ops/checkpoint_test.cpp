// Checkpoint file format: round trip, every kind of damage detected, keep-last-K pruning, temp
// files ignored, the newest valid checkpoint chosen; and the preemption signal handlers.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "base/error.h"
#include "runtime/io/checkpoint.h"
#include "runtime/train/async_checkpoint.h"
#include "runtime/train/preemption.h"

namespace resync::runtime {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = (fs::temp_directory_path() /
            (std::string("resync_ckpt_") + info->name() + "_" + std::to_string(::getpid())))
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static CheckpointMeta meta(uint64_t step) {
    return {.step = step,
            .model = "mlp 8-4-2 (46 params)",
            .world_size = 3,
            .seed = 42,
            .batch_size = 16};
  }
  static std::vector<float> values(size_t n_elems, float base) {
    std::vector<float> v(n_elems);
    for (size_t i = 0; i < n_elems; ++i) v[i] = base + 0.25f * float(i) - 1e-7f * float(i * i);
    return v;
  }
  std::string write(uint64_t step, size_t n_params = 46) {
    return write_checkpoint(dir_, meta(step), values(n_params, float(step)),
                            values(n_params, -float(step)));
  }
  static std::vector<char> bytes_of(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  }
  static void put(const std::string& path, const std::vector<char>& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  // The DataError message of reading `path`, or "" if it read fine.
  static std::string read_error(const std::string& path) {
    try {
      read_checkpoint(path);
    } catch (const DataError& e) {
      return e.what();
    }
    return "";
  }
  // Every single flipped bit (one per byte) of the checkpoint at `path` is reported.
  void expect_every_flipped_byte_caught(const std::string& path) const {
    const std::vector<char> good = bytes_of(path);
    const std::string damaged = dir_ + "/damaged";
    for (size_t i = 0; i < good.size(); ++i) {
      std::vector<char> bad = good;
      bad[i] ^= 0x10;
      put(damaged, bad);
      EXPECT_NE(read_error(damaged), "") << "a flipped bit at byte " << i << " of " << good.size()
                                         << " went unnoticed";
    }
  }

  std::string dir_;
};

TEST_F(CheckpointTest, RoundTripKeepsEveryBit) {
  const std::vector<float> params = values(1000, 3.5f);
  std::vector<float> state = values(1000, -0.125f);
  state[7] = -0.0f;
  state[8] = 1e-42f;  // a denormal survives too
  const std::string path = write_checkpoint(dir_, meta(123), params, state);
  EXPECT_EQ(path, (fs::path(dir_) / "ckpt-000000123.rsck").string());

  const Checkpoint c = read_checkpoint(path);
  EXPECT_EQ(c.meta, meta(123));
  ASSERT_EQ(c.params.size(), params.size());
  ASSERT_EQ(c.optimizer_state.size(), state.size());
  EXPECT_EQ(std::memcmp(c.params.data(), params.data(), params.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(c.optimizer_state.data(), state.data(), state.size() * sizeof(float)), 0);
  EXPECT_FALSE(fs::exists(fs::path(dir_) / ".ckpt-000000123.rsck.tmp")) << "temp file left";
}

// The optimizer is recorded in the header word that format version 1 kept reserved (0), so
// every checkpoint written before AdamW reads as SGD's.
TEST_F(CheckpointTest, OptimizerIsRecordedInTheFormerlyReservedWord) {
  CheckpointMeta adamw = meta(9);
  adamw.optimizer = "adamw";
  const std::string adamw_path =
      write_checkpoint(dir_, adamw, values(46, 1.0f), values(2 * 46, 2.0f));
  const Checkpoint c = read_checkpoint(adamw_path);
  EXPECT_EQ(c.meta, adamw);
  EXPECT_EQ(c.optimizer_state.size(), 2u * 46);
  const std::string sgd_path = write(10);
  EXPECT_EQ(read_checkpoint(sgd_path).meta.optimizer, "sgd");
  constexpr size_t kWord = kCheckpointHeaderBytes + 8 + 4;  // after the step and world size
  EXPECT_EQ(bytes_of(sgd_path)[kWord], 0) << "an SGD checkpoint must stay version 1's bytes";
  EXPECT_EQ(bytes_of(adamw_path)[kWord], 1);
  CheckpointMeta unknown = meta(11);
  unknown.optimizer = "lion";
  EXPECT_THROW(write_checkpoint(dir_, unknown, values(4, 1.0f), values(4, 1.0f)),
               InvalidArgument);
}

TEST_F(CheckpointTest, EmptyBuffersRoundTrip) {
  const std::string path = write_checkpoint(dir_, meta(0), {}, {});
  const Checkpoint c = read_checkpoint(path);
  EXPECT_EQ(c.meta.step, 0u);
  EXPECT_TRUE(c.params.empty());
  EXPECT_TRUE(c.optimizer_state.empty());
}

TEST_F(CheckpointTest, RewritingTheSameStepReplacesTheFile) {
  write(5);
  const std::string path =
      write_checkpoint(dir_, meta(5), values(46, 100.0f), values(46, 200.0f));
  EXPECT_EQ(read_checkpoint(path).params[0], 100.0f);
}

TEST_F(CheckpointTest, EveryFlippedByteIsDetected) {
  expect_every_flipped_byte_caught(write(7, 6));
}

TEST_F(CheckpointTest, CrcMismatchIsNamed) {
  const std::string path = write(7);
  std::vector<char> bytes = bytes_of(path);
  bytes[bytes.size() - 3] ^= 0x01;  // inside the optimizer state
  put(path, bytes);
  const std::string error = read_error(path);
  EXPECT_NE(error.find("CRC mismatch"), std::string::npos) << error;
  EXPECT_NE(error.find(path), std::string::npos) << "the message should name the file: " << error;
}

TEST_F(CheckpointTest, EveryTruncationIsDetected) {
  const std::string path = write(9, 40);
  const std::vector<char> good = bytes_of(path);
  const std::string cut = dir_ + "/cut";
  // Every length through the header and the start of the body, then every few bytes.
  for (size_t n_bytes = 0; n_bytes < good.size(); n_bytes += n_bytes < 96 ? 1 : 7) {
    put(cut, std::vector<char>(good.begin(), good.begin() + static_cast<ptrdiff_t>(n_bytes)));
    const std::string error = read_error(cut);
    EXPECT_NE(error.find("truncated"), std::string::npos)
        << "cut at " << n_bytes << " of " << good.size() << " bytes: got '" << error << "'";
  }
  std::vector<char> longer = good;
  longer.push_back('x');
  put(cut, longer);
  EXPECT_NE(read_error(cut).find("trailing"), std::string::npos) << read_error(cut);
}

TEST_F(CheckpointTest, WrongMagicIsNotACheckpoint) {
  const std::string path = write(3);
  std::vector<char> bytes = bytes_of(path);
  bytes[0] = 'X';
  put(path, bytes);
  EXPECT_NE(read_error(path).find("not a resync checkpoint"), std::string::npos)
      << read_error(path);
}

TEST_F(CheckpointTest, OtherFormatVersionIsRejected) {
  const std::string path = write(3);
  std::vector<char> bytes = bytes_of(path);
  const uint32_t future = kCheckpointVersion + 1;
  std::memcpy(bytes.data() + 8, &future, sizeof(future));
  put(path, bytes);
  const std::string error = read_error(path);
  EXPECT_NE(error.find("format version " + std::to_string(future)), std::string::npos) << error;
}

TEST_F(CheckpointTest, MissingFileIsADataError) {
  EXPECT_NE(read_error(dir_ + "/ckpt-000000001.rsck").find("cannot open"), std::string::npos);
}

TEST_F(CheckpointTest, OtherModelCannotResume) {
  const std::string path = write(3);
  const Checkpoint c = read_checkpoint(path);
  EXPECT_NO_THROW(check_resumable(c, path, meta(3).model, 46, 46));
  try {
    check_resumable(c, path, "mlp 8-5-2 (57 params)", 57, 57);
    FAIL() << "a checkpoint of another model was accepted";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("mlp 8-4-2"), std::string::npos) << what;
    EXPECT_NE(what.find("mlp 8-5-2"), std::string::npos) << what;
    EXPECT_NE(what.find(path), std::string::npos) << what;
  }
  EXPECT_THROW(check_resumable(c, path, meta(3).model, 46, 47), InvalidArgument);
}

TEST_F(CheckpointTest, ListingIgnoresTempAndForeignFiles) {
  write(20);
  write(3);
  write(100);
  put(dir_ + "/.ckpt-000000200.rsck.tmp", {'p', 'a', 'r', 't'});  // a writer died here
  put(dir_ + "/ckpt-abc.rsck", {'x'});
  put(dir_ + "/ckpt-000000300.rsck.bak", {'x'});
  put(dir_ + "/notes.txt", {'x'});
  const std::vector<CheckpointFile> files = list_checkpoints(dir_);
  ASSERT_EQ(files.size(), 3u);
  EXPECT_EQ(files[0].step, 3u);
  EXPECT_EQ(files[1].step, 20u);
  EXPECT_EQ(files[2].step, 100u);

  const std::optional<LoadedCheckpoint> latest = load_latest_checkpoint(dir_);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->checkpoint.meta.step, 100u) << "the leftover temp file must be ignored";
}

TEST_F(CheckpointTest, NoDirectoryOrNoCheckpointMeansNone) {
  EXPECT_TRUE(list_checkpoints(dir_ + "/absent").empty());
  EXPECT_FALSE(load_latest_checkpoint(dir_ + "/absent").has_value());
  EXPECT_FALSE(load_latest_checkpoint(dir_).has_value());
}

TEST_F(CheckpointTest, PruningKeepsTheNewestK) {
  for (uint64_t step : {10, 20, 30, 40, 50}) write(step);
  const std::vector<std::string> removed = prune_checkpoints(dir_, 2);
  EXPECT_EQ(removed.size(), 3u);
  std::vector<uint64_t> kept;
  for (const CheckpointFile& f : list_checkpoints(dir_)) kept.push_back(f.step);
  EXPECT_EQ(kept, (std::vector<uint64_t>{40, 50}));
  EXPECT_TRUE(prune_checkpoints(dir_, 5).empty());
  EXPECT_THROW(prune_checkpoints(dir_, 0), InvalidArgument);
}

TEST_F(CheckpointTest, CorruptNewestIsSkippedForTheOlderOne) {
  write(10);
  const std::string newest = write(20);
  std::vector<char> bytes = bytes_of(newest);
  bytes.resize(bytes.size() / 2);
  put(newest, bytes);
  write(15);  // steps need not be written in order
  const std::optional<LoadedCheckpoint> latest = load_latest_checkpoint(dir_);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->checkpoint.meta.step, 15u);
  EXPECT_EQ(latest->path, (fs::path(dir_) / checkpoint_file_name(15)).string());

  // Every one corrupt: none, never a partial load.
  for (const CheckpointFile& f : list_checkpoints(dir_)) put(f.path, {'R', 'S'});
  EXPECT_FALSE(load_latest_checkpoint(dir_).has_value());
}

TEST_F(CheckpointTest, PrepareCreatesTheDirectoryAndRemovesTempFiles) {
  const std::string nested = dir_ + "/a/b";
  prepare_checkpoint_dir(nested);
  EXPECT_TRUE(fs::is_directory(nested));
  put(nested + "/.ckpt-000000004.rsck.tmp", {'x'});
  put(nested + "/keep.txt", {'x'});
  prepare_checkpoint_dir(nested);
  EXPECT_FALSE(fs::exists(nested + "/.ckpt-000000004.rsck.tmp"));
  EXPECT_TRUE(fs::exists(nested + "/keep.txt"));
}

TEST_F(CheckpointTest, PrepareRejectsAnUnusableDirectory) {
  const std::string file = dir_ + "/plain-file";
  put(file, {'x'});
  for (const std::string& bad : {file, file + "/sub", std::string()}) {
    try {
      prepare_checkpoint_dir(bad);
      FAIL() << "'" << bad << "' was accepted as a checkpoint directory";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("--checkpoint-dir"), std::string::npos) << e.what();
    }
  }
}

TEST_F(CheckpointTest, WriteFailureIsAnError) {
  EXPECT_THROW(write_checkpoint(dir_ + "/absent", meta(1), values(4, 0), values(4, 0)), Error);
}

// ---- an async server's shard: each worker's own steps (format version 2) -------------------

std::string version_word(const std::vector<char>& bytes) {
  uint32_t v = 0;
  std::memcpy(&v, bytes.data() + 8, sizeof(v));
  return std::to_string(v);
}

TEST_F(CheckpointTest, WorkerStepsRoundTripAsVersion2AndPlainStaysVersion1) {
  CheckpointMeta m = meta(5);
  m.worker_steps = {9, 5};  // world 3: two workers besides one server
  const std::string path = write_checkpoint(dir_, m, values(6, 1.0f), values(6, 2.0f));
  EXPECT_EQ(read_checkpoint(path).meta, m);
  EXPECT_EQ(version_word(bytes_of(path)), "2");
  EXPECT_EQ(version_word(bytes_of(write(6))), "1") << "a sync checkpoint must stay version 1";
  expect_every_flipped_byte_caught(path);
}

TEST_F(CheckpointTest, WorkerStepsThatDoNotFitTheHeaderAreMalformed) {
  CheckpointMeta m = meta(4);
  m.worker_steps = {5, 9};  // their minimum is not the step
  std::string error = read_error(write_checkpoint(dir_, m, values(2, 1), values(2, 1)));
  EXPECT_NE(error.find("malformed"), std::string::npos) << error;
  EXPECT_NE(error.find("worker steps"), std::string::npos) << error;
  m.worker_steps = {4, 4, 4};  // as many workers as ranks
  error = read_error(write_checkpoint(dir_, m, values(2, 1), values(2, 1)));
  EXPECT_NE(error.find("worker count"), std::string::npos) << error;
}

// A server's shard of 4 parameters and their velocity, for ShardCheckpoints (ranks: server 0,
// workers 1 and 2).
struct Shard {
  std::vector<float> params = std::vector<float>(4, 0.0f);
  std::vector<float> velocity = std::vector<float>(4, 0.0f);
  ShardCheckpoints ckpt;
  explicit Shard(const std::string& dir, int world = 3)
      : ckpt(dir, 0, 1, 0, {std::span<float>(params), std::span<float>(velocity)},
             CheckpointMeta{.model = "mlp 2-2 (4 params)", .world_size = world}, 2) {}
};

TEST_F(CheckpointTest, ShardResumesEachWorkerAtItsOwnStep) {
  {
    Shard a(dir_);
    for (uint64_t step = 0; step < 5; ++step) {  // worker 2 pushes steps 0..4
      a.ckpt.apply(2, step, [&] { a.params[0] += 1; });
    }
    a.ckpt.apply(1, 0, [&] { a.params[1] += 1; });
    a.ckpt.saw(1, 2);  // worker 1's push of step 1 dropped as stale: done all the same
    a.ckpt.saw(2, 5);  // worker 2 queries before step 5: nothing new
    EXPECT_EQ(a.ckpt.progress(), 2u);
    // What the rescue saves: the shard and the steps as one.
    RescuePlan plan = a.ckpt.rescue_plan(0);
    ASSERT_TRUE(plan.stable->read_stable(std::chrono::milliseconds(100), [&](uint64_t step) {
      EXPECT_EQ(step, 2u);
      EXPECT_EQ(plan.meta(step).worker_steps, (std::vector<uint64_t>{2, 5}));
    }));
    a.ckpt.save();
  }
  EXPECT_TRUE(fs::exists(fs::path(server_checkpoint_dir(dir_, 0)) / "ckpt-000000002.rsck"));
  Shard b(dir_);
  EXPECT_EQ(b.ckpt.restore(2), (std::vector<uint64_t>{2, 5}));
  EXPECT_EQ(b.params, (std::vector<float>{5, 1, 0, 0}));
  // A relaunch with fewer workers: each continues at the slowest one's step.
  Shard c(dir_, 2);
  EXPECT_EQ(c.ckpt.restore(1), (std::vector<uint64_t>{2}));
}

TEST_F(CheckpointTest, ShardStepsOfAnotherWorkerCountAreBadInput) {
  Shard a(dir_);
  CheckpointMeta m{.step = 3, .model = "mlp 2-2 (4 params) shard 0 of 1", .world_size = 4,
                   .worker_steps = {3, 7}};  // 4 ranks, 1 server: 3 workers, not 2
  write_checkpoint(server_checkpoint_dir(dir_, 0), m, values(4, 1), values(4, 1));
  try {
    a.ckpt.restore(2);
    FAIL() << "a record of 2 workers from a run of 3 was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("steps of 2 workers"), std::string::npos) << e.what();
  }
}

// A worker's copy of the parameters (format version 3: shard versions, no worker steps) round
// trips, and every flipped byte of it is caught.
TEST_F(CheckpointTest, ShardVersionsRoundTripAsVersion3) {
  CheckpointMeta m = meta(7);
  m.world_size = 3;
  m.shard_versions = {12, 40};
  const std::string path = write_checkpoint(dir_, m, values(6, 1.0f), {});
  EXPECT_EQ(read_checkpoint(path).meta, m);
  EXPECT_EQ(version_word(bytes_of(path)), "3");
  expect_every_flipped_byte_caught(path);
  m.shard_versions = {1, 2, 3};  // as many shards as ranks
  const std::string error = read_error(write_checkpoint(dir_, m, values(6, 1.0f), {}));
  EXPECT_NE(error.find("shard count"), std::string::npos) << error;
}

// What a worker's rescue writes: its copy of the parameters after `steps_done` steps, holding
// the shard at `version`.
void save_worker_copy(const std::string& dir, int rank, uint64_t steps_done, uint64_t version,
                      const std::vector<float>& params) {
  WorkerCopy copy(dir, rank, params.size(), 1,
                  CheckpointMeta{.model = "mlp 2-2 (4 params)", .world_size = 3});
  copy.note(steps_done, params, std::vector<uint64_t>{version});
  RescuePlan plan = copy.rescue_plan(rank);
  ASSERT_TRUE(plan.stable->read_stable(std::chrono::milliseconds(100), [&](uint64_t step) {
    write_checkpoint(plan.checkpoint_dir, plan.meta(step), plan.state());
  }));
}

// A server that died after its last checkpoint: its shard's parameters resume from the freshest
// worker's copy, its optimizer state from the checkpoint, each worker at the newer of its steps.
TEST_F(CheckpointTest, DeadServerResumesFromTheFreshestWorkerCopy) {
  {
    Shard a(dir_);
    for (uint64_t step = 0; step < 3; ++step) {  // worker 1 pushes steps 0..2: version 3
      a.ckpt.apply(1, step, [&] { a.params[0] += 1, a.velocity[0] += 1; });
    }
    a.ckpt.apply(2, 0, [&] { a.params[1] += 1; });  // version 4
    a.ckpt.save();
    EXPECT_EQ(a.ckpt.version(), 4u);
  }
  // The server went on to version 6 and died; worker 1 holds version 6 after its step 4, worker
  // 2 version 5 after its step 1.
  save_worker_copy(dir_, 1, 5, 6, {5, 1, 0, 0});
  save_worker_copy(dir_, 2, 2, 5, {4, 2, 0, 0});
  Shard b(dir_);
  EXPECT_EQ(b.ckpt.restore(2), (std::vector<uint64_t>{5, 2}));
  EXPECT_TRUE(b.ckpt.restored_from_copy());
  EXPECT_EQ(b.ckpt.version(), 6u);
  EXPECT_EQ(b.params, (std::vector<float>{5, 1, 0, 0}));
  EXPECT_EQ(b.velocity, (std::vector<float>{3, 0, 0, 0})) << "the optimizer state is the shard's";

  // A server that saved its shard when it ended is newer than every copy: they are ignored.
  b.ckpt.resume_at(std::vector<uint64_t>{5, 2});
  b.ckpt.apply(2, 2, [&] { b.params[1] += 1; });  // version 7
  b.ckpt.save();
  Shard c(dir_);
  EXPECT_EQ(c.ckpt.restore(2), (std::vector<uint64_t>{5, 3}));
  EXPECT_FALSE(c.ckpt.restored_from_copy());
  EXPECT_EQ(c.params, (std::vector<float>{5, 2, 0, 0}));

  // A worker's next run removes its old copy; a copy of another run's shape is ignored.
  WorkerCopy fresh(dir_, 1, 4, 1, CheckpointMeta{.model = "mlp 2-2 (4 params)", .world_size = 3});
  EXPECT_TRUE(list_checkpoints(worker_copy_dir(dir_, 1)).empty());
  Shard d(dir_, 4);
  EXPECT_EQ(d.ckpt.restore(3), (std::vector<uint64_t>{3, 3, 3}));
  EXPECT_FALSE(d.ckpt.restored_from_copy());
}

// A shard checkpoint of an older build (format version 1: no steps per worker) resumes every
// worker at its step, the slowest one's.
TEST_F(CheckpointTest, ShardOfVersion1ResumesEveryWorkerAtItsStep) {
  Shard a(dir_);
  const CheckpointMeta m{.step = 6, .model = "mlp 2-2 (4 params) shard 0 of 1", .world_size = 3};
  write_checkpoint(server_checkpoint_dir(dir_, 0), m, values(4, 1), values(4, 1));
  EXPECT_EQ(a.ckpt.restore(2), (std::vector<uint64_t>{6, 6}));
}

// The rescue keeps the state locked after it read it: nothing changes after what it saved.
TEST(StableState, HeldAfterTheRescueRead) {
  auto* state = new StableState(7);  // leaked: never unlocked, as the process would exit
  EXPECT_TRUE(state->read_stable(std::chrono::milliseconds(100), [](uint64_t) {}, true));
  EXPECT_FALSE(state->read_stable(std::chrono::milliseconds(20), [](uint64_t) {}))
      << "the state was free again after a holding read";
}

// ---- preemption signals ----------------------------------------------------------------

TEST(PreemptionSignals, RecordsTheFirstSignalAndRestoresTheHandlers) {
  struct sigaction before {};
  ASSERT_EQ(::sigaction(SIGTERM, nullptr, &before), 0);
  {
    PreemptionSignals signals;
    EXPECT_EQ(signals.received(), 0);
    ASSERT_EQ(::raise(SIGUSR1), 0);  // would end the process without the handler
    EXPECT_EQ(signals.received(), SIGUSR1);
    ASSERT_EQ(::raise(SIGTERM), 0);
    EXPECT_EQ(signals.received(), SIGUSR1) << "a later signal replaced the first";
    EXPECT_THROW(PreemptionSignals second, Error);
  }
  struct sigaction after {};
  ASSERT_EQ(::sigaction(SIGTERM, nullptr, &after), 0);
  EXPECT_EQ(after.sa_handler, before.sa_handler) << "SIGTERM's handler was not restored";

  PreemptionSignals again;  // a new instance starts clean
  EXPECT_EQ(again.received(), 0);
  ASSERT_EQ(::raise(SIGTERM), 0);
  EXPECT_EQ(again.received(), SIGTERM);
}

TEST(PreemptionSignals, Names) {
  EXPECT_EQ(PreemptionSignals::name(SIGTERM), "SIGTERM");
  EXPECT_EQ(PreemptionSignals::name(SIGUSR1), "SIGUSR1");
  EXPECT_EQ(PreemptionSignals::name(SIGINT), "signal 2");
}

}  // namespace
}  // namespace resync::runtime
