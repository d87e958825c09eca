#include "collectives/transport/world.h"

#include <mpi.h>
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // Open MPI: MPIX_CUDA_AWARE_SUPPORT, MPIX_Query_cuda_support
#endif

#include <cstdlib>
#include <ctime>
#include <vector>

#include "base/error.h"

namespace resync::collectives {

int lowest_failed_rank(bool failed) {
  int rank = 0, size = 1;
  RESYNC_CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
  RESYNC_CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, &size));
  int mine = failed ? rank : size;
  int lowest = size;
  RESYNC_CHECK_MPI(MPI_Allreduce(&mine, &lowest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  return lowest;
}

bool all_ranks_equal(uint64_t value) {
  uint64_t lo = 0, hi = 0;
  RESYNC_CHECK_MPI(MPI_Allreduce(&value, &lo, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD));
  RESYNC_CHECK_MPI(MPI_Allreduce(&value, &hi, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD));
  return lo == hi;
}

uint64_t sum_over_ranks(uint64_t value) {
  uint64_t sum = 0;
  RESYNC_CHECK_MPI(MPI_Allreduce(&value, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD));
  return sum;
}

namespace {

template <typename T>
T reduce_over_ranks_idle(T value, MPI_Datatype type, MPI_Op op) {
  MPI_Request request = MPI_REQUEST_NULL;
  RESYNC_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, &value, 1, type, op, MPI_COMM_WORLD, &request));
  for (;;) {
    int done = 0;
    RESYNC_CHECK_MPI(MPI_Test(&request, &done, MPI_STATUS_IGNORE));
    if (done != 0) return value;
    const timespec pause{0, 20'000};
    nanosleep(&pause, nullptr);
  }
}

}  // namespace

uint64_t sum_over_ranks_idle(uint64_t value) {
  return reduce_over_ranks_idle(value, MPI_UINT64_T, MPI_SUM);
}

double max_over_ranks_idle(double value) {
  return reduce_over_ranks_idle(value, MPI_DOUBLE, MPI_MAX);
}

std::vector<int> gather_from_ranks(int value) {
  int world = 1;
  RESYNC_CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, &world));
  std::vector<int> values(static_cast<size_t>(world));
  RESYNC_CHECK_MPI(
      MPI_Allgather(&value, 1, MPI_INT, values.data(), 1, MPI_INT, MPI_COMM_WORLD));
  return values;
}

std::string broadcast_string(const std::string& text, int root) {
  int n_bytes = static_cast<int>(text.size());
  RESYNC_CHECK_MPI(MPI_Bcast(&n_bytes, 1, MPI_INT, root, MPI_COMM_WORLD));
  std::vector<char> buf(text.begin(), text.end());
  buf.resize(static_cast<size_t>(n_bytes));
  RESYNC_CHECK_MPI(MPI_Bcast(buf.data(), n_bytes, MPI_CHAR, root, MPI_COMM_WORLD));
  return std::string(buf.begin(), buf.end());
}

NodeLocalRank node_local_rank() {
  MPI_Comm node = MPI_COMM_NULL;
  RESYNC_CHECK_MPI(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node));
  NodeLocalRank local;
  const int rank_rc = MPI_Comm_rank(node, &local.rank);
  const int size_rc = MPI_Comm_size(node, &local.size);
  MPI_Comm_free(&node);
  RESYNC_CHECK_MPI(rank_rc);
  RESYNC_CHECK_MPI(size_rc);
  return local;
}

MpiCudaSupport mpi_cuda_support() {
#if defined(MPIX_CUDA_AWARE_SUPPORT)
  // The compile-time macro says what the headers were built for; the run-time query what the
  // loaded library does (Open MPI may be rebuilt without CUDA under the same headers).
  return MPIX_Query_cuda_support() == 1 ? MpiCudaSupport::kYes : MpiCudaSupport::kNo;
#else
  return MpiCudaSupport::kUnknown;
#endif
}

std::string describe(MpiCudaSupport support) {
  switch (support) {
    case MpiCudaSupport::kYes:
      return "yes (MPIX_Query_cuda_support)";
    case MpiCudaSupport::kNo:
      return "no (MPIX_Query_cuda_support)";
    case MpiCudaSupport::kUnknown:
      break;
  }
  return "unknown (this MPI has no CUDA query extension)";
}

void abort_world(int exit_code) {
  MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);  // MPI_Abort does not return; this only satisfies [[noreturn]]
}

}  // namespace resync::collectives
