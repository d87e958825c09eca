// Synchronous data-parallel training (docs/DESIGN.md, "The life of a step"). One step reads top
// to bottom: batch -> forward/backward -> the step protocol (READY, the coordinator's order,
// all-reduce over the participants, averaged update, catch-ups: StepExecutor) -> metrics,
// evaluation and checkpoints on rank 0. A stop at the next step boundary when any rank receives
// SIGTERM/SIGUSR1 (all ranks agree through the coordinator).
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>

#include "base/log.h"
#include "collectives/control/control_plane.h"
#include "collectives/control/tcp_control.h"
#include "collectives/control/tcp_watch.h"
#include "collectives/transport/context.h"
#include "collectives/transport/mpi_session.h"
#include "collectives/transport/mpi_transport.h"
#include "collectives/transport/world.h"
#include "kernels/gemm.h"
#include "runtime/observe/progress.h"
#include "runtime/observe/timeline.h"
#include "runtime/train/checksum.h"
#include "runtime/train/inject_delay.h"
#include "runtime/train/preemption.h"
#include "runtime/train/rank_zero_duties.h"
#include "runtime/train/rescue.h"
#include "runtime/train/step_executor.h"
#include "runtime/train/sync_setup.h"
#include "runtime/train/train.h"
#include "runtime/train/train_common.h"

namespace resync::runtime {
namespace {

using Clock = std::chrono::steady_clock;

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
  GradientPlane plane = make_gradient_plane(cfg, replica, ctx, straggler_mode, rank, world);
  collectives::Allreducer& allreducer = *plane.allreducer;
  ctx.set_timeout(straggler_mode ? std::chrono::milliseconds(cfg.ring_timeout_ms)
                                 : std::chrono::milliseconds(std::chrono::hours(24 * 365)));
  const auto n_state_in_shm = std::count_if(plane.shared_state_node.begin(),
                                            plane.shared_state_node.end(),
                                            [](int n) { return n >= 0; });

  // On the CPU the host state is the live one; on a GPU a mirror, sent back after a resume.
  const ResumePoint resumed = restore_checkpoint(s, replica.host_state());
  mpi.mark_setup_agreed();  // the last step every rank agrees on before training
  if (!resumed.path.empty()) replica.upload_state();
  const uint64_t start_step = resumed.step;
  PhaseRecorder allreduce_phases(*timeline, StepExecutor::kAttemptsPerStep);
  // The phases are recorded by the thread that runs the all-reduce: not with overlap, whose
  // communication thread must not write the training thread's timeline.
  if (timeline->enabled() && plane.overlap == nullptr) {
    allreducer.set_phase_observer(&allreduce_phases);
  }
  ProgressReporter progress = make_progress_reporter(cfg, rank);
  std::unique_ptr<collectives::TcpControlServer> coordinator;
  if (rank == 0) {
    collectives::TcpServerOptions options;
    options.coordinator = coordinator_config(cfg, world, std::move(plane.shared_state_node));
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
       .state_timeout = std::chrono::milliseconds(cfg.ring_timeout_ms),
       .check_summed_gradient = !plane.nccl},
      ctx, *control, *plane.exchange, step_state, plane.board.get(), *timeline);
  executor.resumed_at(start_step);
  // With a checkpoint directory, a death ends the job with the newest state saved (rescue.h):
  // the watch on the coordinator notices it even while this thread waits inside an all-reduce.
  std::unique_ptr<collectives::CoordinatorWatch> watch;
  if (!cfg.checkpoint_dir.empty()) {
    arm_rescue({.checkpoint_dir = cfg.checkpoint_dir,
                .rank = rank,
                .stable = &executor.stable_state(),
                .meta = [&s](uint64_t at) { return checkpoint_meta(s, at); },
                .state = [&replica] {
                  replica.download_state();
                  return replica.host_state();
                }});
    watch = std::make_unique<collectives::CoordinatorWatch>(
        endpoint, rank, cfg.coordinator_timeout_s,
        [](const std::string& why) { rescue_if_armed(why); });
  }
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
  // A control or MPI call that fails here means a rank died or rank 0 is gone: rescue (while
  // the state and the executor are still alive), else the error ends the job.
  try {
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

      // Forward and backward on this rank's own mini-batch (with overlap, the last layers'
      // gradients are already being all-reduced while the first ones compute).
      if (plane.overlap) plane.overlap->begin_step(step * StepExecutor::kAttemptsPerStep);
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
      if (rank == 0 && step == start_step && !plane.nccl) {
        log->info("step {}: all-reduce of {} floats over {} ranks took the {} path{}", step,
                  layout.n_params, report.order->participants.size(),
                  collectives::path_name(allreducer.last_path()),
                  plane.overlap ? fmt::format(", in {} buckets overlapped with the backward pass",
                                              plane.overlap->last_buckets())
                                : std::string());
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
  } catch (const CommError& e) {
    rescue_if_armed(e.what());
    throw;
  } catch (const NonFiniteError& e) {
    // A diverged run is not restartable (it would diverge again): no rescue. A rank whose
    // failure the lowest participant reports keeps its connections open until that rank ends
    // the job, so that nobody mistakes it for a death.
    // The reporter ends the job here, before the coordinator waits for its clients to close.
    disarm_rescue();
    if (e.reported_by_peer()) {
      std::this_thread::sleep_for(std::chrono::seconds(10));
    } else {
      std::fprintf(stderr, "resync: error: %s\n", e.what());
      collectives::abort_world(1);
    }
    throw;
  }
  disarm_rescue();  // the final round closed: every rank holds the final state
  watch.reset();
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
