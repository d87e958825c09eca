#include "runtime/tools/bench_step.h"

#include <fmt/format.h>

#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>

#include "base/random.h"
#include "kernels/gemm.h"
#include "models/gpt.h"
#include "runtime/train/replica.h"

namespace resync::runtime {
namespace {

// The launcher's node-local rank, so that ranks of one node started together measure different
// GPUs; 0 outside a launcher. No MPI: the benchmark is one rank's step.
int local_rank_from_launcher() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    if (const char* v = std::getenv(var)) return std::atoi(v);
  }
  return 0;
}

struct StepFigures {
  std::string device;  // "cpu", "cuda:0"
  std::string model;
  double ms_per_step = 0;
  double samples_per_s = 0;
  double tokens_per_s = 0;  // labels per second: samples/s x labels per sample
  double cpu_ms_per_step = 0;  // process CPU time: what a busy shared machine leaves comparable
  float last_loss = 0;
};

// Seeded random inputs and labels of one batch: the step's cost does not depend on the values.
struct Batch {
  std::vector<float> x;
  std::vector<int32_t> y;
};

// A sequence model (gpt) reads token ids and has a label per position.
Batch make_batch(const models::ModelSpec& spec, size_t batch, size_t labels_per_sample,
                 uint64_t seed) {
  SplitMix64 rng(seed);
  Batch b{std::vector<float>(batch * spec.input_size()),
          std::vector<int32_t>(batch * labels_per_sample)};
  const bool tokens = labels_per_sample > 1;
  for (float& v : b.x) {
    v = tokens ? static_cast<float>(rng.next() % spec.n_classes)
               : static_cast<float>(rng.uniform());
  }
  for (int32_t& label : b.y) label = static_cast<int32_t>(rng.next() % spec.n_classes);
  return b;
}

StepFigures measure(Replica& replica, const Batch& batch, const StepBenchConfig& cfg) {
  const size_t n = cfg.batch_size;
  float loss = 0;
  uint64_t step = 0;
  for (int i = 0; i < cfg.warmup; ++i) {
    loss = replica.compute_gradients(batch.x.data(), batch.y.data(), n);
    replica.apply_gradients(1.0f, step++);
  }
  // Both calls end synchronised with the device, so wall time is the step's time.
  const auto t0 = std::chrono::steady_clock::now();
  const std::clock_t cpu0 = std::clock();
  for (int i = 0; i < cfg.iters; ++i) {
    loss = replica.compute_gradients(batch.x.data(), batch.y.data(), n);
    replica.apply_gradients(1.0f, step++);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double cpu_seconds = static_cast<double>(std::clock() - cpu0) / CLOCKS_PER_SEC;
  StepFigures f;
  f.device = replica.cuda_device() >= 0 ? fmt::format("cuda:{}", replica.cuda_device()) : "cpu";
  f.model = replica.describe();
  f.ms_per_step = seconds * 1e3 / cfg.iters;
  f.samples_per_s = static_cast<double>(n) * cfg.iters / seconds;
  f.tokens_per_s = f.samples_per_s * static_cast<double>(batch.y.size() / n);
  f.cpu_ms_per_step = cpu_seconds * 1e3 / cfg.iters;
  f.last_loss = loss;
  return f;
}

void print_row(const StepFigures& f, const StepBenchConfig& cfg) {
  std::printf("  %-8s %6zu %6d %12.3f %14.1f %14.1f %10.4f   %s\n", f.device.c_str(),
              cfg.batch_size, cfg.iters, f.ms_per_step, f.samples_per_s, f.tokens_per_s,
              static_cast<double>(f.last_loss), f.model.c_str());
}

}  // namespace

int run_step_bench(const StepBenchConfig& cfg) {
  models::ModelSpec spec;  // Fashion-MNIST's shape: 1x28x28, 10 classes
  spec.name = cfg.model;
  spec.hidden = cfg.hidden;
  if (cfg.model == "gpt") {  // byte text: T token ids per sample, 256 classes
    spec = models::gpt_spec(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.context, 256);
  }
  const models::LayerStack shape = models::build_layer_stack(spec);
  const size_t labels_per_sample = shape.layers.back()->out_size() / spec.n_classes;
  OptimizerConfig hyper = kernels::SgdHyper{.lr = 0.01f, .momentum = 0.9f, .weight_decay = 0.0f};
  if (cfg.optimizer == "adamw") {
    hyper = OptimizerConfig{};
    hyper.kind = OptimizerKind::kAdamW;
    hyper.lr = 1e-3f;
    hyper.weight_decay = 0.01f;
  }
  kernels::set_blas_threads(cfg.threads);

  // Built before anything is printed: a device that cannot be used fails with one line only.
  std::unique_ptr<Replica> primary =
      make_replica(cfg.device, spec, cfg.batch_size, cfg.seed, hyper, local_rank_from_launcher());
  std::unique_ptr<Replica> cpu_peer;
  if (cfg.device != "cpu") {
    cpu_peer = make_replica("cpu", spec, cfg.batch_size, cfg.seed, hyper, 0);
  }
  const Batch batch = make_batch(spec, cfg.batch_size, labels_per_sample, cfg.seed);

  std::printf(
      "# resync bench step: compute_gradients + apply_gradients (%s) on one "
      "rank, seeded synthetic %zux%zux%zu batches, %zu classes\n",
      cfg.optimizer == "adamw" ? "AdamW" : "SGD momentum", spec.in_channels, spec.in_height,
      spec.in_width, spec.n_classes);
  std::printf("# %d warm-up steps, then %d timed; BLAS threads (cpu) %d\n", cfg.warmup, cfg.iters,
              cfg.threads);
  std::printf("# %-8s %6s %6s %12s %14s %14s %10s   %s\n", "device", "batch", "iters",
              "ms/step", "samples/s", "tokens/s", "loss", "model");
  std::fflush(stdout);
  const StepFigures main_figures = measure(*primary, batch, cfg);
  print_row(main_figures, cfg);
  if (!cpu_peer) {
    std::printf("# process cpu time: %.3f ms/step, %.1f tokens per cpu-second\n",
                main_figures.cpu_ms_per_step,
                static_cast<double>(batch.y.size()) / main_figures.cpu_ms_per_step * 1e3);
  }
  std::fflush(stdout);
  if (cpu_peer) {
    const StepFigures cpu_figures = measure(*cpu_peer, batch, cfg);
    print_row(cpu_figures, cfg);
    std::printf("# %s / cpu: %.2fx samples/s\n", main_figures.device.c_str(),
                main_figures.samples_per_s / cpu_figures.samples_per_s);
  }
  return 0;
}

}  // namespace resync::runtime
