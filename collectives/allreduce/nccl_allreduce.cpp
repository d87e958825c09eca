#include "collectives/allreduce/nccl_allreduce.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <nccl.h>

#include <cstring>

#include "base/error.h"

namespace resync::collectives {
namespace {

// Checks the device before any NCCL call, so that the common failure (no GPU on this node) reads
// as one plain sentence instead of an NCCL internal error.
void check_device(int device) {
  int n_devices = 0;
  const cudaError_t rc = cudaGetDeviceCount(&n_devices);
  if (rc != cudaSuccess || n_devices == 0) {
    (void)cudaGetLastError();
    const std::string reason = rc != cudaSuccess
                                   ? fmt::format("cudaGetDeviceCount: {} ({})",
                                                 cudaGetErrorString(rc), cudaGetErrorName(rc))
                                   : std::string("the CUDA runtime reports 0 devices");
    throw DeviceError(fmt::format("no CUDA device is available ({})", reason));
  }
  if (device < 0 || device >= n_devices) {
    throw DeviceError(
        fmt::format("CUDA device {} does not exist: {} device(s) visible", device, n_devices));
  }
}

}  // namespace

struct NcclAllreduce::State {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int rank = 0;
  int size = 1;
  int device = 0;

  ~State() {
    // Teardown never throws: a failed destroy leaks the communicator, which ends with the job.
    if (comm != nullptr) (void)ncclCommDestroy(comm);
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }
};

NcclAllreduce::NcclAllreduce(MPI_Comm comm, int device) : state_(std::make_unique<State>()) {
  RESYNC_CHECK_MPI(MPI_Comm_rank(comm, &state_->rank));
  RESYNC_CHECK_MPI(MPI_Comm_size(comm, &state_->size));
  state_->device = device;
  // Agreed before any NCCL call: a rank without its device must not leave the others blocked in
  // ncclCommInitRank waiting for it.
  std::string problem;
  try {
    check_device(device);
    RESYNC_CHECK_CUDA(cudaSetDevice(device));
  } catch (const DeviceError& e) {
    problem = e.what();
  }
  int mine = problem.empty() ? state_->size : state_->rank;
  int first_failed = state_->size;
  RESYNC_CHECK_MPI(MPI_Allreduce(&mine, &first_failed, 1, MPI_INT, MPI_MIN, comm));
  if (!problem.empty()) throw DeviceError(problem);
  if (first_failed < state_->size) {
    throw DeviceError(
        fmt::format("NCCL not set up: rank {} has no usable CUDA device", first_failed));
  }

  // Every rank learns rank 0's id; NCCL then connects the ranks by itself (its own sockets).
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (state_->rank == 0) RESYNC_CHECK_NCCL(ncclGetUniqueId(&id));
  RESYNC_CHECK_MPI(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, comm));
  RESYNC_CHECK_NCCL(ncclCommInitRank(&state_->comm, state_->size, id, state_->rank));
  RESYNC_CHECK_CUDA(cudaStreamCreateWithFlags(&state_->stream, cudaStreamNonBlocking));
}

NcclAllreduce NcclAllreduce::over_world(int device) {
  return NcclAllreduce(MPI_COMM_WORLD, device);
}

NcclAllreduce::~NcclAllreduce() = default;
NcclAllreduce::NcclAllreduce(NcclAllreduce&&) noexcept = default;
NcclAllreduce& NcclAllreduce::operator=(NcclAllreduce&&) noexcept = default;

int NcclAllreduce::rank() const { return state_->rank; }
int NcclAllreduce::size() const { return state_->size; }
int NcclAllreduce::device() const { return state_->device; }

void NcclAllreduce::allreduce(std::span<float> device_data, NcclReduceOp op) {
  RESYNC_CHECK(state_ != nullptr, "NcclAllreduce used after move");
  if (device_data.empty()) return;
  const ncclRedOp_t nccl_op = op == NcclReduceOp::kAverage ? ncclAvg : ncclSum;
  RESYNC_CHECK_CUDA(cudaSetDevice(state_->device));
  RESYNC_CHECK_NCCL(ncclAllReduce(device_data.data(), device_data.data(), device_data.size(),
                                  ncclFloat32, nccl_op, state_->comm, state_->stream));
  // A peer that failed inside the collective shows up here, as an asynchronous NCCL error or a
  // CUDA error of the stream.
  const cudaError_t rc = cudaStreamSynchronize(state_->stream);
  if (rc != cudaSuccess) {
    ncclResult_t async_rc = ncclSuccess;
    if (ncclCommGetAsyncError(state_->comm, &async_rc) == ncclSuccess && async_rc != ncclSuccess) {
      RESYNC_CHECK_NCCL(async_rc);
    }
    RESYNC_CHECK_CUDA(rc);
  }
}

std::string NcclAllreduce::version() {
  int v = 0;
  RESYNC_CHECK_NCCL(ncclGetVersion(&v));
  // Since NCCL 2.9 the code is 10000 * major + 100 * minor + patch.
  return fmt::format("{}.{}.{}", v / 10000, v / 100 % 100, v % 100);
}

}  // namespace resync::collectives
