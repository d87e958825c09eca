// NcclAllreduce: an NCCL communicator over the ranks of an MPI communicator (bootstrapped through
// MPI: rank 0's ncclGetUniqueId broadcast) that sums or averages a device buffer in place.
// Built only with RESYNC_WITH_CUDA; the plain-sync gradient exchange of `--collective nccl`.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <memory>
#include <span>
#include <string>

namespace resync::collectives {

enum class NcclReduceOp { kSum, kAverage };

class NcclAllreduce {
 public:
  // Collective over `comm`: every rank calls it with the CUDA device it computes on. The ranks
  // first agree that each has its device: a rank without one throws DeviceError "no CUDA device
  // is available (...)" (or names the bad id), every other rank DeviceError naming that rank.
  // An NCCL failure while connecting throws DeviceError with NCCL's reason.
  NcclAllreduce(MPI_Comm comm, int device);
  // The same over every rank of the job (MPI_COMM_WORLD), for callers that hold no MPI types.
  static NcclAllreduce over_world(int device);
  ~NcclAllreduce();
  NcclAllreduce(NcclAllreduce&&) noexcept;
  NcclAllreduce& operator=(NcclAllreduce&&) noexcept;
  NcclAllreduce(const NcclAllreduce&) = delete;
  NcclAllreduce& operator=(const NcclAllreduce&) = delete;

  int rank() const;
  int size() const;
  int device() const;

  // Reduces `device_data` (device memory on device()) in place over every rank of the
  // communicator and waits for the result. Every rank passes the same number of elements.
  // On its own stream: the caller must have finished writing the buffer (synchronised) first.
  void allreduce(std::span<float> device_data, NcclReduceOp op);

  // The NCCL library loaded at run time, e.g. "2.28.9".
  static std::string version();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace resync::collectives
