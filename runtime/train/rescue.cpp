// The rescue of a synchronous run after a death: save once, exit with kExitRestart.
#include "runtime/train/rescue.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <thread>

#include "base/log.h"

namespace resync::runtime {

namespace fs = std::filesystem;

bool StableState::read_stable(std::chrono::milliseconds wait,
                              const std::function<void(uint64_t)>& read, bool hold) {
  std::unique_lock<std::timed_mutex> lock(mu_, std::defer_lock);
  if (!lock.try_lock_for(wait) || torn_) return false;
  read(step_);
  if (hold) lock.release();  // stays locked until the process ends
  return true;
}

namespace {

std::mutex armed_mu;
std::optional<RescuePlan> armed;  // guarded by armed_mu
std::atomic<bool> rescuing{false};

// How long a survivor that lost the claim waits for the writer's file before writing it itself.
constexpr auto kWriterGrace = std::chrono::seconds(5);
// How long a rescue waits for a change of the state under way (an update) to end.
constexpr auto kChangeWait = std::chrono::milliseconds(2000);

bool newest_at_least(const std::string& dir, uint64_t step) {
  try {
    const std::vector<CheckpointFile> files = list_checkpoints(dir);
    return !files.empty() && files.back().step >= step;
  } catch (const std::exception&) {
    return false;
  }
}

// One survivor writes: the first to create the claim file. The others wait for its checkpoint
// and write it themselves if it does not come (the writer may have died too). Every survivor at
// step S holds the same bits, so whoever writes, the file is the same.
void save(const RescuePlan& plan, uint64_t step, const std::span<const std::span<float>> state) {
  auto log = log::get("ckpt");
  if (plan.sole_writer) {
    const std::string path = write_checkpoint(plan.checkpoint_dir, plan.meta(step), state);
    log->warn("rank {}: saved its state to {}", plan.rank, path);
    return;
  }
  if (newest_at_least(plan.checkpoint_dir, step)) {
    log->info("rank {}: a checkpoint of step {} or later exists already", plan.rank, step);
    return;
  }
  const std::string name = checkpoint_file_name(step);
  const std::string claim = (fs::path(plan.checkpoint_dir) / ("." + name + ".claim.tmp")).string();
  const int fd = ::open(claim.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    const auto deadline = std::chrono::steady_clock::now() + kWriterGrace;
    while (std::chrono::steady_clock::now() < deadline) {
      if (newest_at_least(plan.checkpoint_dir, step)) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    log->warn("rank {}: the rank that claimed step {} did not write it; writing it", plan.rank,
              step);
  } else {
    ::close(fd);
  }
  const std::string path = write_checkpoint(plan.checkpoint_dir, plan.meta(step), state);
  ::unlink(claim.c_str());
  log->warn("rank {}: saved the state after step {} to {}", plan.rank, step, path);
}

}  // namespace

void arm_rescue(RescuePlan plan) {
  std::lock_guard<std::mutex> lock(armed_mu);
  armed = std::move(plan);
}

void disarm_rescue() {
  std::lock_guard<std::mutex> lock(armed_mu);
  armed.reset();
}

void rescue_if_armed(const std::string& why) {
  std::optional<RescuePlan> plan;
  {
    std::lock_guard<std::mutex> lock(armed_mu);
    if (!armed) return;
    plan = armed;
  }
  if (rescuing.exchange(true)) {
    while (true) std::this_thread::sleep_for(std::chrono::hours(1));  // the first one exits
  }
  auto log = log::get("train");
  log->error(
      "rank {}: {}; saving the newest complete state, then exiting with code {} "
      "(restart with --resume)",
      plan->rank, why, kExitRestart);
  try {
    if (plan->stable == nullptr) {
      log->info("rank {} holds no state of its own to save", plan->rank);
    } else if (const bool saved = plan->stable->read_stable(
                   std::chrono::duration_cast<std::chrono::milliseconds>(kChangeWait),
                   [&](uint64_t step) { save(*plan, step, plan->state()); }, /*hold=*/true);
               !saved) {
      log->warn(
          "rank {}: its state was being changed (a catch-up or update that cannot end); "
          "another rank saves",
          plan->rank);
    }
  } catch (const std::exception& e) {
    log->error("rank {}: could not save its state: {}", plan->rank, e.what());
  }
  log::get("train")->flush();
  log::get("ckpt")->flush();
  std::fflush(nullptr);
  ::_exit(kExitRestart);  // no MPI_Finalize: it would wait for the dead rank
}

}  // namespace resync::runtime
