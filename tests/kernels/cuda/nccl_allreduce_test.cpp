// Under mpirun, what works without a GPU: the node-local rank that picks each rank's GPU, the MPI
// CUDA-awareness query, and NcclAllreduce's one-line DeviceError on every rank without a device.
#include "collectives/allreduce/nccl_allreduce.h"

#include <gtest/gtest.h>
#include <mpi.h>

#include <string>

#include "base/error.h"
#include "collectives/transport/world.h"
#include "kernels/cuda/context.h"
#include "tests/mpi_test_util.h"

namespace resync::collectives {
namespace {

using mpi_test::world_rank;
using mpi_test::world_size;

// The tests run every rank on one node, so the node-local rank is the world rank.
TEST(NodeLocalRank, EqualsWorldRankOnOneNode) {
  const NodeLocalRank local = node_local_rank();
  EXPECT_EQ(local.rank, world_rank()) << "rank " << world_rank();
  EXPECT_EQ(local.size, world_size()) << "rank " << world_rank();
}

TEST(MpiCudaSupport, AnswersTheSameOnEveryRankAndDescribesIt) {
  const MpiCudaSupport support = mpi_cuda_support();
  EXPECT_TRUE(all_ranks_equal(static_cast<uint64_t>(support)));
  const std::string text = describe(support);
  EXPECT_FALSE(text.empty());
  EXPECT_EQ(text.find('\n'), std::string::npos) << text;
}

TEST(NcclAllreduce, WithoutDeviceEveryRankThrowsOneLine) {
  if (kernels::cuda::query_devices().n_devices > 0) {
    GTEST_SKIP() << "a CUDA device exists: the no-device path cannot be reached here";
  }
  std::string msg;
  try {
    NcclAllreduce nccl = NcclAllreduce::over_world(0);
    FAIL() << "rank " << world_rank() << ": an NCCL communicator without a device";
  } catch (const DeviceError& e) {
    msg = e.what();
  }
  EXPECT_EQ(msg.rfind("no CUDA device is available (", 0), 0u)
      << "rank " << world_rank() << ": " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "rank " << world_rank() << ": " << msg;
}

TEST(NcclAllreduce, VersionIsKnownWithoutDevice) {
  const std::string v = NcclAllreduce::version();
  EXPECT_EQ(v.rfind("2.", 0), 0u) << v;
}

}  // namespace
}  // namespace resync::collectives
