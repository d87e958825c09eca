// Rescue: what a rank of a synchronous run does when the job cannot go on because a rank died,
// or rank 0 died or froze (docs/DESIGN.md, "Dead ranks"). It saves the newest complete state it
// holds as a checkpoint (one survivor writes, the others stand by in case it dies too) and exits
// with kExitRestart, never waiting in MPI, so that `resync launch` relaunches the job with
// --resume. Triggered by the coordinator watch (collectives/control/tcp_watch.h) on its thread,
// or by the training thread when a control or MPI call fails after set-up.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <string>

#include "runtime/io/checkpoint.h"

namespace resync::runtime {

// "Restart me": the job ended because a rank died; its newest state is in --checkpoint-dir.
inline constexpr int kExitRestart = 75;  // EX_TEMPFAIL

// Whether the state the training thread changes is complete, and at which step. The training
// thread wraps every change (an update, a catch-up) in a Change; a rescue on another thread
// reads the state only between changes. A change that never ends (its thread blocked for good
// in a transfer, or an exception left it half done) leaves the state torn: not saved.
class StableState {
 public:
  explicit StableState(uint64_t step) : step_(step) {}

  class Change {
   public:
    explicit Change(StableState& s) : s_(s), lock_(s.mu_) { s_.torn_ = true; }
    // The change is complete: the state is that after `step` steps.
    void done(uint64_t step) {
      s_.step_ = step;
      s_.torn_ = false;
    }

   private:
    StableState& s_;
    std::unique_lock<std::timed_mutex> lock_;
  };

  // Runs `read(step)` while no change is under way, if one ends within `wait` and left the
  // state complete. Returns false (read not called) otherwise. With `hold`, no change starts
  // after the read (the rescue: the process exits next, so that nothing, e.g. an async server's
  // next update, lands beyond the state it saved).
  bool read_stable(std::chrono::milliseconds wait, const std::function<void(uint64_t)>& read,
                   bool hold = false);

 private:
  std::timed_mutex mu_;
  bool torn_ = false;
  uint64_t step_;
};

struct RescuePlan {
  std::string checkpoint_dir;  // where the state goes (--checkpoint-dir)
  int rank = 0;
  StableState* stable = nullptr;  // null: this rank holds no state of its own (async worker)
  std::function<CheckpointMeta(uint64_t step)> meta;
  // The host view of the state (StateLayout's parts), fresh (on a GPU: downloaded).
  std::function<std::span<const std::span<float>>()> state;
  // Only this rank writes into checkpoint_dir (an async server's own directory): no claim, and
  // it writes even when a checkpoint of the same step exists (its shard moved on since).
  bool sole_writer = false;
};

// Arms the rescue for this process (one at a time; the plan must outlive disarm_rescue()).
void arm_rescue(RescuePlan plan);
void disarm_rescue();

// If a rescue is armed: saves the state (see the header comment) and ends the process with
// kExitRestart; a second caller waits for the first to end the process. Returns if none is.
void rescue_if_armed(const std::string& why);

}  // namespace resync::runtime
