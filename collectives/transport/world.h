// Whole-world agreements the training thread makes outside the step protocol: at start-up
// (did every rank set up? rank 0's control address) and at the end (do parameters agree?).
// Blocking MPI collectives over MPI_COMM_WORLD; only for moments when every rank is present.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace resync::collectives {

// The lowest rank that passed `failed` = true, or the world size if none did; on every rank.
int lowest_failed_rank(bool failed);

// True on every rank if every rank passed the same value.
bool all_ranks_equal(uint64_t value);

// Sum of `value` over every rank, on every rank.
uint64_t sum_over_ranks(uint64_t value);

// The same reductions for a rank that may wait a long time (e.g. while others run a benchmark):
// it sleeps between MPI_Test polls instead of spinning in a blocking collective, which would
// burn the CPU the others are measured on.
uint64_t sum_over_ranks_idle(uint64_t value);
double max_over_ranks_idle(double value);

// Every rank's `value`, indexed by rank, on every rank.
std::vector<int> gather_from_ranks(int value);

// Rank `root`'s `text` on every rank.
std::string broadcast_string(const std::string& text, int root);

// This process's rank among the ranks on its node (MPI_Comm_split_type, MPI_COMM_TYPE_SHARED)
// and how many ranks share the node: picks one GPU per rank. Collective over MPI_COMM_WORLD.
struct NodeLocalRank {
  int rank = 0;
  int size = 1;
};
NodeLocalRank node_local_rank();

// Whether the MPI library accepts device (CUDA) pointers in its calls: kYes/kNo when it can tell
// (Open MPI's MPIX_Query_cuda_support), kUnknown otherwise; logged with the GPU gradient-exchange
// choice (runtime/train/replica.h). Not collective; needs no device and no CUDA build.
enum class MpiCudaSupport { kNo, kYes, kUnknown };
MpiCudaSupport mpi_cuda_support();
// "yes (...)", "no (...)" or "unknown (...)": the answer and how it was found, for the log.
std::string describe(MpiCudaSupport support);

// Ends every process of the job with `exit_code` (MPI_Abort): for failures after which some
// ranks could otherwise wait forever. Only main() calls it.
[[noreturn]] void abort_world(int exit_code);

}  // namespace resync::collectives
