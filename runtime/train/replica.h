// Replica: one rank's model and optimizer on one device (CPU, or a CUDA GPU), the unit the
// training loop talks to; and make_replica, which builds one for `--device cpu|cuda`.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "base/state_layout.h"
#include "runtime/train/optimizer.h"
#include "models/model.h"

namespace resync::runtime {

// Where compute_gradients leaves the gradient and apply_gradients takes it from.
//   kHost:   gradient_buffer() (host memory; pinned on CUDA), for resync's ring on the host.
//   kDevice: device_gradient_buffer(), for an all-reduce on the device (NCCL, or a CUDA-aware
//            MPI); the host copy is skipped both ways. CUDA replicas only.
enum class GradientLocation { kHost, kDevice };

class Replica {
 public:
  virtual ~Replica() = default;

  // e.g. "mlp 784-512-512-10 (669706 params) on cpu" or "... on cuda:0 (NVIDIA A100 ...)".
  virtual std::string describe() const = 0;
  // The model alone, as models::Model::describe() says it (what checkpoints record).
  virtual std::string model_description() const = 0;
  virtual size_t n_params() const = 0;
  virtual size_t max_batch() const = 0;

  // Forward and backward of one mini-batch given in host memory (x [n x input size], labels
  // [n x labels per sample]: one per sample, or one per position for a sequence model such as
  // gpt; 1 <= n <= max_batch); returns the mean loss over the labels. Afterwards the gradient of that mean is
  // in gradient_buffer() (or device_gradient_buffer(), see GradientLocation), where the
  // all-reduce may sum it in place.
  virtual float compute_gradients(const float* x, const int32_t* y, size_t n) = 0;
  virtual std::span<float> gradient_buffer() = 0;
  // Has compute_gradients call `hook` during its backward pass as the gradients of
  // [first_final, n_params()) become final (models::Model::GradientsFinalHook); an empty hook
  // removes it. Returns false if this replica cannot (the CUDA replica computes asynchronously).
  virtual bool set_gradients_final_hook(models::Model::GradientsFinalHook hook) = 0;
  // Moves the host gradient buffer into `storage` (>= n_params() floats, e.g. the all-reducer's
  // shared-memory window, so the node's ranks sum it without staging copies; it must not overlap
  // the state, InvalidArgument otherwise). Returns false if this replica keeps its own (the CUDA
  // replica's is pinned host memory).
  virtual bool place_gradients(std::span<float> storage) = 0;
  // The parts of the state (parameters, then the optimizer's buffers) and their length.
  virtual StateLayout state_layout() const = 0;
  // Moves the live state into `storage` (>= state_layout().n_floats() floats, the parts back to
  // back as StateLayout says), e.g. into the node's shared-memory window, so that a late peer
  // copies the state straight out of it. The storage is kept alive by the caller and must not
  // overlap the gradient buffer (InvalidArgument otherwise, nothing changed). The values move
  // along; host_state() then views `storage`. Returns false, changing nothing, if the state does
  // not live in host memory (the CUDA replica keeps it on the device: use download_state()).
  virtual bool place_state(std::span<float> storage) = 0;

  // Applies the gradient now in the gradient buffer, scaled by grad_scale (1/|participants| for
  // a summed gradient), as the update of training step `step` (0-based: AdamW's bias correction
  // and the learning-rate schedule depend on it), with the optimizer on the device where the
  // parameters live.
  virtual void apply_gradients(float grad_scale, uint64_t step) = 0;

  // Host views of the full state, one span per StateLayout part (parameters first), for
  // checksums, catch-up transfers and checkpoints. On CUDA they are a host mirror:
  // download_state() fills it from the device, upload_state() sends a change made to it
  // (catch-up, resume) back. On CPU both are no-ops and the views alias the live state (the
  // storage given to place_state, if any).
  virtual std::span<const std::span<float>> host_state() = 0;
  virtual void download_state() = 0;
  virtual void upload_state() = 0;
  // On the host view: the parameters after the update of training step `step` whose optimizer
  // buffers host_state() already holds, from the parameters before it (bit for bit what the
  // update computed: SGD's p -= lr * v, AdamW's decay and bias-corrected step from m and v). A
  // late rank one step behind receives only the optimizer buffers and calls this; then
  // upload_state().
  virtual void apply_update_from_optimizer_state(uint64_t step) = 0;

  // Forward only on host inputs (0 <= n <= max_batch): summed loss, correct count and the
  // number of labels.
  virtual models::EvalResult evaluate(const float* x, const int32_t* y, size_t n) = 0;

  // GradientLocation::kDevice is for CUDA replicas only (InvalidArgument on CPU).
  virtual void set_gradient_location(GradientLocation location) = 0;
  // The device gradient (valid while the location is kDevice on a CUDA replica), else empty.
  virtual std::span<float> device_gradient_buffer() = 0;
  // The CUDA device this replica computes on, or -1 for the CPU.
  virtual int cuda_device() const = 0;
};

// Builds the replica of `spec` for `device` ("cpu" or "cuda"), for batches of up to max_batch.
// The initial parameters come from models::make_model(spec, max_batch, seed) on every device, so
// a CUDA run starts from the same point as a CPU run. On CUDA the GPU is local_rank modulo the
// number of visible devices (local_rank: collectives::node_local_rank().rank).
// Throws InvalidArgument for an unknown device or a bad spec, and DeviceError with one line when
// the CUDA replica cannot be made: "this build has no CUDA support", "no CUDA device is available
// (...)", "... layer 'tanh 64' has no cuda implementation", or an out-of-memory message.
std::unique_ptr<Replica> make_replica(const std::string& device, const models::ModelSpec& spec,
                                      size_t max_batch, uint64_t seed,
                                      const OptimizerConfig& optimizer, int local_rank);

// How a training loop on GPUs exchanges gradients, decided from the flags and the MPI library:
// --collective nccl all-reduces on the device; the ring (needed for backup workers and timeouts)
// stages through the pinned host gradient buffer. It does so even with a CUDA-aware MPI: the
// ring sums the segments it receives with host code, so it cannot be handed device pointers.
enum class GpuExchange { kNccl, kRingHostStaged };
struct GpuExchangeChoice {
  GpuExchange exchange;
  GradientLocation location;  // what to pass to Replica::set_gradient_location
  std::string reason;         // one line for the log
};
// collective: "ring" or "nccl"; mpi_cuda_support: collectives::describe(mpi_cuda_support()).
GpuExchangeChoice choose_gpu_exchange(const std::string& collective,
                                      const std::string& mpi_cuda_support);

}  // namespace resync::runtime
