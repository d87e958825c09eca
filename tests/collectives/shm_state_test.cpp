// MPI tier: ShmStateBoard — every rank's state region seen by its peers at the right place,
// copies that wait for a version published later, give up on a version already passed or
// after a timeout, never return a torn copy while the donor rewrites its region continuously,
// argument validation, and a board over an Allreducer's window beside the direct all-reduce.
#include "collectives/state/shm_state.h"

#include <gtest/gtest.h>
#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "base/error.h"
#include "collectives/allreduce/allreducer.h"
#include "collectives/transport/context.h"
#include "collectives/transport/mpi_transport.h"
#include "collectives/allreduce/shm_allreduce.h"
#include "tests/mpi_test_util.h"

namespace resync::collectives {
namespace {

using namespace std::chrono_literals;

using mpi_test::world_rank;
using mpi_test::world_size;
void barrier() { MPI_Barrier(MPI_COMM_WORLD); }

// Test-only handshakes between donor and readers, on MPI_COMM_WORLD (the board never sends
// anything, so nothing else travels there).
enum Tag : int { kAboutToWait = 11, kWritingBegun = 12, kChecked = 13, kPublished = 14 };
void send_to(int peer, Tag tag) {
  int token = world_rank();
  MPI_Send(&token, 1, MPI_INT, peer, tag, MPI_COMM_WORLD);
}
void recv_from(int peer, Tag tag) {
  int token = -1;
  MPI_Recv(&token, 1, MPI_INT, peer, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
}

constexpr int kDonor = 0;

// The donor tells every other rank (the readers), or hears from every one of them.
void send_to_readers(Tag tag) {
  for (int r = 0; r < world_size(); ++r) {
    if (r != kDonor) send_to(r, tag);
  }
}
void recv_from_readers(Tag tag) {
  for (int r = 0; r < world_size(); ++r) {
    if (r != kDonor) recv_from(r, tag);
  }
}

constexpr size_t kSharedElems = 16 * 1024;
// 1 MiB regions for the stress tests: a copy takes tens of microseconds, so copies and
// rewrites overlap often.
constexpr size_t kStressElems = 256 * 1024;

// A node's window, created collectively by every rank (in the same order on every rank).
struct Node {
  explicit Node(size_t shared_elems = kSharedElems)
      : ctx(transport, 20s), shm(ctx, transport.comm(), [&] {
          ShmOptions o;
          o.direct_elems = shared_elems;
          return o;
        }()) {}
  // Every rank of the job shares one node (else the tests skip, on every rank alike).
  bool whole_world() const { return shm.node_size() == world_size(); }

  MpiTransport transport;
  Context ctx;
  ShmAllreduce shm;
};

// Rewrites the region as the owner does: every element = `value`, then publishes `version`.
void write_state(ShmStateBoard& board, uint64_t version, float value) {
  board.begin_update();
  std::ranges::fill(board.state(), value);
  board.publish(version);
}
void write_state(ShmStateBoard& board, uint64_t version) {
  write_state(board, version, static_cast<float>(version));
}

// Every element of `got` equals `expected`; reports the first mismatch with rank and index.
void expect_all_equal(std::span<const float> got, float expected, const char* what) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != expected) {
      ADD_FAILURE() << what << ": rank " << world_rank() << " index " << i << " of " << got.size()
                    << ": expected " << expected << ", actual " << got[i];
      return;
    }
  }
}

double elapsed_ms(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since).count();
}

#define SKIP_UNLESS_ONE_NODE(node)                                             \
  do {                                                                         \
    if (world_size() < 2) GTEST_SKIP() << "needs two ranks";                   \
    if (!(node).whole_world()) GTEST_SKIP() << "needs every rank on one node"; \
  } while (0)

TEST(ShmStateBoard, RegionIsVisibleToPeersAtItsOffset) {
  Node node;
  SKIP_UNLESS_ONE_NODE(node);
  const int me = world_rank();
  const int n_ranks = world_size();
  constexpr size_t kOffset = 100;
  constexpr size_t kCount = 1000;
  ShmStateBoard board(node.shm, kOffset, kCount);
  ASSERT_EQ(board.state().data(), node.shm.shared_buffer().data() + kOffset);
  ASSERT_EQ(board.state().size(), kCount);
  for (int r = 0; r < n_ranks; ++r) EXPECT_TRUE(board.covers(r)) << "rank " << me << " peer " << r;
  EXPECT_FALSE(board.covers(-1));
  EXPECT_FALSE(board.covers(n_ranks));

  // Version 0 from window creation on: the zeroed buffer.
  std::vector<float> out(kCount, -1.0f);
  for (int r = 0; r < n_ranks; ++r) {
    EXPECT_EQ(board.published(r), 0u) << "rank " << me << " peer " << r;
    ASSERT_TRUE(board.copy_from(r, 0, out, 0ns)) << "rank " << me << " peer " << r;
    expect_all_equal(out, 0.0f, "version 0");
  }
  barrier();

  // Each rank writes its whole shared buffer (distinct value per rank and index), under the
  // board's version word, and publishes version 1.
  const auto value = [](int rank, size_t i) { return static_cast<float>(rank * 1'000'000 + i); };
  board.begin_update();
  std::span<float> mine = node.shm.shared_buffer();
  for (size_t i = 0; i < mine.size(); ++i) mine[i] = value(me, i);
  board.publish(1);
  barrier();

  // A second board 7 floats further on reads the same word over a shifted region.
  ShmStateBoard shifted(node.shm, kOffset + 7, kCount - 7);
  std::vector<float> out_shifted(kCount - 7);
  for (int r = 0; r < n_ranks; ++r) {
    EXPECT_EQ(board.published(r), 1u) << "rank " << me << " peer " << r;
    ASSERT_TRUE(board.copy_from(r, 1, out, 5s)) << "rank " << me << " peer " << r;
    ASSERT_TRUE(shifted.copy_from(r, 1, out_shifted, 5s)) << "rank " << me << " peer " << r;
    for (size_t i = 0; i < kCount; ++i) {
      ASSERT_EQ(out[i], value(r, kOffset + i))
          << "rank " << me << " reading rank " << r << " index " << i;
    }
    for (size_t i = 0; i < out_shifted.size(); ++i) {
      ASSERT_EQ(out_shifted[i], value(r, kOffset + 7 + i))
          << "rank " << me << " reading rank " << r << " index " << i << " (shifted board)";
    }
  }
  barrier();
}

TEST(ShmStateBoard, CopyWaitsForAVersionPublishedLater) {
  Node node;
  SKIP_UNLESS_ONE_NODE(node);
  const int me = world_rank();
  ShmStateBoard board(node.shm, 64, 4096);
  std::vector<float> out(board.count());
  if (me == kDonor) {
    write_state(board, 1);
    barrier();
    // Version 2 comes only once every reader has seen that it is not there yet.
    recv_from_readers(kAboutToWait);
    write_state(board, 2);
  } else {
    barrier();
    EXPECT_EQ(board.published(kDonor), 1u) << "rank " << me;
    EXPECT_FALSE(board.copy_from(kDonor, 2, out, 20ms))
        << "rank " << me << ": copied version 2 before the donor could publish it";
    send_to(kDonor, kAboutToWait);
    EXPECT_TRUE(board.copy_from(kDonor, 2, out, 20s)) << "rank " << me;
    expect_all_equal(out, 2.0f, "version 2");
  }
  barrier();
}

// While the donor rewrites, no version can be copied (not even the one being overwritten: the
// rewrite might publish it again); once it publishes version 2, version 1 is gone at once.
TEST(ShmStateBoard, CopyWaitsWhileTheDonorRewritesAndDropsTheVersionItOverwrites) {
  Node node;
  SKIP_UNLESS_ONE_NODE(node);
  const int me = world_rank();
  ShmStateBoard board(node.shm, 0, 8192);
  std::vector<float> out(board.count());
  if (me == kDonor) {
    write_state(board, 1);
    barrier();
    board.begin_update();
    std::ranges::fill(board.state().first(100), 2.0f);  // half written
    send_to_readers(kWritingBegun);
    recv_from_readers(kChecked);
    std::ranges::fill(board.state(), 2.0f);
    board.publish(2);
    send_to_readers(kPublished);
  } else {
    barrier();
    recv_from(kDonor, kWritingBegun);
    EXPECT_EQ(board.published(kDonor), ShmStateBoard::kWriting) << "rank " << me;
    const Clock::time_point t0 = Clock::now();
    EXPECT_FALSE(board.copy_from(kDonor, 1, out, 30ms))
        << "rank " << me << ": copied version 1 while the donor overwrites it";
    EXPECT_GE(elapsed_ms(t0), 30.0) << "rank " << me << ": gave up before the timeout";
    EXPECT_FALSE(board.copy_from(kDonor, 2, out, 20ms))
        << "rank " << me << ": copied version 2 before the donor published it";
    send_to(kDonor, kChecked);
    EXPECT_TRUE(board.copy_from(kDonor, 2, out, 20s)) << "rank " << me;
    expect_all_equal(out, 2.0f, "version 2 after the rewrite");
    recv_from(kDonor, kPublished);
    const Clock::time_point t1 = Clock::now();
    EXPECT_FALSE(board.copy_from(kDonor, 1, out, 20s)) << "rank " << me;
    EXPECT_LT(elapsed_ms(t1), 5000.0) << "rank " << me << ": waited for an overwritten version";
  }
  barrier();
}

TEST(ShmStateBoard, VersionAlreadyPassedReturnsFalseAtOnce) {
  Node node;
  SKIP_UNLESS_ONE_NODE(node);
  const int me = world_rank();
  ShmStateBoard board(node.shm, 0, 1024);
  std::vector<float> out(board.count());
  if (me == kDonor) {
    for (uint64_t v = 1; v <= 3; ++v) write_state(board, v);
  }
  barrier();
  if (me != kDonor) {
    const Clock::time_point t0 = Clock::now();
    EXPECT_FALSE(board.copy_from(kDonor, 0, out, 20s)) << "rank " << me;
    EXPECT_FALSE(board.copy_from(kDonor, 2, out, 20s)) << "rank " << me;
    EXPECT_LT(elapsed_ms(t0), 5000.0) << "rank " << me << ": waited for passed versions";
    EXPECT_TRUE(board.copy_from(kDonor, 3, out, 0ns)) << "rank " << me;
    expect_all_equal(out, 3.0f, "version 3");
  }
  barrier();
}

TEST(ShmStateBoard, TimesOutWhenTheDonorNeverPublishes) {
  Node node;
  SKIP_UNLESS_ONE_NODE(node);
  const int me = world_rank();
  ShmStateBoard board(node.shm, 0, 1024);
  std::vector<float> out(board.count());
  if (me == kDonor) write_state(board, 1);
  barrier();
  if (me != kDonor) {
    Clock::time_point t0 = Clock::now();
    EXPECT_FALSE(board.copy_from(kDonor, 5, out, 50ms)) << "rank " << me;
    EXPECT_GE(elapsed_ms(t0), 50.0) << "rank " << me << ": gave up before its timeout";
    t0 = Clock::now();
    EXPECT_FALSE(board.copy_from(kDonor, 2, out, 0ns)) << "rank " << me;
    EXPECT_LT(elapsed_ms(t0), 1000.0) << "rank " << me << ": a zero timeout waited";
    EXPECT_TRUE(board.copy_from(kDonor, 1, out, 0ns)) << "rank " << me;
    expect_all_equal(out, 1.0f, "version 1");
  }
  barrier();
}

// Every element of a copy of `version` must equal it; counts torn copies, reports the first.
void check_copy(std::span<const float> out, uint64_t version, uint64_t* torn) {
  const float expected = static_cast<float>(version);
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] != expected) {
      if ((*torn)++ == 0) {
        ADD_FAILURE() << "rank " << world_rank() << ": torn copy of version " << version
                      << " index " << i << ": expected " << expected << ", actual " << out[i];
      }
      return;
    }
  }
}

// Readers ask for random versions, the current one or later ones (copy_from then waits for
// them); the donor rewrites its region version after version but holds each one until every
// reader has asked for a later one (the readers tell it over MPI). So no copy may fail.
TEST(ShmStateBoard, CopiesOfVersionsTheDonorStillHoldsAllSucceed) {
  Node node(32 + kStressElems);
  SKIP_UNLESS_ONE_NODE(node);
  const int me = world_rank();
  const int n_ranks = world_size();
  constexpr uint64_t kVersions = 300;
  constexpr int kWantTag = 21;
  ShmStateBoard board(node.shm, 32, kStressElems);
  barrier();
  if (me == kDonor) {
    // Per reader, the version it asked for last: it is done with every earlier one.
    std::vector<uint64_t> wants(n_ranks, 0);
    wants[kDonor] = ~uint64_t{0};
    for (uint64_t v = 1; v <= kVersions; ++v) {
      write_state(board, v);
      while (*std::min_element(wants.begin(), wants.end()) <= v) {
        uint64_t want = 0;
        MPI_Request request;
        MPI_Irecv(&want, 1, MPI_UINT64_T, MPI_ANY_SOURCE, kWantTag, MPI_COMM_WORLD, &request);
        int done = 0;
        MPI_Status status;
        // Yields while waiting: readers may share this core.
        for (MPI_Test(&request, &done, &status); !done; MPI_Test(&request, &done, &status)) {
          sched_yield();
        }
        wants[status.MPI_SOURCE] = want;
      }
    }
  } else {
    std::mt19937 rng(1234 + me);
    std::vector<float> out(board.count());
    uint64_t asked = 0;
    uint64_t copies = 0;
    uint64_t torn = 0;
    for (;;) {
      const uint64_t now = board.published(kDonor);
      const uint64_t current = now == ShmStateBoard::kWriting ? 0 : now;
      const uint64_t target = std::max(asked + 1, current + rng() % 3);
      // Past the last version: tells the donor we are done.
      MPI_Send(&target, 1, MPI_UINT64_T, kDonor, kWantTag, MPI_COMM_WORLD);
      if (target > kVersions) break;
      asked = target;
      if (!board.copy_from(kDonor, target, out, 20s)) {
        ADD_FAILURE() << "rank " << me << ": no copy of version " << target
                      << " although the donor holds it (donor at " << board.published(kDonor)
                      << ")";
        const uint64_t done = kVersions + 1;  // so that the donor does not wait for us forever
        MPI_Send(&done, 1, MPI_UINT64_T, kDonor, kWantTag, MPI_COMM_WORLD);
        break;
      }
      ++copies;
      check_copy(out, target, &torn);
    }
    EXPECT_EQ(torn, 0u) << "rank " << me << ": torn copies out of " << copies;
    EXPECT_GT(copies, 0u) << "rank " << me;
  }
  barrier();
}

// The donor rewrites its region back to back with short random pauses (shorter than a copy
// to a few times longer), readers copy the current version or one of the next two: copies
// overlap rewrites all the time, each must either fail or be whole.
TEST(ShmStateBoard, NoTornCopyWhileTheDonorRewritesContinuously) {
  Node node(32 + kStressElems);
  SKIP_UNLESS_ONE_NODE(node);
  const int me = world_rank();
  constexpr uint64_t kLastVersion = 1000;
  ShmStateBoard board(node.shm, 32, kStressElems);
  barrier();
  if (me == kDonor) {
    std::mt19937 rng(99);
    for (uint64_t v = 1; v <= kLastVersion; ++v) {
      write_state(board, v);
      // Keeps version v a little; yields meanwhile, so that a reader sharing the core gets
      // to copy (a delay for variety, never a synchronisation).
      const Clock::time_point until = Clock::now() + std::chrono::microseconds(rng() % 100);
      while (Clock::now() < until) sched_yield();
    }
  } else {
    std::mt19937 rng(1234 + me);
    std::vector<float> out(board.count());
    uint64_t attempts = 0;
    uint64_t copies = 0;
    uint64_t torn = 0;
    // Latest version known to be published or asked for (the word hides which version a
    // rewrite starts from).
    uint64_t known = 0;
    for (;;) {
      const uint64_t now = board.published(kDonor);
      if (now == kLastVersion) break;
      // The current version or one of the next two (during a rewrite: one of the next two).
      const uint64_t target = std::min(
          kLastVersion, now == ShmStateBoard::kWriting ? known + 1 + rng() % 2 : now + rng() % 3);
      known = std::max(known, target);
      ++attempts;
      if (!board.copy_from(kDonor, target, out, 20s)) continue;
      ++copies;
      check_copy(out, target, &torn);
    }
    EXPECT_EQ(torn, 0u) << "rank " << me << ": torn copies out of " << copies;
    // How many succeed depends on scheduling (other processes share the cores); some must,
    // or the torn check above checked nothing.
    EXPECT_GT(copies, 0u) << "rank " << me << ": no copy out of " << attempts << " attempts";
    RecordProperty("copies", std::to_string(copies) + "/" + std::to_string(attempts));
  }
  barrier();
}

// The donor publishes version 1 again and again with new contents (as a rank whose state came
// from an abandoned step attempt is caught up to that same step): a copy of version 1 is
// whole, never half of one rewrite and half of another.
TEST(ShmStateBoard, NoTornCopyWhenTheDonorRepublishesTheSameVersion) {
  Node node(32 + kStressElems);
  SKIP_UNLESS_ONE_NODE(node);
  const int me = world_rank();
  constexpr int kRewrites = 1000;
  ShmStateBoard board(node.shm, 32, kStressElems);
  barrier();
  if (me == kDonor) {
    std::mt19937 rng(7);
    for (int k = 1; k <= kRewrites; ++k) {
      write_state(board, 1, static_cast<float>(k));
      const Clock::time_point until = Clock::now() + std::chrono::microseconds(rng() % 100);
      while (Clock::now() < until) sched_yield();
    }
    write_state(board, 2);  // tells the readers to stop
  } else {
    std::vector<float> out(board.count());
    uint64_t copies = 0;
    uint64_t torn = 0;
    while (board.published(kDonor) != 2) {
      if (!board.copy_from(kDonor, 1, out, 20s)) continue;
      ++copies;
      const float first = out[0];
      for (size_t i = 0; i < out.size(); ++i) {
        if (out[i] != first) {
          if (torn++ == 0) {
            ADD_FAILURE() << "rank " << me << ": torn copy, index 0 holds " << first
                          << ", index " << i << " holds " << out[i];
          }
          break;
        }
      }
    }
    EXPECT_EQ(torn, 0u) << "rank " << me << ": torn copies out of " << copies;
    EXPECT_GT(copies, 0u) << "rank " << me << ": no copy succeeded";
  }
  barrier();
}

TEST(ShmStateBoard, RejectsBadRegionsAndMisuse) {
  Node node;
  Node no_buffer(0);
  const int me = world_rank();
  EXPECT_THROW(ShmStateBoard(node.shm, kSharedElems - 10, 11), InvalidArgument);
  EXPECT_THROW(ShmStateBoard(node.shm, kSharedElems + 1, 0), InvalidArgument);
  EXPECT_THROW(ShmStateBoard(node.shm, SIZE_MAX, 2), InvalidArgument);
  EXPECT_THROW(ShmStateBoard(no_buffer.shm, 0, 1), InvalidArgument);
  EXPECT_NO_THROW(ShmStateBoard(node.shm, kSharedElems, 0));
  EXPECT_NO_THROW(ShmStateBoard(node.shm, 0, kSharedElems));
  EXPECT_NO_THROW(ShmStateBoard(no_buffer.shm, 0, 0));

  ShmStateBoard board(node.shm, 16, 16);
  std::vector<float> out(16), short_out(15);
  EXPECT_THROW(board.copy_from(me, 0, short_out, 0ns), InvalidArgument);
  EXPECT_THROW(board.copy_from(-1, 0, out, 0ns), InvalidArgument);
  EXPECT_THROW(board.copy_from(world_size(), 0, out, 0ns), InvalidArgument);
  EXPECT_THROW(board.published(world_size()), InvalidArgument);
  EXPECT_TRUE(board.copy_from(me, 0, out, 0ns)) << "rank " << me << ": its own version 0";

  EXPECT_THROW(board.publish(1), InvalidArgument) << "publish without begin_update";
  write_state(board, 1);
  board.begin_update();
  board.begin_update();  // still one rewrite
  EXPECT_EQ(board.published(me), ShmStateBoard::kWriting);
  EXPECT_THROW(board.publish(0), InvalidArgument) << "lower version";
  board.publish(1);  // the same version again is allowed (a rank caught up to its own step)
  EXPECT_EQ(board.published(me), 1u);
  write_state(board, 2);
  EXPECT_EQ(board.published(me), 2u);
  // A new board over the same window continues the versions.
  ShmStateBoard again(node.shm, 16, 16);
  again.begin_update();
  EXPECT_THROW(again.publish(1), InvalidArgument);
  again.publish(3);
  EXPECT_EQ(board.published(me), 3u);
  barrier();
}

// The board over an Allreducer's window: the gradients summed in place at the start of the
// shared buffer, the state kept after them; neither disturbs the other.
TEST(ShmStateBoard, LivesBesideTheDirectAllreduceOfAnAllreducer) {
  MpiTransport transport;
  Context ctx(transport, 20s);
  {
    AllreducerOptions off;
    off.use_shm = ShmUse::kOff;
    Allreducer without(ctx, off);
    EXPECT_EQ(without.shm(), nullptr);
  }
  constexpr size_t kGradElems = 100'000;
  constexpr size_t kStateElems = 50'000;
  AllreducerOptions options;
  options.shm.direct_elems = kGradElems + kStateElems;
  options.force = AllreducePath::kShmDirect;
  Allreducer allreducer(ctx, options);
  ASSERT_NE(allreducer.shm(), nullptr);
  ASSERT_EQ(allreducer.shm()->shared_buffer().data(), allreducer.shared_buffer().data());
  if (world_size() < 2 || allreducer.node_size() != world_size()) {
    GTEST_SKIP() << "needs two ranks on one node";
  }
  const int me = world_rank();
  const int n_ranks = world_size();
  std::vector<int> everyone(n_ranks);
  std::iota(everyone.begin(), everyone.end(), 0);
  ShmStateBoard board(*allreducer.shm(), kGradElems, kStateElems);
  const std::span<float> grads = allreducer.shared_buffer().first(kGradElems);
  const float expected_sum = static_cast<float>(n_ranks * (n_ranks + 1) / 2);
  std::vector<float> out(kStateElems);
  for (uint64_t step = 1; step <= 3; ++step) {
    std::ranges::fill(grads, static_cast<float>(me + 1));
    allreducer.allreduce_sum(grads, everyone, step);
    EXPECT_EQ(allreducer.last_path(), AllreducePath::kShmDirect);
    expect_all_equal(grads, expected_sum, "summed gradients");
    write_state(board, step, static_cast<float>(100 * me + step));
    barrier();
    for (int r = 0; r < n_ranks; ++r) {
      ASSERT_TRUE(board.copy_from(r, step, out, 5s)) << "rank " << me << " peer " << r;
      expect_all_equal(out, static_cast<float>(100 * r + step), "state beside the gradients");
    }
    barrier();
  }
}

}  // namespace
}  // namespace resync::collectives
