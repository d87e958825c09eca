// The coordinator watch (tcp_watch.h) against a real TcpControlServer on 127.0.0.1: heartbeats
// keep it quiet, END ends it quietly, a rank's death reaches every watch as the abort reason,
// the server going away and its silence are reported, and a destroyed watch reports nothing.
#include "collectives/control/tcp_watch.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "collectives/control/tcp_control.h"

namespace resync::collectives {
namespace {

TcpServerOptions options(int world_size) {
  TcpServerOptions o;
  o.coordinator.world_size = world_size;
  o.advertise_host = "127.0.0.1";
  o.startup_timeout_s = 20;
  o.linger_s = 1;
  o.heartbeat_s = 0.05;
  return o;
}

// Collects what a watch reports.
struct Report {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> lost;

  CoordinatorWatch::LostHandler handler() {
    return [this](const std::string& why) {
      std::lock_guard<std::mutex> lock(mu);
      lost.push_back(why);
      cv.notify_all();
    };
  }
  std::optional<std::string> wait(std::chrono::milliseconds limit) {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, limit, [&] { return !lost.empty(); })) return std::nullopt;
    return lost.front();
  }
};

TEST(CoordinatorWatch, HeartbeatsKeepItQuietAndEndEndsItQuietly) {
  TcpControlServer server(options(2));
  Report report;
  // Silence limit far above the heartbeat interval: quiet while the coordinator lives.
  CoordinatorWatch watch0(server.endpoint(), 0, 0.5, report.handler());
  CoordinatorWatch watch1(server.endpoint(), 1, 0.5, report.handler());
  auto c0 = TcpControlClient::connect(server.endpoint(), 0);
  auto c1 = TcpControlClient::connect(server.endpoint(), 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // > 2 silence limits
  EXPECT_FALSE(report.wait(std::chrono::milliseconds(0)));
  // Both ranks finish: the final round, then END on every watch.
  std::thread t([&] { c1->finish(0); });
  const StepOrder last = c0->finish(0);
  t.join();
  EXPECT_TRUE(last.final_round);
  for (int i = 0; i < 100 && !(watch0.ended() && watch1.ended()); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(watch0.ended());
  EXPECT_TRUE(watch1.ended());
  EXPECT_FALSE(report.wait(std::chrono::milliseconds(200))) << report.lost.front();
}

TEST(CoordinatorWatch, ADeadRankReachesEveryWatchAsTheAbortReason) {
  TcpControlServer server(options(3));
  Report r0, r1;
  CoordinatorWatch watch0(server.endpoint(), 0, 5, r0.handler());
  CoordinatorWatch watch1(server.endpoint(), 1, 5, r1.handler());
  auto c0 = TcpControlClient::connect(server.endpoint(), 0);
  auto c1 = TcpControlClient::connect(server.endpoint(), 1);
  auto c2 = TcpControlClient::connect(server.endpoint(), 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  c2.reset();  // rank 2's connection closes before its final order: it died
  const auto why0 = r0.wait(std::chrono::seconds(5));
  const auto why1 = r1.wait(std::chrono::seconds(5));
  ASSERT_TRUE(why0);
  ASSERT_TRUE(why1);
  EXPECT_NE(why0->find("rank 2"), std::string::npos) << *why0;
  EXPECT_NE(why0->find("died"), std::string::npos) << *why0;
  EXPECT_EQ(*why0, *why1);
  EXPECT_FALSE(watch0.ended());
}

TEST(CoordinatorWatch, TheCoordinatorGoingAwayIsReported) {
  auto server = std::make_unique<TcpControlServer>(options(2));
  Report report;
  CoordinatorWatch watch(server->endpoint(), 1, 5, report.handler());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  server.reset();  // rank 0 exits (or dies) before the job ended
  const auto why = report.wait(std::chrono::seconds(10));
  ASSERT_TRUE(why);
  EXPECT_TRUE(why->find("closed") != std::string::npos ||
              why->find("shut down") != std::string::npos)
      << *why;
}

TEST(CoordinatorWatch, SilenceCountsAsAFrozenCoordinator) {
  TcpServerOptions o = options(2);
  o.heartbeat_s = 30;  // a coordinator that says nothing for longer than the limit
  TcpControlServer server(o);
  Report report;
  const auto t0 = std::chrono::steady_clock::now();
  CoordinatorWatch watch(server.endpoint(), 0, 0.3, report.handler());
  const auto why = report.wait(std::chrono::seconds(10));
  ASSERT_TRUE(why);
  EXPECT_NE(why->find("silent"), std::string::npos) << *why;
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(250));
}

TEST(CoordinatorWatch, ADestroyedWatchReportsNothing) {
  auto server = std::make_unique<TcpControlServer>(options(2));
  Report report;
  { CoordinatorWatch watch(server->endpoint(), 0, 5, report.handler()); }
  server.reset();
  EXPECT_FALSE(report.wait(std::chrono::milliseconds(300)));
}

TEST(CoordinatorWatch, RejectsABadLimitAndAnUnreachableCoordinator) {
  Report report;
  EXPECT_THROW(CoordinatorWatch("127.0.0.1:1:00", 0, 0, report.handler()), InvalidArgument);
  EXPECT_THROW(CoordinatorWatch("no-colon", 0, 1, report.handler()), InvalidArgument);
}

}  // namespace
}  // namespace resync::collectives
