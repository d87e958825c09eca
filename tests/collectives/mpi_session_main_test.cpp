// MpiSession owning MPI (its own main, unlike the gtest MPI tier): initialises, reports the
// world, runs one ring all-reduce, and finalises when it goes out of scope. Exit code 0 only if
// every rank saw the expected values.
#include <mpi.h>

#include <cstdio>
#include <exception>
#include <vector>

#include "collectives/transport/context.h"
#include "collectives/transport/mpi_session.h"
#include "collectives/transport/mpi_transport.h"
#include "collectives/allreduce/ring_allreduce.h"

namespace {

using resync::collectives::Context;
using resync::collectives::MpiSession;
using resync::collectives::MpiTransport;
using resync::collectives::RingAllreduce;

int failures = 0;

void expect(bool ok, int rank, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "[rank %d] FAILED: %s\n", rank, what);
    ++failures;
  }
}

}  // namespace

int main(int argc, char** argv) {
  int any_failed = 1;
  try {
    MpiSession session(&argc, &argv);
    const int rank = session.rank();
    int initialized = 0;
    MPI_Initialized(&initialized);
    expect(initialized != 0 && session.owns_mpi(), rank, "session initialised MPI");
    int world = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    expect(session.size() == world, rank, "size matches MPI_COMM_WORLD");
    expect(session.node_local_rank() >= 0 && session.node_local_rank() < session.node_local_size(),
           rank, "node-local rank in range");
    expect(!session.library_version().empty(), rank, "library version reported");
    if (rank == 0) {
      std::printf("%s; %s; %d ranks, node-local size %d on %s\n", session.library_version().c_str(),
                  session.provided_level_name().c_str(), session.size(), session.node_local_size(),
                  session.processor_name().c_str());
    }
    {
      MpiTransport transport;
      Context ctx(transport);
      RingAllreduce ring(ctx);
      std::vector<float> data(1001, static_cast<float>(rank + 1));
      ring.allreduce_sum(data);
      const float want = static_cast<float>(world * (world + 1) / 2);
      expect(data.front() == want && data.back() == want, rank, "ring sum of rank+1");
    }
    MPI_Allreduce(&failures, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized == 0) {
    std::fprintf(stderr, "MPI not finalised by the session\n");
    return 1;
  }
  return any_failed == 0 ? 0 : 1;
}
