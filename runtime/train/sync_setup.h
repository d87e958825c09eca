// The pieces of a synchronous run around its step loop (train_sync.cpp): the coordinator's
// configuration, resuming from a checkpoint, the gradient plane (all-reducer, exchange, state
// in the node's shared memory), the replica as the step protocol sees it, and the agreed
// reason for a stop.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "collectives/allreduce/allreducer.h"
#include "collectives/control/coordinator.h"
#include "collectives/state/shm_state.h"
#include "collectives/transport/context.h"
#include "runtime/io/checkpoint.h"
#include "runtime/io/config.h"
#include "runtime/train/preemption.h"
#include "runtime/train/replica.h"
#include "runtime/train/overlap_exchange.h"
#include "runtime/train/step_executor.h"
#include "runtime/train/train_common.h"

namespace resync::runtime {

// `shared_state_node`: per rank, the node whose shared memory holds its state, or -1
// (CoordinatorConfig::shared_state_node); empty at set-up, before the window exists.
collectives::CoordinatorConfig coordinator_config(const TrainConfig& cfg, int world,
                                                  std::vector<int> shared_state_node = {});

CheckpointMeta checkpoint_meta(const Setup& s, uint64_t step);

struct ResumePoint {
  uint64_t step = 0;  // the first step to train
  std::string path;   // the checkpoint loaded; empty for a fresh start
};

// Rank 0 checks that --checkpoint-dir is writable. With --resume, rank 0 picks the newest valid
// checkpoint and every rank loads that same file into `state` (the directory must be shared, as
// it must be anyway for a job requeued on other nodes). Runs before the control plane exists,
// so a bad checkpoint ends the job like bad flags: one line, exit 2. Collective.
ResumePoint restore_checkpoint(const Setup& s, std::span<const std::span<float>> state);

// How gradients and state travel between the ranks of a synchronous run. The all-reducer uses
// shared memory among the ranks of a node, a latency-optimal path for small buffers, the
// pipelined ring otherwise, every path over the step's participants only. Each rank's part of
// the node's window holds its gradient and, with stragglers on the CPU, its state
// (StateLayout::window_*), from which late ranks of the node copy it (ShmStateBoard).
struct GradientPlane {
  std::unique_ptr<collectives::Allreducer> allreducer;
  // resync's all-reducer over the host gradient (pinned on a GPU), or for plain sync on GPUs
  // with --collective nccl, NCCL over the device gradient.
  std::unique_ptr<GradientExchange> exchange;
  bool nccl = false;
  // Plain sync with --overlap: the exchange, which the replica's backward pass feeds.
  OverlapExchange* overlap = nullptr;
  std::unique_ptr<collectives::ShmStateBoard> board;  // null: the state is not in the window
  // Per rank, the lowest rank of its node if its state is in shared memory, else -1.
  std::vector<int> shared_state_node;
};
// Collective (the window, the gather of shared_state_node). Places the replica's gradient and
// state into the window where it can.
GradientPlane make_gradient_plane(const TrainConfig& cfg, Replica& replica,
                                  collectives::Context& ctx, bool straggler_mode, int rank,
                                  int world);

// The replica as the step protocol sees it; a retried all-reduce recomputes this rank's batch.
class ReplicaStepState final : public StepState {
 public:
  ReplicaStepState(Replica& replica, Setup& s) : replica_(replica), s_(s) {}
  std::span<float> gradient() override { return replica_.gradient_buffer(); }
  void recompute_gradient() override {
    replica_.compute_gradients(s_.x.data(), s_.y.data(), s_.cfg.batch_size);
  }
  void apply_update(float grad_scale, uint64_t step) override {
    replica_.apply_gradients(grad_scale, step);
  }
  StateLayout layout() const override { return replica_.state_layout(); }
  std::span<const std::span<float>> host_state() override { return replica_.host_state(); }
  void download_state() override { replica_.download_state(); }
  void upload_state() override { replica_.upload_state(); }
  void apply_update_from_optimizer_state(uint64_t step) override {
    replica_.apply_update_from_optimizer_state(step);
  }

 private:
  Replica& replica_;
  Setup& s_;
};

// Which signal stopped the run and where, on every rank (only the signalled ranks know): the
// lowest signalled rank's. Collective; every rank calls it when the final order says `stop`.
struct StopReason {
  std::string signal = "a stop request";
  int rank = -1;
};
StopReason agreed_stop_reason(const PreemptionSignals& signals, int rank, int world);

}  // namespace resync::runtime
