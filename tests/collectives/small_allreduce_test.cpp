// Loopback tier: the float-sum kernels, SmallAllreduce (direct exchange) and the Allreducer's
// choice of path over a transport without shared memory.
#include "collectives/allreduce/small_allreduce.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "base/error.h"
#include "collectives/allreduce/allreducer.h"
#include "collectives/transport/context.h"
#include "collectives/allreduce/float_sum.h"
#include "collectives/transport/loopback_transport.h"
#include "ring_test_util.h"

namespace resync::collectives {
namespace {

using namespace std::chrono_literals;
using test::expect_sum_of;
using test::fill_input;
using test::first_bitwise_difference;

std::vector<int> all_ranks(int n) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

bool contains(const std::vector<int>& v, int x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

TEST(FloatSum, SumsLeftToRightAndAllowsTheDestinationAsASource) {
  for (size_t n : {size_t{0}, size_t{1}, size_t{17}, size_t{1024}, size_t{5000}}) {
    for (int n_srcs : {1, 2, 3, 5}) {
      for (int alias : {-1, 0, 1, n_srcs - 1}) {
        SCOPED_TRACE(std::to_string(n) + " elems, " + std::to_string(n_srcs) +
                     " sources, dst = "
                     "source " +
                     std::to_string(alias));
        std::vector<std::vector<float>> src(n_srcs, std::vector<float>(n));
        for (int k = 0; k < n_srcs; ++k) fill_input(src[k], k, n);
        std::vector<float> want(n);
        for (size_t i = 0; i < n; ++i) {
          float acc = src[0][i];
          for (int k = 1; k < n_srcs; ++k) acc += src[k][i];
          want[i] = acc;
        }
        std::vector<float> out(n, -1.0f);
        std::vector<const float*> ptrs(n_srcs);
        for (int k = 0; k < n_srcs; ++k) ptrs[k] = src[k].data();
        float* dst = out.data();
        if (alias >= 0 && alias < n_srcs) dst = src[alias].data();
        sum_in_order(std::span<float>(dst, n), ptrs);
        EXPECT_EQ(first_bitwise_difference(std::span<const float>(dst, n), want), -1);
      }
    }
  }
}

TEST(FloatSum, AddIntoAddsElementwise) {
  std::vector<float> a(1003), b(1003);
  fill_input(a, 1);
  fill_input(b, 2);
  std::vector<float> want(a.size());
  for (size_t i = 0; i < a.size(); ++i) want[i] = a[i] + b[i];
  add_into(a, b);
  EXPECT_EQ(first_bitwise_difference(a, want), -1);
}

// Runs one SmallAllreduce over `participants` on a fabric of `world` ranks and checks values,
// bitwise agreement and that nobody outside the list was contacted.
void check_small(int world, const std::vector<int>& participants, size_t n_elems, uint64_t salt) {
  SCOPED_TRACE("world " + std::to_string(world) + ", " + std::to_string(participants.size()) +
               " participants, " + std::to_string(n_elems) + " elems");
  LoopbackFabric fabric(world);
  std::vector<std::vector<float>> results(world);
  run_on_ranks(fabric, [&](Transport& t) {
    if (!contains(participants, t.rank())) return;
    Context ctx(t, 20s);
    SmallAllreduce small(ctx);
    std::vector<float> data(n_elems);
    fill_input(data, t.rank(), salt);
    small.allreduce_sum(data, participants, salt);
    results[t.rank()] = std::move(data);
  });
  for (int r : participants) {
    ASSERT_EQ(results[r].size(), n_elems) << "rank " << r;
    expect_sum_of(results[r], participants, r, salt);
    const long diff = first_bitwise_difference(results[r], results[participants.front()]);
    EXPECT_EQ(diff, -1) << "rank " << r << " differs bitwise from rank " << participants.front()
                        << " at index " << diff;
  }
  for (int outside = 0; outside < world; ++outside) {
    if (contains(participants, outside)) continue;
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(fabric.messages_delivered(r, outside) + fabric.messages_delivered(outside, r), 0u)
          << "rank " << r << " <-> " << outside;
    }
  }
  EXPECT_EQ(fabric.pending_operations(), 0u);
}

class SmallWorldTest : public ::testing::TestWithParam<int> {};

TEST_P(SmallWorldTest, SumsAwkwardCounts) {
  const int world = GetParam();
  for (size_t n : {size_t{0}, size_t{1}, size_t{2}, static_cast<size_t>(world - 1),
                   static_cast<size_t>(world + 1), size_t{1001}, size_t{65539}}) {
    check_small(world, all_ranks(world), n, n);
  }
}

INSTANTIATE_TEST_SUITE_P(Worlds, SmallWorldTest, ::testing::Values(1, 2, 3, 4, 5),
                         [](const auto& tp) { return "np" + std::to_string(tp.param); });

TEST(SmallAllreduce, SubsetsNeverContactOtherRanks) {
  check_small(5, {0, 2, 3}, 777, 1);
  check_small(5, {1, 4}, 3, 2);
  check_small(5, {3}, 100, 3);
}

TEST(SmallAllreduce, RepeatedCallsReuseTheirBuffers) {
  LoopbackFabric fabric(3);
  std::vector<size_t> grown(3, 0);
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    SmallAllreduce small(ctx, 4096);
    const size_t before = small.scratch_elems();
    std::vector<float> data;
    for (size_t call = 0; call < 6; ++call) {
      data.resize(call % 2 ? 4096 : 5);
      fill_input(data, t.rank(), call);
      small.allreduce_sum(data, all_ranks(3), call);
      expect_sum_of(data, all_ranks(3), t.rank(), call);
    }
    grown[t.rank()] = small.scratch_elems() - before;
  });
  for (int r = 0; r < 3; ++r) EXPECT_EQ(grown[r], 0u) << "rank " << r;
}

TEST(SmallAllreduce, DifferentElementCountsFailInsteadOfHanging) {
  LoopbackFabric fabric(2);
  EXPECT_THROW(run_on_ranks(fabric,
                            [&](Transport& t) {
                              Context ctx(t, 5s);
                              SmallAllreduce small(ctx);
                              std::vector<float> data(t.rank() == 0 ? 10 : 8, 1.0f);
                              small.allreduce_sum(data, all_ranks(2), 0);
                            }),
               CommError);
}

// Rank 2 never joins: ranks 0 and 1 time out naming it, then complete a round without it.
TEST(SmallAllreduce, MissingParticipantTimesOutAndSurvivorsContinue) {
  LoopbackFabric fabric(3);
  std::vector<int> timeout_peer(3, -1);
  std::vector<std::vector<float>> results(3);
  run_on_ranks(fabric, [&](Transport& t) {
    if (t.rank() == 2) return;
    Context ctx(t, 150ms);
    SmallAllreduce small(ctx);
    std::vector<float> data(100);
    fill_input(data, t.rank());
    const auto start = std::chrono::steady_clock::now();
    try {
      small.allreduce_sum(data, all_ranks(3), 41);
    } catch (const TimeoutError& e) {
      timeout_peer[t.rank()] = e.peer();
      EXPECT_EQ(e.seq(), 41u);
    }
    EXPECT_GE(std::chrono::steady_clock::now() - start, 150ms) << "rank " << t.rank();
    ctx.set_timeout(20s);
    fill_input(data, t.rank(), 1);
    small.allreduce_sum(data, std::vector<int>{0, 1}, 42);
    results[t.rank()] = data;
  });
  EXPECT_EQ(timeout_peer[0], 2);
  EXPECT_EQ(timeout_peer[1], 2);
  for (int r : {0, 1}) expect_sum_of(results[r], std::vector<int>{0, 1}, r, 1);
  EXPECT_EQ(first_bitwise_difference(results[0], results[1]), -1);
  EXPECT_EQ(fabric.messages_delivered(0, 2) + fabric.messages_delivered(1, 2), 0u);
}

TEST(Allreducer, PathNamesRoundTrip) {
  for (AllreducePath path :
       {AllreducePath::kLocal, AllreducePath::kSmall, AllreducePath::kRing,
        AllreducePath::kShmSmall, AllreducePath::kShm, AllreducePath::kShmDirect}) {
    EXPECT_EQ(path_from_name(path_name(path)), path) << path_name(path);
  }
  EXPECT_FALSE(path_from_name("nccl").has_value());
}

// Over the loopback transport there is no shared memory: small buffers take the direct
// exchange, larger ones the ring, and every call still sums correctly and bitwise-equally.
TEST(Allreducer, FallsBackToPointToPointPathsOverLoopback) {
  const int world = 4;
  LoopbackFabric fabric(world);
  std::vector<std::vector<std::string>> paths(world);
  std::vector<std::vector<float>> last(world);
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    Allreducer allreducer(
        ctx, AllreducerOptions{.ring = {.segment_bytes = 4096}, .small_max_bytes = 1024});
    EXPECT_FALSE(allreducer.has_shm());
    EXPECT_EQ(allreducer.node_size(), 1);
    uint64_t seq = 10;
    for (size_t n : {size_t{0}, size_t{1}, size_t{255}, size_t{256}, size_t{257}, size_t{9999}}) {
      for (const std::vector<int>& subset :
           {all_ranks(world), std::vector<int>{1, 3}, std::vector<int>{2}}) {
        if (!contains(subset, t.rank())) {
          ++seq;
          continue;
        }
        std::vector<float> data(n);
        fill_input(data, t.rank(), seq);
        allreducer.allreduce_sum(data, subset, seq);
        expect_sum_of(data, subset, t.rank(), seq);
        if (subset.size() == static_cast<size_t>(world)) {
          paths[t.rank()].push_back(path_name(allreducer.last_path()));
          last[t.rank()] = data;
        }
        ++seq;
      }
    }
  });
  const std::vector<std::string> want = {"local", "small", "small", "small", "ring", "ring"};
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(paths[r], want) << "rank " << r;
    EXPECT_EQ(first_bitwise_difference(last[r], last[0]), -1) << "rank " << r;
  }
}

TEST(Allreducer, ForcedSharedMemoryWithoutAWindowIsRejected) {
  LoopbackFabric fabric(2);
  Context ctx(fabric.transport(0), 1s);
  Allreducer allreducer(ctx, AllreducerOptions{.force = AllreducePath::kShm});
  std::vector<float> data(10, 1.0f);
  EXPECT_THROW(allreducer.allreduce_sum(data, all_ranks(2), 1), InvalidArgument);
  const std::vector<int> without_me = {1};
  EXPECT_THROW(allreducer.allreduce_sum(data, without_me, 2), InvalidArgument);
  EXPECT_EQ(fabric.pending_operations(), 0u);
}

}  // namespace
}  // namespace resync::collectives
