// End-to-end tests of the TCP control plane in one process: the coordinator server and one
// client thread per rank on 127.0.0.1, plus raw sockets playing strangers on the control port.
#include "collectives/control/tcp_control.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "base/error.h"
#include "control_harness.h"

namespace resync::collectives {
namespace {

using testing::Gate;
using testing::RankHooks;
using testing::RankResult;
using testing::StateExchange;

TcpServerOptions server_options(int world_size, int backup_workers, int64_t timeout_ms = 0,
                                int min_quorum = 1) {
  TcpServerOptions o;
  o.coordinator.world_size = world_size;
  o.coordinator.backup_workers = backup_workers;
  o.coordinator.straggler_timeout_ms = timeout_ms;
  o.coordinator.min_quorum = min_quorum;
  o.advertise_host = "127.0.0.1";
  o.startup_timeout_s = 20;
  o.linger_s = 2;
  return o;
}

std::vector<std::unique_ptr<ControlChannel>> connect_all(const TcpControlServer& server,
                                                         int world_size) {
  std::vector<std::unique_ptr<ControlChannel>> channels;
  for (int r = 0; r < world_size; ++r) {
    channels.push_back(TcpControlClient::connect(server.endpoint(), r));
  }
  return channels;
}

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

// A stranger's socket on the control port. Its receive timeout only turns a server that never
// closes the connection into a failure instead of a hang.
class RawPeer {
 public:
  explicit RawPeer(uint16_t port) : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
    EXPECT_GE(fd_.get(), 0);
    timeval tv{10, 0};
    setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::connect(fd_.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0);
  }
  void send_bytes(const std::vector<uint8_t>& bytes) {
    EXPECT_EQ(::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
  }
  void send_hello(const JobToken& token, int rank) {
    wire::Message hello;
    hello.type = wire::MsgType::kHello;
    hello.token = token;
    hello.rank = rank;
    hello.text = "intruder";
    std::vector<uint8_t> frame;
    wire::append_frame(hello, frame);
    send_bytes(frame);
  }
  // True once the server closed the connection without sending anything.
  bool closed_by_server() {
    char buf[64];
    ssize_t n;
    do {
      n = ::recv(fd_.get(), buf, sizeof(buf), 0);
    } while (n < 0 && errno == EINTR);
    return n == 0 || (n < 0 && errno == ECONNRESET);
  }

 private:
  detail::UniqueFd fd_;
};

JobToken other_token(const JobToken& token) {
  JobToken t = token;
  t.bytes[15] ^= 1;
  return t;
}

TEST(TcpControl, AddressEndpointAndToken) {
  TcpControlServer server(server_options(1, 0));
  EXPECT_EQ(server.address(), "127.0.0.1:" + std::to_string(server.port()));
  EXPECT_EQ(server.endpoint(), server.address() + ":" + server.token().hex());
  auto client = TcpControlClient::connect(server.endpoint(), 0);
  EXPECT_EQ(client->ready(0).participants, std::vector<int>{0});
  EXPECT_TRUE(client->finish(1).final_round);
  EXPECT_THROW(client->ready(1), CommError) << "the channel is closed after the final order";
}

TEST(TcpControl, ResolvesAnAddressForOtherHosts) {
  TcpServerOptions o = server_options(1, 0);
  o.advertise_host.clear();
  o.linger_s = 0;
  TcpControlServer server(o);
  const std::string address = server.address();
  EXPECT_NE(address.find(':'), std::string::npos) << address;
  EXPECT_GT(address.rfind(':'), 0u) << address;
  auto client = TcpControlClient::connect(server.endpoint(), 0);
  EXPECT_EQ(client->ready(0).step, 0u) << "reachable at " << address;
  client->finish(1);
}

TEST(TcpControl, PlainSyncOddWorldSize) {
  TcpControlServer server(server_options(5, 0));
  auto channels = connect_all(server, 5);
  auto results = run_all(channels, 4);
  expect_all_agree(results, 4);
  for (size_t r = 0; r < results.size(); ++r) {
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_EQ(results[r].orders.at(i).participants, (std::vector<int>{0, 1, 2, 3, 4}))
          << "rank " << r << " step " << i;
    }
  }
  EXPECT_FALSE(server.abort_reason());
}

TEST(TcpControl, StragglerIsDroppedAndCaughtUp) {
  TcpControlServer server(server_options(4, 1));
  auto channels = connect_all(server, 4);
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
      EXPECT_EQ(results[static_cast<size_t>(r)].orders.at(i).participants,
                (std::vector<int>{0, 1, 2}))
          << "rank " << r << " step " << i;
    }
  }
  const StepOrder& first = results[3].orders.at(0);
  EXPECT_EQ(first.kind, OrderKind::kCatchUp) << "rank 3's READY(0) came after step 2 closed";
  EXPECT_GE(first.step, 3u);
  EXPECT_NE(first.donor, 3);
}

TEST(TcpControl, StragglerTimeoutClosesWithQuorum) {
  // Real time: a 50 ms straggler timeout is the only thing that can close step 0.
  TcpControlServer server(server_options(3, 0, 50, 2));
  auto channels = connect_all(server, 3);
  Gate step0_closed;
  std::vector<RankHooks> hooks(3);
  hooks[0].after_order = [&](const StepOrder& o) {
    if (o.step == 0) step0_closed.open();
  };
  hooks[2].before_ready = [&](uint64_t step) {
    if (step == 0) step0_closed.wait();
  };
  const auto start = std::chrono::steady_clock::now();
  auto results = run_all(channels, 3, hooks);
  expect_all_agree(results, 3);
  const StepOrder& first = results[0].orders.at(0);
  EXPECT_TRUE(first.timed_out);
  EXPECT_EQ(first.participants, (std::vector<int>{0, 1}));
  EXPECT_EQ(results[2].orders.at(0).kind, OrderKind::kCatchUp);
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(50));
}

TEST(TcpControl, StrangersAreRefusedAndTheJobGoesOn) {
  TcpServerOptions o = server_options(2, 0);
  o.hello_timeout_s = 0.2;
  TcpControlServer server(o);

  RawPeer early(server.port());  // during start-up
  early.send_hello(other_token(server.token()), 0);
  EXPECT_TRUE(early.closed_by_server()) << "wrong token during start-up";
  EXPECT_EQ(server.refused_connections(), 1u);

  auto channels = connect_all(server, 2);

  RawPeer wrong(server.port());
  wrong.send_hello(other_token(server.token()), 1);
  EXPECT_TRUE(wrong.closed_by_server()) << "wrong token";
  EXPECT_EQ(server.refused_connections(), 2u);

  RawPeer garbage(server.port());
  const std::string http = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  garbage.send_bytes(std::vector<uint8_t>(http.begin(), http.end()));
  EXPECT_TRUE(garbage.closed_by_server()) << "not a HELLO";
  EXPECT_EQ(server.refused_connections(), 3u);

  RawPeer silent(server.port());
  EXPECT_TRUE(silent.closed_by_server()) << "no HELLO within the HELLO timeout";
  EXPECT_EQ(server.refused_connections(), 4u);

  RawPeer duplicate(server.port());
  duplicate.send_hello(server.token(), 1);
  EXPECT_TRUE(duplicate.closed_by_server()) << "right token, rank already connected";
  EXPECT_EQ(server.refused_connections(), 5u);

  EXPECT_THROW(TcpControlClient(server.address(), other_token(server.token()), 1), CommError);
  EXPECT_EQ(server.refused_connections(), 6u);

  auto results = run_all(channels, 3);
  expect_all_agree(results, 3);
  EXPECT_FALSE(server.abort_reason());
}

TEST(TcpControl, ClientThatDisconnectsAbortsTheOthers) {
  TcpControlServer server(server_options(3, 0));
  auto channels = connect_all(server, 3);
  std::vector<RankResult> results(2);
  StateExchange exchange;
  std::vector<std::thread> threads;
  for (size_t r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] { results[r] = testing::run_rank(*channels[r], 5, exchange); });
  }
  // Rank 2 takes part in step 0, then dies (its connection closes).
  EXPECT_EQ(channels[2]->ready(0).participants, (std::vector<int>{0, 1, 2}));
  channels[2].reset();
  for (auto& t : threads) t.join();
  for (size_t r = 0; r < 2; ++r) {
    EXPECT_NE(results[r].error.find("rank 2 ("), std::string::npos)
        << "rank " << r << ": " << results[r].error;
    EXPECT_NE(results[r].error.find("closed its control connection: it died"), std::string::npos)
        << "rank " << r << ": " << results[r].error;
  }
  ASSERT_TRUE(server.abort_reason());
}

TEST(TcpControl, StartUpTimeoutNamesTheMissingRanks) {
  TcpServerOptions o = server_options(3, 0);
  o.startup_timeout_s = 0.2;
  TcpControlServer server(o);
  auto rank0 = TcpControlClient::connect(server.endpoint(), 0);
  auto rank2 = TcpControlClient::connect(server.endpoint(), 2);
  try {
    rank0->ready(0);
    ADD_FAILURE() << "ready() returned although rank 1 never connected";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("missing ranks [1]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(rank2->ready(0), CommError);
}

TEST(TcpControl, ServerShutdownReleasesWaitingClients) {
  TcpServerOptions o = server_options(2, 0);
  o.linger_s = 0.3;
  auto server = std::make_unique<TcpControlServer>(o);
  auto rank0 = TcpControlClient::connect(server->endpoint(), 0);
  auto rank1 = TcpControlClient::connect(server->endpoint(), 1);
  std::string error;
  Gate waiting;
  std::thread waiter([&] {
    try {
      waiting.open();
      rank0->ready(0);  // rank 1 never reports: only the shutdown can end this
    } catch (const CommError& e) {
      error = e.what();
    }
  });
  waiting.wait();
  server.reset();
  waiter.join();
  EXPECT_NE(error.find("shut down"), std::string::npos) << error;
}

TEST(TcpControl, BusyReturnsTheCatchUpOrNothing) {
  // W = 3, b = 1. Rank 0 is the busy one: the server handles frames that arrive together in
  // rank order, and rank 0's BUSY is in the server's socket before the READY that closes the
  // step is sent, so the coordinator always sees the BUSY first.
  TcpServerOptions options = server_options(3, 1);
  options.coordinator.busy_ranks_join = false;  // caught up (joining: coordinator tests)
  TcpControlServer server(options);
  auto channels = connect_all(server, 3);
  using std::chrono::milliseconds;
  StepOrder o1;
  std::thread r1([&] { o1 = channels[1]->ready(0); });
  EXPECT_FALSE(channels[0]->busy(0, milliseconds(50))) << "one READY cannot close step 0";
  StepOrder o2;
  std::thread r2([&] { o2 = channels[2]->ready(0); });
  // The step closes during this wait (the repeated BUSY is ignored).
  std::optional<StepOrder> o0 = channels[0]->busy(0, std::chrono::seconds(20));
  r1.join();
  r2.join();
  ASSERT_TRUE(o0) << "the catch-up order did not arrive during the wait";
  EXPECT_EQ(o0->kind, OrderKind::kCatchUp);
  EXPECT_EQ(o0->step, 0u);
  EXPECT_EQ(o1.participants, (std::vector<int>{1, 2}));
  ASSERT_EQ(o1.catchups.size(), 1u);
  EXPECT_EQ(o1.catchups[0].late_rank, 0);
  EXPECT_EQ(o0->donor, o1.catchups[0].donor_rank);

  // Step 1: the wait runs out first; ready(1) then returns the catch-up that came meanwhile.
  EXPECT_FALSE(channels[0]->busy(1, milliseconds(20)));
  r1 = std::thread([&] { o1 = channels[1]->ready(1); });
  o2 = channels[2]->ready(1);
  r1.join();
  StepOrder late = channels[0]->ready(1);
  EXPECT_EQ(late.kind, OrderKind::kCatchUp);
  EXPECT_EQ(late.step, 1u);
  EXPECT_EQ(o2.participants, (std::vector<int>{1, 2}));

  std::vector<std::thread> finishing;
  for (size_t r = 0; r < 3; ++r) {
    finishing.emplace_back(
        [&, r] { EXPECT_TRUE(channels[r]->finish(2).final_round) << "rank " << r; });
  }
  for (auto& t : finishing) t.join();
  EXPECT_FALSE(server.abort_reason());
}

TEST(TcpControl, FailedRingIsReclosedWithTheNextAttempt) {
  TcpControlServer server(server_options(2, 0));
  auto channels = connect_all(server, 2);
  StepOrder o0;
  std::thread r0([&] { o0 = channels[0]->ready(0); });
  StepOrder o1 = channels[1]->ready(0);
  r0.join();
  r0 = std::thread([&] { o0 = channels[0]->failed(0); });
  o1 = channels[1]->failed(0);
  r0.join();
  for (const StepOrder* o : {&o0, &o1}) {
    EXPECT_EQ(o->kind, OrderKind::kParticipate);
    EXPECT_EQ(o->step, 0u);
    EXPECT_EQ(o->attempt, 1u);
    EXPECT_EQ(o->participants, (std::vector<int>{0, 1}));
  }
  r0 = std::thread([&] { channels[0]->finish(1); });
  EXPECT_TRUE(channels[1]->finish(1).final_round);
  r0.join();
  EXPECT_FALSE(server.abort_reason());
}

TEST(TcpControl, StopRequestReachesEveryRank) {
  TcpControlServer server(server_options(3, 0));
  auto channels = connect_all(server, 3);
  std::vector<RankHooks> hooks(3);
  // STOP travels before READY(1) on rank 2's connection, and step 1 needs rank 2 (b = 0).
  hooks[2].before_ready = [&](uint64_t step) {
    if (step == 1) channels[2]->request_stop();
  };
  auto results = run_all(channels, 100, hooks);
  expect_all_agree(results, 2);
  for (size_t r = 0; r < results.size(); ++r) {
    ASSERT_EQ(results[r].orders.size(), 3u) << "rank " << r << ": 2 steps and the final round";
    EXPECT_FALSE(results[r].orders[0].stop) << "rank " << r;
    EXPECT_TRUE(results[r].orders[1].stop) << "rank " << r;
  }
}

}  // namespace
}  // namespace resync::collectives
