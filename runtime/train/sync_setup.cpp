// The pieces of a synchronous run around its step loop (sync_setup.h).
#include "runtime/train/sync_setup.h"

#include <fmt/format.h>

#include <cmath>
#include <exception>
#include <functional>
#include <optional>

#include "base/error.h"
#include "base/log.h"
#include "collectives/transport/world.h"
#ifdef RESYNC_WITH_CUDA
#include "collectives/allreduce/nccl_allreduce.h"
#endif

namespace resync::runtime {
namespace {

#ifdef RESYNC_WITH_CUDA
// --collective nccl (plain sync on GPUs, which validate_for_world enforces): NCCL over the
// device gradient; every rank takes part, so the members are all of them.
class NcclGradientExchange final : public GradientExchange {
 public:
  explicit NcclGradientExchange(Replica& replica)
      : replica_(replica), nccl_(collectives::NcclAllreduce::over_world(replica.cuda_device())) {}
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

}  // namespace

collectives::CoordinatorConfig coordinator_config(const TrainConfig& cfg, int world,
                                                  std::vector<int> shared_state_node) {
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

CheckpointMeta checkpoint_meta(const Setup& s, uint64_t step) {
  return {.step = step,
          .model = s.replica->model_description(),
          .world_size = s.world,
          .seed = s.cfg.seed,
          .batch_size = s.cfg.batch_size,
          .optimizer = s.cfg.optimizer};
}

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
    if (c.meta.optimizer != cfg.optimizer) {
      throw InvalidArgument(fmt::format("--resume: checkpoint {} was written with --optimizer {}, "
                                        "this run uses --optimizer {}",
                                        path, c.meta.optimizer, cfg.optimizer));
    }
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

GradientPlane make_gradient_plane(const TrainConfig& cfg, Replica& replica,
                                  collectives::Context& ctx, bool straggler_mode, int rank,
                                  int world) {
  const StateLayout layout = replica.state_layout();
  const bool state_in_shm = straggler_mode && replica.cuda_device() < 0;
  GradientPlane plane;
  plane.allreducer = std::make_unique<collectives::Allreducer>(
      ctx, collectives::AllreducerOptions{
               .ring = {.segment_bytes = cfg.segment_kib * 1024},
               .shm = {.direct_elems = state_in_shm ? layout.window_floats() : layout.n_params},
               .max_elems = layout.n_params});
  collectives::Allreducer& allreducer = *plane.allreducer;
  plane.exchange = make_device_exchange(cfg, replica, rank);
  plane.nccl = plane.exchange != nullptr;
  const std::span<float> window = allreducer.shared_buffer();
  if (!plane.nccl) {
    if (window.size() >= layout.n_params) replica.place_gradients(layout.window_gradient(window));
    // Overlap needs every rank in every step (plain sync) and a backward pass on the host.
    const bool spans_nodes = allreducer.node_size() < world;
    const bool overlap = !straggler_mode && (cfg.overlap == "on" ||
                                             (cfg.overlap == "auto" && spans_nodes));
    if (overlap && replica.set_gradients_final_hook({})) {
      auto exchange = std::make_unique<OverlapExchange>(
          allreducer, replica.gradient_buffer(), world, cfg.bucket_kib * 1024 / sizeof(float));
      plane.overlap = exchange.get();
      replica.set_gradients_final_hook(
          [o = plane.overlap](size_t first_final) { o->gradients_final(first_final); });
      plane.exchange = std::move(exchange);
    } else {
      if (cfg.overlap == "on" && rank == 0) {
        log::get("train")->warn("--overlap on: not with backup workers, a straggler timeout or "
                                "a GPU; the step keeps its protocol");
      }
      plane.exchange = std::make_unique<AllreducerExchange>(allreducer, replica.gradient_buffer());
    }
  }
  if (state_in_shm && allreducer.shm() != nullptr && window.size() >= layout.window_floats() &&
      replica.place_state(layout.window_state(window))) {
    plane.board = std::make_unique<collectives::ShmStateBoard>(
        *allreducer.shm(), layout.window_state_offset(), layout.n_floats());
  }
  // Ranks with the same id copy each other's state: the lowest rank of the node.
  int state_node = -1;
  for (int r = 0; plane.board && r < world && state_node < 0; ++r) {
    if (plane.board->covers(r)) state_node = r;
  }
  plane.shared_state_node = collectives::gather_from_ranks(state_node);
  return plane;
}

StopReason agreed_stop_reason(const PreemptionSignals& signals, int rank, int world) {
  const int signalled = collectives::lowest_failed_rank(signals.received() != 0);
  if (signalled >= world) return {};
  return {collectives::broadcast_string(
              rank == signalled ? PreemptionSignals::name(signals.received()) : "", signalled),
          signalled};
}

}  // namespace resync::runtime
