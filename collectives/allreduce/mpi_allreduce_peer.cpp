#include "collectives/allreduce/mpi_allreduce_peer.h"

#include <mpi.h>

#include <algorithm>
#include <climits>

#include "base/error.h"

namespace resync::collectives {

struct MpiAllreducePeer::Comm {
  MPI_Comm comm = MPI_COMM_NULL;
  ~Comm() {
    if (comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
  }
};

MpiAllreducePeer::MpiAllreducePeer(std::span<const int> members) : comm_(std::make_unique<Comm>()) {
  int rank = 0;
  RESYNC_CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
  const bool member = std::binary_search(members.begin(), members.end(), rank);
  RESYNC_CHECK_MPI(MPI_Comm_split(MPI_COMM_WORLD, member ? 0 : MPI_UNDEFINED, rank, &comm_->comm));
}

MpiAllreducePeer::~MpiAllreducePeer() = default;

bool MpiAllreducePeer::is_member() const { return comm_->comm != MPI_COMM_NULL; }

void MpiAllreducePeer::allreduce_sum(std::span<float> data) {
  RESYNC_CHECK(is_member(), "MpiAllreducePeer: allreduce_sum on a rank that is no member");
  RESYNC_CHECK_ARG(data.size() <= static_cast<size_t>(INT_MAX),
                   "MpiAllreducePeer: MPI_Allreduce counts are ints");
  RESYNC_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(data.size()),
                                 MPI_FLOAT, MPI_SUM, comm_->comm));
}

void MpiAllreducePeer::barrier() {
  RESYNC_CHECK(is_member(), "MpiAllreducePeer: barrier on a rank that is no member");
  RESYNC_CHECK_MPI(MPI_Barrier(comm_->comm));
}

}  // namespace resync::collectives
