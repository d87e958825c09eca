// MPI tier: the hierarchical all-reduce over fake nodes (ShmOptions::fake_node_size splits this
// one machine's ranks into nodes of k ranks) against MPI_Allreduce for awkward counts, subsets
// that leave a node out or spread unevenly (1+3, 2+3), repeated calls, no allocation in steady
// state, bitwise agreement across all participants, and a missing participant timing out.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "alloc_counter.h"
#include "base/error.h"
#include "collectives/allreduce/allreducer.h"
#include "collectives/transport/context.h"
#include "collectives/transport/mpi_transport.h"
#include "ring_test_util.h"
#include "tests/mpi_test_util.h"

namespace resync::collectives {
namespace {

using namespace std::chrono_literals;
using mpi_test::world_rank;
using mpi_test::world_size;
using test::bytes_hash;
using test::fill_input;

bool contains(std::span<const int> v, int x) { return std::find(v.begin(), v.end(), x) != v.end(); }
std::vector<int> range(int begin, int end) {
  std::vector<int> v;
  for (int r = begin; r < end; ++r) v.push_back(r);
  return v;
}

// Independent expectation: MPI_Allreduce of the same inputs (non-participants add zeros) within
// a rounding tolerance; then the participants' bytes must all agree. Collective over the world.
void expect_matches_mpi(std::span<const float> got, std::span<const int> participants,
                        uint64_t salt, const std::string& what) {
  const int me = world_rank();
  const bool in = contains(participants, me);
  const size_t n = got.size();
  std::vector<float> mine(n, 0.0f), ref(n), abs_mine(n), abs_sum(n);
  if (in) fill_input(mine, me, salt);
  for (size_t i = 0; i < n; ++i) abs_mine[i] = std::fabs(mine[i]);
  MPI_Allreduce(mine.data(), ref.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(abs_mine.data(), abs_sum.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM,
                MPI_COMM_WORLD);
  if (in) {
    int n_reported = 0;
    for (size_t i = 0; i < n && n_reported < 5; ++i) {
      const float tol = 4.0f * world_size() * FLT_EPSILON * abs_sum[i] + 1e-30f;
      if (!(std::fabs(got[i] - ref[i]) <= tol)) {
        ADD_FAILURE() << what << ": rank " << me << " index " << i << " of " << n << ": expected "
                      << ref[i] << ", actual " << got[i];
        ++n_reported;
      }
    }
  }
  const uint64_t h = bytes_hash(got);
  uint64_t hmax = in ? h : 0;
  uint64_t hmin = in ? h : UINT64_MAX;
  MPI_Allreduce(MPI_IN_PLACE, &hmax, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &hmin, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
  if (in) {
    EXPECT_EQ(hmax, hmin) << what << ": rank " << me << ": participants differ bitwise";
  }
}

void expect_no_stray_messages(const MpiTransport& transport) {
  MPI_Barrier(MPI_COMM_WORLD);
  int flag = 0;
  MPI_Status status;
  MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, transport.comm(), &flag, &status);
  EXPECT_EQ(flag, 0) << "rank " << world_rank() << " has a message from rank " << status.MPI_SOURCE;
  MPI_Barrier(MPI_COMM_WORLD);
}

// The path the Allreducer should pick over fake nodes of k ranks (k = 0: one node).
AllreducePath expected_path(std::span<const int> subset, int k) {
  if (subset.size() <= 1) return AllreducePath::kLocal;
  std::vector<int> per_node(world_size(), 0);
  for (int r : subset) ++per_node[k > 0 ? r / k : 0];
  const int nodes = static_cast<int>(
      std::count_if(per_node.begin(), per_node.end(), [](int c) { return c > 0; }));
  const int max_local = *std::max_element(per_node.begin(), per_node.end());
  if (nodes == 1) return AllreducePath::kShm;  // the sizes below are all above shm-small
  return max_local >= 2 ? AllreducePath::kHier : AllreducePath::kRing;
}

struct Split {
  int node_size;
  size_t block_bytes;
};

class HierTest : public ::testing::TestWithParam<Split> {
 protected:
  int k() const { return GetParam().node_size; }
  AllreducerOptions options() const {
    AllreducerOptions o;
    o.ring.segment_bytes = 8192;
    o.shm.block_bytes = GetParam().block_bytes;
    o.shm.fake_node_size = k();
    o.small_max_bytes = 256;  // keep the latency paths out of the way of the sizes below
    if (GetParam().block_bytes < ShmOptions{}.block_bytes) {
      // Between two nodes: groups of a few steps, a few of them in flight, many per call.
      o.hier.message_bytes = 4096;
      o.hier.in_flight_bytes = 16384;
    }
    return o;
  }
};

TEST_P(HierTest, AwkwardCountsOverAllRanks) {
  MpiTransport transport;
  Context ctx(transport, 20s);
  Allreducer allreducer(ctx, options());
  ASSERT_EQ(allreducer.node_size(), std::min(k(), world_size() - world_rank() / k() * k()));
  const std::vector<int> everyone = range(0, world_size());
  const size_t p = world_size();
  uint64_t seq = 100;
  for (size_t n :
       {size_t{0}, size_t{1}, size_t{7}, p + 1, size_t{4099}, size_t{65537}, size_t{1000003}}) {
    std::vector<float> data(n);
    fill_input(data, world_rank(), seq);
    allreducer.allreduce_sum(data, everyone, seq);
    if (n * sizeof(float) > 256) {
      EXPECT_EQ(allreducer.last_path(), expected_path(everyone, k())) << n << " elems";
    }
    expect_matches_mpi(data, everyone, seq, std::to_string(n) + " elems");
    ++seq;
  }
  expect_no_stray_messages(transport);
}

// Subsets over the fake nodes: a node left out, one rank per node (the flat ring), uneven
// counts, and the same subsets forced onto the hierarchical path. Non-participants never call.
TEST_P(HierTest, ParticipantSubsetsSpreadOverNodes) {
  MpiTransport transport;
  Context ctx(transport, 20s);
  Allreducer allreducer(ctx, options());
  AllreducerOptions forced_options = options();
  forced_options.force = AllreducePath::kHier;
  Allreducer forced(ctx, forced_options);
  const int n = world_size();
  const int me = world_rank();
  std::vector<std::vector<int>> subsets = {range(0, n), range(1, n), {0, n - 1}};
  subsets.push_back(range(0, std::min(n, k() + 1)));  // first node + one rank of the next
  // The middle node contributes nothing.
  if (n > 2 * k()) {
    std::vector<int> s = range(0, k());
    for (int r = 2 * k(); r < n; ++r) s.push_back(r);
    subsets.push_back(s);
  }
  if (n > k()) subsets.push_back({k() - 1, k(), n - 1});  // 1 + 2 (or 1 + 1)
  for (std::vector<int>& s : subsets) s.erase(std::unique(s.begin(), s.end()), s.end());
  uint64_t seq = 1000;
  for (const std::vector<int>& subset : subsets) {
    for (size_t count : {size_t{1}, size_t{7}, size_t{5001}, size_t{1000003}}) {
      for (Allreducer* a : {&allreducer, &forced}) {
        std::vector<float> data(count, 0.0f);
        const std::string what = std::to_string(subset.size()) + " participants from " +
                                 std::to_string(subset.front()) + ", " + std::to_string(count) +
                                 " elems" + (a == &forced ? " (forced hier)" : "");
        if (contains(subset, me)) {
          fill_input(data, me, seq);
          a->allreduce_sum(data, subset, seq);
          if (a == &forced && subset.size() > 1) {
            EXPECT_EQ(a->last_path(), AllreducePath::kHier) << what;
          } else if (count * sizeof(float) > 256) {
            EXPECT_EQ(a->last_path(), expected_path(subset, k())) << what;
          }
        }
        expect_matches_mpi(data, subset, seq, what);
        ++seq;
      }
    }
  }
  expect_no_stray_messages(transport);
}

// Repeated calls with different seqs over the same buffer: identical bits across all ranks and
// no heap allocation of ours once the first call has sized everything.
TEST_P(HierTest, RepeatedCallsAgreeAndDoNotAllocate) {
  MpiTransport transport;
  Context ctx(transport, 20s);
  AllreducerOptions o = options();
  o.max_elems = 300001;
  Allreducer allreducer(ctx, o);
  const std::vector<int> everyone = range(0, world_size());
  std::vector<float> data(300001);
  size_t allocations = 0;
  for (uint64_t call = 0; call < 5; ++call) {
    fill_input(data, world_rank(), call);
    if (call > 0) test::start_counting_allocations();
    allreducer.allreduce_sum(data, everyone, 7000 + call);
    if (call > 0) allocations += test::stop_counting_allocations();
    expect_matches_mpi(data, everyone, call, "call " + std::to_string(call));
  }
  EXPECT_EQ(allocations, 0u) << "rank " << world_rank();
}

// Nodes of k ranks for k = 1 (one rank per node), 2 and 3 with small blocks and messages (many
// pipeline steps and groups across nodes) and the defaults; worlds smaller than a node are one
// node.
INSTANTIATE_TEST_SUITE_P(FakeNodes, HierTest,
                         ::testing::Values(Split{1, 4096}, Split{2, 4096}, Split{3, 4096},
                                           Split{2, ShmOptions{}.block_bytes},
                                           Split{3, ShmOptions{}.block_bytes}),
                         [](const auto& tp) {
                           return "node" + std::to_string(tp.param.node_size) + "_block" +
                                  std::to_string(tp.param.block_bytes);
                         });

// The last rank never joins a hierarchical call: every other rank, on its node or another,
// throws TimeoutError after the timeout (slice owners from the ring or the shm waits, their
// node peers from the owners' abandonment); then the survivors go on without it.
TEST(HierFailure, MissingParticipantTimesOutEverywhere) {
  const int n = world_size();
  const int me = world_rank();
  if (n < 2) GTEST_SKIP() << "needs two ranks";
  MpiTransport transport;
  Context ctx(transport, 300ms);
  AllreducerOptions o;
  o.shm.block_bytes = 4096;
  o.hier.message_bytes = 4096;  // many groups: the timeout strikes with some in flight
  o.hier.in_flight_bytes = 16384;
  o.shm.fake_node_size = (n + 1) / 2;  // two nodes: 1+1, 2+1, 2+2, 3+2, 3+3
  o.force = AllreducePath::kHier;
  Allreducer allreducer(ctx, o);
  const std::vector<int> everyone = range(0, n);
  const std::vector<int> survivors = range(0, n - 1);
  std::vector<float> data(20000);
  if (me != n - 1) {
    fill_input(data, me, 1);
    const auto start = std::chrono::steady_clock::now();
    EXPECT_THROW(allreducer.allreduce_sum(data, everyone, 77), TimeoutError) << "rank " << me;
    EXPECT_GE(std::chrono::steady_clock::now() - start, 300ms) << "rank " << me;
    ctx.set_timeout(20s);
  }
  // Stray messages of the abandoned call are matched by seq, never by a later call.
  MPI_Barrier(MPI_COMM_WORLD);
  for (uint64_t seq = 78; seq < 81; ++seq) {
    std::fill(data.begin(), data.end(), 0.0f);
    if (me != n - 1) {
      fill_input(data, me, seq);
      allreducer.allreduce_sum(data, survivors, seq);
    }
    expect_matches_mpi(data, survivors, seq, "after, seq " + std::to_string(seq));
  }
}

TEST(HierPath, NameRoundTrips) {
  EXPECT_STREQ(path_name(AllreducePath::kHier), "hier");
  EXPECT_EQ(path_from_name("hier"), AllreducePath::kHier);
}

}  // namespace
}  // namespace resync::collectives
