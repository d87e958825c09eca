// MpiTransport: the production Transport, point-to-point MPI on a private duplicate of a
// parent communicator (MPI_ERRORS_RETURN, so every failure reaches RESYNC_CHECK_MPI).
#pragma once

#include <mpi.h>

#include <string>

#include "collectives/transport/transport.h"

namespace resync::collectives {

// Waiting polls MPI_Test and gives the CPU away while nothing arrives: a busy-polling wait
// starves the very peer it waits for when ranks outnumber cores (see BASELINES.md).
class MpiTransport final : public Transport {
 public:
  // Collective over `parent`: duplicates it. MPI must be initialised (see MpiSession).
  explicit MpiTransport(MPI_Comm parent = MPI_COMM_WORLD);
  ~MpiTransport() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int max_tag() const override { return max_tag_; }
  std::string name() const override { return "mpi"; }

  // The private communicator; for tests and diagnostics (probing for stray messages).
  MPI_Comm comm() const { return comm_; }

 protected:
  uint64_t post_send(int peer, int tag, std::span<const std::byte> bytes) override;
  uint64_t post_recv(int peer, int tag, std::span<std::byte> bytes) override;
  bool test_handle(uint64_t& handle, size_t* n_bytes) override;
  size_t wait_handles(std::span<uint64_t* const> handles, Deadline deadline,
                      size_t* n_bytes) override;
  bool cancel_handle(uint64_t& handle, size_t* n_bytes) override;
  void abandon_handle(uint64_t handle, Direction direction) noexcept override;

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 0;
  int max_tag_ = 32767;
};

}  // namespace resync::collectives
