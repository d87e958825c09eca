// RankZeroDuties: what rank 0 does between the steps of a synchronous run: the test-set
// evaluation after every epoch (and at the end) and the periodic and final checkpoints.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "runtime/observe/metrics.h"
#include "runtime/observe/progress.h"
#include "runtime/observe/timeline.h"
#include "base/log.h"
#include "runtime/io/checkpoint.h"
#include "runtime/train/sync_setup.h"
#include "runtime/train/train_common.h"

namespace resync::runtime {

// Rank 0's duties between steps: evaluation after every epoch (and at the end), periodic
// checkpoints. Its state after a step is the run's (participants agree bitwise; a rank that
// caught up holds the donor's).
class RankZeroDuties {
 public:
  RankZeroDuties(Setup& s, Timeline& timeline, ProgressReporter& progress, uint64_t start_step,
                 std::string resumed_from)
      : s_(s),
        timeline_(timeline),
        progress_(progress),
        epochs_evaluated_(start_step / s.sampler.steps_per_epoch()),
        last_checkpoint_(start_step),
        last_checkpoint_path_(std::move(resumed_from)) {}

  // Evaluates when this rank has completed an epoch (its step counter passed a boundary).
  void maybe_evaluate(uint64_t completed_steps, double train_loss) {
    const size_t epochs_done = completed_steps / s_.sampler.steps_per_epoch();
    const bool last = completed_steps == s_.total_steps;
    if (s_.rank != 0 || (epochs_done <= epochs_evaluated_ && !last)) return;
    if (last && last_eval_.step == completed_steps) return;
    epochs_evaluated_ = epochs_done;
    {
      auto span = timeline_.span("eval", static_cast<int64_t>(completed_steps));
      last_eval_ = evaluate(*s_.replica, s_.data.test, s_.cfg.batch_size, s_.x, s_.y);
    }
    last_eval_.epoch = s_.sampler.epoch_of(completed_steps - 1);
    last_eval_.step = completed_steps;
    last_eval_.elapsed_s = ms_since(start_) / 1000.0;
    s_.metrics.eval(last_eval_);
    progress_.clear_line();  // the log line must not run on from the live progress line
    if (last_eval_.test_bits_per_byte >= 0) {
      log::get("train")->info(
          "epoch {} step {}: validation loss {:.4f} nats, {:.4f} bits per byte, token accuracy "
          "{:.4f}, train loss {:.4f}, {:.1f} s",
          last_eval_.epoch, last_eval_.step, last_eval_.test_loss, last_eval_.test_bits_per_byte,
          last_eval_.test_accuracy, train_loss, last_eval_.elapsed_s);
      return;
    }
    log::get("train")->info(
        "epoch {} step {}: test accuracy {:.4f}, test loss {:.4f}, train loss {:.4f}, {:.1f} s",
        last_eval_.epoch, last_eval_.step, last_eval_.test_accuracy, last_eval_.test_loss,
        train_loss, last_eval_.elapsed_s);
  }

  void maybe_checkpoint(uint64_t completed_steps) {  // a catch-up may skip steps
    const uint64_t every = s_.cfg.checkpoint_every;
    if (s_.rank != 0 || every == 0) return;
    if (completed_steps / every > last_checkpoint_ / every) write_checkpoint_at(completed_steps);
  }

  // The end of the run: a checkpoint unless the last one is of this step.
  void final_checkpoint(uint64_t steps) {
    if (s_.rank != 0 || s_.cfg.checkpoint_dir.empty()) return;
    if (last_checkpoint_ != steps || last_checkpoint_path_.empty()) write_checkpoint_at(steps);
  }

  const EvalRecord& last_eval() const { return last_eval_; }
  const std::string& last_checkpoint_path() const { return last_checkpoint_path_; }

 private:
  void write_checkpoint_at(uint64_t completed_steps) {
    auto span = timeline_.span("checkpoint", static_cast<int64_t>(completed_steps));
    const auto t0 = std::chrono::steady_clock::now();
    s_.replica->download_state();
    last_checkpoint_path_ = write_checkpoint(s_.cfg.checkpoint_dir,
                                             checkpoint_meta(s_, completed_steps),
                                             s_.replica->host_state());
    prune_checkpoints(s_.cfg.checkpoint_dir, s_.cfg.checkpoint_keep);
    last_checkpoint_ = completed_steps;
    progress_.clear_line();
    log::get("ckpt")->info("checkpoint {} written ({:.0f} ms)", last_checkpoint_path_,
                           ms_since(t0));
  }

  Setup& s_;
  Timeline& timeline_;
  ProgressReporter& progress_;
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  size_t epochs_evaluated_;
  EvalRecord last_eval_;
  uint64_t last_checkpoint_;
  std::string last_checkpoint_path_;
};

}  // namespace resync::runtime
