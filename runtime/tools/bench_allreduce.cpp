// `resync bench allreduce`: resync's all-reduce against MPI_Allreduce, nccl-tests style.
#include "runtime/tools/bench_allreduce.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "collectives/allreduce/allreducer.h"
#include "collectives/allreduce/mpi_allreduce_peer.h"
#include "collectives/transport/context.h"
#include "collectives/transport/mpi_session.h"
#include "collectives/transport/mpi_transport.h"
#include "collectives/transport/world.h"

namespace resync::runtime {

namespace {

using Clock = std::chrono::steady_clock;
using collectives::AllreducePath;

// Iterations per timed block when --iters is 0: enough for this long, within bounds.
constexpr double kAutoBlockSeconds = 0.02;
constexpr int kAutoMinIters = 5;
constexpr int kAutoMaxIters = 20000;

struct Row {
  const char* impl;
  std::string path;
  size_t bytes = 0;
  size_t count = 0;
  double time_us = 0;
  double algbw = 0;  // GB/s
  double busbw = 0;  // GB/s
  uint64_t wrong = 0;
  int ranks = 0;
};

std::vector<int> parse_participants(const std::string& spec, int world) {
  std::vector<int> ranks;
  if (spec.empty()) {
    ranks.resize(world);
    std::iota(ranks.begin(), ranks.end(), 0);
    return ranks;
  }
  const auto parse_int = [&](const std::string& text) {
    char* end = nullptr;
    const long v = std::strtol(text.c_str(), &end, 10);
    RESYNC_CHECK_ARG(!text.empty() && end != nullptr && *end == '\0' && v >= 0 && v < (1 << 24),
                     fmt::format("--participants: '{}' is not a rank or count", text));
    return static_cast<int>(v);
  };
  if (spec.find(',') == std::string::npos) {
    const int n = parse_int(spec);
    RESYNC_CHECK_ARG(n >= 1 && n <= world,
                     fmt::format("--participants {}: the count must be in 1..{}", n, world));
    ranks.resize(n);
    std::iota(ranks.begin(), ranks.end(), 0);
    return ranks;
  }
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t comma = std::min(spec.find(',', start), spec.size());
    const std::string item = spec.substr(start, comma - start);
    start = comma + 1;
    if (item.empty() && start > spec.size()) break;  // one trailing comma: "3,"
    const int r = parse_int(item);
    RESYNC_CHECK_ARG(r < world,
                     fmt::format("--participants: rank {} is outside 0..{}", r, world - 1));
    ranks.push_back(r);
  }
  std::sort(ranks.begin(), ranks.end());
  RESYNC_CHECK_ARG(std::adjacent_find(ranks.begin(), ranks.end()) == ranks.end(),
                   "--participants: a rank appears twice");
  return ranks;
}

// Check data: small integers, so that every sum is exact whatever the order of additions and
// the expected value can be computed independently, in integers.
int check_int(int rank, int iter, size_t i) {
  uint64_t x = i * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(rank + 1) * 0xbf58476d1ce4e5b9ULL +
               static_cast<uint64_t>(iter + 1) * 0x94d049bb133111ebULL;
  x ^= x >> 31;
  x *= 0xd6e8feb86659fd93ULL;
  x ^= x >> 32;
  return static_cast<int>(x % 33) - 16;
}

void fill_check(std::span<float> data, int rank, int iter) {
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(check_int(rank, iter, i));
}

uint64_t count_wrong(std::span<const float> got, std::span<const int> participants, int iter) {
  uint64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    int64_t want = 0;
    for (int r : participants) want += check_int(r, iter, i);
    if (got[i] != static_cast<float>(want)) ++wrong;
  }
  return wrong;
}

// Timing data: non-negative integers, so repeated in-place sums grow but never turn into NaN.
void fill_timing(std::span<float> data) {
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i & 1);
}

// Ranks that sit out the measured calls wait for the participants in these reductions, which
// sleep instead of burning the CPU the participants are measured on.
using collectives::max_over_ranks_idle;
using collectives::sum_over_ranks_idle;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

std::string json_row(const Row& r) {
  return fmt::format(
      "{{\"impl\": \"{}\", \"path\": \"{}\", \"bytes\": {}, \"count\": {}, \"type\": \"float\", "
      "\"redop\": \"sum\", \"time_us\": {:.3f}, \"algbw\": {:.4f}, \"busbw\": {:.4f}, "
      "\"wrong\": {}, \"ranks\": {}}}\n",
      r.impl, r.path, r.bytes, r.count, r.time_us, r.algbw, r.busbw, r.wrong, r.ranks);
}

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : fallback;
}

}  // namespace

int run_allreduce_bench(const AllreduceBenchConfig& cfg) {
  collectives::MpiSession mpi;
  const int rank = mpi.rank();
  const int world = mpi.size();

  std::vector<int> participants;
  std::optional<AllreducePath> forced;
  try {
    participants = parse_participants(cfg.participants, world);
    if (cfg.path != "auto") {
      forced = collectives::path_from_name(cfg.path);
      RESYNC_CHECK_ARG(forced.has_value(), fmt::format("--path {}: unknown path", cfg.path));
    }
  } catch (const InvalidArgument& e) {
    if (rank == 0) std::fprintf(stderr, "resync bench allreduce: error: %s\n", e.what());
    return 2;
  }
  const int p = static_cast<int>(participants.size());
  const bool in = std::binary_search(participants.begin(), participants.end(), rank);

  collectives::MpiTransport transport;
  collectives::Context ctx(transport);
  collectives::AllreducerOptions options;
  options.ring.segment_bytes = cfg.segment_kib * 1024;
  if (cfg.block_kib > 0) options.shm.block_bytes = cfg.block_kib * 1024;
  if (cfg.direct_block_kib > 0) options.shm.direct_block_bytes = cfg.direct_block_kib * 1024;
  options.force = forced;
  options.shm.fake_node_size = cfg.fake_node_size;
  std::vector<size_t> sizes;
  for (size_t b = cfg.min_bytes; b <= cfg.max_bytes; b *= cfg.step_factor) {
    sizes.push_back(b);
    if (b > cfg.max_bytes / cfg.step_factor) break;
  }
  const size_t max_count = cfg.max_bytes / sizeof(float) + cfg.extra_elems;
  options.max_elems = max_count;
  const bool shared = cfg.buffer == "shared";
  if (shared) options.shm.direct_elems = max_count;
  collectives::Allreducer allreducer(ctx, options);
  if (shared && !allreducer.has_shm()) {
    if (rank == 0) {
      std::fprintf(stderr, "resync bench allreduce: error: --buffer shared needs shared memory\n");
    }
    return 2;
  }

  collectives::MpiAllreducePeer mpi_peer(participants);

  std::FILE* json = nullptr;
  if (rank == 0 && !cfg.json.empty()) {
    json = std::fopen(cfg.json.c_str(), "w");
    if (json == nullptr) {
      std::fprintf(stderr, "resync bench allreduce: error: cannot write %s: %s\n", cfg.json.c_str(),
                   std::strerror(errno));
    }
  }
  const double json_failed =
      max_over_ranks_idle(rank == 0 && !cfg.json.empty() && json == nullptr ? 1 : 0);
  if (json_failed != 0) return 2;

  if (rank == 0) {
    std::printf("# resync bench allreduce: %d ranks (%s), %d participants: %s\n", world,
                mpi.library_version().c_str(), p,
                fmt::format("{}", fmt::join(participants, ",")).c_str());
    std::printf("# %s\n", allreducer.describe().c_str());
    std::printf(
        "# Open MPI vader single-copy mechanism: %s; in-place float sum; resync's buffer: "
        "%s memory\n",
        env_or("OMPI_MCA_btl_vader_single_copy_mechanism", "default").c_str(),
        shared ? "shared (Allreducer::shared_buffer)" : "user");
    std::printf(
        "# time: per call, mean over a block of iterations, max over ranks; median of %d "
        "blocks, resync and MPI blocks interleaved\n",
        cfg.blocks);
    std::printf("#%11s %11s %6s %5s %9s | %10s %8s %8s %6s | %10s %8s %8s %6s | %6s\n", "", "", "",
                "", "", "resync", "", "", "", "MPI_Allreduce", "", "", "", "ratio");
    std::printf("#%11s %11s %6s %5s %9s | %10s %8s %8s %6s | %10s %8s %8s %6s | %6s\n", "size",
                "count", "type", "redop", "path", "time", "algbw", "busbw", "#wrong", "time",
                "algbw", "busbw", "#wrong", "busbw");
    std::printf("#%11s %11s %6s %5s %9s | %10s %8s %8s %6s | %10s %8s %8s %6s | %6s\n", "(B)",
                "(elems)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)",
                "", "");
    std::fflush(stdout);
  }

  std::vector<float> user_buf(shared ? 0 : max_count);
  std::vector<float> ref(max_count);
  const std::span<float> buf = shared ? allreducer.shared_buffer() : std::span<float>(user_buf);
  fill_timing(buf);
  fill_timing(ref);
  uint64_t seq = 1;
  uint64_t total_wrong = 0;
  for (size_t bytes : sizes) {
    const size_t count = bytes / sizeof(float) + cfg.extra_elems;
    std::span<float> ours(buf.data(), count);
    std::span<float> theirs(ref.data(), count);
    const auto run_ours = [&](std::span<float> data) {
      allreducer.allreduce_sum(data, participants, seq++);
    };
    const auto run_mpi = [&](std::span<float> data) { mpi_peer.allreduce_sum(data); };

    // Warm-up, timed roughly to choose the iteration count every rank then uses.
    double warm_s = 0;
    if (in) {
      fill_timing(ours);
      fill_timing(theirs);
      const Clock::time_point t0 = Clock::now();
      for (int i = 0; i < cfg.warmup; ++i) {
        run_ours(ours);
        run_mpi(theirs);
      }
      warm_s = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    int iters = cfg.iters;
    if (iters == 0) {
      const double per_call = max_over_ranks_idle(warm_s / std::max(1, 2 * cfg.warmup));
      iters = per_call > 0 ? static_cast<int>(kAutoBlockSeconds / per_call) : kAutoMaxIters;
      iters = std::clamp(iters, kAutoMinIters, kAutoMaxIters);
    }

    // Timed blocks, interleaved, alternating which implementation goes first.
    std::vector<double> ours_us(cfg.blocks, 0.0);
    std::vector<double> mpi_us(cfg.blocks, 0.0);
    for (int blk = 0; blk < cfg.blocks; ++blk) {
      for (int half = 0; half < 2; ++half) {
        const bool mine = (blk + half) % 2 == 0;
        double us = 0;
        if (in) {
          fill_timing(mine ? ours : theirs);
          mpi_peer.barrier();
          const Clock::time_point t0 = Clock::now();
          for (int i = 0; i < iters; ++i) {
            if (mine) {
              run_ours(ours);
            } else {
              run_mpi(theirs);
            }
          }
          us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters;
        }
        (mine ? ours_us : mpi_us)[blk] = max_over_ranks_idle(us);
      }
    }

    uint64_t ours_wrong = 0;
    uint64_t mpi_wrong = 0;
    if (cfg.check && in) {
      for (int it = 0; it < cfg.check_iters; ++it) {
        fill_check(ours, rank, it);
        run_ours(ours);
        ours_wrong += count_wrong(ours, participants, it);
        fill_check(theirs, rank, it);
        run_mpi(theirs);
        mpi_wrong += count_wrong(theirs, participants, it);
      }
    }
    ours_wrong = sum_over_ranks_idle(ours_wrong);
    mpi_wrong = sum_over_ranks_idle(mpi_wrong);
    total_wrong += ours_wrong + mpi_wrong;

    const double bus_factor = p > 1 ? 2.0 * (p - 1) / p : 0.0;
    const auto make_row = [&](const char* impl, std::string path, double us, uint64_t wrong) {
      Row r{impl, std::move(path), count * sizeof(float), count, us, 0, 0, wrong, p};
      r.algbw = us > 0 ? static_cast<double>(r.bytes) / (us * 1e3) : 0;
      r.busbw = r.algbw * bus_factor;
      return r;
    };
    const Row a =
        make_row("resync", collectives::path_name(allreducer.path_for(ours, participants)),
                 median(ours_us), ours_wrong);
    const Row b = make_row("mpi", "MPI_Allreduce", median(mpi_us), mpi_wrong);
    if (rank == 0) {
      const double ratio = a.time_us > 0 ? b.time_us / a.time_us : 0;
      std::printf(
          " %11zu %11zu %6s %5s %9s | %10.2f %8.3f %8.3f %6llu | %10.2f %8.3f %8.3f %6llu | "
          "%6.2f\n",
          a.bytes, a.count, "float", "sum", a.path.c_str(), a.time_us, a.algbw, a.busbw,
          static_cast<unsigned long long>(a.wrong), b.time_us, b.algbw, b.busbw,
          static_cast<unsigned long long>(b.wrong), ratio);
      std::fflush(stdout);
      if (json != nullptr) {
        std::fputs(json_row(a).c_str(), json);
        std::fputs(json_row(b).c_str(), json);
      }
    }
  }
  if (json != nullptr) std::fclose(json);
  if (rank == 0) {
    if (cfg.check) {
      std::printf("# check: %s (%llu wrong elements)\n", total_wrong == 0 ? "OK" : "FAILED",
                  static_cast<unsigned long long>(total_wrong));
    }
    std::fflush(stdout);
  }
  return total_wrong == 0 ? 0 : 1;
}

}  // namespace resync::runtime
