// Asynchronous parameter-server training (--mode async; docs/DESIGN.md, "Asynchronous mode").
// Ranks 0..ps-1 serve contiguous shards of the parameters and their momentum; the other ranks
// are workers. A worker step reads top to bottom: batch -> forward/backward -> injected delay
// -> (with --max-staleness: refresh instead if too far behind) -> push every gradient shard and
// receive the fresh shards. Servers apply each gradient as it arrives, from any worker.
//
// Metrics: rank 0 is server 0, and every push reaches every server, so rank 0 sees every
// worker step. It writes one "step" record (mode "async") per push: the worker's loss, compute
// and delay times and previous round trip travel in the push header; step_ms is the time
// between two pushes of the same worker as server 0 sees them. Rank 0 evaluates whenever the
// workers together have completed another epoch of the training set (and at the end), as sync
// mode does; meanwhile shard 0 is not served, which is the same pause sync mode takes.
//
// With --checkpoint-dir each server keeps checkpoints of its shard (async_checkpoint.h), and a
// death ends the job with every surviving server's shard and every surviving worker's copy of
// the parameters saved (rescue.h): rank 0 runs a coordinator for liveness only, and every rank
// watches it, as in sync mode.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <optional>
#include <sstream>
#include <stop_token>
#include <thread>

#include "base/error.h"
#include "base/log.h"
#include "collectives/control/tcp_control.h"
#include "collectives/control/tcp_watch.h"
#include "collectives/ps/parameter_server.h"
#include "collectives/transport/context.h"
#include "collectives/transport/mpi_session.h"
#include "collectives/transport/mpi_transport.h"
#include "collectives/transport/world.h"
#include "kernels/gemm.h"
#include "kernels/adamw.h"
#include "models/model.h"
#include "runtime/train/async_checkpoint.h"
#include "runtime/train/checksum.h"
#include "runtime/train/finite.h"
#include "runtime/train/inject_delay.h"
#include "runtime/train/preemption.h"
#include "runtime/train/rescue.h"
#include "runtime/train/train.h"
#include "runtime/train/train_common.h"

namespace resync::runtime {
namespace {

using Clock = std::chrono::steady_clock;

// Telemetry a worker sends along with each push (PsRequest::user).
enum Telemetry : size_t { kLoss = 0, kComputeMs = 1, kDelayMs = 2, kPrevExchangeMs = 3 };

// A worker whose loss or gradient turned NaN or inf tells server 0 (rank 0) in a query whose
// telemetry is this report instead (kBadValue is never finite; a push never carries one), and
// rank 0 ends the job with one line naming the worker's step and rank: several workers diverge
// at once (they share the parameters), and one rank must report, not each of them.
enum NonFiniteReport : size_t { kBadValue = 0, kBadIsGradient = 1, kBadIndex = 2, kBadCount = 3 };

NonFiniteError non_finite_error(const std::array<double, 4>& report, uint64_t step, int rank,
                                bool reported_by_peer) {
  if (report[kBadIsGradient] == 0) {
    return non_finite_loss_error(report[kBadValue], step, rank, reported_by_peer);
  }
  return non_finite_values_error("gradient", report[kBadValue], size_t(report[kBadIndex]),
                                 size_t(report[kBadCount]), step, rank, reported_by_peer);
}

std::vector<int> rank_range(int begin, int end) {
  std::vector<int> r(static_cast<size_t>(std::max(0, end - begin)));
  std::iota(r.begin(), r.end(), begin);
  return r;
}

void check_async_flags(const TrainConfig& cfg) {
  const DelaySpec spec = parse_delay_spec(cfg.inject_delay);
  if (spec.kind == DelayKind::kFixedRank && spec.rank < cfg.ps) {
    throw InvalidArgument(fmt::format(
        "--inject-delay names rank {}, a parameter server with --ps {}: name a worker rank "
        "(>= {})",
        spec.rank, cfg.ps, cfg.ps));
  }
}

// Where each worker continues after --resume. Each server restored the steps its shard holds per
// worker (`restored`; nullopt: no checkpoint); a worker continues at the smallest, so no shard
// misses a push (one holding it already applies it again: a step redone). A dead server's shard
// comes from the freshest surviving worker's copy of the parameters (async_checkpoint.h), and so
// then do the steps. No checkpoint or copy of shard 0: a fresh start (nullopt); another server
// without one is left out (its shard starts afresh).
std::optional<std::vector<uint64_t>> agree_resume_steps(
    const std::optional<std::vector<uint64_t>>& restored, int n_servers, int n_workers,
    bool report) {
  std::optional<std::vector<uint64_t>> agreed;
  for (int k = 0; k < n_servers; ++k) {
    const std::string text = collectives::broadcast_string(
        restored ? fmt::format("{}", fmt::join(*restored, " ")) : std::string("none"), k);
    if (text == "none") {
      if (k == 0) break;
      if (report) {
        log::get("train")->warn("--resume: no checkpoint of shard {}: it starts afresh", k);
      }
      continue;
    }
    std::vector<uint64_t> steps;
    std::istringstream in(text);
    for (uint64_t v = 0; in >> v;) steps.push_back(v);
    RESYNC_CHECK(steps.size() == static_cast<size_t>(n_workers), "server steps of other workers");
    if (!agreed) {
      agreed = std::move(steps);
    } else {
      for (size_t w = 0; w < steps.size(); ++w) (*agreed)[w] = std::min((*agreed)[w], steps[w]);
    }
  }
  return agreed;
}

// What one worker did, summed over workers at the end.
struct WorkerCounts {
  uint64_t steps = 0;
  uint64_t dropped = 0;    // steps whose gradient some server dropped, or refreshed ones
  uint64_t refreshed = 0;  // steps discarded before pushing because the copy was too stale
};

// `first_step`: this worker's own resume point; `resumed`: the servers hold restored shards;
// `copy` (with --checkpoint-dir): keeps what this worker's rescue saves.
WorkerCounts run_worker(Setup& s, collectives::Context& ctx, const collectives::ShardLayout& layout,
                        uint64_t first_step, bool resumed, WorkerCopy* copy) {
  const TrainConfig& cfg = s.cfg;
  models::Model& model = *s.model;
  std::span<float> params = model.params();
  std::span<float> grads = model.grads();
  collectives::ParameterClient client(ctx, layout, rank_range(0, cfg.ps));
  const OptimizerConfig clip = optimizer_config(cfg, s.total_steps);
  WorkerCounts counts;
  double prev_exchange_ms = 0;
  if (resumed) client.pull(params);  // the servers' restored shards
  if (copy) copy->note(first_step, params, client.versions());
  for (uint64_t step = first_step; step < s.total_steps; ++step) {
    // Forward and backward on this worker's own mini-batch, with the parameters it holds.
    const Clock::time_point t0 = Clock::now();
    s.data.train.gather(s.sampler.batch(step), s.x.data(), s.y.data());
    const double loss = model.forward_backward(s.x.data(), s.y.data(), cfg.batch_size);
    // A diverged run stops here, before its loss or gradient reaches a server: rank 0 ends the
    // job (exit 1) on the report; this rank waits for that (NonFiniteError, reported by peer).
    if (!std::isfinite(loss) || !all_finite(grads)) [[unlikely]] {
      const size_t bad = std::isfinite(loss) ? first_non_finite(grads) : 0;
      const std::array<double, 4> report =
          std::isfinite(loss)
              ? std::array<double, 4>{grads[bad], 1, double(bad), double(grads.size())}
              : std::array<double, 4>{loss, 0, 0, 0};
      client.versions_behind(step, report);
      throw non_finite_error(report, step, s.rank, /*reported_by_peer=*/true);
    }
    // --grad-clip: each worker clips its own gradient by its global norm before the push (the
    // servers each see one shard only).
    if (clip.grad_clip > 0) {
      const float f = clip.clipped_scale(kernels::sum_of_squares(grads), 1.0f);
      if (f != 1.0f) {
        for (float& g : grads) g *= f;
      }
    }
    const double compute_ms = ms_since(t0);

    // Straggler injection, a sleep on purpose: the same delay this rank would sleep at this
    // step in sync mode (a function of seed, step, rank and world size).
    const double delay_ms = injected_delay_ms(s.delay_spec, cfg.seed, step, s.rank, s.world);
    if (delay_ms > 0) {
      std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(delay_ms));
    }
    const std::array<double, 4> telemetry = {loss, compute_ms, delay_ms, prev_exchange_ms};

    // Too far behind the servers: take the fresh parameters instead of pushing a stale gradient.
    const Clock::time_point t_exchange = Clock::now();
    if (cfg.max_staleness >= 0 &&
        client.versions_behind(step, telemetry) > static_cast<uint64_t>(cfg.max_staleness)) {
      client.pull(params);
      ++counts.refreshed;
      ++counts.dropped;
    } else {
      const collectives::PushResult r = client.push(step, grads, params, telemetry);
      if (r.n_dropped > 0) ++counts.dropped;
    }
    prev_exchange_ms = ms_since(t_exchange);
    ++counts.steps;
    if (copy) copy->note(step + 1, params, client.versions());
  }
  client.done();
  return counts;
}

// Rank 0's view of the run while it serves shard 0: step records and the per-epoch evaluation.
class Rank0Monitor {
 public:
  Rank0Monitor(Setup& s, collectives::Context& ctx, const collectives::ShardLayout& layout,
               Clock::time_point start)
      : s_(s),
        start_(start),
        n_workers_(s.world - s.cfg.ps),
        last_push_(static_cast<size_t>(s.world), start),
        progress_(static_cast<size_t>(s.world), 0) {
    if (s.cfg.ps > 1) {
      others_ =
          std::make_unique<collectives::ParameterClient>(ctx, layout, rank_range(1, s.cfg.ps));
    }
  }

  void observe(const collectives::RequestEvent& e) {
    if (!std::isfinite(e.user[kBadValue])) [[unlikely]] {  // a worker's non-finite report
      throw non_finite_error(e.user, e.step, e.client, /*reported_by_peer=*/false);
    }
    const size_t w = static_cast<size_t>(e.client);
    if (e.step + 1 > progress_[w]) {
      total_progress_ += e.step + 1 - progress_[w];
      progress_[w] = e.step + 1;
    }
    if (e.kind == collectives::PsRequestKind::kPush) record_step(e);
    const uint64_t per_epoch = s_.sampler.steps_per_epoch() * uint64_t(n_workers_);
    const bool finished = total_progress_ >= s_.total_steps * uint64_t(n_workers_);
    if (!finished && total_progress_ >= (epochs_evaluated_ + 1) * per_epoch) {
      epochs_evaluated_ = total_progress_ / per_epoch;
      if (others_) others_->pull(s_.model->params());
      evaluate_current(epochs_evaluated_ - 1);
    }
  }

  // The servers other than rank 0 serve rank 0 too (for evaluations) until it says done.
  void release_other_servers() {
    if (others_) others_->done();
  }

  // Evaluates the parameters rank 0 holds (all shards fresh only after a pull or the end).
  void evaluate_current(size_t epoch) {
    last_eval_ = evaluate(*s_.model, s_.data.test, s_.cfg.batch_size, s_.x, s_.y);
    last_eval_.epoch = epoch;
    last_eval_.step = total_progress_;
    last_eval_.elapsed_s = ms_since(start_) / 1000.0;
    s_.metrics.eval(last_eval_);
    log::get("train")->info(
        "epoch {} ({} worker steps): test accuracy {:.4f}, test loss {:.4f}, {:.1f} s",
        last_eval_.epoch, last_eval_.step, last_eval_.test_accuracy, last_eval_.test_loss,
        last_eval_.elapsed_s);
  }

  // A resumed run: worker k (rank ps + k) has done worker_steps[k] steps already.
  void resumed_at(std::span<const uint64_t> worker_steps) {
    total_progress_ = 0;
    for (size_t k = 0; k < worker_steps.size(); ++k) {
      progress_[static_cast<size_t>(s_.cfg.ps) + k] = worker_steps[k];
      total_progress_ += worker_steps[k];
    }
    epochs_evaluated_ = total_progress_ / (s_.sampler.steps_per_epoch() * uint64_t(n_workers_));
  }

  const EvalRecord& last_eval() const { return last_eval_; }
  uint64_t total_progress() const { return total_progress_; }

 private:
  void record_step(const collectives::RequestEvent& e) {
    const size_t w = static_cast<size_t>(e.client);
    const Clock::time_point now = Clock::now();
    AsyncStepRecord rec;
    rec.step = e.step;
    rec.epoch = s_.sampler.epoch_of(e.step);
    rec.worker = e.client;
    rec.loss = e.user[kLoss];
    rec.step_ms = std::chrono::duration<double, std::milli>(now - last_push_[w]).count();
    rec.compute_ms = e.user[kComputeMs];
    rec.delay_ms = e.user[kDelayMs];
    rec.comm_ms = e.user[kPrevExchangeMs];
    rec.staleness = e.staleness;
    rec.applied = e.applied;
    rec.version = e.version;
    rec.elapsed_s = std::chrono::duration<double>(now - start_).count();
    last_push_[w] = now;
    if (e.step % s_.cfg.metrics_every == 0 || e.step + 1 == s_.total_steps) {
      s_.metrics.async_step(rec);
    }
  }

  Setup& s_;
  Clock::time_point start_;
  int n_workers_;
  std::vector<Clock::time_point> last_push_;
  std::vector<uint64_t> progress_;  // per worker rank: steps seen so far
  uint64_t total_progress_ = 0;
  size_t epochs_evaluated_ = 0;
  EvalRecord last_eval_;
  std::unique_ptr<collectives::ParameterClient> others_;
};

}  // namespace

SummaryRecord train_async(const TrainConfig& cfg, collectives::MpiSession& mpi) {
  auto log = log::get("train");
  const int rank = mpi.rank();
  const int world = mpi.size();
  const bool server = rank < cfg.ps;
  const int n_workers = std::max(1, world - cfg.ps);
  // Workers shard the training set among themselves; a server's sampler is never used.
  const ShardAssignment data_shard{.index = server ? 0 : rank - cfg.ps, .count = n_workers};
  std::unique_ptr<Setup> setup =
      agreed_setup(cfg, rank, world, data_shard, [&] { check_async_flags(cfg); });
  Setup& s = *setup;
  models::Model& model = *s.model;
  std::span<float> params = model.params();

  collectives::MpiTransport transport;
  // Nothing in the protocol gives up on a peer: a frozen worker only delays itself, and a
  // worker waits for its servers as long as it takes (up to --stall-abort-s if set).
  collectives::Context ctx(transport,
                           cfg.stall_abort_s > 0
                               ? std::chrono::milliseconds(int64_t(cfg.stall_abort_s * 1000))
                               : std::chrono::milliseconds(std::chrono::hours(24 * 365)));
  const collectives::ShardLayout layout(model.n_params(), cfg.ps);

  if (rank == 0) {
    log->info("config: {}", describe(cfg));
    log->info(
        "{} ranks: {} parameter server(s), {} workers; model {}, shards of "
        "~{} parameters, data {} ({} train / {} test samples), {} steps/epoch per worker, {} steps "
        "per worker, max staleness {}, BLAS {}",
        world, cfg.ps, n_workers, model.describe(), layout.size(0), cfg.data,
        s.data.train.n_samples(), s.data.test.n_samples(), s.sampler.steps_per_epoch(),
        s.total_steps, cfg.max_staleness, kernels::blas_core());
    if (!cfg.timeline.empty()) {
      log->warn("--timeline is not supported in --mode async; ignored");
    }
  }

  // Checkpoints of this server's shard, and where each worker continues (its own step).
  std::optional<ShardCheckpoints> shard_ckpt;
  std::vector<uint64_t> resume_steps(static_cast<size_t>(n_workers), 0);  // by worker index
  bool resumed = false;
  if (!cfg.checkpoint_dir.empty()) {
    std::optional<std::vector<uint64_t>> restored;
    // Agreed on: a checkpoint that cannot resume this run is bad input on every rank (exit 2).
    agreed(rank, world, [&] {
      if (!server) return;
      std::vector<std::span<float>> parts = {layout.slice(params, rank)};
      for (size_t j = 0; j < s.optimizer.n_buffers(); ++j) {
        parts.push_back(layout.slice(s.optimizer.buffer(j), rank));
      }
      shard_ckpt.emplace(cfg.checkpoint_dir, rank, cfg.ps, layout.offset(rank), std::move(parts),
                         CheckpointMeta{.model = model.describe(),
                                        .world_size = world,
                                        .seed = cfg.seed,
                                        .batch_size = cfg.batch_size,
                                        .optimizer = cfg.optimizer},
                         cfg.checkpoint_keep);
      if (cfg.resume) restored = shard_ckpt->restore(n_workers);
    });
    if (cfg.resume) {
      if (std::optional<std::vector<uint64_t>> agreed =
              agree_resume_steps(restored, cfg.ps, n_workers, rank == 0)) {
        for (size_t k = 0; k < resume_steps.size(); ++k) {
          resume_steps[k] = std::min((*agreed)[k], s.total_steps);
        }
        resumed = true;
      }
      if (shard_ckpt) {
        shard_ckpt->resume_at(resume_steps);
        // Taken from a worker's copy: on disk before the workers replace their copies.
        if (shard_ckpt->restored_from_copy()) shard_ckpt->save();
      }
      if (rank == 0) {
        if (resumed) {
          log->info("--resume: the workers continue at their own steps {}", resume_steps);
        } else {
          log->info("--resume: no checkpoint of shard 0: a fresh start");
        }
      }
    }
  }
  // A worker keeps a copy of the parameters as of its last exchange for its rescue (a dead
  // server's shard resumes from the freshest copy: async_checkpoint.h).
  std::optional<WorkerCopy> worker_copy;
  if (!cfg.checkpoint_dir.empty()) {
    agreed(rank, world, [&] {  // a directory a worker cannot write fails every rank (exit 2)
      if (server) return;
      worker_copy.emplace(cfg.checkpoint_dir, rank, model.n_params(), cfg.ps,
                          CheckpointMeta{.model = model.describe(),
                                         .world_size = world,
                                         .seed = cfg.seed,
                                         .batch_size = cfg.batch_size,
                                         .optimizer = cfg.optimizer});
    });
  }
  mpi.mark_setup_agreed();
  std::unique_ptr<collectives::TcpControlServer> liveness;  // rank 0: deaths, for the rescue
  std::unique_ptr<collectives::ControlChannel> control;
  std::unique_ptr<collectives::CoordinatorWatch> watch;
  if (!cfg.checkpoint_dir.empty()) {
    if (rank == 0) {
      collectives::TcpServerOptions options;
      options.coordinator.world_size = world;
      options.coordinator.stall_warning_s = 0;  // no steps close here: liveness only
      liveness = std::make_unique<collectives::TcpControlServer>(options);
    }
    const std::string endpoint =
        collectives::broadcast_string(liveness ? liveness->endpoint() : "", 0);
    control = collectives::TcpControlClient::connect(endpoint, rank);
    arm_rescue(server ? shard_ckpt->rescue_plan(rank) : worker_copy->rescue_plan(rank));
    watch = std::make_unique<collectives::CoordinatorWatch>(
        endpoint, rank, cfg.coordinator_timeout_s,
        [](const std::string& why) { rescue_if_armed(why); });
  }
  // mpirun sends the survivors of a death SIGTERM (SIGKILL a second later), Slurm a preempted
  // job too: with a checkpoint directory the signal starts the rescue instead of ending the
  // server before it has saved its shard. The rescue is not async-signal-safe, hence a thread
  // that watches the handler's flag. Once the rescue is disarmed, the signal ends the process.
  std::optional<PreemptionSignals> signals;
  std::jthread signal_watch;
  if (!cfg.checkpoint_dir.empty()) {
    signals.emplace();
    signal_watch = std::jthread([&signals](const std::stop_token& stop) {
      while (!stop.stop_requested()) {
        if (const int signo = signals->received(); signo != 0) {
          rescue_if_armed("received " + PreemptionSignals::name(signo));
          std::_Exit(128 + signo);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    });
  }

  const Clock::time_point start = Clock::now();
  WorkerCounts counts;
  collectives::ServerStats stats;
  std::optional<Rank0Monitor> monitor;
  // A failed MPI or control call here means a rank died: rescue (rescue.h) while the state lives.
  try {
    if (server) {
      // Each server applies the same optimizer as sync mode to its shard (SGD: the velocity's
      // shard; AdamW: the moments' shards), one gradient at a time (no averaging: every gradient
      // is its own update, as in Downpour SGD). The update count is the server's own: AdamW's
      // bias correction and the learning-rate schedule follow it.
      std::span<float> shard = layout.slice(params, rank);
      // This server's version: names the update a bad gradient was for. A resumed run counts
      // on from the updates the workers' pushes up to their resume points made.
      uint64_t updates = std::accumulate(resume_steps.begin(), resume_steps.end(), uint64_t{0});
      std::vector<int> clients = rank_range(cfg.ps, world);
      if (rank != 0) clients.insert(clients.begin(), 0);  // rank 0 pulls shards to evaluate
      if (rank == 0) monitor.emplace(s, ctx, layout, start);
      if (monitor) monitor->resumed_at(resume_steps);
      collectives::ParameterServer ps(
          ctx, shard, clients,
          {.max_staleness = cfg.max_staleness,
           .idle_warning = std::chrono::milliseconds(int64_t(cfg.stall_warning_s * 1000)),
           .first_version = shard_ckpt ? shard_ckpt->version() : 0},
          [&](std::span<const float> grad, const collectives::RequestEvent& push) {
            // Workers check before pushing; a non-finite gradient is never applied regardless.
            check_finite_values(grad, "gradient received by the parameter server", updates, rank);
            auto update = [&] {
              s.optimizer.step(shard, grad, 1.0f, updates, layout.offset(rank));
            };
            if (shard_ckpt) {
              shard_ckpt->apply(push.client, push.step, update);  // with the worker's count
            } else {
              update();
            }
            ++updates;
            if (shard_ckpt && cfg.checkpoint_every > 0 && updates % cfg.checkpoint_every == 0) {
              shard_ckpt->save();
            }
          },
          [&](const collectives::RequestEvent& e) {
            // The worker's step is done without changing the shard: a dropped push; a query
            // comes before a step, so the ones before it are done.
            if (shard_ckpt && e.kind == collectives::PsRequestKind::kPush && !e.applied) {
              shard_ckpt->saw(e.client, e.step + 1);
            } else if (shard_ckpt && e.kind == collectives::PsRequestKind::kQuery) {
              shard_ckpt->saw(e.client, e.step);
            }
            if (monitor) monitor->observe(e);
          });
      ps.run();
      if (shard_ckpt) shard_ckpt->save();
      if (monitor) monitor->release_other_servers();
      stats = ps.stats();
    } else {
      counts =
          run_worker(s, ctx, layout, resume_steps[static_cast<size_t>(rank - cfg.ps)], resumed,
                     worker_copy ? &*worker_copy : nullptr);
    }
    if (control) control->finish(0);  // every rank is done: the watches get END
  } catch (const CommError& e) {
    rescue_if_armed(e.what());
    throw;
  }
  disarm_rescue();
  watch.reset();

  // ---- the end: every rank receives the servers' final parameters -------------------------
  collectives::share_shards(ctx, layout, params);
  const std::vector<collectives::ServerStats> all_stats =
      collectives::gather_server_stats(ctx, cfg.ps, 0, stats);
  const uint64_t checksum = checksum64(params);
  SummaryRecord summary;
  // Every rank holds the gathered parameters now; they agree if every shard arrived intact.
  summary.ranks_agree = collectives::all_ranks_equal(checksum);
  summary.steps = collectives::sum_over_ranks(counts.steps);  // worker steps, a batch each
  summary.dropped_gradients = collectives::sum_over_ranks(counts.dropped);
  const uint64_t refreshed = collectives::sum_over_ranks(counts.refreshed);
  summary.catch_ups = refreshed;
  summary.param_checksum = fmt::format("{:016x}", checksum);
  if (rank == 0) {
    monitor->evaluate_current(s.sampler.epoch_of(s.total_steps - 1));
    summary.test_accuracy = monitor->last_eval().test_accuracy;
  }
  summary.elapsed_s = ms_since(start) / 1000.0;
  // As in sync mode, only samples whose gradient was applied count.
  const uint64_t samples = (summary.steps - summary.dropped_gradients) * cfg.batch_size;
  summary.samples_per_s = summary.elapsed_s > 0 ? double(samples) / summary.elapsed_s : 0;
  if (rank == 0) {
    for (size_t i = 0; i < all_stats.size(); ++i) {
      const collectives::ServerStats& st = all_stats[i];
      StalenessRecord rec;
      rec.server = static_cast<int>(i);
      rec.applied = st.applied;
      rec.dropped = st.dropped;
      rec.refreshed = i == 0 ? refreshed : 0;
      rec.max_staleness = st.max_applied_staleness;
      rec.histogram = st.staleness_counts;
      double sum = 0;
      for (size_t k = 0; k < st.staleness_counts.size(); ++k) {
        sum += double(k * st.staleness_counts[k]);
      }
      rec.mean_staleness = st.applied ? sum / double(st.applied) : 0;
      s.metrics.staleness(rec);
      log->info("server {}: {} updates applied, {} dropped as stale, staleness mean {:.2f} max {}",
                i, st.applied, st.dropped, rec.mean_staleness, rec.max_staleness);
    }
    s.metrics.summary(summary);
    log->info(
        "done: {} worker steps in {:.1f} s, {:.0f} samples/s, test accuracy {:.4f}, "
        "checksum {}, ranks agree: {}, dropped gradients {}, refreshed {}",
        summary.steps, summary.elapsed_s, summary.samples_per_s, summary.test_accuracy,
        summary.param_checksum, summary.ranks_agree, summary.dropped_gradients, refreshed);
  }
  return summary;
}

}  // namespace resync::runtime
