// MPI tier: every all-reduce path (point-to-point ring, direct exchange, shared memory blocked
// and small, and the automatic choice) against MPI_Allreduce for awkward counts and
// participant subsets, bitwise agreement, and the shared-memory failure modes (a participant
// missing, vanishing mid-call, stuck in an old call, abandoning).
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
using test::bytes_hash;
using test::fill_input;

using mpi_test::world_rank;
using mpi_test::world_size;
std::vector<int> all_ranks() {
  std::vector<int> v(world_size());
  std::iota(v.begin(), v.end(), 0);
  return v;
}
bool contains(std::span<const int> v, int x) { return std::find(v.begin(), v.end(), x) != v.end(); }

// Checks `got` against MPI_Allreduce of the same inputs (non-participants contribute zeros)
// within a rounding tolerance, and that all participants hold bitwise-equal buffers. Collective
// over MPI_COMM_WORLD: every rank calls it, participant or not.
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
                      << ref[i] << " (MPI_Allreduce, tolerance " << tol << "), actual " << got[i];
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

// Nothing may be left for this rank on the transport's communicator once everyone is done.
void expect_no_stray_messages(const MpiTransport& transport) {
  MPI_Barrier(MPI_COMM_WORLD);
  int flag = 0;
  MPI_Status status;
  MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, transport.comm(), &flag, &status);
  EXPECT_EQ(flag, 0) << "rank " << world_rank() << " has a message from rank " << status.MPI_SOURCE;
  MPI_Barrier(MPI_COMM_WORLD);
}

struct PathCase {
  AllreducePath path;
  size_t shm_block_bytes;
};

constexpr size_t kSharedElems = (1u << 20) + 64;

class PathTest : public ::testing::TestWithParam<PathCase> {
 protected:
  bool direct() const { return GetParam().path == AllreducePath::kShmDirect; }
  AllreducerOptions options() const {
    AllreducerOptions o;
    o.ring.segment_bytes = 4096;
    o.shm.block_bytes = GetParam().shm_block_bytes;
    o.shm.direct_block_bytes = GetParam().shm_block_bytes;
    o.shm.direct_elems = direct() ? kSharedElems : 0;
    o.force = GetParam().path;
    return o;
  }
  // The buffer of a call: `storage`, or for the direct path a piece of the shared buffer at a
  // different offset on every rank.
  std::span<float> buffer(Allreducer& allreducer, std::vector<float>& storage, size_t n) const {
    if (!direct()) {
      storage.assign(n, 0.0f);
      return storage;
    }
    const size_t offset = 7 * static_cast<size_t>(world_rank()) % 64;
    std::span<float> data = allreducer.shared_buffer().subspan(offset, n);
    std::fill(data.begin(), data.end(), 0.0f);
    return data;
  }
  std::vector<size_t> counts() const {
    const size_t p = world_size();
    return {0, 1, 2, p - 1, p + 1, 1001, 4099, 65537, (1u << 20) + 3};
  }
};

TEST_P(PathTest, MatchesMpiAllreduceForAwkwardCounts) {
  MpiTransport transport;
  Context ctx(transport, 20s);
  Allreducer allreducer(ctx, options());
  const std::vector<int> everyone = all_ranks();
  uint64_t seq = 100;
  std::vector<float> storage;
  for (size_t n : counts()) {
    const std::span<float> data = buffer(allreducer, storage, n);
    fill_input(data, world_rank(), seq);
    allreducer.allreduce_sum(data, everyone, seq);
    if (n > 0 && everyone.size() > 1) {
      EXPECT_EQ(allreducer.last_path(), GetParam().path);
    }
    expect_matches_mpi(data, everyone, seq, std::to_string(n) + " elems");
    ++seq;
  }
  expect_no_stray_messages(transport);
}

TEST_P(PathTest, SubsetsLeaveOtherRanksAlone) {
  MpiTransport transport;
  Context ctx(transport, 20s);
  Allreducer allreducer(ctx, options());
  const int n = world_size();
  const int me = world_rank();
  std::vector<std::vector<int>> subsets;
  std::vector<int> without_one;
  for (int r = 0; r < n; ++r) {
    if (r != 1) without_one.push_back(r);
  }
  subsets.push_back(without_one);
  subsets.push_back({n - 1});
  subsets.push_back({0, n - 1});
  if (n >= 4) subsets.push_back({1, 2, n - 1});
  for (std::vector<int>& subset : subsets) {  // small worlds repeat ranks
    subset.erase(std::unique(subset.begin(), subset.end()), subset.end());
  }
  uint64_t seq = 1000;
  for (const std::vector<int>& subset : subsets) {
    for (size_t count : {size_t{1}, size_t{3}, size_t{4097}, size_t{50001}}) {
      std::vector<float> storage;
      const std::span<float> data = buffer(allreducer, storage, count);
      // Non-participants do not call at all: nobody may wait for them.
      if (contains(subset, me)) {
        fill_input(data, me, seq);
        allreducer.allreduce_sum(data, subset, seq);
      }
      expect_matches_mpi(
          data, subset, seq,
          std::to_string(subset.size()) + " participants, " + std::to_string(count) + " elems");
      ++seq;
    }
  }
  expect_no_stray_messages(transport);
}

// Open MPI allocates with malloc, which the counter does not see: this checks our code only.
TEST_P(PathTest, SteadyStateMakesNoHeapAllocation) {
  MpiTransport transport;
  Context ctx(transport, 20s);
  AllreducerOptions o = options();
  o.max_elems = 30000;
  Allreducer allreducer(ctx, o);
  const size_t n = 30000;
  std::vector<float> storage;
  const std::span<float> data = buffer(allreducer, storage, n);
  const std::vector<int> everyone = all_ranks();
  size_t allocations = 0;
  for (uint64_t call = 0; call < 4; ++call) {
    fill_input(data, world_rank(), call);
    if (call > 0) test::start_counting_allocations();
    allreducer.allreduce_sum(data, everyone, 7000 + call);
    if (call > 0) allocations += test::stop_counting_allocations();
    expect_matches_mpi(data, everyone, call, "call " + std::to_string(call));
  }
  EXPECT_EQ(allocations, 0u) << "rank " << world_rank();
}

INSTANTIATE_TEST_SUITE_P(Paths, PathTest,
                         ::testing::Values(PathCase{AllreducePath::kRing, 64 * 1024},
                                           PathCase{AllreducePath::kSmall, 64 * 1024},
                                           PathCase{AllreducePath::kShm, 4096},
                                           PathCase{AllreducePath::kShm, ShmOptions{}.block_bytes},
                                           PathCase{AllreducePath::kShmDirect, 4096},
                                           PathCase{AllreducePath::kShmDirect,
                                                    ShmOptions{}.block_bytes},
                                           PathCase{AllreducePath::kShmSmall, 20000}),
                         [](const auto& tp) {
                           std::string name = path_name(tp.param.path);
                           std::erase(name, '-');
                           return name + "_block" + std::to_string(tp.param.shm_block_bytes);
                         });

// The automatic choice: shared memory on one node, small buffers on the latency path; and a
// long run of calls over changing subsets and sizes, as a training run makes them.
TEST(Allreducer, AutomaticPathOverChangingSubsetsAndSizes) {
  MpiTransport transport;
  Context ctx(transport, 20s);
  Allreducer allreducer(ctx,
                        AllreducerOptions{.shm = {.block_bytes = 16384, .direct_elems = 100000}});
  const int n = world_size();
  const int me = world_rank();
  ASSERT_TRUE(allreducer.has_shm());
  ASSERT_EQ(allreducer.node_size(), n) << "the MPI tier runs on one node";
  const std::vector<int> everyone = all_ranks();
  std::vector<float> big(100000), tiny(16);
  if (n > 1) {
    EXPECT_EQ(allreducer.path_for(tiny, everyone), AllreducePath::kShmSmall);
    EXPECT_EQ(allreducer.path_for(big, everyone), AllreducePath::kShm);
    EXPECT_EQ(allreducer.path_for(allreducer.shared_buffer(), everyone), AllreducePath::kShmDirect);
    EXPECT_EQ(allreducer.path_for(allreducer.shared_buffer().first(16), everyone),
              AllreducePath::kShmSmall);
  }
  EXPECT_EQ(allreducer.path_for(std::span<const float>(), everyone), AllreducePath::kLocal);
  uint64_t state = 12345;
  const auto next = [&] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return state >> 33;
  };
  for (uint64_t step = 0; step < 60; ++step) {
    std::vector<int> subset;
    for (int r = 0; r < n; ++r) {
      if (next() % 4 != 0) subset.push_back(r);
    }
    if (subset.empty()) subset.push_back(static_cast<int>(step % n));
    const size_t sizes[] = {1, 33, 3000, 20000, 70001};
    const size_t count = sizes[next() % 5];
    std::vector<float> storage(count, 0.0f);
    std::span<float> data = storage;
    if (next() % 2 == 0) {  // the same choice on every rank: the direct path when large
      data = allreducer.shared_buffer().subspan(me * 3, count);
      std::fill(data.begin(), data.end(), 0.0f);
    }
    if (contains(subset, me)) {
      fill_input(data, me, step);
      allreducer.allreduce_sum(data, subset, step);
    }
    expect_matches_mpi(data, subset, step, "step " + std::to_string(step));
  }
}

// The next tests are about shared-memory failures; with one rank there is nobody to fail.
class ShmFailureTest : public ::testing::TestWithParam<AllreducePath> {
 protected:
  void SetUp() override {
    if (world_size() < 2) GTEST_SKIP() << "needs two ranks";
  }
};

// The last rank never joins: the others throw TimeoutError naming it after their timeout, then
// complete rounds without it.
TEST_P(ShmFailureTest, MissingParticipantTimesOutNamingItAndSurvivorsContinue) {
  MpiTransport transport;
  Context ctx(transport, 200ms);
  Allreducer allreducer(ctx, AllreducerOptions{.shm = {.block_bytes = 4096}, .force = GetParam()});
  const int n = world_size();
  const int me = world_rank();
  std::vector<int> survivors(n - 1);
  std::iota(survivors.begin(), survivors.end(), 0);
  std::vector<float> data(1000);
  if (me != n - 1) {
    fill_input(data, me, 1);
    int peer = -1;
    const auto start = std::chrono::steady_clock::now();
    try {
      allreducer.allreduce_sum(data, all_ranks(), 77);
      ADD_FAILURE() << "rank " << me << " finished a round without rank " << n - 1;
    } catch (const TimeoutError& e) {
      peer = e.peer();
      EXPECT_EQ(e.seq(), 77u) << "rank " << me;
    }
    EXPECT_GE(std::chrono::steady_clock::now() - start, 200ms) << "rank " << me;
    EXPECT_EQ(peer, n - 1) << "rank " << me;
    ctx.set_timeout(20s);
    for (uint64_t seq = 78; seq < 82; ++seq) {
      fill_input(data, me, seq);
      allreducer.allreduce_sum(data, survivors, seq);
    }
  }
  expect_matches_mpi(me != n - 1 ? data : std::vector<float>(1000), survivors, 81, "after");
}

// The last rank publishes its input and disappears mid-call: the others time out naming it
// instead of hanging, and go on without it for several calls even though, as far as they can
// tell, it is still reading their buffers of the abandoned call (so they switch buffer sets).
TEST_P(ShmFailureTest, ParticipantVanishingMidCallMakesOthersTimeOut) {
  const int n = world_size();
  const int me = world_rank();
  MpiTransport transport;
  Context ctx(transport, 300ms);
  AllreducerOptions o{.shm = {.block_bytes = 4096}, .force = GetParam()};
  if (me == n - 1) o.shm.vanish_after_events = 1;
  Allreducer allreducer(ctx, o);
  // The small path needs nothing from a peer after its input, so it vanishes unnoticed.
  const bool noticed = GetParam() == AllreducePath::kShm;
  std::vector<float> data(noticed ? 3000 : 1000);
  fill_input(data, me, 5);
  int peer = -1;
  try {
    allreducer.allreduce_sum(data, all_ranks(), 500);
  } catch (const TimeoutError& e) {
    peer = e.peer();
  }
  if (me != n - 1) {
    EXPECT_EQ(peer, noticed ? n - 1 : -1) << "rank " << me;
  }
  std::vector<int> survivors(n - 1);
  std::iota(survivors.begin(), survivors.end(), 0);
  ctx.set_timeout(20s);
  for (uint64_t seq = 501; seq < 506; ++seq) {
    std::fill(data.begin(), data.end(), 0.0f);
    if (me != n - 1) {
      fill_input(data, me, seq);
      allreducer.allreduce_sum(data, survivors, seq);
    }
    expect_matches_mpi(data, survivors, seq, "seq " + std::to_string(seq));
  }
}

// Rank 0 gives up on a call (short timeout) before rank 1 arrives; rank 1, with a long
// timeout, learns from rank 0's word at once instead of waiting for its own deadline.
TEST_P(ShmFailureTest, AbandonedCallFailsLatePeersAtOnce) {
  const int me = world_rank();
  MpiTransport transport;
  Context ctx(transport, me == 0 ? 100ms : 20s);
  Allreducer allreducer(ctx, AllreducerOptions{.shm = {.block_bytes = 4096}, .force = GetParam()});
  const std::vector<int> pair = {0, 1};
  std::vector<float> data(1000);
  fill_input(data, me, 9);
  if (me == 0) {
    EXPECT_THROW(allreducer.allreduce_sum(data, pair, 900), TimeoutError);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (me == 1) {
    const auto start = std::chrono::steady_clock::now();
    try {
      allreducer.allreduce_sum(data, pair, 900);
      ADD_FAILURE() << "rank 1 completed a call rank 0 abandoned";
    } catch (const TimeoutError& e) {
      EXPECT_EQ(e.peer(), 0);
      EXPECT_NE(std::string(e.what()).find("abandoned"), std::string::npos) << e.what();
    }
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  // Both go on with fresh calls.
  ctx.set_timeout(20s);
  std::fill(data.begin(), data.end(), 0.0f);
  if (me <= 1) {
    fill_input(data, me, 901);
    allreducer.allreduce_sum(data, pair, 901);
  }
  expect_matches_mpi(data, pair, 901, "after the abandoned call");
}

TEST_P(ShmFailureTest, RepeatedSeqAndMismatchedCountsAreErrors) {
  const int me = world_rank();
  MpiTransport transport;
  Context ctx(transport, 2s);
  Allreducer allreducer(ctx, AllreducerOptions{.shm = {.block_bytes = 4096}, .force = GetParam()});
  const std::vector<int> pair = {0, 1};
  std::vector<float> data(500);
  if (me <= 1) {
    fill_input(data, me, 1);
    allreducer.allreduce_sum(data, pair, 10);
    EXPECT_THROW(allreducer.allreduce_sum(data, pair, 10), InvalidArgument);
    std::vector<float> other(me == 0 ? 500 : 400, 1.0f);
    EXPECT_THROW(allreducer.allreduce_sum(other, pair, 11), CommError) << "rank " << me;
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

INSTANTIATE_TEST_SUITE_P(ShmPaths, ShmFailureTest,
                         ::testing::Values(AllreducePath::kShm, AllreducePath::kShmSmall),
                         [](const auto& tp) {
                           std::string name = path_name(tp.param);
                           std::erase(name, '-');
                           return name;
                         });

}  // namespace
}  // namespace resync::collectives
