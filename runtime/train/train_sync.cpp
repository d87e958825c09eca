// Synchronous data-parallel training (DESIGN.md, "The synchronous step"). One step reads top to
// bottom: batch -> forward/backward -> READY, wait for the order -> ring all-reduce over the
// participants -> averaged update -> send state to the late ranks this rank serves; a
// checkpoint from rank 0 every --checkpoint-every steps, and a stop at the next step boundary
// when any rank receives SIGTERM/SIGUSR1 (all ranks agree through the coordinator).
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
#include "collectives/state/state_transfer.h"
#include "collectives/control/tcp_control.h"
#include "collectives/transport/world.h"
#include "kernels/gemm.h"
#include "kernels/sgd.h"
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
#include "runtime/train/train_common.h"

namespace resync::runtime {
namespace {

using Clock = std::chrono::steady_clock;

// A step may be re-run after a failed all-reduce; each attempt has its own message tags.
constexpr uint64_t kAttemptsPerStep = 16;

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
// checkpoint and every rank loads that same file into `params` and `momentum` (the directory
// must be shared, as it must be anyway for a job requeued on other nodes). Runs before the
// control plane exists, so a bad checkpoint ends the job like bad flags: one line, exit 2.
ResumePoint restore_checkpoint(const Setup& s, std::span<float> params,
                               std::span<float> momentum) {
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
    check_resumable(c, path, s.replica->model_description(), params.size(), momentum.size());
    std::copy(c.params.begin(), c.params.end(), params.begin());
    std::copy(c.optimizer_state.begin(), c.optimizer_state.end(), momentum.begin());
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

// --collective nccl: NCCL all-reduce of the device gradient (CUDA builds; plain sync only,
// which validate_for_world enforces). Otherwise nothing: the ring exchanges the host buffer.
class GradientExchangeOnDevice {
 public:
  virtual ~GradientExchangeOnDevice() = default;
  virtual void allreduce_sum() = 0;
};

#ifdef RESYNC_WITH_CUDA
class NcclGradientExchange final : public GradientExchangeOnDevice {
 public:
  explicit NcclGradientExchange(Replica& replica)
      : replica_(replica), nccl_(MPI_COMM_WORLD, replica.cuda_device()) {}
  void allreduce_sum() override {
    nccl_.allreduce(replica_.device_gradient_buffer(), collectives::NcclReduceOp::kSum);
  }

 private:
  Replica& replica_;
  collectives::NcclAllreduce nccl_;
};
#endif

std::unique_ptr<GradientExchangeOnDevice> make_device_exchange(const TrainConfig& cfg,
                                                               Replica& replica, int rank) {
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
  const size_t n_params = replica.n_params();
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
  // (parameters, velocity): a late rank copies that state itself (ShmStateBoard).
  const bool state_in_shm = straggler_mode && replica.cuda_device() < 0;
  collectives::Allreducer allreducer(
      ctx, {.ring = {.segment_bytes = cfg.segment_kib * 1024},
            .shm = {.direct_elems = (state_in_shm ? 3 : 1) * n_params},
            .max_elems = n_params});
  ctx.set_timeout(straggler_mode ? std::chrono::milliseconds(cfg.ring_timeout_ms)
                                 : std::chrono::milliseconds(std::chrono::hours(24 * 365)));
  // The gradient exchange: resync's ring over the host gradient buffer (pinned on a GPU), or,
  // for plain sync on GPUs with --collective nccl, NCCL over the device gradient.
  std::unique_ptr<GradientExchangeOnDevice> nccl = make_device_exchange(cfg, replica, rank);
  const std::span<float> shared = allreducer.shared_buffer();
  if (!nccl && shared.size() >= n_params) replica.place_gradients(shared.first(n_params));
  std::unique_ptr<collectives::ShmStateBoard> board;
  if (state_in_shm && allreducer.shm() != nullptr && shared.size() >= 3 * n_params &&
      replica.place_state(shared.subspan(n_params, n_params),
                          shared.subspan(2 * n_params, n_params))) {
    board = std::make_unique<collectives::ShmStateBoard>(*allreducer.shm(), n_params,
                                                         2 * n_params);
  }
  // Ranks with the same id copy each other's state: the lowest rank of the node.
  int state_node = -1;
  for (int r = 0; board && r < world && state_node < 0; ++r) {
    if (board->covers(r)) state_node = r;
  }
  std::vector<int> shared_state_node = collectives::gather_from_ranks(state_node);
  const auto n_state_in_shm =
      std::count_if(shared_state_node.begin(), shared_state_node.end(), [](int n) { return n >= 0; });

  // The host view of the state: on the CPU the live parameters and velocity; on a GPU a mirror,
  // refreshed (download_state) before it is read and sent back (upload_state) after a write.
  const std::array<std::span<float>, 2> state = replica.host_state();
  const std::span<float> params = state[0];
  const std::span<float> velocity = state[1];
  const ResumePoint resumed = restore_checkpoint(s, params, velocity);
  mpi.mark_setup_agreed();  // the last step every rank agrees on before training
  if (!resumed.path.empty()) replica.upload_state();
  const uint64_t start_step = resumed.step;
  // The state of a run starts as version 0; a resumed one is of its checkpoint's step (no peer
  // reads it before the first step closes).
  if (board && start_step > 0) {
    board->begin_update();
    board->publish(start_step);
  }
  PhaseRecorder allreduce_phases(*timeline, kAttemptsPerStep);
  if (timeline->enabled()) allreducer.set_phase_observer(&allreduce_phases);
  ProgressReporter progress = make_progress_reporter(cfg, rank);
  uint64_t dropped_so_far = 0;  // gradients left out of the steps rank 0 took part in
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

  std::span<float> grads = replica.gradient_buffer();
  const std::array<std::span<const float>, 2> state_out = {params, velocity};
  const std::array<std::span<float>, 2> state_in = {params, velocity};
  // A rank one step behind needs only the new velocity (StepOrder::velocity_only).
  const std::array<std::span<const float>, 1> velocity_out = {velocity};
  const std::array<std::span<float>, 1> velocity_in = {velocity};
  uint64_t steps_skipped = 0;  // steps whose update this rank received by catch-up
  uint64_t passive_steps = 0;  // steps this rank took part in with a zero gradient (busy)
  std::vector<int> members;    // of each step's all-reduce; capacity reused every step
  members.reserve(static_cast<size_t>(world));
  uint64_t catch_ups = 0;
  size_t epochs_evaluated = start_step / s.sampler.steps_per_epoch();
  EvalRecord last_eval;
  const Clock::time_point start = Clock::now();

  // Rank 0 evaluates when it has completed an epoch (its own step counter passed a boundary).
  auto maybe_evaluate = [&](uint64_t completed_steps, double train_loss) {
    const size_t epochs_done = completed_steps / s.sampler.steps_per_epoch();
    const bool last = completed_steps == s.total_steps;
    if (rank != 0 || (epochs_done <= epochs_evaluated && !last)) return;
    if (last && last_eval.step == completed_steps) return;
    epochs_evaluated = epochs_done;
    {
      auto span = timeline->span("eval", static_cast<int64_t>(completed_steps));
      last_eval = evaluate(replica, s.data.test, cfg.batch_size, s.x, s.y);
    }
    last_eval.epoch = s.sampler.epoch_of(completed_steps - 1);
    last_eval.step = completed_steps;
    last_eval.elapsed_s = ms_since(start) / 1000.0;
    s.metrics.eval(last_eval);
    progress.clear_line();  // the log line must not run on from the live progress line
    log->info("epoch {} step {}: test accuracy {:.4f}, test loss {:.4f}, train loss {:.4f}, "
              "{:.1f} s",
              last_eval.epoch, last_eval.step, last_eval.test_accuracy, last_eval.test_loss,
              train_loss, last_eval.elapsed_s);
  };

  // Sends this rank's fresh state to every late rank it serves after `order`'s round. A late
  // rank that froze again cannot receive: give up on it after the ring timeout (it will report
  // the failed catch-up and be served again), never stall the participants.
  // An early catch-up (kServe) sends the state this rank computes `order.step` from.
  auto serve_catchups = [&](const collectives::StepOrder& order, StepRecord& rec) {
    const std::vector<int> served = order.late_ranks_served_by(rank);
    if (!served.empty()) replica.download_state();
    for (int late : served) {
      auto span = timeline->span("serve_catch_up", static_cast<int64_t>(order.step), Lane::kTrain,
                                 {"late_rank", late});
      collectives::StateHeader header{
          .step = order.final_round || order.early ? order.step : order.step + 1};
      header.user[0] = checksum64(params);
      header.user[1] = checksum64(velocity);
      try {
        const std::span<const std::span<const float>> spans =
            order.velocity_only ? std::span<const std::span<const float>>(velocity_out)
                                : std::span<const std::span<const float>>(state_out);
        collectives::send_state(ctx, late, collectives::state_sequence(order), header, spans);
      } catch (const TimeoutError& e) {
        log->warn("step {}: could not catch up rank {}: {}", order.step, late, e.what());
      }
    }
    if (order.early) return;  // only this donor knows of it; counted in the summary
    for (const collectives::CatchUp& c : order.catchups) rec.late.push_back(c.late_rank);
  };

  // Replaces this rank's state with the donor's; returns the step to continue with, or nothing
  // if the transfer timed out or arrived torn (the donor gave up on it): ask for a new order.
  auto catch_up = [&](const collectives::StepOrder& order,
                      uint64_t from_step) -> std::optional<uint64_t> {
    auto span = timeline->span("catch_up", static_cast<int64_t>(order.step), Lane::kTrain,
                               {"donor", order.donor});
    if (order.shared) {
      RESYNC_CHECK(board != nullptr, "a shared catch-up without a shared-memory state");
      const uint64_t version = order.final_round || order.early ? order.step : order.step + 1;
      board->begin_update();
      if (!board->copy_from(order.donor, version, board->state(),
                            std::chrono::milliseconds(cfg.ring_timeout_ms))) {
        // A donor that has already moved past the step is a race of short steps, not a fault.
        const uint64_t donor_at = board->published(order.donor);
        const bool moved_on = donor_at != collectives::ShmStateBoard::kWriting && donor_at > version;
        log->log(moved_on ? spdlog::level::debug : spdlog::level::warn,
                 "catch-up from rank {}'s shared memory to step {} failed (it is at {}); asking "
                 "again",
                 order.donor, version, donor_at);
        return std::nullopt;  // the region stays marked as being written: nobody copies it
      }
      board->publish(version);
      steps_skipped += version - from_step;
      ++catch_ups;
      log->debug("caught up from rank {} (shared memory): step {} -> {}", order.donor, from_step,
                 version);
      return version;
    }
    collectives::StateHeader header;
    if (order.velocity_only) replica.download_state();  // the parameters it updates
    if (board) board->begin_update();
    try {
      if (order.velocity_only) {
        collectives::recv_state(ctx, order.donor, collectives::state_sequence(order), header,
                                velocity_in);
        kernels::sgd_apply_velocity(params, velocity, cfg.lr);
      } else {
        collectives::recv_state(ctx, order.donor, collectives::state_sequence(order), header,
                                state_in);
      }
    } catch (const TimeoutError& e) {
      log->warn("catch-up from rank {} after step {} failed: {}", order.donor, order.step,
                e.what());
      return std::nullopt;
    }
    if (header.user[0] != checksum64(params) || header.user[1] != checksum64(velocity)) {
      log->warn("catch-up from rank {} after step {} arrived torn; asking again", order.donor,
                order.step);
      return std::nullopt;
    }
    replica.upload_state();
    if (board) board->publish(header.step);
    steps_skipped += header.step - from_step;
    ++catch_ups;
    log->debug("caught up from rank {}: step {} -> {}", order.donor, from_step, header.step);
    return header.step;
  };

  // The injected straggler delay. With backup workers or a timeout the rank stays reachable
  // while it sleeps: if its step closes without it, it is caught up at once (the order).
  auto injected_delay = [&](uint64_t step, double delay_ms) -> std::optional<collectives::StepOrder> {
    const auto delay = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::duration<double, std::milli>(delay_ms));
    if (straggler_mode) return control->busy(step, delay);
    std::this_thread::sleep_for(delay);  // straggler injection: a sleep on purpose
    return std::nullopt;
  };

  // Rank 0 writes checkpoints: its state after a step is the run's (participants agree
  // bitwise; a rank that caught up holds the donor's).
  uint64_t last_checkpoint = start_step;
  std::string last_checkpoint_path = resumed.path;
  auto write_checkpoint_at = [&](uint64_t completed_steps) {
    auto span = timeline->span("checkpoint", static_cast<int64_t>(completed_steps));
    const Clock::time_point t0 = Clock::now();
    replica.download_state();
    last_checkpoint_path = write_checkpoint(cfg.checkpoint_dir,
                                            checkpoint_meta(s, completed_steps), params, velocity);
    prune_checkpoints(cfg.checkpoint_dir, cfg.checkpoint_keep);
    last_checkpoint = completed_steps;
    progress.clear_line();
    log::get("ckpt")->info("checkpoint {} written ({:.0f} ms)", last_checkpoint_path,
                           ms_since(t0));
  };
  auto maybe_checkpoint = [&](uint64_t completed_steps) {  // a catch-up may skip steps
    if (rank != 0 || cfg.checkpoint_every == 0) return;
    if (completed_steps / cfg.checkpoint_every > last_checkpoint / cfg.checkpoint_every) {
      write_checkpoint_at(completed_steps);
    }
  };

  uint64_t step = start_step;
  StepRecord rec;
  rec.participants.reserve(static_cast<size_t>(world));
  rec.dropped.reserve(static_cast<size_t>(world));
  rec.late.reserve(static_cast<size_t>(world));
  bool stop = false;
  bool stop_requested = false;
  bool final_round_done = false;  // a late rank may be caught up by the final round itself
  while (step < s.total_steps && !stop && !final_round_done) {
    if (signals.received() != 0 && !stop_requested) {
      log->warn("received {}: asking every rank to stop at the next step boundary",
                PreemptionSignals::name(signals.received()));
      control->request_stop();
      stop_requested = true;
    }
    // The step's record; its rank lists keep their capacity from step to step.
    rec.step = step;
    rec.epoch = s.sampler.epoch_of(step);
    rec.delay_ms = rec.wait_ms = rec.comm_ms = 0;
    rec.late.clear();
    const Clock::time_point t0 = Clock::now();

    // Forward and backward on this rank's own mini-batch.
    s.data.train.gather(s.sampler.batch(step), s.x.data(), s.y.data());
    rec.loss = replica.compute_gradients(s.x.data(), s.y.data(), cfg.batch_size);
    rec.compute_ms = ms_since(t0);
    timeline->end("compute", t0, static_cast<int64_t>(step));

    // READY (after any injected delay), then the coordinator's order for this step.
    rec.delay_ms = injected_delay_ms(s.delay_spec, cfg.seed, step, rank, world);
    const Clock::time_point t_wait = Clock::now();
    std::optional<collectives::StepOrder> early;
    if (rec.delay_ms > 0) early = injected_delay(step, rec.delay_ms);
    collectives::StepOrder order = early ? *early : control->ready(step);
    rec.wait_ms = std::max(0.0, ms_since(t_wait) - rec.delay_ms);
    timeline->end("wait_plan", t_wait, static_cast<int64_t>(step), Lane::kTrain,
                  {"delay_us", static_cast<int64_t>(rec.delay_ms * 1000)});

    // Carry out orders until this step is done; a timed-out ring or catch-up asks for another.
    const Clock::time_point t_comm = Clock::now();
    bool participated = false;
    for (;;) {
      if (order.kind == collectives::OrderKind::kServe) {  // a late rank needs this state now
        serve_catchups(order, rec);
        order = control->next_order();
        continue;
      }
      if (order.kind == collectives::OrderKind::kCatchUp) {  // too late: gradient dropped
        if (std::optional<uint64_t> next = catch_up(order, step)) {
          step = *next;
          final_round_done = order.final_round;
          stop = order.stop;
          break;
        }
        order = control->failed(order.step);
        continue;
      }
      // Gradient exchange over the participants only. A busy rank joins with a zero gradient:
      // the sum is the participants', and it ends the step with everyone's state without a
      // catch-up. A retry (repair) finds a partial sum in the buffer, summed in place: it
      // computes the gradient again, to the bit the same (same parameters, same batch), rather
      // than every step paying for a copy kept against so rare an event.
      const bool passive = order.is_passive(rank);
      if (passive) {
        std::fill(grads.begin(), grads.end(), 0.0f);
      } else if (order.attempt > 0) {
        auto span = timeline->span("compute", static_cast<int64_t>(order.step), Lane::kTrain,
                                   {"attempt", static_cast<int64_t>(order.attempt)});
        replica.compute_gradients(s.x.data(), s.y.data(), cfg.batch_size);
      }
      try {
        auto span = timeline->span("allreduce", static_cast<int64_t>(order.step), Lane::kTrain,
                                   {"attempt", static_cast<int64_t>(order.attempt)});
        if (nccl) {
          nccl->allreduce_sum();  // plain sync: every rank takes part
        } else {
          order.allreduce_members(members);
          allreducer.allreduce_sum(grads, members,
                                   order.step * kAttemptsPerStep + order.attempt);
        }
        participated = true;
        if (passive) ++passive_steps;
        break;
      } catch (const TimeoutError& e) {
        if (!straggler_mode) throw;
        log->warn("step {}: all-reduce over {} failed ({}); reporting it", step,
                  fmt::join(order.participants, ","), e.what());
        order = control->failed(step);
      }
    }
    if (!participated) {
      maybe_evaluate(step, rec.loss);
      maybe_checkpoint(step);
      continue;
    }

    if (rank == 0 && step == start_step && !nccl) {
      log->info("step {}: all-reduce of {} floats over {} ranks took the {} path", step,
                grads.size(), order.participants.size(),
                collectives::path_name(allreducer.last_path()));
    }

    // The averaged update, then the fresh state to the late ranks this rank serves.
    if (board) board->begin_update();
    replica.apply_gradients(1.0f / float(std::max<size_t>(1, order.participants.size())));
    if (board) board->publish(step + 1);
    serve_catchups(order, rec);
    rec.comm_ms = ms_since(t_comm);

    rec.participants.assign(order.participants.begin(), order.participants.end());
    complement(order.participants, world, rec.dropped);
    rec.step_ms = ms_since(t0);
    rec.elapsed_s = ms_since(start) / 1000.0;
    if (rank == 0 && (step % cfg.metrics_every == 0 || step + 1 == s.total_steps)) {
      s.metrics.step(rec);
    }
    stop = order.stop;
    step += 1;
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
    maybe_evaluate(step, rec.loss);
    maybe_checkpoint(step);
  }

  // Final round: every rank ends with the same state (late ranks are caught up once more).
  if (!final_round_done) {
    const collectives::StepOrder final_order = control->finish(step);
    stop = final_order.stop;  // the same on every rank (the coordinator's flag is sticky)
    if (final_order.kind == collectives::OrderKind::kCatchUp) {
      // The coordinator is done after the final round: nothing can repair a failed transfer.
      std::optional<uint64_t> next = catch_up(final_order, step);
      if (!next) {
        throw CommError(fmt::format("the final catch-up from rank {} failed", final_order.donor));
      }
      step = *next;
    } else {
      StepRecord ignored;
      serve_catchups(final_order, ignored);
    }
  }
  progress.finish();  // before the final evaluation's and summary's log lines
  maybe_evaluate(step, 0);

  // A stopped run (preemption) and every run with --checkpoint-dir end with a checkpoint.
  const StopReason stopped_by = stop ? agreed_stop_reason(signals, rank, world) : StopReason{};
  if (rank == 0) {
    const bool have_dir = !cfg.checkpoint_dir.empty();
    if (have_dir && (last_checkpoint != step || last_checkpoint_path.empty())) {
      write_checkpoint_at(step);
    }
    if (stop) {
      log->warn("stopped by {} at step {}{}; {}", stopped_by.signal, step,
                stopped_by.rank >= 0 ? fmt::format(" (signalled on rank {})", stopped_by.rank)
                                     : std::string(),
                have_dir ? fmt::format("checkpoint {} written; resume with --resume",
                                       last_checkpoint_path)
                         : std::string("no checkpoint written (no --checkpoint-dir)"));
    }
  }

  // ---- summary: every rank's checksum compared ------------------------------------------
  SummaryRecord summary;
  summary.steps = step;
  summary.elapsed_s = ms_since(start) / 1000.0;
  // Gradients dropped: a catch-up skips steps; a passive member's own gradient is discarded.
  const uint64_t dropped = collectives::sum_over_ranks(steps_skipped + passive_steps);
  const uint64_t samples = (uint64_t(world) * (step - start_step) - dropped) * cfg.batch_size;
  summary.samples_per_s = summary.elapsed_s > 0 ? double(samples) / summary.elapsed_s : 0;
  summary.test_accuracy = last_eval.test_accuracy;
  replica.download_state();
  const uint64_t checksum = checksum64(params);
  summary.param_checksum = fmt::format("{:016x}", checksum);
  summary.ranks_agree = collectives::all_ranks_equal(checksum);
  summary.dropped_gradients = dropped;
  summary.catch_ups = collectives::sum_over_ranks(catch_ups);
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
