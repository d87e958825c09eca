// Under mpirun with one GPU per rank (label gpu): NcclAllreduce sums and averages in place,
// compared with exact expected values. Skips visibly where there are fewer GPUs than ranks.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <string>
#include <vector>

#include "base/error.h"
#include "collectives/allreduce/nccl_allreduce.h"
#include "collectives/transport/world.h"
#include "kernels/cuda/context.h"
#include "tests/mpi_test_util.h"

namespace resync::collectives {
namespace {

using mpi_test::world_rank;
using mpi_test::world_size;

// NCCL wants one GPU per rank: skipped where there are fewer GPUs than ranks.
TEST(NcclAllreduce, SumAndAverageInPlace) {
  const int n_devices = kernels::cuda::query_devices().n_devices;
  const int rank = world_rank(), size = world_size();
  // Every rank must take the same branch, so agree on the device count first.
  if (!all_ranks_equal(static_cast<uint64_t>(n_devices)) || n_devices < size) {
    GTEST_SKIP() << n_devices << " CUDA device(s) for " << size << " ranks";
  }
  const int device = node_local_rank().rank % n_devices;
  kernels::cuda::CudaContext ctx(device);
  NcclAllreduce nccl(MPI_COMM_WORLD, device);
  EXPECT_EQ(nccl.rank(), rank);
  EXPECT_EQ(nccl.size(), size);
  // Small integers: every sum is exact in float, whatever order NCCL adds in.
  for (const size_t n : {size_t{1}, size_t{7}, size_t{100003}}) {
    std::vector<float> host(n);
    for (size_t i = 0; i < n; ++i) host[i] = static_cast<float>((i % 13) + rank);
    kernels::cuda::DeviceBuffer<float> buf(n);
    kernels::cuda::upload(std::span<const float>(host), buf.data(), ctx.stream());
    ctx.synchronize();
    nccl.allreduce({buf.data(), n}, NcclReduceOp::kSum);
    kernels::cuda::download(static_cast<const float*>(buf.data()), std::span<float>(host),
                            ctx.stream());
    ctx.synchronize();
    const float rank_sum = static_cast<float>(size * (size - 1) / 2);
    for (size_t i = 0; i < n; ++i) {
      const float expected = static_cast<float>(size * (i % 13)) + rank_sum;
      ASSERT_EQ(host[i], expected) << "rank " << rank << " n " << n << " index " << i;
    }
    nccl.allreduce({buf.data(), n}, NcclReduceOp::kAverage);  // every rank holds the sum
    kernels::cuda::download(static_cast<const float*>(buf.data()), std::span<float>(host),
                            ctx.stream());
    ctx.synchronize();
    for (size_t i = 0; i < n; ++i) {
      const float expected = static_cast<float>(size * (i % 13)) + rank_sum;
      ASSERT_FLOAT_EQ(host[i], expected) << "rank " << rank << " n " << n << " index " << i;
    }
  }
}

}  // namespace
}  // namespace resync::collectives
