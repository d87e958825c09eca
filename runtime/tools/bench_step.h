// `resync bench step`: samples/s of one training step (compute_gradients + apply_gradients)
// through a Replica on one rank, on the CPU or a CUDA GPU (with the CPU figure beside it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace resync::runtime {

struct StepBenchConfig {
  std::string device = "cpu";  // cpu or cuda
  std::string model = "mlp";   // a registered model (mlp, cnn, ...)
  std::vector<size_t> hidden = {512, 512};
  // gpt: shape and sequence length; byte tokens (vocabulary 256).
  size_t n_layer = 4, n_head = 4, n_embd = 128, context = 128;
  size_t batch_size = 64;
  int iters = 20;   // timed steps
  int warmup = 3;   // untimed steps first (allocations, cuBLAS heuristics, caches)
  int threads = 1;  // BLAS threads of the CPU replica
  uint64_t seed = 1;
  std::string optimizer = "sgd";  // sgd | adamw
};

// Prints a small table to stdout and returns 0. Throws DeviceError ("no CUDA device is available
// (...)" or "this build has no CUDA support") before printing anything when --device cuda cannot
// run, InvalidArgument on a bad model.
int run_step_bench(const StepBenchConfig& cfg);

}  // namespace resync::runtime
