// `resync bench SUBCOMMAND`: flag parsing for the benchmarks, and the memory-bandwidth one.
#include "runtime/tools/bench.h"

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "collectives/allreduce/float_sum.h"
#include "models/model.h"
#include "runtime/tools/bench_allreduce.h"
#include "runtime/tools/bench_step.h"

namespace resync::runtime {

namespace {

constexpr int kExitBadInput = 2;
constexpr int kExitRuntime = 1;

// The launcher's rank before MPI is up, so that only one rank prints a flag error.
int launcher_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"}) {
    if (const char* v = std::getenv(var)) return std::atoi(v);
  }
  return 0;
}

// "4096", "64K", "1M", "2G" (binary multiples) -> bytes; throws CLI::ValidationError.
size_t parse_bytes(const std::string& flag, const std::string& text) {
  size_t pos = 0;
  unsigned long long v = 0;
  try {
    v = std::stoull(text, &pos);
  } catch (const std::exception&) {
    throw CLI::ValidationError(flag, "'" + text + "' is not a size (e.g. 8, 64K, 1M, 1G)");
  }
  const std::string suffix = text.substr(pos);
  size_t unit = 1;
  if (suffix == "K" || suffix == "k" || suffix == "KiB") {
    unit = size_t{1} << 10;
  } else if (suffix == "M" || suffix == "m" || suffix == "MiB") {
    unit = size_t{1} << 20;
  } else if (suffix == "G" || suffix == "g" || suffix == "GiB") {
    unit = size_t{1} << 30;
  } else if (!suffix.empty() && suffix != "B") {
    throw CLI::ValidationError(flag, "'" + text + "' has an unknown unit (use K, M or G)");
  }
  if (v > (size_t{1} << 40) / unit) throw CLI::ValidationError(flag, "'" + text + "' is too large");
  return static_cast<size_t>(v) * unit;
}

// ---- membw --------------------------------------------------------------------------------

enum class MemOp { kCopy, kAdd };

// Runs `op` on per-thread buffers of `n_bytes` from `n_threads` threads at once for about
// `seconds`; returns the summed rate in buffer bytes per second (GB/s).
double measure(MemOp op, size_t n_bytes, int n_threads, double seconds) {
  const size_t n = std::max<size_t>(1, n_bytes / sizeof(float));
  std::vector<double> rates(n_threads, 0.0);
  std::barrier sync(n_threads);
  std::vector<std::thread> threads;
  for (int t = 0; t < n_threads; ++t) {
    threads.emplace_back([&, t] {
      // Each thread allocates and first-touches its own buffers.
      std::vector<float> a(n, 1.0f);
      std::vector<float> b(n, 0.0f);
      const auto once = [&] {
        if (op == MemOp::kCopy) {
          std::memcpy(a.data(), b.data(), n * sizeof(float));
        } else {
          collectives::add_into(a, b);
        }
      };
      once();
      sync.arrive_and_wait();
      const auto t0 = std::chrono::steady_clock::now();
      const auto stop = t0 + std::chrono::duration<double>(seconds);
      uint64_t reps = 0;
      auto now = t0;
      do {
        once();
        ++reps;
        now = std::chrono::steady_clock::now();
      } while (now < stop);
      const double elapsed = std::chrono::duration<double>(now - t0).count();
      rates[t] = static_cast<double>(reps) * n * sizeof(float) / elapsed / 1e9;
      sync.arrive_and_wait();
    });
  }
  for (std::thread& th : threads) th.join();
  double total = 0;
  for (double r : rates) total += r;
  return total;
}

// Copies an S-byte buffer that a thread on another core has just written (memcpy into it),
// as every shared-memory exchange does; the two threads take turns. Returns the reader's
// rate in GB/s, or 0 if this process may not use two CPUs.
double measure_cross_core(size_t n_bytes, double seconds) {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || CPU_COUNT(&allowed) < 2) return 0;
  int cpus[2] = {-1, -1};
  for (int c = 0, found = 0; c < CPU_SETSIZE && found < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus[found++] = c;
  }
  std::vector<char> shared(n_bytes, 0);
  std::atomic<int> turn{0};  // 0: writer's turn, 1: reader's, 2: stop
  double read_seconds = 0;
  uint64_t reads = 0;
  const auto pin = [&](int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
  };
  std::thread writer([&] {
    pin(cpus[0]);
    std::vector<char> src(n_bytes, 1);
    for (;;) {
      int t = 0;
      while ((t = turn.load(std::memory_order_acquire)) == 1) std::this_thread::yield();
      if (t == 2) return;
      std::memcpy(shared.data(), src.data(), n_bytes);
      turn.store(1, std::memory_order_release);
    }
  });
  std::thread reader([&] {
    pin(cpus[1]);
    std::vector<char> dst(n_bytes, 0);
    const auto stop = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < stop) {
      while (turn.load(std::memory_order_acquire) != 1) std::this_thread::yield();
      const auto t0 = std::chrono::steady_clock::now();
      std::memcpy(dst.data(), shared.data(), n_bytes);
      read_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      ++reads;
      turn.store(0, std::memory_order_release);
    }
    while (turn.load(std::memory_order_acquire) != 1) std::this_thread::yield();
    turn.store(2, std::memory_order_release);
  });
  writer.join();
  reader.join();
  return read_seconds > 0 ? static_cast<double>(reads) * n_bytes / read_seconds / 1e9 : 0;
}

}  // namespace

int run_membw_bench(const MembwBenchConfig& cfg) {
  std::printf(
      "# resync bench membw: memcpy(dst, src, S) and a[i] += b[i] (the all-reduce's add "
      "kernel) on S-byte buffers, one pair per thread\n");
  std::printf(
      "# GB/s = S/t summed over threads; the memory traffic is 2S/t for memcpy and 3S/t "
      "for a += b\n");
  std::printf(
      "# x-core copy: memcpy of a buffer that a thread on another core has just written (the "
      "reader's rate), the unit of every shared-memory exchange\n");
  std::printf("# %12s %8s %14s %14s %16s\n", "size (B)", "threads", "memcpy (GB/s)", "a+=b (GB/s)",
              "x-core copy");
  for (size_t bytes = cfg.min_bytes; bytes <= cfg.max_bytes; bytes *= cfg.step_factor) {
    for (size_t i = 0; i < cfg.threads.size(); ++i) {
      const int threads = cfg.threads[i];
      const double copy = measure(MemOp::kCopy, bytes, threads, cfg.seconds);
      const double add = measure(MemOp::kAdd, bytes, threads, cfg.seconds);
      std::string cross = "";
      if (i == 0) {
        const double x = measure_cross_core(bytes, cfg.seconds);
        cross = x > 0 ? fmt::format("{:.2f}", x) : "(1 CPU)";
      }
      std::printf("  %12zu %8d %14.2f %14.2f %16s\n", bytes, threads, copy, add, cross.c_str());
      std::fflush(stdout);
    }
    if (bytes > cfg.max_bytes / cfg.step_factor) break;
  }
  return 0;
}

int bench_main(int argc, char** argv) {
  CLI::App app{"resync bench: benchmarks to judge resync on this machine."};
  app.name("resync bench");
  app.require_subcommand(1);

  AllreduceBenchConfig ar;
  std::string ar_min = "8";
  std::string ar_max = "64M";
  CLI::App* allreduce = app.add_subcommand(
      "allreduce",
      "resync's all-reduce against MPI_Allreduce (run under mpirun): nccl-tests-style table");
  allreduce->add_option("--min-bytes,-b", ar_min, "Smallest buffer (bytes; K, M, G suffixes)")
      ->capture_default_str();
  allreduce->add_option("--max-bytes,-e", ar_max, "Largest buffer")->capture_default_str();
  allreduce->add_option("--step-factor,-f", ar.step_factor, "Multiply the size by this per row")
      ->check(CLI::Range(size_t{2}, size_t{1024}))
      ->capture_default_str();
  allreduce
      ->add_option("--extra-elems", ar.extra_elems,
                   "Add this many floats to every size's count (1: odd counts)")
      ->check(CLI::Range(size_t{0}, size_t{1} << 20))
      ->capture_default_str();
  allreduce->add_option("--warmup,-w", ar.warmup, "Untimed calls per size and implementation")
      ->check(CLI::Range(0, 100000))
      ->capture_default_str();
  allreduce
      ->add_option("--iters,-n", ar.iters, "Calls per timed block (0: enough for ~20 ms per block)")
      ->check(CLI::Range(0, 10000000))
      ->capture_default_str();
  allreduce
      ->add_option("--blocks", ar.blocks,
                   "Timed blocks per implementation, interleaved; the median is reported")
      ->check(CLI::Range(1, 101))
      ->capture_default_str();
  allreduce->add_option("--segment-kib", ar.segment_kib, "Ring segment size (KiB)")
      ->check(CLI::Range(size_t{1}, size_t{1} << 20))
      ->capture_default_str();
  allreduce
      ->add_option("--block-kib", ar.block_kib,
                   "Shared-memory pipeline block (KiB; 0: the library default)")
      ->check(CLI::Range(size_t{0}, size_t{1} << 20))
      ->capture_default_str();
  allreduce
      ->add_option("--direct-block-kib", ar.direct_block_kib,
                   "Pipeline block of the direct (shared-buffer) path (KiB; 0: default)")
      ->check(CLI::Range(size_t{0}, size_t{1} << 20))
      ->capture_default_str();
  allreduce->add_option("--participants,-p", ar.participants,
                        "Ranks taking part: N (ranks 0..N-1) or a list like 0,2,3 (default all); "
                        "the MPI_Allreduce peer runs on a communicator of the same ranks");
  allreduce->add_option("--path", ar.path, "Force resync's path (default auto)")
      ->check(CLI::IsMember({"auto", "ring", "small", "shm", "shm-small", "shm-direct", "hier"}))
      ->capture_default_str();
  allreduce
      ->add_option("--fake-node-size", ar.fake_node_size,
                   "Treat every this many ranks of a node as a node of their own, so that the "
                   "cross-node (hier) path runs on one machine (0: real nodes)")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  allreduce
      ->add_option("--buffer", ar.buffer,
                   "resync's buffer: user (ordinary memory, an application's own buffer) or "
                   "shared (the all-reducer's shared-memory buffer, summed without staging "
                   "copies; where the training loop keeps its gradients on a node)")
      ->check(CLI::IsMember({"user", "shared"}))
      ->capture_default_str();
  allreduce->add_flag("--check,-c", ar.check,
                      "Check results: deterministic integer data per rank and iteration against "
                      "an independently computed sum; exit 1 on any wrong element");
  allreduce->add_option("--check-iters", ar.check_iters, "Checked calls per size")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  allreduce->add_option("--json", ar.json, "Also write one JSON object per row to this file");

  MembwBenchConfig mb;
  std::string mb_min = "64K";
  std::string mb_max = "256M";
  CLI::App* membw = app.add_subcommand(
      "membw", "Memory bandwidth of memcpy and a += b: the limit under any all-reduce");
  membw->add_option("--min-bytes,-b", mb_min, "Smallest buffer")->capture_default_str();
  membw->add_option("--max-bytes,-e", mb_max, "Largest buffer")->capture_default_str();
  membw->add_option("--step-factor,-f", mb.step_factor, "Multiply the size by this per row")
      ->check(CLI::Range(size_t{2}, size_t{1024}))
      ->capture_default_str();
  membw->add_option("--threads,-t", mb.threads, "Thread counts to measure")
      ->check(CLI::Range(1, 256))
      ->delimiter(',')
      ->capture_default_str();
  membw->add_option("--seconds", mb.seconds, "Duration of each measurement")
      ->check(CLI::Range(0.001, 60.0))
      ->capture_default_str();

  StepBenchConfig st;
  CLI::App* step = app.add_subcommand(
      "step",
      "Samples/s of one training step (forward, backward, SGD or AdamW) on one rank, on the cpu "
      "or a CUDA GPU (then with the cpu figure beside it)");
  step->add_option("--device", st.device, "Where the step runs: cpu or cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  step->add_option("--model", st.model, "Model: mlp, cnn or a registered one")
      ->check(CLI::IsMember(models::model_names()))  // built-ins and registered models
      ->capture_default_str();
  step->add_option("--hidden", st.hidden, "Hidden layer widths of the mlp")
      ->check(CLI::Range(size_t{1}, size_t{1} << 16))
      ->delimiter(',')
      ->capture_default_str();
  step->add_option("--n-layer", st.n_layer, "gpt: transformer blocks")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{64}));
  step->add_option("--n-head", st.n_head, "gpt: attention heads")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{64}));
  step->add_option("--n-embd", st.n_embd, "gpt: width")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{4096}));
  step->add_option("--context", st.context, "gpt: tokens per sample")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{4096}));
  step->add_option("--batch-size", st.batch_size, "Samples per step")
      ->check(CLI::Range(size_t{1}, size_t{1} << 16))
      ->capture_default_str();
  step->add_option("--iters", st.iters, "Timed steps")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  step->add_option("--warmup", st.warmup, "Untimed steps before timing")
      ->check(CLI::Range(0, 1000000))
      ->capture_default_str();
  step->add_option("--threads", st.threads, "BLAS threads of the cpu step")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  step->add_option("--seed", st.seed, "Seed of the parameters and the synthetic batch")
      ->capture_default_str();
  step->add_option("--optimizer", st.optimizer,
                   "The update: sgd (lr 0.01, momentum 0.9) or adamw (lr 1e-3, PyTorch's "
                   "defaults but beta2 0.95)")
      ->check(CLI::IsMember({"sgd", "adamw"}))
      ->capture_default_str();

  try {
    if (argc >= 2 && argv[1][0] != '-' && std::strcmp(argv[1], "allreduce") != 0 &&
        std::strcmp(argv[1], "membw") != 0 && std::strcmp(argv[1], "step") != 0) {
      throw CLI::ValidationError(std::string("unknown benchmark '") + argv[1] +
                                 "' (allreduce, membw, step)");
    }
    app.parse(argc, argv);
    if (allreduce->parsed()) {
      ar.min_bytes = parse_bytes("--min-bytes", ar_min);
      ar.max_bytes = parse_bytes("--max-bytes", ar_max);
      if (ar.min_bytes < sizeof(float) && ar.extra_elems == 0) {
        throw CLI::ValidationError("--min-bytes", "must be at least 4 (one float)");
      }
      if (ar.max_bytes < ar.min_bytes) {
        throw CLI::ValidationError("--max-bytes", "must be at least --min-bytes");
      }
      if (ar.max_bytes / sizeof(float) + ar.extra_elems > (size_t{1} << 31) - 1) {
        throw CLI::ValidationError("--max-bytes", "MPI_Allreduce counts are ints: at most 8 GiB");
      }
    } else if (membw->parsed()) {
      mb.min_bytes = parse_bytes("--min-bytes", mb_min);
      mb.max_bytes = parse_bytes("--max-bytes", mb_max);
      if (mb.min_bytes < sizeof(float) || mb.max_bytes < mb.min_bytes) {
        throw CLI::ValidationError("--max-bytes", "need 4 <= --min-bytes <= --max-bytes");
      }
    }
  } catch (const CLI::CallForHelp& e) {
    return launcher_rank() == 0 ? app.exit(e) : 0;
  } catch (const CLI::CallForAllHelp& e) {
    return launcher_rank() == 0 ? app.exit(e) : 0;
  } catch (const CLI::ParseError& e) {
    if (launcher_rank() == 0) std::fprintf(stderr, "resync bench: error: %s\n", e.what());
    return kExitBadInput;
  }

  try {
    if (allreduce->parsed()) return run_allreduce_bench(ar);
    if (step->parsed()) return run_step_bench(st);
    return run_membw_bench(mb);
  } catch (const InvalidArgument& e) {
    std::fprintf(stderr, "resync bench: error: %s\n", e.what());
    return kExitBadInput;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "resync bench: error: %s\n", e.what());
    return kExitRuntime;
  }
}

}  // namespace resync::runtime
