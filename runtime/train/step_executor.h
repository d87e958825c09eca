// StepExecutor: carries out one rank's orders of the straggler-tolerant step protocol
// (docs/DESIGN.md, "The life of a step"): READY (or BUSY during an injected delay), then
// Participate, Passive, CatchUp, Serve and Retry orders until the step is done, and the final
// round. It works over three small interfaces: the control channel, the gradient exchange and
// the rank's state. The training loop (train_sync.cpp) feeds it; the protocol tests
// (tests/collectives/protocol) drive the same class over the loopback transport and the
// in-process control hub.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <vector>

#include "base/state_layout.h"
#include "collectives/allreduce/allreducer.h"
#include "collectives/control/control_plane.h"
#include "collectives/state/shm_state.h"
#include "collectives/transport/context.h"
#include "runtime/observe/timeline.h"
#include "runtime/train/rescue.h"

namespace resync::runtime {

// The rank's model as the protocol sees it. The training loop adapts its Replica; the protocol
// tests use a toy model.
class StepState {
 public:
  virtual ~StepState() = default;
  // The host buffer that the gradient exchange sums in place.
  virtual std::span<float> gradient() = 0;
  // After a failed all-reduce, whose partial sum is in gradient(): this step's gradient again
  // (same parameters, same batch: the same bits).
  virtual void recompute_gradient() = 0;
  // The update of training step `step` with the summed gradient times grad_scale
  // (1/|participants|).
  virtual void apply_update(float grad_scale, uint64_t step) = 0;
  // The state that catch-ups move, as StateLayout's parts (parameters first) in host memory:
  // download_state() before reading them, upload_state() after writing them.
  virtual StateLayout layout() const = 0;
  virtual std::span<const std::span<float>> host_state() = 0;
  virtual void download_state() = 0;
  virtual void upload_state() = 0;
  // On the host view: the parameters after the update of training step `step`, whose optimizer
  // buffers it now holds.
  virtual void apply_update_from_optimizer_state(uint64_t step) = 0;
};

// Sums the gradient over a step's all-reduce members (ascending world ranks), in place.
// Throws TimeoutError when a member does not take part within the context's timeout.
class GradientExchange {
 public:
  virtual ~GradientExchange() = default;
  virtual void allreduce_sum(std::span<const int> members, uint64_t seq) = 0;
};

// resync's all-reducer over a host gradient buffer (pinned on a GPU): the exchange of every run
// but plain sync with --collective nccl.
class AllreducerExchange final : public GradientExchange {
 public:
  AllreducerExchange(collectives::Allreducer& allreducer, std::span<float> grads)
      : allreducer_(allreducer), grads_(grads) {}
  void allreduce_sum(std::span<const int> members, uint64_t seq) override {
    allreducer_.allreduce_sum(grads_, members, seq);
  }

 private:
  collectives::Allreducer& allreducer_;
  std::span<float> grads_;
};

// What one step did on this rank.
struct StepReport {
  enum class Outcome { kUpdated, kCaughtUp };
  Outcome outcome = Outcome::kUpdated;
  uint64_t next_step = 0;     // the step this rank trains next
  bool stop = false;          // every rank stops after this round (SIGTERM/SIGUSR1 somewhere)
  bool final_round = false;   // caught up by the final round: training is over
  double wait_ms = 0;         // waiting for the order, the injected delay excluded
  double comm_ms = 0;         // all-reduce, update and catch-up transfers
  const collectives::StepOrder* order = nullptr;  // the order that ended the step
};

class StepExecutor {
 public:
  // A step may be re-run after a failed all-reduce; each attempt has its own message tags.
  static constexpr uint64_t kAttemptsPerStep = 16;

  struct Options {
    // Backup workers or a straggler timeout: a frozen rank cannot stall the others, and an
    // injected delay is spent reachable (BUSY) rather than asleep.
    bool straggler_mode = false;
    // How long a catch-up waits for a donor's state in shared memory.
    std::chrono::milliseconds state_timeout{2000};
    // Whether StepState::gradient() holds the sum after the exchange (not so for NCCL's device
    // gradient): then a non-finite sum stops the job before the update (NonFiniteError).
    bool check_summed_gradient = true;
  };

  // `board`: this rank's state in the node's shared memory (nullptr if it is not kept there);
  // its region holds host_state()'s parts back to back. Every reference must outlive this.
  StepExecutor(Options options, collectives::Context& ctx, collectives::ControlChannel& control,
               GradientExchange& exchange, StepState& state, collectives::ShmStateBoard* board,
               Timeline& timeline);

  // The state of a resumed run is that of `step` (what late peers of the node copy).
  void resumed_at(uint64_t step);

  // After computing the gradient of `step` (and an injected delay of delay_ms, spent here):
  // READY, then this rank's orders until the step is done.
  StepReport run(uint64_t step, double delay_ms);

  // After the last step (`step` = steps done): FINISH and the final round. Returns the step
  // count this rank ends with. Throws CommError if a final catch-up fails.
  StepReport finish(uint64_t step);

  uint64_t catch_ups() const { return catch_ups_; }
  // Steps whose update this rank received by catch-up, and steps it took part in with a zero
  // gradient (busy): its gradients that were dropped.
  uint64_t steps_skipped() const { return steps_skipped_; }
  uint64_t passive_steps() const { return passive_steps_; }
  // Whether the state is complete, and at which step: what a rescue may save (rescue.h).
  StableState& stable_state() { return stable_; }
  // Catch-ups whose state failed the checksums (a torn transfer, or parameters recomputed from
  // the optimizer buffers that differ from the donor's) and were asked for again.
  uint64_t torn_catch_ups() const { return torn_catch_ups_; }

 private:
  collectives::StepOrder await_order(uint64_t step, double delay_ms);
  // All-reduce and update for `order`; false if the all-reduce failed (order replaced by the
  // next one) rather than completed.
  bool participate(collectives::StepOrder& order);
  void serve_catch_ups(const collectives::StepOrder& order);
  // The state from order.donor; the step to continue with, or nothing if the transfer timed
  // out or arrived torn (ask for a new order).
  std::optional<uint64_t> catch_up(const collectives::StepOrder& order, uint64_t from_step);
  std::optional<uint64_t> catch_up_shared(const collectives::StepOrder& order, uint64_t version);
  // Checksums of the parameters and of the optimizer buffers, to detect a torn transfer.
  std::array<uint64_t, 2> state_checksums();

  Options options_;
  collectives::Context& ctx_;
  collectives::ControlChannel& control_;
  GradientExchange& exchange_;
  StepState& state_;
  collectives::ShmStateBoard* board_;
  Timeline& timeline_;
  int rank_;
  collectives::StepOrder order_;  // the order being carried out
  std::vector<int> members_;      // of each all-reduce; capacity reused every step
  std::vector<std::span<const float>> sent_;  // the state parts a catch-up sends (reused)
  uint64_t catch_ups_ = 0;
  uint64_t steps_skipped_ = 0;
  uint64_t passive_steps_ = 0;
  StableState stable_{0};
  uint64_t torn_catch_ups_ = 0;
};

}  // namespace resync::runtime
