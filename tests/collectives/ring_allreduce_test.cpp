// Ring all-reduce over the loopback transport: values against a double-precision reference,
// bitwise agreement between participants, subsets, awkward counts, timeouts.
#include "collectives/allreduce/ring_allreduce.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "base/error.h"
#include "collectives/transport/context.h"
#include "collectives/transport/loopback_transport.h"
#include "ring_test_util.h"

namespace resync::collectives {
namespace {

using namespace std::chrono_literals;
using test::expect_sum_of;
using test::fill_input;
using test::first_bitwise_difference;

bool contains(const std::vector<int>& v, int x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

std::vector<int> all_ranks(int n) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

struct Ring {
  std::vector<int> participants;
  uint64_t seq = 7;
  uint64_t salt = 0;
};

// Runs one all-reduce per ring (disjoint rings run at the same time on one fabric) and checks
// every participant's result, bitwise agreement inside each ring, and that no message crossed
// between a ring and any rank outside it.
void check_rings(int world, const std::vector<Ring>& rings, size_t n_elems, RingOptions options) {
  SCOPED_TRACE("world " + std::to_string(world) + ", " + std::to_string(n_elems) +
               " elems, segment " + std::to_string(options.segment_bytes) + " B");
  LoopbackFabric fabric(world);
  std::vector<std::vector<float>> results(world);
  run_on_ranks(fabric, [&](Transport& t) {
    for (const Ring& ring : rings) {
      if (!contains(ring.participants, t.rank())) continue;
      Context ctx(t, 20s);
      RingAllreduce allreduce(ctx, options);
      std::vector<float> data(n_elems);
      fill_input(data, t.rank(), ring.salt);
      allreduce.allreduce_sum(data, ring.participants, ring.seq);
      results[t.rank()] = std::move(data);
    }
  });
  for (const Ring& ring : rings) {
    const int first = ring.participants.front();
    for (int r : ring.participants) {
      ASSERT_EQ(results[r].size(), n_elems) << "rank " << r;
      expect_sum_of(results[r], ring.participants, r, ring.salt);
      const long diff = first_bitwise_difference(results[r], results[first]);
      EXPECT_EQ(diff, -1) << "rank " << r << " differs bitwise from rank " << first << " at index "
                          << diff;
    }
    for (int outside = 0; outside < world; ++outside) {
      if (contains(ring.participants, outside)) continue;
      for (int r : ring.participants) {
        EXPECT_EQ(fabric.messages_delivered(r, outside), 0u) << "rank " << r << " -> " << outside;
        EXPECT_EQ(fabric.messages_delivered(outside, r), 0u) << "rank " << outside << " -> " << r;
      }
    }
  }
  EXPECT_EQ(fabric.pending_operations(), 0u);
}

class RingWorldTest : public ::testing::TestWithParam<int> {};

TEST_P(RingWorldTest, SumsAwkwardCountsWithManySegments) {
  const int world = GetParam();
  const std::vector<size_t> counts = {0,
                                      1,
                                      2,
                                      static_cast<size_t>(world - 1),
                                      static_cast<size_t>(world + 1),
                                      1000,
                                      (1u << 16) + 3};
  const std::vector<size_t> segment_bytes = {4, 12, 4096, RingOptions{}.segment_bytes};
  for (size_t n : counts) {
    for (size_t seg : segment_bytes) {
      if (seg < 1024 && n > 1000) continue;  // ~10^5 one-float messages: slow, adds nothing
      check_rings(world, {Ring{all_ranks(world)}}, n, RingOptions{.segment_bytes = seg});
    }
  }
}

TEST_P(RingWorldTest, ShallowAndDeepPipelines) {
  const int world = GetParam();
  for (int depth : {1, 2, 5}) {
    for (int sends : {1, 3}) {
      SCOPED_TRACE("recv_depth " + std::to_string(depth) + ", sends " + std::to_string(sends));
      check_rings(
          world, {Ring{all_ranks(world)}}, 777,
          RingOptions{.segment_bytes = 40, .recv_depth = depth, .max_sends_in_flight = sends});
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Worlds, RingWorldTest, ::testing::Values(1, 2, 3, 4, 5),
                         [](const auto& tp) { return "np" + std::to_string(tp.param); });

TEST(RingAllreduce, SubsetNeverContactsOtherRanks) {
  for (size_t n : {0ul, 1ul, 2ul, 4ul, 1000ul}) {
    check_rings(5, {Ring{{0, 2, 3}}}, n, RingOptions{.segment_bytes = 64});
  }
}

TEST(RingAllreduce, SingleParticipantKeepsItsData) {
  check_rings(5, {Ring{{3}}}, 100, RingOptions{});
}

TEST(RingAllreduce, DisjointRingsWithTheSameSequenceRunConcurrently) {
  const std::vector<Ring> rings = {Ring{{0, 2, 3}, 5, 1}, Ring{{1, 4}, 5, 2}};
  check_rings(5, rings, 5000, RingOptions{.segment_bytes = 256});
}

TEST(RingAllreduce, RepeatedCallsReuseScratchAndStayCorrect) {
  const int world = 3;
  LoopbackFabric fabric(world);
  std::vector<size_t> scratch_after(world);
  std::vector<size_t> scratch_end(world);
  std::vector<std::vector<float>> last(world);
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    RingAllreduce ring(ctx, RingOptions{.segment_bytes = 1024});
    const std::vector<int> everyone = all_ranks(world);
    std::vector<float> data;
    // Warm up with the largest size, then vary sizes below it: scratch must not grow.
    const std::vector<size_t> sizes = {5000, 3, 0, 4999, 1, 5000, 2048};
    for (size_t call = 0; call < sizes.size(); ++call) {
      data.resize(sizes[call]);
      fill_input(data, t.rank(), call);
      ring.allreduce_sum(data);
      expect_sum_of(data, everyone, t.rank(), call);
      if (call == 0) scratch_after[t.rank()] = ring.scratch_elems();
    }
    scratch_end[t.rank()] = ring.scratch_elems();
    last[t.rank()] = data;
  });
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(scratch_end[r], scratch_after[r]) << "rank " << r << " grew its scratch";
    EXPECT_EQ(first_bitwise_difference(last[r], last[0]), -1) << "rank " << r;
  }
}

TEST(RingAllreduce, MaxElemsSizesScratchUpFront) {
  LoopbackFabric fabric(2);
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    RingAllreduce ring(ctx, RingOptions{.segment_bytes = 4096, .max_elems = 100000});
    const size_t before = ring.scratch_elems();
    EXPECT_GT(before, 0u);
    std::vector<float> data(100000, 1.0f);
    ring.allreduce_sum(data);
    EXPECT_EQ(ring.scratch_elems(), before) << "rank " << t.rank();
    EXPECT_EQ(data[99999], 2.0f) << "rank " << t.rank();
  });
}

TEST(RingAllreduce, RejectsBadParticipantLists) {
  LoopbackFabric fabric(4);
  Context ctx(fabric.transport(1), 1s);
  RingAllreduce ring(ctx);
  std::vector<float> data(10);
  const std::vector<int> without_me = {0, 2};
  const std::vector<int> unsorted = {2, 1};
  const std::vector<int> duplicate = {1, 1};
  const std::vector<int> out_of_range = {1, 4};
  EXPECT_THROW(ring.allreduce_sum(data, without_me, 0), InvalidArgument);
  EXPECT_THROW(ring.allreduce_sum(data, unsorted, 0), InvalidArgument);
  EXPECT_THROW(ring.allreduce_sum(data, duplicate, 0), InvalidArgument);
  EXPECT_THROW(ring.allreduce_sum(data, out_of_range, 0), InvalidArgument);
  EXPECT_EQ(fabric.pending_operations(), 0u);
}

TEST(RingAllreduce, DifferentElementCountsFailInsteadOfHanging) {
  LoopbackFabric fabric(2);
  EXPECT_THROW(run_on_ranks(fabric,
                            [&](Transport& t) {
                              Context ctx(t, 5s);
                              RingAllreduce ring(ctx);
                              std::vector<float> data(t.rank() == 0 ? 10 : 12, 1.0f);
                              ring.allreduce_sum(data);
                            }),
               CommError);
}

// A participant that never shows up: the others time out (rank 0 names it, as it is rank 0's
// left neighbour), then the survivors complete a fresh round without it, undisturbed by
// messages of the abandoned one.
TEST(RingAllreduce, MissingParticipantTimesOutAndSurvivorsContinue) {
  LoopbackFabric fabric(3);
  std::vector<int> timeout_peer(3, -1);
  std::vector<uint64_t> timeout_seq(3, 0);
  std::vector<std::vector<float>> results(3);
  run_on_ranks(fabric, [&](Transport& t) {
    if (t.rank() == 2) return;
    Context ctx(t, 150ms);
    RingAllreduce ring(ctx, RingOptions{.segment_bytes = 64});
    std::vector<float> data(1000);
    fill_input(data, t.rank());
    const std::vector<int> everyone = {0, 1, 2};
    try {
      ring.allreduce_sum(data, everyone, 41);
    } catch (const TimeoutError& e) {
      timeout_peer[t.rank()] = e.peer();
      timeout_seq[t.rank()] = e.seq();
    }
    const std::vector<int> survivors = {0, 1};
    ctx.set_timeout(20s);
    fill_input(data, t.rank(), 1);
    ring.allreduce_sum(data, survivors, 42);
    results[t.rank()] = data;
  });
  EXPECT_EQ(timeout_peer[0], 2);
  EXPECT_EQ(timeout_seq[0], 41u);
  EXPECT_GE(timeout_peer[1], 0) << "rank 1 did not time out";
  EXPECT_EQ(timeout_seq[1], 41u);
  const std::vector<int> survivors = {0, 1};
  for (int r : survivors) expect_sum_of(results[r], survivors, r, 1);
  EXPECT_EQ(first_bitwise_difference(results[0], results[1]), -1);
  EXPECT_EQ(fabric.messages_delivered(0, 2) + fabric.messages_delivered(1, 2), 0u);
}

TEST(RingAllreduce, WorldOverloadUsesContextSequence) {
  LoopbackFabric fabric(4);
  std::vector<uint64_t> next(4);
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    RingAllreduce ring(ctx);
    std::vector<float> data(10);
    for (int i = 0; i < 3; ++i) {
      fill_input(data, t.rank(), i);
      ring.allreduce_sum(data);
      expect_sum_of(data, all_ranks(4), t.rank(), i);
    }
    next[t.rank()] = ctx.next_sequence();
  });
  for (int r = 0; r < 4; ++r) EXPECT_EQ(next[r], 3u) << "rank " << r;
}

}  // namespace
}  // namespace resync::collectives
