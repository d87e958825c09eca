// `resync bench allreduce` and `resync bench membw`: the settings each takes and the functions
// that run them (flag parsing is in bench.cpp).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace resync::runtime {

struct AllreduceBenchConfig {
  size_t min_bytes = 8;
  size_t max_bytes = 64 << 20;
  size_t step_factor = 2;
  size_t extra_elems = 0;  // added to every size's element count (1: odd counts)
  int warmup = 5;
  int iters = 0;   // per timed block; 0: enough for ~20 ms per block
  int blocks = 5;  // timed blocks per implementation, interleaved; the median is reported
  size_t segment_kib = 512;
  size_t block_kib = 0;         // shared-memory pipeline block; 0: the library default
  size_t direct_block_kib = 0;  // the same for the direct path
  std::string participants;     // "" (all), "N" (ranks 0..N-1) or "a,b,c"
  std::string path = "auto";
  // Where resync's buffer lives: "user" (ordinary memory, an application's own buffer) or
  // "shared" (the Allreducer's shared buffer, summed without staging copies: where the training
  // loop keeps its gradients on a node).
  std::string buffer = "user";
  // > 0: split each node into fake nodes of this many ranks (ShmOptions::fake_node_size), so
  // that the cross-node (hierarchical) path runs on one machine.
  int fake_node_size = 0;
  bool check = false;
  int check_iters = 2;
  std::string json;
};

// Runs under mpirun (initialises MPI itself). Returns the exit code: 0, 1 if a result was
// wrong, 2 for bad settings found once MPI is up (participants outside the world).
int run_allreduce_bench(const AllreduceBenchConfig& cfg);

struct MembwBenchConfig {
  size_t min_bytes = 64 << 10;
  size_t max_bytes = 256 << 20;
  size_t step_factor = 4;
  std::vector<int> threads = {1, 2};
  double seconds = 0.2;  // per measurement
};

// Single process: memcpy and a += b bandwidth per buffer size and thread count.
int run_membw_bench(const MembwBenchConfig& cfg);

}  // namespace resync::runtime
