// Tests of the control-plane pieces without sockets: orders of a closed round, their delivery,
// the wire format, the job token, and the in-process hub with ranks as threads.
#include "collectives/control/control_plane.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "collectives/control/delivery.h"
#include "collectives/control/local_hub.h"
#include "collectives/control/wire.h"
#include "control_harness.h"

namespace resync::collectives {
namespace {

using testing::Gate;
using testing::RankHooks;
using testing::RankResult;
using testing::StateExchange;

TEST(Orders, ParticipantsAndLateRanksGetTheirOrders) {
  ClosedRound round;
  round.step = 7;
  round.stop = true;
  round.participants = {0, 2, 3};
  round.catchups = {{1, 3}, {4, 0}};
  auto orders = orders_for(round);
  ASSERT_EQ(orders.size(), 5u);
  for (int rank = 0; rank < 5; ++rank) {
    const auto& [who, order] = orders[static_cast<size_t>(rank)];
    EXPECT_EQ(who, rank);
    EXPECT_EQ(order.step, 7u);
    EXPECT_TRUE(order.stop);
    EXPECT_EQ(order.participants, round.participants) << "rank " << rank;
    EXPECT_EQ(order.catchups, round.catchups) << "rank " << rank;
  }
  EXPECT_EQ(orders[1].second.kind, OrderKind::kCatchUp);
  EXPECT_EQ(orders[1].second.donor, 3);
  EXPECT_EQ(orders[4].second.kind, OrderKind::kCatchUp);
  EXPECT_EQ(orders[4].second.donor, 0);
  EXPECT_EQ(orders[3].second.kind, OrderKind::kParticipate);
  EXPECT_EQ(orders[3].second.late_ranks_served_by(3), std::vector<int>{1});
  EXPECT_EQ(orders[0].second.late_ranks_served_by(0), std::vector<int>{4});
  EXPECT_TRUE(orders[2].second.late_ranks_served_by(2).empty());
}

TEST(Orders, FinalRoundHasNoAllReduce) {
  ClosedRound round;
  round.step = 10;
  round.final_round = true;
  round.participants = {0, 1};
  round.catchups = {{2, 1}};
  for (const auto& [rank, order] : orders_for(round)) {
    EXPECT_TRUE(order.final_round) << "rank " << rank;
    EXPECT_TRUE(order.participants.empty()) << "rank " << rank;
  }
}

TEST(Orders, RepairRoundCarriesTheAttemptAndSkipsRanksOrderedBefore) {
  ClosedRound round;
  round.step = 4;
  round.attempt = 2;
  round.participants = {0, 1};
  round.catchups = {{2, 0}, {3, 1}};
  round.ordered_before = {2};
  auto orders = orders_for(round);
  ASSERT_EQ(orders.size(), 3u) << "rank 2 still holds its order from the earlier attempt";
  EXPECT_EQ(orders[0].first, 0);
  EXPECT_EQ(orders[1].first, 1);
  EXPECT_EQ(orders[2].first, 3);
  for (const auto& [rank, order] : orders) {
    EXPECT_EQ(order.attempt, 2u) << "rank " << rank;
    EXPECT_EQ(order.catchups, round.catchups) << "rank " << rank;
  }
  EXPECT_EQ(orders[0].second.late_ranks_served_by(0), std::vector<int>{2})
      << "the donor still serves the rank ordered before";
}

// Records what deliver() asks of a hub, in order.
class RecordingSink final : public OrderSink {
 public:
  void send(int rank, StepOrder&& order) override {
    events.push_back(fmt::format("order {} -> rank {}", static_cast<int>(order.kind), rank));
  }
  void round_sent(const ClosedRound& round) override {
    events.push_back(fmt::format("round {} sent", round.step));
  }
  void abort(const std::string& reason) override { events.push_back("abort: " + reason); }
  std::vector<std::string> events;
};

TEST(Delivery, RoundsThenEarlyCatchUpsThenAbort) {
  Decisions d;
  ClosedRound round;
  round.step = 3;
  round.participants = {0, 2};
  round.catchups = {{1, 2}};
  d.closed.push_back(round);
  d.early.push_back({.step = 4, .late_rank = 1, .donor_rank = 0});
  d.abort = "test";
  RecordingSink sink;
  deliver(d, sink);
  const std::vector<std::string> want = {
      "order 1 -> rank 0", "order 2 -> rank 1", "order 1 -> rank 2", "round 3 sent",
      "order 3 -> rank 0", "order 2 -> rank 1", "abort: test"};
  EXPECT_EQ(sink.events, want);
  EXPECT_EQ(sink.who(5), "rank 5");
}

wire::Message round_trip(const wire::Message& msg) {
  std::vector<uint8_t> bytes;
  wire::append_frame(msg, bytes);
  // Every proper prefix is an incomplete frame, never an error or a misparse.
  for (size_t n = 0; n < bytes.size(); ++n) {
    wire::Message partial;
    EXPECT_EQ(wire::decode_frame(std::span(bytes).first(n), wire::kMaxFrameBytes, partial), 0u)
        << "prefix of " << n << " of " << bytes.size() << " bytes";
  }
  bytes.push_back(0xAB);  // the start of the next frame is left alone
  wire::Message out;
  EXPECT_EQ(wire::decode_frame(bytes, wire::kMaxFrameBytes, out), bytes.size() - 1);
  EXPECT_EQ(out.type, msg.type);
  return out;
}

TEST(Wire, EveryMessageRoundTrips) {
  wire::Message hello;
  hello.type = wire::MsgType::kHello;
  hello.token = JobToken::random();
  hello.rank = 12;
  hello.text = "node-17";
  wire::Message back = round_trip(hello);
  EXPECT_TRUE(back.token == hello.token);
  EXPECT_EQ(back.rank, 12);
  EXPECT_EQ(back.text, "node-17");

  for (auto type : {wire::MsgType::kReady, wire::MsgType::kFinish, wire::MsgType::kBusy,
                    wire::MsgType::kFailed}) {
    wire::Message m;
    m.type = type;
    m.step = 0x0123456789abcdefULL;
    EXPECT_EQ(round_trip(m).step, m.step);
  }
  for (auto type : {wire::MsgType::kWelcome, wire::MsgType::kStop}) {
    wire::Message m;
    m.type = type;
    round_trip(m);
  }

  wire::Message order;
  order.type = wire::MsgType::kOrder;
  order.order.kind = OrderKind::kCatchUp;
  order.order.step = 99;
  order.order.attempt = 0xfedc1234u;
  order.order.final_round = true;
  order.order.stop = false;
  order.order.timed_out = true;
  order.order.participants = {0, 3, 4, 1000};
  order.order.catchups = {{1, 3}, {2, 4}};
  order.order.donor = 3;
  EXPECT_EQ(round_trip(order).order, order.order);
  order.order.passive = {2, 7};
  order.order.early = true;
  order.order.velocity_only = true;
  order.order.kind = OrderKind::kServe;
  EXPECT_EQ(round_trip(order).order, order.order) << "passive members, early, kServe";
  order.order.kind = OrderKind::kCatchUp;
  order.order.shared = true;
  order.order.catchups = {{1, 3, true}, {2, 4, false}};
  EXPECT_EQ(round_trip(order).order, order.order) << "shared catch-ups";

  wire::Message abort;
  abort.type = wire::MsgType::kAbort;
  abort.text = "rank 3 (node2) closed its control connection: it died";
  EXPECT_EQ(round_trip(abort).text, abort.text);
}

TEST(Wire, MalformedFramesAreRejected) {
  wire::Message m;
  std::vector<uint8_t> too_long = {0x00, 0x00, 0x00, 0x01};  // 16 MiB body announced
  EXPECT_THROW(wire::decode_frame(too_long, wire::kMaxFrameBytes, m), CommError);
  std::vector<uint8_t> empty_body = {0, 0, 0, 0};
  EXPECT_THROW(wire::decode_frame(empty_body, wire::kMaxFrameBytes, m), CommError);
  std::vector<uint8_t> unknown_type = {1, 0, 0, 0, 99};
  EXPECT_THROW(wire::decode_frame(unknown_type, wire::kMaxFrameBytes, m), CommError);
  std::vector<uint8_t> trailing = {10, 0, 0, 0, 3, 1, 0, 0, 0, 0, 0, 0, 0, 7};
  EXPECT_THROW(wire::decode_frame(trailing, wire::kMaxFrameBytes, m), CommError);
  std::vector<uint8_t> short_ready = {5, 0, 0, 0, 3, 1, 0, 0, 0};
  EXPECT_THROW(wire::decode_frame(short_ready, wire::kMaxFrameBytes, m), CommError);
  // An HTTP request (or any stranger) on the control port is not a HELLO.
  const std::string http = "GET / HTTP/1.1\r\n\r\n";
  std::vector<uint8_t> bytes(http.begin(), http.end());
  EXPECT_THROW(wire::decode_frame(bytes, wire::kMaxHelloBytes, m), CommError);
  // A PLAN whose participant count exceeds its body must not allocate for it.
  wire::Message order;
  order.type = wire::MsgType::kOrder;
  std::vector<uint8_t> frame;
  wire::append_frame(order, frame);
  frame[4 + 1 + 1 + 8 + 4 + 1 + 4 + 3] = 0x7f;  // top byte of the participant count
  EXPECT_THROW(wire::decode_frame(frame, wire::kMaxFrameBytes, m), CommError);
  // A HELLO with another magic number.
  wire::Message hello;
  hello.type = wire::MsgType::kHello;
  frame.clear();
  wire::append_frame(hello, frame);
  frame[5] ^= 0xff;
  EXPECT_THROW(wire::decode_frame(frame, wire::kMaxHelloBytes, m), CommError);
}

TEST(JobToken, HexRoundTripAndRandomness) {
  const JobToken a = JobToken::random();
  const JobToken b = JobToken::random();
  EXPECT_FALSE(a == b) << "two random 128-bit tokens collided";
  EXPECT_EQ(a.hex().size(), 32u);
  EXPECT_TRUE(JobToken::from_hex(a.hex()) == a);
  EXPECT_TRUE(JobToken::from_hex("00112233445566778899AABBCCDDEEFF") ==
              JobToken::from_hex("00112233445566778899aabbccddeeff"));
  EXPECT_THROW(JobToken::from_hex("0011"), InvalidArgument);
  EXPECT_THROW(JobToken::from_hex("zz112233445566778899aabbccddeeff"), InvalidArgument);
}

// Runs `n` ranks as threads on `channels`; hooks[r] customise rank r.
std::vector<RankResult> run_all(std::vector<std::unique_ptr<ControlChannel>>& channels,
                                uint64_t n_steps, std::vector<RankHooks> hooks = {}) {
  hooks.resize(channels.size());
  StateExchange exchange;
  std::vector<RankResult> results(channels.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < channels.size(); ++r) {
    threads.emplace_back(
        [&, r] { results[r] = testing::run_rank(*channels[r], n_steps, exchange, hooks[r]); });
  }
  for (auto& t : threads) t.join();
  return results;
}

void expect_all_agree(const std::vector<RankResult>& results, uint64_t n_steps) {
  for (size_t r = 0; r < results.size(); ++r) {
    EXPECT_EQ(results[r].error, "") << "rank " << r;
    EXPECT_EQ(results[r].state.n_steps, n_steps) << "rank " << r;
    EXPECT_EQ(results[r].state.digest, results[0].state.digest)
        << "rank " << r << " ends with a different state than rank 0";
  }
}

CoordinatorConfig hub_config(int world_size, int backup_workers, int64_t timeout_ms = 0) {
  CoordinatorConfig c;
  c.world_size = world_size;
  c.backup_workers = backup_workers;
  c.straggler_timeout_ms = timeout_ms;
  return c;
}

std::vector<std::unique_ptr<ControlChannel>> connect_all(LocalControlHub& hub, int world_size) {
  std::vector<std::unique_ptr<ControlChannel>> channels;
  for (int r = 0; r < world_size; ++r) channels.push_back(hub.connect(r));
  return channels;
}

TEST(LocalControlHub, PlainSyncEveryRankInEveryStep) {
  LocalControlHub hub(hub_config(3, 0));
  auto channels = connect_all(hub, 3);
  auto results = run_all(channels, 5);
  expect_all_agree(results, 5);
  for (size_t r = 0; r < results.size(); ++r) {
    ASSERT_EQ(results[r].orders.size(), 6u) << "rank " << r;
    for (size_t i = 0; i + 1 < results[r].orders.size(); ++i) {
      EXPECT_EQ(results[r].orders[i].participants, (std::vector<int>{0, 1, 2}))
          << "rank " << r << " step " << i;
    }
  }
  EXPECT_FALSE(hub.abort_reason());
}

TEST(LocalControlHub, StragglerIsDroppedAndCaughtUp) {
  LocalControlHub hub(hub_config(4, 1));
  auto channels = connect_all(hub, 4);
  Gate others_did_three_steps;
  std::vector<RankHooks> hooks(4);
  hooks[0].after_order = [&](const StepOrder& o) {
    if (o.step == 2) others_did_three_steps.open();
  };
  hooks[3].before_ready = [&](uint64_t step) {
    if (step == 0) others_did_three_steps.wait();
  };
  auto results = run_all(channels, 8, hooks);
  expect_all_agree(results, 8);
  for (int r = 0; r < 3; ++r) {
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(results[static_cast<size_t>(r)].orders[i].participants, (std::vector<int>{0, 1, 2}))
          << "rank " << r << " step " << i;
    }
  }
  const StepOrder& first = results[3].orders.at(0);
  EXPECT_EQ(first.kind, OrderKind::kCatchUp) << "rank 3's READY(0) came after step 2 closed";
  EXPECT_GE(first.step, 3u);
  EXPECT_GE(results[3].n_catchups, 1);
}

TEST(LocalControlHub, LastReadyTooLateIsAnsweredByTheFinalRound) {
  // Rank 2 reports step 0 only after the others did both steps: ready(0) returns the final
  // order, a catch-up, and rank 2 must not call finish().
  LocalControlHub hub(hub_config(3, 1));
  auto channels = connect_all(hub, 3);
  Gate others_done;
  std::vector<RankHooks> hooks(3);
  hooks[0].after_order = [&](const StepOrder& o) {
    if (o.step == 1) others_done.open();
  };
  hooks[2].before_ready = [&](uint64_t step) {
    if (step == 0) others_done.wait();
  };
  auto results = run_all(channels, 2, hooks);
  expect_all_agree(results, 2);
  ASSERT_EQ(results[2].orders.size(), 1u);
  EXPECT_TRUE(results[2].orders[0].final_round);
  EXPECT_EQ(results[2].orders[0].kind, OrderKind::kCatchUp);
  EXPECT_EQ(results[2].orders[0].step, 2u);
}

TEST(LocalControlHub, TimeoutFiresFromTheTimerThread) {
  // Real time: the straggler timeout is 50 ms and nothing but the timer can close step 0.
  LocalControlHub hub(hub_config(2, 0, 50));
  auto channels = connect_all(hub, 2);
  Gate step0_closed;
  std::vector<RankHooks> hooks(2);
  hooks[0].after_order = [&](const StepOrder& o) {
    if (o.step == 0) step0_closed.open();
  };
  hooks[1].before_ready = [&](uint64_t step) {
    if (step == 0) step0_closed.wait();
  };
  auto results = run_all(channels, 3, hooks);
  expect_all_agree(results, 3);
  const StepOrder& first = results[0].orders.at(0);
  EXPECT_TRUE(first.timed_out);
  EXPECT_EQ(first.participants, std::vector<int>{0});
  EXPECT_EQ(results[1].orders.at(0).kind, OrderKind::kCatchUp);
}

TEST(LocalControlHub, DeadRankAbortsTheOthers) {
  LocalControlHub hub(hub_config(3, 0));
  auto channels = connect_all(hub, 3);
  channels[2].reset();  // rank 2 dies
  std::vector<std::unique_ptr<ControlChannel>> alive;
  alive.push_back(std::move(channels[0]));
  alive.push_back(std::move(channels[1]));
  auto results = run_all(alive, 4);
  for (size_t r = 0; r < alive.size(); ++r) {
    EXPECT_NE(results[r].error.find("rank 2 closed its control connection"), std::string::npos)
        << "rank " << r << ": " << results[r].error;
  }
  ASSERT_TRUE(hub.abort_reason());
}

TEST(LocalControlHub, DestroyingTheHubReleasesWaitingRanks) {
  auto hub = std::make_unique<LocalControlHub>(hub_config(2, 0));
  auto channel = hub->connect(0);
  auto other = hub->connect(1);
  std::string error;
  std::thread waiter([&] {
    try {
      channel->ready(0);
    } catch (const CommError& e) {
      error = e.what();
    }
  });
  hub.reset();
  waiter.join();
  EXPECT_NE(error.find("shut down"), std::string::npos) << error;
}

TEST(LocalControlHub, BusyReturnsTheCatchUpOrNothing) {
  // W = 3, b = 1: two READYs close a step. Events are applied synchronously under the hub's
  // lock, so the order of calls below is the order the coordinator sees.
  CoordinatorConfig config = hub_config(3, 1);
  config.busy_ranks_join = false;  // busy ranks are caught up (joining: coordinator tests)
  LocalControlHub hub(config);
  auto channels = connect_all(hub, 3);
  using std::chrono::milliseconds;
  EXPECT_FALSE(channels[2]->busy(0, milliseconds(20))) << "step 0 cannot close yet";
  StepOrder o0;
  std::thread r0([&] { o0 = channels[0]->ready(0); });
  StepOrder o1 = channels[1]->ready(0);
  r0.join();
  EXPECT_EQ(o1.participants, (std::vector<int>{0, 1}));
  ASSERT_EQ(o1.catchups.size(), 1u);
  EXPECT_EQ(o1.catchups[0].late_rank, 2);
  // The BUSY wait ran out before the close: ready(0) returns the order that came meanwhile.
  StepOrder o2 = channels[2]->ready(0);
  EXPECT_EQ(o2.kind, OrderKind::kCatchUp);
  EXPECT_EQ(o2.step, 0u);
  EXPECT_EQ(o2.donor, o1.catchups[0].donor_rank);

  // Step 1: the step closes during rank 2's wait; busy() returns the catch-up.
  std::optional<StepOrder> busy_order;
  Gate busy_sent;
  std::thread r2([&] {
    // The hub applies BUSY before the wait starts; a second BUSY of a busy rank is ignored.
    EXPECT_FALSE(channels[2]->busy(1, milliseconds(0)));
    busy_sent.open();
    busy_order = channels[2]->busy(1, std::chrono::seconds(20));
  });
  busy_sent.wait();
  std::thread r0b([&] { o0 = channels[0]->ready(1); });
  o1 = channels[1]->ready(1);
  r0b.join();
  r2.join();
  ASSERT_TRUE(busy_order);
  EXPECT_EQ(busy_order->kind, OrderKind::kCatchUp);
  EXPECT_EQ(busy_order->step, 1u);
  EXPECT_EQ(o1.participants, (std::vector<int>{0, 1}));
  std::vector<std::thread> finishing;
  for (size_t r = 0; r < 3; ++r) {
    finishing.emplace_back(
        [&, r] { EXPECT_TRUE(channels[r]->finish(2).final_round) << "rank " << r; });
  }
  for (auto& t : finishing) t.join();
  EXPECT_FALSE(hub.abort_reason());
}

TEST(LocalControlHub, FailedEverywhereIsRepairedWithTheNextAttempt) {
  LocalControlHub hub(hub_config(2, 0));
  auto channels = connect_all(hub, 2);
  StepOrder o0;
  std::thread r0([&] { o0 = channels[0]->ready(0); });
  StepOrder o1 = channels[1]->ready(0);
  r0.join();
  EXPECT_EQ(o1.attempt, 0u);
  std::thread f0([&] { o0 = channels[0]->failed(0); });
  o1 = channels[1]->failed(0);
  f0.join();
  for (const StepOrder* o : {&o0, &o1}) {
    EXPECT_EQ(o->kind, OrderKind::kParticipate);
    EXPECT_EQ(o->step, 0u);
    EXPECT_EQ(o->attempt, 1u);
    EXPECT_EQ(o->participants, (std::vector<int>{0, 1}));
  }
  std::thread fin([&] { channels[0]->finish(1); });
  EXPECT_TRUE(channels[1]->finish(1).final_round);
  fin.join();
  EXPECT_FALSE(hub.abort_reason());
}

TEST(LocalControlHub, StopRequestEndsEveryRankAtTheSameBoundary) {
  LocalControlHub hub(hub_config(3, 0));
  auto channels = connect_all(hub, 3);
  std::vector<RankHooks> hooks(3);
  hooks[1].before_ready = [&](uint64_t step) {
    if (step == 2) channels[1]->request_stop();
  };
  auto results = run_all(channels, 100, hooks);
  expect_all_agree(results, 3);
  for (size_t r = 0; r < results.size(); ++r) {
    EXPECT_TRUE(results[r].orders.at(2).stop) << "rank " << r;
    EXPECT_EQ(results[r].orders.size(), 4u) << "rank " << r << ": 3 steps and the final round";
  }
}

}  // namespace
}  // namespace resync::collectives
