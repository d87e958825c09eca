// Unit tier: the pure parts of the hierarchical all-reduce, the plan of a call (nodes, slices,
// owners) and the slicing of a buffer, without MPI.
#include <gtest/gtest.h>

#include <vector>

#include "collectives/allreduce/hier_allreduce.h"

namespace resync::collectives {
namespace {

struct Planned {
  HierPlan plan;
  std::vector<int> members;
  std::vector<int> owners;
};

Planned plan_of(const std::vector<int>& participants, const std::vector<int>& node_of, int rank) {
  Planned out;
  std::vector<int> scratch(node_of.size(), 0);
  out.members.reserve(participants.size());
  out.owners.reserve(participants.size());
  out.plan = plan_hier(participants, node_of, rank, out.members, out.owners, scratch);
  for (int c : scratch) EXPECT_EQ(c, 0) << "scratch must be left zero";
  return out;
}

// Two nodes of four ranks: node ids are the nodes' lowest ranks.
const std::vector<int> kTwoByFour = {0, 0, 0, 0, 4, 4, 4, 4};

TEST(HierPlan, EvenSplitHasOneSlicePerLocalRank) {
  const std::vector<int> all = {0, 1, 2, 3, 4, 5, 6, 7};
  const Planned p = plan_of(all, kTwoByFour, 5);
  EXPECT_EQ(p.plan.n_nodes, 2);
  EXPECT_EQ(p.plan.n_slices, 4);
  EXPECT_EQ(p.plan.max_local, 4);
  EXPECT_EQ(p.plan.local_pos, 1);
  EXPECT_EQ(p.plan.local_count, 4);
  EXPECT_EQ(p.members, (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(p.owners, (std::vector<int>{1, 5}));
}

TEST(HierPlan, UnevenCountsUseTheSmallestAndExtraRanksOwnNothing) {
  const std::vector<int> parts = {0, 2, 4, 5, 7};  // 2 + 3
  const Planned a = plan_of(parts, kTwoByFour, 2);
  EXPECT_EQ(a.plan.n_slices, 2);
  EXPECT_EQ(a.plan.local_pos, 1);
  EXPECT_EQ(a.owners, (std::vector<int>{2, 5}));
  const Planned extra = plan_of(parts, kTwoByFour, 7);
  EXPECT_EQ(extra.plan.n_slices, 2);
  EXPECT_EQ(extra.plan.local_pos, 2);
  EXPECT_EQ(extra.plan.local_count, 3);
  EXPECT_TRUE(extra.owners.empty());
  const Planned one_three = plan_of({3, 4, 5, 6}, kTwoByFour, 6);  // 1 + 3
  EXPECT_EQ(one_three.plan.n_slices, 1);
  EXPECT_EQ(one_three.plan.max_local, 3);
  EXPECT_TRUE(one_three.owners.empty());
  EXPECT_EQ(plan_of({3, 4, 5, 6}, kTwoByFour, 4).owners, (std::vector<int>{3, 4}));
}

TEST(HierPlan, NodesWithoutParticipantsDoNotCount) {
  // Three nodes of two (ids 0, 2, 4); the middle one sits out.
  const std::vector<int> node_of = {0, 0, 2, 2, 4, 4};
  const Planned p = plan_of({0, 1, 4, 5}, node_of, 4);
  EXPECT_EQ(p.plan.n_nodes, 2);
  EXPECT_EQ(p.plan.n_slices, 2);
  EXPECT_EQ(p.owners, (std::vector<int>{0, 4}));
  // Interleaved node ids (ranks placed round-robin) work the same.
  const std::vector<int> round_robin = {0, 1, 0, 1, 0, 1};
  const Planned q = plan_of({0, 1, 2, 3, 5}, round_robin, 3);
  EXPECT_EQ(q.plan.n_nodes, 2);
  EXPECT_EQ(q.plan.n_slices, 2);
  EXPECT_EQ(q.members, (std::vector<int>{1, 3, 5}));
  EXPECT_EQ(q.plan.local_pos, 1);
  EXPECT_EQ(q.owners, (std::vector<int>{2, 3}));
}

TEST(HierSlices, SlicesCoverTheBufferAtLineBoundaries) {
  for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{33}, size_t{1000003}}) {
    for (int s : {1, 2, 3, 5}) {
      const HierSlices sl(n, s, 4096 / sizeof(float));
      // Room in a block for the staged pieces and an owner's shared piece.
      EXPECT_LE((s + 1) * sl.piece, 4096 / sizeof(float));
      EXPECT_EQ(sl.begin(0), 0u);
      EXPECT_EQ(sl.end(s - 1), n) << n << " elems, " << s << " slices";
      for (int i = 0; i < s; ++i) {
        EXPECT_EQ(sl.begin(i) % 16 == 0 || sl.begin(i) == n, true);
        if (i > 0) {
          EXPECT_EQ(sl.begin(i), sl.end(i - 1));
        }
        // The steps cover each slice exactly.
        size_t covered = 0;
        for (size_t k = 0; k < sl.n_steps(); ++k) {
          EXPECT_EQ(sl.piece_begin(i, k), sl.begin(i) + covered);
          covered += sl.piece_end(i, k) - sl.piece_begin(i, k);
        }
        EXPECT_EQ(covered, sl.end(i) - sl.begin(i));
      }
    }
  }
}

// A piece is also at most one message across nodes (HierOptions::message_bytes), in whole
// cache lines; without that cap the block alone decides.
TEST(HierSlices, PieceIsCappedByTheMessageSize) {
  const size_t block = 128 * 1024 / sizeof(float);
  EXPECT_EQ(HierSlices(1 << 20, 1, block).piece, block / 2);
  EXPECT_EQ(HierSlices(1 << 20, 2, block).piece, block / 3 / 16 * 16);
  const size_t cap = 60 * 1024 / sizeof(float);
  EXPECT_EQ(HierSlices(1 << 20, 1, block, cap).piece, cap);
  EXPECT_EQ(HierSlices(1 << 20, 2, block, cap).piece, block / 3 / 16 * 16);
  EXPECT_EQ(HierSlices(1 << 20, 1, block, 1000).piece, 992u);
  EXPECT_EQ(HierSlices(1 << 20, 1, block, 3).piece, 16u);  // never below one cache line
}

}  // namespace
}  // namespace resync::collectives
