// Synchronous data-parallel training (docs/DESIGN.md, "The life of a step"). One step reads top
// to bottom: batch -> forward/backward -> the step protocol (READY, the coordinator's order,
// all-reduce over the participants, averaged update, catch-ups: StepExecutor) -> metrics,
// evaluation and checkpoints on rank 0. A stop at the next step boundary when any rank receives
// SIGTERM/SIGUSR1 (all ranks agree through the coordinator).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <thread>

#include "base/error.h"
#include "base/log.h"
#include "collectives/transport/context.h"
#include "collectives/control/control_plane.h"
#include "collectives/transport/mpi_session.h"
#include "collectives/transport/mpi_transport.h"
#ifdef RESYNC_WITH_CUDA
#include "collectives/allreduce/nccl_allreduce.h"
#endif
#include "collectives/allreduce/allreducer.h"
#include "collectives/state/shm_state.h"
#include "collectives/control/tcp_control.h"
#include "collectives/transport/world.h"
#include "kernels/gemm.h"
#include "models/model.h"
#include "runtime/io/checkpoint.h"
#include "runtime/train/checksum.h"
#include "runtime/io/dataset.h"
#include "runtime/train/inject_delay.h"
#include "runtime/train/optimizer.h"
#include "runtime/train/preemption.h"
#include "runtime/observe/progress.h"
#include "runtime/observe/timeline.h"
#include "runtime/train/train.h"
#include "runtime/train/replica.h"
#include "runtime/train/step_executor.h"
#include "runtime/train/train_common.h"

namespace resync::runtime {
namespace {

using Clock = std::chrono::steady_clock;

// `shared_state_node`: per rank, the node whose shared memory holds its state, or -1
// (CoordinatorConfig::shared_state_node); empty at set-up, before the window exists.
collectives::CoordinatorConfig coordinator_config(const TrainConfig& cfg, int world,
                                                  std::vector<int> shared_state_node = {}) {
  collectives::CoordinatorConfig c;
  c.world_size = world;
  c.backup_workers = cfg.backup_workers;
  c.straggler_timeout_ms = static_cast<int64_t>(std::llround(cfg.straggler_timeout_ms));
  c.min_quorum = cfg.min_quorum;
  c.stall_warning_s = cfg.stall_warning_s;
  c.stall_abort_s = cfg.stall_abort_s;
  c.repair_window_ms = cfg.ring_timeout_ms;
  c.early_catch_up = cfg.early_catch_up;
  c.shared_state_node = std::move(shared_state_node);
  return c;
}

// The ranks of [0, world) not in `members` (sorted), into `out` (its capacity is reused).
void complement(const std::vector<int>& members, int world, std::vector<int>& out) {
  out.clear();
  size_t j = 0;
  for (int r = 0; r < world; ++r) {
    if (j < members.size() && members[j] == r) {
      ++j;
    } else {
      out.push_back(r);
    }
  }
}

// Runs `fn` on every rank and agrees on success, as agreed_setup does: the lowest failing rank
// rethrows its error (one report), the others throw PeerSetupFailed.
void agreed(int rank, int world, const std::function<void()>& fn) {
  std::exception_ptr error;
  try {
    fn();
  } catch (const Error&) {
    error = std::current_exception();
  }
  const int first_failed = collectives::lowest_failed_rank(error != nullptr);
  if (first_failed == rank) std::rethrow_exception(error);
  if (first_failed < world) throw PeerSetupFailed();
}

CheckpointMeta checkpoint_meta(const Setup& s, uint64_t step) {
  return {.step = step,
          .model = s.replica->model_description(),
          .world_size = s.world,
          .seed = s.cfg.seed,
          .batch_size = s.cfg.batch_size};
}

struct ResumePoint {
  uint64_t step = 0;  // the first step to train
  std::string path;   // the checkpoint loaded; empty for a fresh start
};

// Rank 0 checks that --checkpoint-dir is writable. With --resume, rank 0 picks the newest valid
// checkpoint and every rank loads that same file into `state` (the directory
// must be shared, as it must be anyway for a job requeued on other nodes). Runs before the
// control plane exists, so a bad checkpoint ends the job like bad flags: one line, exit 2.
ResumePoint restore_checkpoint(const Setup& s, std::span<const std::span<float>> state) {
  const TrainConfig& cfg = s.cfg;
  if (cfg.checkpoint_dir.empty()) return {};
  auto log = log::get("ckpt");
  std::optional<LoadedCheckpoint> latest;
  agreed(s.rank, s.world, [&] {
    if (s.rank != 0) return;
    prepare_checkpoint_dir(cfg.checkpoint_dir);
    if (cfg.resume) latest = load_latest_checkpoint(cfg.checkpoint_dir);
  });
  if (!cfg.resume) return {};
  const std::string path = collectives::broadcast_string(latest ? latest->path : "", 0);
  if (path.empty()) {
    if (s.rank == 0) {
      log->info("--resume: no checkpoint in {}; starting from step 0", cfg.checkpoint_dir);
    }
    return {};
  }
  CheckpointMeta meta;
  agreed(s.rank, s.world, [&] {
    Checkpoint c = latest ? std::move(latest->checkpoint) : read_checkpoint(path);
    restore_state(c, path, s.replica->model_description(), s.replica->state_layout(), state);
    meta = std::move(c.meta);
  });
  if (s.rank == 0) {
    log->info("resumed from {} at step {} (epoch {})", path, meta.step,
              s.sampler.epoch_of(meta.step));
    const CheckpointMeta now = checkpoint_meta(s, meta.step);
    if (meta.world_size != now.world_size || meta.seed != now.seed ||
        meta.batch_size != now.batch_size) {
      log->warn("the checkpoint was written by a run with {} ranks, seed {}, batch size {}; this "
                "run has {}, {}, {}: its batches differ from an uninterrupted run's",
                meta.world_size, meta.seed, meta.batch_size, now.world_size, now.seed,
                now.batch_size);
    }
    if (meta.step >= s.total_steps) {
      log->warn("the checkpoint is at step {}, this run has {} steps: nothing left to train",
                meta.step, s.total_steps);
    }
  }
  return {meta.step, path};
}

// Which signal stopped the run and where, on every rank (only the signalled ranks know): the
// lowest signalled rank's. Collective; every rank calls it when the final order says `stop`.
struct StopReason {
  std::string signal = "a stop request";
  int rank = -1;
};
StopReason agreed_stop_reason(const PreemptionSignals& signals, int rank, int world) {
  const int signalled = collectives::lowest_failed_rank(signals.received() != 0);
  if (signalled >= world) return {};
  return {collectives::broadcast_string(
              rank == signalled ? PreemptionSignals::name(signals.received()) : "", signalled),
          signalled};
}

#ifdef RESYNC_WITH_CUDA
// --collective nccl (plain sync on GPUs, which validate_for_world enforces): NCCL over the
// device gradient; every rank takes part, so the members are all of them.
class NcclGradientExchange final : public GradientExchange {
 public:
  explicit NcclGradientExchange(Replica& replica)
      : replica_(replica), nccl_(MPI_COMM_WORLD, replica.cuda_device()) {}
  void allreduce_sum(std::span<const int> /*members*/, uint64_t /*seq*/) override {
    nccl_.allreduce(replica_.device_gradient_buffer(), collectives::NcclReduceOp::kSum);
  }

 private:
  Replica& replica_;
  collectives::NcclAllreduce nccl_;
};
#endif

// The NCCL exchange for --device cuda --collective nccl, else nullptr (the ring over the host
// gradient); sets where the replica leaves its gradient.
std::unique_ptr<GradientExchange> make_device_exchange(const TrainConfig& cfg, Replica& replica,
                                                       int rank) {
  if (cfg.device != "cuda") return nullptr;
  const GpuExchangeChoice choice =
      choose_gpu_exchange(cfg.collective, collectives::describe(collectives::mpi_cuda_support()));
  if (rank == 0) log::get("train")->info("gradient exchange on GPUs: {}", choice.reason);
  replica.set_gradient_location(choice.location);
  if (choice.exchange != GpuExchange::kNccl) return nullptr;
#ifdef RESYNC_WITH_CUDA
  return std::make_unique<NcclGradientExchange>(replica);
#else
  throw DeviceError("--collective nccl: this build has no CUDA support");
#endif
}

// The replica as the step protocol sees it; a retried all-reduce recomputes this rank's batch.
class ReplicaStepState final : public StepState {
 public:
  ReplicaStepState(Replica& replica, Setup& s) : replica_(replica), s_(s) {}
  std::span<float> gradient() override { return replica_.gradient_buffer(); }
  void recompute_gradient() override {
    replica_.compute_gradients(s_.x.data(), s_.y.data(), s_.cfg.batch_size);
  }
  void apply_update(float grad_scale) override { replica_.apply_gradients(grad_scale); }
  StateLayout layout() const override { return replica_.state_layout(); }
  std::span<const std::span<float>> host_state() override { return replica_.host_state(); }
  void download_state() override { replica_.download_state(); }
  void upload_state() override { replica_.upload_state(); }
  void apply_update_from_optimizer_state() override {
    replica_.apply_update_from_optimizer_state();
  }

 private:
  Replica& replica_;
  Setup& s_;
};

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
    const Clock::time_point t0 = Clock::now();
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
  const Clock::time_point start_ = Clock::now();
  size_t epochs_evaluated_;
  EvalRecord last_eval_;
  uint64_t last_checkpoint_;
  std::string last_checkpoint_path_;
};

}  // namespace

SummaryRecord train_sync(const TrainConfig& cfg, collectives::MpiSession& mpi) {
  auto log = log::get("train");
  const int rank = mpi.rank();
  const int world = mpi.size();
  const PreemptionSignals signals;  // SIGTERM/SIGUSR1 from now on: stop at a step boundary
  std::unique_ptr<Timeline> timeline;  // --timeline: disabled without it
  std::unique_ptr<Setup> setup =
      agreed_setup(cfg, rank, world, {.index = rank, .count = world}, [&] {
        collectives::CoordinatorConfig(coordinator_config(cfg, world)).validate();
        timeline = make_timeline(cfg.timeline, rank);  // a bad path fails set-up on every rank
      });
  Setup& s = *setup;
  Replica& replica = *s.replica;
  const StateLayout layout = replica.state_layout();
  // With backup workers or a timeout, a rank frozen inside the all-reduce must not stall the
  // others: the ring gives up after --ring-timeout-ms and the step is repaired without it. Plain
  // synchronous SGD waits for everyone, like MPI_Allreduce (the coordinator reports the stall).
  const bool straggler_mode = cfg.backup_workers > 0 || cfg.straggler_timeout_ms > 0;

  // Data plane: MPI on a private communicator. Control plane: TCP to rank 0's coordinator.
  collectives::MpiTransport transport;
  collectives::Context ctx(transport);
  // Shared memory among the ranks of a node, a latency-optimal path for small buffers, the
  // pipelined ring otherwise; every path runs over the step's participants only. Each rank's
  // part of the node's window holds its gradient and, with stragglers on the CPU, its state
  // (StateLayout::window_*): a late rank copies that state itself (ShmStateBoard).
  const bool state_in_shm = straggler_mode && replica.cuda_device() < 0;
  collectives::Allreducer allreducer(
      ctx, {.ring = {.segment_bytes = cfg.segment_kib * 1024},
            .shm = {.direct_elems = state_in_shm ? layout.window_floats() : layout.n_params},
            .max_elems = layout.n_params});
  ctx.set_timeout(straggler_mode ? std::chrono::milliseconds(cfg.ring_timeout_ms)
                                 : std::chrono::milliseconds(std::chrono::hours(24 * 365)));
  // The gradient exchange: resync's all-reducer over the host gradient buffer (pinned on a GPU),
  // or, for plain sync on GPUs with --collective nccl, NCCL over the device gradient.
  std::unique_ptr<GradientExchange> exchange = make_device_exchange(cfg, replica, rank);
  const bool nccl = exchange != nullptr;
  const std::span<float> window = allreducer.shared_buffer();
  if (!nccl && window.size() >= layout.n_params) {
    replica.place_gradients(layout.window_gradient(window));
  }
  if (!nccl) exchange = std::make_unique<AllreducerExchange>(allreducer, replica.gradient_buffer());
  std::unique_ptr<collectives::ShmStateBoard> board;
  if (state_in_shm && allreducer.shm() != nullptr && window.size() >= layout.window_floats() &&
      replica.place_state(layout.window_state(window))) {
    board = std::make_unique<collectives::ShmStateBoard>(
        *allreducer.shm(), layout.window_state_offset(), layout.n_floats());
  }
  // Ranks with the same id copy each other's state: the lowest rank of the node.
  int state_node = -1;
  for (int r = 0; board && r < world && state_node < 0; ++r) {
    if (board->covers(r)) state_node = r;
  }
  std::vector<int> shared_state_node = collectives::gather_from_ranks(state_node);
  const auto n_state_in_shm = std::count_if(shared_state_node.begin(), shared_state_node.end(),
                                            [](int n) { return n >= 0; });

  // On the CPU the host state is the live one; on a GPU a mirror, sent back after a resume.
  const ResumePoint resumed = restore_checkpoint(s, replica.host_state());
  mpi.mark_setup_agreed();  // the last step every rank agrees on before training
  if (!resumed.path.empty()) replica.upload_state();
  const uint64_t start_step = resumed.step;
  PhaseRecorder allreduce_phases(*timeline, StepExecutor::kAttemptsPerStep);
  if (timeline->enabled()) allreducer.set_phase_observer(&allreduce_phases);
  ProgressReporter progress = make_progress_reporter(cfg, rank);
  std::unique_ptr<collectives::TcpControlServer> coordinator;
  if (rank == 0) {
    collectives::TcpServerOptions options;
    options.coordinator = coordinator_config(cfg, world, std::move(shared_state_node));
    options.coordinator.first_step = start_step;  // a resumed run keeps its step numbers
    coordinator = std::make_unique<collectives::TcpControlServer>(options);
  }
  const std::string endpoint =
      collectives::broadcast_string(coordinator ? coordinator->endpoint() : "", 0);
  std::unique_ptr<collectives::ControlChannel> control =
      collectives::TcpControlClient::connect(endpoint, rank);

  if (rank == 0) {
    log->info("config: {}", describe(cfg));
    log->info("{} ranks, model {}, data {} ({} train / {} test samples), {} steps/epoch, "
              "{} steps, BLAS {}",
              world, replica.describe(), cfg.data, s.data.train.n_samples(),
              s.data.test.n_samples(), s.sampler.steps_per_epoch(), s.total_steps,
              kernels::blas_core());
    log->info("coordinator at {}, W={} b={} straggler-timeout-ms={}", coordinator->address(),
              world, cfg.backup_workers, cfg.straggler_timeout_ms);
    log->info("gradient {}", allreducer.describe());
    if (straggler_mode) {
      log->info("catch-ups: {} of {} ranks keep their state in shared memory, where late ranks "
                "of their node copy it; the state of any other rank travels by MPI",
                n_state_in_shm, world);
    }
  }
  if (const std::string advice = kernels::blas_core_advice(); !advice.empty() && rank == 0) {
    log->warn("{}", advice);
  }

  ReplicaStepState step_state(replica, s);
  StepExecutor executor(
      {.straggler_mode = straggler_mode,
       .state_timeout = std::chrono::milliseconds(cfg.ring_timeout_ms)},
      ctx, *control, *exchange, step_state, board.get(), *timeline);
  executor.resumed_at(start_step);
  RankZeroDuties duties(s, *timeline, progress, start_step, resumed.path);
  const Clock::time_point start = Clock::now();
  uint64_t dropped_so_far = 0;  // gradients left out of the steps rank 0 took part in
  uint64_t step = start_step;
  StepRecord rec;  // its rank lists keep their capacity from step to step
  rec.participants.reserve(static_cast<size_t>(world));
  rec.dropped.reserve(static_cast<size_t>(world));
  rec.late.reserve(static_cast<size_t>(world));
  bool stop = false;
  bool stop_requested = false;
  bool training_over = false;  // a late rank may be caught up by the final round itself
  while (step < s.total_steps && !stop && !training_over) {
    if (signals.received() != 0 && !stop_requested) {
      log->warn("received {}: asking every rank to stop at the next step boundary",
                PreemptionSignals::name(signals.received()));
      control->request_stop();
      stop_requested = true;
    }
    rec.step = step;
    rec.epoch = s.sampler.epoch_of(step);
    const Clock::time_point t0 = Clock::now();

    // Forward and backward on this rank's own mini-batch.
    s.data.train.gather(s.sampler.batch(step), s.x.data(), s.y.data());
    rec.loss = replica.compute_gradients(s.x.data(), s.y.data(), cfg.batch_size);
    rec.compute_ms = ms_since(t0);
    timeline->end("compute", t0, static_cast<int64_t>(step));

    // The step protocol: READY (after any injected delay), the coordinator's orders, the
    // all-reduce over the participants and the averaged update, or a catch-up.
    rec.delay_ms = injected_delay_ms(s.delay_spec, cfg.seed, step, rank, world);
    const StepReport report = executor.run(step, rec.delay_ms);
    stop = report.stop;
    training_over = report.final_round;
    if (report.outcome == StepReport::Outcome::kCaughtUp) {
      step = report.next_step;
      duties.maybe_evaluate(step, rec.loss);
      duties.maybe_checkpoint(step);
      continue;
    }
    if (rank == 0 && step == start_step && !nccl) {
      log->info("step {}: all-reduce of {} floats over {} ranks took the {} path", step,
                layout.n_params, report.order->participants.size(),
                collectives::path_name(allreducer.last_path()));
    }

    // The step's record, on rank 0.
    const collectives::StepOrder& order = *report.order;
    rec.wait_ms = report.wait_ms;
    rec.comm_ms = report.comm_ms;
    rec.participants.assign(order.participants.begin(), order.participants.end());
    complement(order.participants, world, rec.dropped);
    rec.late.clear();
    for (const collectives::CatchUp& c : order.catchups) rec.late.push_back(c.late_rank);
    rec.step_ms = ms_since(t0);
    rec.elapsed_s = ms_since(start) / 1000.0;
    if (rank == 0 && (step % cfg.metrics_every == 0 || step + 1 == s.total_steps)) {
      s.metrics.step(rec);
    }
    step = report.next_step;
    dropped_so_far += rec.dropped.size();
    if (progress.mode() != ProgressMode::kOff) {
      const double elapsed_s = ms_since(start) / 1000.0;
      const uint64_t samples =
          (uint64_t(world) * (step - start_step) - dropped_so_far) * cfg.batch_size;
      progress.update({.step = step,
                       .total_steps = s.total_steps,
                       .epoch = rec.epoch,
                       .loss = rec.loss,
                       .samples_per_s = elapsed_s > 0 ? double(samples) / elapsed_s : 0,
                       .dropped = dropped_so_far});
    }
    duties.maybe_evaluate(step, rec.loss);
    duties.maybe_checkpoint(step);
  }

  // Final round: every rank ends with the same state (late ranks are caught up once more).
  if (!training_over) {
    const StepReport last = executor.finish(step);
    stop = last.stop;
    step = last.next_step;
  }
  progress.finish();  // before the final evaluation's and summary's log lines
  duties.maybe_evaluate(step, 0);

  // A stopped run (preemption) and every run with --checkpoint-dir end with a checkpoint.
  const StopReason stopped_by = stop ? agreed_stop_reason(signals, rank, world) : StopReason{};
  duties.final_checkpoint(step);
  if (rank == 0 && stop) {
    log->warn("stopped by {} at step {}{}; {}", stopped_by.signal, step,
              stopped_by.rank >= 0 ? fmt::format(" (signalled on rank {})", stopped_by.rank)
                                   : std::string(),
              cfg.checkpoint_dir.empty()
                  ? std::string("no checkpoint written (no --checkpoint-dir)")
                  : fmt::format("checkpoint {} written; resume with --resume",
                                duties.last_checkpoint_path()));
  }

  // ---- summary: every rank's checksum compared ------------------------------------------
  SummaryRecord summary;
  summary.steps = step;
  summary.elapsed_s = ms_since(start) / 1000.0;
  // Gradients dropped: a catch-up skips steps; a passive member's own gradient is discarded.
  const uint64_t dropped =
      collectives::sum_over_ranks(executor.steps_skipped() + executor.passive_steps());
  const uint64_t samples = (uint64_t(world) * (step - start_step) - dropped) * cfg.batch_size;
  summary.samples_per_s = summary.elapsed_s > 0 ? double(samples) / summary.elapsed_s : 0;
  summary.test_accuracy = duties.last_eval().test_accuracy;
  replica.download_state();
  const uint64_t checksum = checksum64(replica.host_state()[0]);
  summary.param_checksum = fmt::format("{:016x}", checksum);
  summary.ranks_agree = collectives::all_ranks_equal(checksum);
  summary.dropped_gradients = dropped;
  summary.catch_ups = collectives::sum_over_ranks(executor.catch_ups());
  if (!resumed.path.empty()) summary.resumed_from_step = start_step;
  if (stop) summary.stopped_by = stopped_by.signal;
  if (rank == 0) {
    s.metrics.summary(summary);
    log->info("done: {} steps in {:.1f} s, {:.0f} samples/s, test accuracy {:.4f}, checksum {}, "
              "ranks agree: {}, dropped gradients {}, catch-ups {}",
              summary.steps, summary.elapsed_s, summary.samples_per_s, summary.test_accuracy,
              summary.param_checksum, summary.ranks_agree, summary.dropped_gradients,
              summary.catch_ups);
  }
  timeline->finish();
  return summary;
}

}  // namespace resync::runtime
