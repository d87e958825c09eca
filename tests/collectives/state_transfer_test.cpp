// State transfer over the loopback transport: round trip of several buffers in many chunks,
// header fields, layout mismatch, and a sender that never comes.
#include "collectives/state/state_transfer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <vector>

#include "base/error.h"
#include "collectives/transport/loopback_transport.h"
#include "ring_test_util.h"

namespace resync::collectives {
namespace {

using namespace std::chrono_literals;
using test::first_bitwise_difference;

struct State {
  std::vector<float> params, empty, momentum;
  explicit State(size_t n_params) : params(n_params), momentum(n_params + 3) {}
  std::vector<std::span<const float>> views() const { return {params, empty, momentum}; }
  std::vector<std::span<float>> views() { return {params, empty, momentum}; }
};

TEST(StateTransfer, RoundTripsHeaderAndBuffersInManyChunks) {
  LoopbackFabric fabric(3);
  State sent(12345), got(12345);
  test::fill_input(sent.params, 0);
  test::fill_input(sent.momentum, 0, 1);
  StateHeader header_got;
  const StateTransferOptions options{.chunk_bytes = 4000, .max_in_flight = 2};
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    if (t.rank() == 0) {
      const StateHeader header{.step = 77, .user = {1, 2, 3, 4}};
      const State& s = sent;
      send_state(ctx, 2, 77, header, s.views(), options);
    } else if (t.rank() == 2) {
      recv_state(ctx, 0, 77, header_got, got.views(), options);
    }
  });
  EXPECT_EQ(header_got.step, 77u);
  EXPECT_EQ(header_got.user, (std::array<uint64_t, 4>{1, 2, 3, 4}));
  EXPECT_EQ(first_bitwise_difference(got.params, sent.params), -1);
  EXPECT_EQ(first_bitwise_difference(got.momentum, sent.momentum), -1);
  // Header + ceil(12345*4/4000) + ceil(12348*4/4000) chunks (the chunk is 1000 floats).
  EXPECT_EQ(fabric.messages_delivered(0, 2), 1u + 13u + 13u);
  EXPECT_EQ(fabric.messages_delivered(0, 1) + fabric.messages_delivered(1, 2), 0u);
}

TEST(StateTransfer, LayoutMismatchIsCommErrorAndLeavesBuffersAlone) {
  LoopbackFabric fabric(2);
  State sent(100), got(101);
  test::fill_input(sent.params, 0);
  bool receiver_threw = false;
  bool sender_timed_out = false;
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, t.rank() == 0 ? 100ms : 5s);
    StateHeader header;
    if (t.rank() == 0) {
      try {
        const State& s = sent;
        send_state(ctx, 1, 3, header, s.views());
      } catch (const TimeoutError& e) {
        sender_timed_out = e.peer() == 1 && e.seq() == 3;
      }
    } else {
      try {
        recv_state(ctx, 0, 3, header, got.views());
      } catch (const CommError& e) {
        receiver_threw = std::string(e.what()).find("rank 0") != std::string::npos;
      }
    }
  });
  EXPECT_TRUE(receiver_threw);
  EXPECT_TRUE(sender_timed_out);
  for (float v : got.params) ASSERT_EQ(v, 0.0f);
}

TEST(StateTransfer, MissingSenderTimesOutNamingIt) {
  LoopbackFabric fabric(2);
  Context ctx(fabric.transport(1), 20ms);
  State got(10);
  StateHeader header;
  try {
    recv_state(ctx, 0, 9, header, got.views());
    FAIL() << "recv_state returned without a sender";
  } catch (const TimeoutError& e) {
    EXPECT_EQ(e.peer(), 0);
    EXPECT_EQ(e.seq(), 9u);
  }
  EXPECT_EQ(fabric.pending_operations(), 0u);
}

}  // namespace
}  // namespace resync::collectives
