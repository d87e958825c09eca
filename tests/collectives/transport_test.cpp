// Transport semantics on the loopback fabric (matching, ordering, timeouts, cancellation,
// abandonment, failure propagation) and the Context's sequence-number tags.
#include "collectives/transport/transport.h"

#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cstring>
#include <set>
#include <stdexcept>
#include <vector>

#include "base/error.h"
#include "collectives/transport/context.h"
#include "collectives/transport/loopback_transport.h"

namespace resync::collectives {
namespace {

using namespace std::chrono_literals;

std::span<const std::byte> bytes_of(const std::vector<int>& v) {
  return std::as_bytes(std::span(v));
}
std::span<std::byte> bytes_of(std::vector<int>& v) { return std::as_writable_bytes(std::span(v)); }

TEST(LoopbackTransport, MessagesOnOneTagArriveInOrderAndTagsKeepThemApart) {
  LoopbackFabric fabric(2);
  run_on_ranks(fabric, [&](Transport& t) {
    if (t.rank() == 0) {
      const std::vector<int> a = {1, 2, 3};
      const std::vector<int> b = {4};
      const std::vector<int> c = {5, 6};
      Request ra = t.isend(1, 10, bytes_of(a));
      Request rb = t.isend(1, 10, bytes_of(b));
      Request rc = t.isend(1, 11, bytes_of(c));
      // Sends complete only once received, and rank 1 takes tag 11 first.
      t.wait(rc, kNoDeadline);
      t.wait(ra, kNoDeadline);
      t.wait(rb, kNoDeadline);
    } else {
      std::vector<int> c(2), a(3), b(8, -1);
      Request rc = t.irecv(0, 11, bytes_of(c));
      EXPECT_EQ(t.wait(rc, kNoDeadline), 2 * sizeof(int));
      Request ra = t.irecv(0, 10, bytes_of(a));
      Request rb = t.irecv(0, 10, bytes_of(b));
      EXPECT_EQ(t.wait(rb, kNoDeadline), sizeof(int)) << "a larger receive buffer is allowed";
      EXPECT_EQ(t.wait(ra, kNoDeadline), 3 * sizeof(int));
      EXPECT_EQ(a, (std::vector<int>{1, 2, 3}));
      EXPECT_EQ(b[0], 4);
      EXPECT_EQ(b[1], -1);
      EXPECT_EQ(c, (std::vector<int>{5, 6}));
    }
  });
  EXPECT_EQ(fabric.messages_delivered(0, 1), 3u);
  EXPECT_EQ(fabric.bytes_delivered(0, 1), 6 * sizeof(int));
  EXPECT_EQ(fabric.messages_delivered(1, 0), 0u);
}

TEST(LoopbackTransport, ReceiveTimeoutNamesPeerAndSequence) {
  LoopbackFabric fabric(3);
  Context ctx(fabric.transport(0), 30ms);
  std::vector<int> buf(4);
  Request r = ctx.irecv(2, OpKind::kAllreduce, 42, bytes_of(buf));
  const auto start = Clock::now();
  try {
    ctx.transport().wait(r, ctx.deadline());
    FAIL() << "wait returned without a message";
  } catch (const TimeoutError& e) {
    EXPECT_EQ(e.peer(), 2);
    EXPECT_EQ(e.seq(), 42u);
    EXPECT_NE(std::string(e.what()).find("rank 2"), std::string::npos) << e.what();
  }
  EXPECT_GE(Clock::now() - start, 30ms);
  EXPECT_TRUE(r.active()) << "a timed-out request stays pending";
  EXPECT_TRUE(ctx.transport().cancel(r));
  EXPECT_FALSE(r.active());
  EXPECT_EQ(fabric.pending_operations(), 0u);
}

TEST(LoopbackTransport, CancelledReceiveNeverTakesALaterMessage) {
  LoopbackFabric fabric(2);
  Transport& t0 = fabric.transport(0);
  Transport& t1 = fabric.transport(1);
  std::vector<int> stale(1, -1), fresh(1, -1);
  Request cancelled = t1.irecv(0, 5, bytes_of(stale));
  EXPECT_TRUE(t1.cancel(cancelled));
  Request recv = t1.irecv(0, 5, bytes_of(fresh));
  const std::vector<int> msg = {99};
  Request send = t0.isend(1, 5, bytes_of(msg));
  t1.wait(recv, kNoDeadline);
  t0.wait(send, kNoDeadline);
  EXPECT_EQ(fresh[0], 99);
  EXPECT_EQ(stale[0], -1);
}

TEST(LoopbackTransport, CancelAfterArrivalKeepsTheData) {
  LoopbackFabric fabric(2);
  std::vector<int> buf(1, -1);
  const std::vector<int> msg = {7};
  Request send = fabric.transport(0).isend(1, 3, bytes_of(msg));
  Request recv = fabric.transport(1).irecv(0, 3, bytes_of(buf));
  EXPECT_FALSE(fabric.transport(1).cancel(recv));
  EXPECT_EQ(recv.transferred_bytes(), sizeof(int));
  EXPECT_EQ(buf[0], 7);
  EXPECT_TRUE(fabric.transport(0).test(send));
}

TEST(LoopbackTransport, TooSmallReceiveBufferIsCommError) {
  LoopbackFabric fabric(2);
  std::vector<int> buf(1);
  const std::vector<int> msg = {1, 2};
  Request send = fabric.transport(0).isend(1, 3, bytes_of(msg));
  Request recv = fabric.transport(1).irecv(0, 3, bytes_of(buf));
  EXPECT_THROW(fabric.transport(1).wait(recv, kNoDeadline), CommError);
  EXPECT_TRUE(fabric.transport(0).test(send));
}

TEST(LoopbackTransport, AbandonedSendIsWithdrawn) {
  LoopbackFabric fabric(2);
  {
    const std::vector<int> msg = {1};
    Request send = fabric.transport(0).isend(1, 3, bytes_of(msg));
    EXPECT_EQ(fabric.pending_operations(), 1u);
  }
  EXPECT_EQ(fabric.pending_operations(), 0u);
  std::vector<int> buf(1);
  Request recv = fabric.transport(1).irecv(0, 3, bytes_of(buf));
  EXPECT_FALSE(fabric.transport(1).test(recv));
}

TEST(LoopbackTransport, WaitAnyReturnsTheCompletedRequest) {
  LoopbackFabric fabric(3);
  std::vector<int> from1(1), from2(1);
  Transport& t0 = fabric.transport(0);
  Request r1 = t0.irecv(1, 0, bytes_of(from1));
  Request r2 = t0.irecv(2, 0, bytes_of(from2));
  const std::vector<int> msg = {2};
  Request send = fabric.transport(2).isend(0, 0, bytes_of(msg));
  std::array<Request*, 2> both{&r1, &r2};
  EXPECT_EQ(t0.wait_any(both, kNoDeadline), 1u);
  EXPECT_FALSE(r2.active());
  EXPECT_TRUE(r1.active());
  EXPECT_EQ(from2[0], 2);
  try {
    t0.wait_any(both, deadline_after(10ms));
    FAIL() << "no message from rank 1 was sent";
  } catch (const TimeoutError& e) {
    EXPECT_EQ(e.peer(), 1);
  }
}

TEST(LoopbackTransport, RejectsBadPeersAndTags) {
  LoopbackFabric fabric(2);
  std::vector<int> buf(1);
  EXPECT_THROW(fabric.transport(0).irecv(2, 0, bytes_of(buf)), InvalidArgument);
  EXPECT_THROW(fabric.transport(0).irecv(-1, 0, bytes_of(buf)), InvalidArgument);
  EXPECT_THROW(fabric.transport(0).irecv(1, -1, bytes_of(buf)), InvalidArgument);
  EXPECT_THROW(LoopbackFabric(0), InvalidArgument);
}

TEST(RunOnRanks, FirstFailureIsRethrownAndReleasesBlockedRanks) {
  LoopbackFabric fabric(4);
  try {
    run_on_ranks(fabric, [](Transport& t) {
      if (t.rank() == 2) throw std::runtime_error("rank 2 gave up");
      std::vector<int> buf(1);
      Request r = t.irecv(2, 0, bytes_of(buf));
      t.wait(r, kNoDeadline);  // never sent: only the fabric abort ends this wait
    });
    FAIL() << "run_on_ranks did not rethrow";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "rank 2 gave up");
  }
}

TEST(Context, TagsSeparateKindsAndSequencesWithinTheWindow) {
  LoopbackFabric fabric(1, 32767);
  Context ctx(fabric.transport(0));
  EXPECT_EQ(ctx.sequence_window(), 8192u);
  std::set<int> tags;
  for (uint64_t seq = 100; seq < 100 + ctx.sequence_window(); ++seq) {
    for (OpKind kind : {OpKind::kAllreduce, OpKind::kStateTransfer}) {
      const int tag = ctx.tag(kind, seq);
      EXPECT_GE(tag, 0);
      EXPECT_LE(tag, 32767);
      tags.insert(tag);
    }
  }
  EXPECT_EQ(tags.size(), 2 * ctx.sequence_window());
  EXPECT_EQ(ctx.tag(OpKind::kAllreduce, 5), ctx.tag(OpKind::kAllreduce, 5 + 8192));
  EXPECT_EQ(ctx.next_sequence(), 0u);
  EXPECT_EQ(ctx.next_sequence(), 1u);

  LoopbackFabric big(1);  // INT_MAX tags: a far larger window
  EXPECT_EQ(Context(big.transport(0)).sequence_window(), 1u << 29);
}

// A message of an abandoned round (sent, never received) must not satisfy the next round's
// receive: the sequence in the tag keeps them apart.
TEST(Context, LateMessageOfAnAbandonedRoundNeverMatchesTheNext) {
  LoopbackFabric fabric(2);
  Context c0(fabric.transport(0), 1s);
  Context c1(fabric.transport(1), 1s);
  const std::vector<int> old_round = {41};
  const std::vector<int> new_round = {42};
  Request late = c0.isend(1, OpKind::kAllreduce, 41, bytes_of(old_round));
  Request next = c0.isend(1, OpKind::kAllreduce, 42, bytes_of(new_round));
  std::vector<int> got(1);
  Request recv = c1.irecv(0, OpKind::kAllreduce, 42, bytes_of(got));
  fabric.transport(1).wait(recv, c1.deadline());
  EXPECT_EQ(got[0], 42);
  EXPECT_TRUE(late.active());
  std::vector<int> other_kind(1);
  Request wrong_kind = c1.irecv(0, OpKind::kStateTransfer, 41, bytes_of(other_kind));
  EXPECT_FALSE(fabric.transport(1).test(wrong_kind));
  EXPECT_TRUE(fabric.transport(1).cancel(wrong_kind));
}

TEST(Deadline, SaturatesInsteadOfOverflowing) {
  EXPECT_EQ(deadline_after(std::chrono::milliseconds::max()), kNoDeadline);
  const Deadline passed = deadline_after(-5ms);
  EXPECT_LE(passed, Clock::now());
  const Deadline soon = deadline_after(1000ms);
  EXPECT_GT(soon, Clock::now() + 900ms);
}

}  // namespace
}  // namespace resync::collectives
