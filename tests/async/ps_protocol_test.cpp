// Parameter-server protocol over the loopback transport (ranks as threads): shard layout,
// push/apply/reply, versions and staleness, the staleness bound, a frozen client that delays
// nobody, malformed requests, and the end-of-training share and stats gather.
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <mutex>
#include <numeric>
#include <vector>

#include "base/error.h"
#include "collectives/transport/loopback_transport.h"
#include "collectives/ps/parameter_server.h"

namespace resync::collectives {
namespace {

using namespace std::chrono_literals;

// The server's apply function in these tests: plain addition, so the final shard tells exactly
// which gradients were applied.
void add_into(std::span<float> shard, std::span<const float> grad) {
  ASSERT_EQ(shard.size(), grad.size());
  for (size_t i = 0; i < shard.size(); ++i) shard[i] += grad[i];
}

// First index where a and b differ, or -1.
long first_difference(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<long>(i);
  }
  return -1;
}

TEST(ShardLayout, CoversTheBufferContiguouslyWithRemaindersFirst) {
  for (size_t n : {0u, 1u, 2u, 10u, 669706u}) {
    for (int servers : {1, 2, 3, 5}) {
      const ShardLayout layout(n, servers);
      size_t next = 0;
      for (int s = 0; s < servers; ++s) {
        EXPECT_EQ(layout.offset(s), next) << "n " << n << " servers " << servers << " shard " << s;
        const size_t expected = n / servers + (static_cast<size_t>(s) < n % servers ? 1 : 0);
        EXPECT_EQ(layout.size(s), expected)
            << "n " << n << " servers " << servers << " shard " << s;
        next += layout.size(s);
      }
      EXPECT_EQ(next, n) << "n " << n << " servers " << servers;
    }
  }
  EXPECT_THROW(ShardLayout(10, 0), InvalidArgument);
  EXPECT_THROW(ShardLayout(10, 2).offset(2), InvalidArgument);
}

TEST(ParameterServer, OneClientSeesEveryUpdateWithStalenessZero) {
  constexpr size_t kParams = 1001;
  constexpr int kPushes = 20;
  LoopbackFabric fabric(2);
  std::vector<float> server_shard(kParams, 1.0f);
  std::vector<RequestEvent> events;
  std::vector<uint64_t> applied_steps;  // the steps apply() was told, in order
  ServerStats stats;
  std::vector<float> client_params(kParams, 1.0f);
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    const ShardLayout layout(kParams, 1);
    if (t.rank() == 0) {
      ParameterServer ps(
          ctx, server_shard, {1}, {},
          [&](std::span<const float> g, const RequestEvent& push) {
            applied_steps.push_back(push.step);
            EXPECT_EQ(push.client, 1);
            add_into(server_shard, g);
          },
          [&](const RequestEvent& e) { events.push_back(e); });
      ps.run();
      stats = ps.stats();
      EXPECT_EQ(ps.version(), uint64_t(kPushes));
    } else {
      ParameterClient client(ctx, layout, {0});
      std::vector<float> grad(kParams);
      for (int step = 0; step < kPushes; ++step) {
        std::iota(grad.begin(), grad.end(), float(step));
        const PushResult r = client.push(step, grad, client_params, {double(step), 2, 3, 4});
        EXPECT_EQ(r.n_dropped, 0) << "step " << step;
        EXPECT_EQ(r.max_staleness, 0u) << "step " << step;
        EXPECT_EQ(client.versions()[0], uint64_t(step + 1)) << "step " << step;
      }
      client.done();
    }
  });
  // The client's copy after the last reply is the server's shard, bit for bit.
  EXPECT_EQ(first_difference(client_params, server_shard), -1);
  // shard[i] = 1 + sum over steps of (step + i).
  for (size_t i : {size_t{0}, size_t{500}, kParams - 1}) {
    const float expected = 1.0f + float(kPushes * (kPushes - 1) / 2) + float(kPushes * i);
    EXPECT_EQ(server_shard[i], expected) << "index " << i;
  }
  ASSERT_EQ(events.size(), size_t(kPushes));
  ASSERT_EQ(applied_steps.size(), size_t(kPushes));
  for (int step = 0; step < kPushes; ++step) {
    EXPECT_EQ(applied_steps[size_t(step)], uint64_t(step));
    const RequestEvent& e = events[size_t(step)];
    EXPECT_EQ(e.kind, PsRequestKind::kPush);
    EXPECT_EQ(e.client, 1);
    EXPECT_EQ(e.step, uint64_t(step));
    EXPECT_TRUE(e.applied);
    EXPECT_EQ(e.staleness, 0u);
    EXPECT_EQ(e.version, uint64_t(step + 1));
    EXPECT_EQ(e.user, (std::array<double, 4>{double(step), 2, 3, 4}));
  }
  EXPECT_EQ(stats.applied, uint64_t(kPushes));
  EXPECT_EQ(stats.dropped, 0u);
  EXPECT_EQ(stats.staleness_counts, std::vector<uint64_t>{uint64_t(kPushes)});
}

// Servers 0 and 1 (a shard each, uneven), clients 2..6 pushing concurrently: every gradient is
// applied exactly once on each shard, whatever the interleaving; versions count the updates.
TEST(ParameterServer, ConcurrentClientsOnTwoShardsApplyEveryGradientOnce) {
  constexpr size_t kParams = 777;
  constexpr int kServers = 2, kClients = 5, kPushes = 30;  // 5: more than 8 requests per wait
  LoopbackFabric fabric(kServers + kClients);
  std::vector<float> truth(kParams, 0.0f);  // rank s's shard lives in truth's slice s
  std::vector<int> clients(kClients);
  std::iota(clients.begin(), clients.end(), kServers);
  std::vector<ServerStats> stats(kServers);
  std::vector<uint64_t> final_versions(kServers);
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    const ShardLayout layout(kParams, kServers);
    const int r = t.rank();
    if (r < kServers) {
      std::span<float> shard = layout.slice(std::span<float>(truth), r);
      ParameterServer ps(
          ctx, shard, clients, {},
          [&](std::span<const float> g, const RequestEvent&) { add_into(shard, g); });
      ps.run();
      stats[size_t(r)] = ps.stats();
      final_versions[size_t(r)] = ps.version();
    } else {
      ParameterClient client(ctx, layout, {0, 1});
      std::vector<float> params(kParams, 0.0f), grad(kParams, float(r));
      for (int step = 0; step < kPushes; ++step) {
        const PushResult res = client.push(step, grad, params);
        EXPECT_EQ(res.n_dropped, 0) << "rank " << r << " step " << step;
        // A version never goes backwards and never exceeds all pushes.
        for (uint64_t v : client.versions()) EXPECT_LE(v, uint64_t(kClients * kPushes));
      }
      client.done();
    }
  });
  const float expected = float(kPushes * std::accumulate(clients.begin(), clients.end(), 0));
  for (size_t i = 0; i < kParams; ++i) {
    ASSERT_EQ(truth[i], expected) << "index " << i;
  }
  for (int s = 0; s < kServers; ++s) {
    EXPECT_EQ(final_versions[size_t(s)], uint64_t(kClients * kPushes)) << "server " << s;
    EXPECT_EQ(stats[size_t(s)].applied, uint64_t(kClients * kPushes)) << "server " << s;
    const auto& h = stats[size_t(s)].staleness_counts;
    EXPECT_EQ(std::accumulate(h.begin(), h.end(), uint64_t{0}), uint64_t(kClients * kPushes))
        << "server " << s;
    EXPECT_EQ(h.size(), stats[size_t(s)].max_applied_staleness + 1) << "server " << s;
  }
}

// Client 1 pushes twice while client 2 still holds version 0 (ordered with futures, not sleeps).
TEST(ParameterServer, StalenessBoundDropsAndQueryPullRefresh) {
  constexpr size_t kParams = 64;
  LoopbackFabric fabric(3);
  std::vector<float> shard(kParams, 0.0f);
  std::promise<void> first_pushed_twice;
  std::shared_future<void> pushed = first_pushed_twice.get_future().share();
  ServerStats stats;
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    const ShardLayout layout(kParams, 1);
    std::vector<float> params(kParams, 0.0f), grad(kParams, 1.0f);
    if (t.rank() == 0) {
      ParameterServer ps(
          ctx, shard, {1, 2}, {.max_staleness = 1},
          [&](std::span<const float> g, const RequestEvent&) { add_into(shard, g); });
      ps.run();
      stats = ps.stats();
    } else if (t.rank() == 1) {
      ParameterClient client(ctx, layout, {0});
      client.push(0, grad, params);
      client.push(1, grad, params);
      first_pushed_twice.set_value();
      client.done();
    } else {
      pushed.wait();
      ParameterClient client(ctx, layout, {0});
      EXPECT_EQ(client.versions_behind(0), 2u);
      // Staleness 2 > bound 1: dropped, but the reply still brings the fresh shard.
      PushResult r = client.push(0, grad, params);
      EXPECT_EQ(r.n_dropped, 1);
      EXPECT_EQ(r.max_staleness, 2u);
      EXPECT_EQ(client.versions()[0], 2u);
      EXPECT_EQ(params[0], 2.0f);
      EXPECT_EQ(client.versions_behind(1), 0u);
      r = client.push(1, grad, params);
      EXPECT_EQ(r.n_dropped, 0);
      EXPECT_EQ(r.max_staleness, 0u);
      std::fill(params.begin(), params.end(), -1.0f);
      client.pull(params);
      EXPECT_EQ(params[kParams - 1], 3.0f);
      EXPECT_EQ(client.versions()[0], 3u);
      client.done();
    }
  });
  EXPECT_EQ(stats.applied, 3u);
  EXPECT_EQ(stats.dropped, 1u);
  EXPECT_EQ(stats.max_applied_staleness, 0u);
  EXPECT_EQ(shard[0], 3.0f);
}

// Client 3 stays silent (as if frozen) until clients 1 and 2 have finished all their pushes:
// the server must serve them meanwhile.
TEST(ParameterServer, SilentClientDelaysNobody) {
  constexpr size_t kParams = 100;
  constexpr int kPushes = 25;
  LoopbackFabric fabric(4);
  std::vector<float> shard(kParams, 0.0f);
  std::promise<void> others_done_1, others_done_2;
  std::future<void> f1 = others_done_1.get_future(), f2 = others_done_2.get_future();
  std::vector<uint64_t> late_versions;
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    const ShardLayout layout(kParams, 1);
    std::vector<float> params(kParams, 0.0f), grad(kParams, 1.0f);
    if (t.rank() == 0) {
      ParameterServer ps(
          ctx, shard, {1, 2, 3}, {},
          [&](std::span<const float> g, const RequestEvent&) { add_into(shard, g); });
      ps.run();
    } else if (t.rank() < 3) {
      ParameterClient client(ctx, layout, {0});
      for (int step = 0; step < kPushes; ++step) client.push(step, grad, params);
      (t.rank() == 1 ? others_done_1 : others_done_2).set_value();
      client.done();
    } else {
      f1.wait();
      f2.wait();
      ParameterClient client(ctx, layout, {0});
      late_versions.push_back(client.versions_behind(0));
      const PushResult r = client.push(0, grad, params);
      late_versions.push_back(r.max_staleness);
      client.done();
    }
  });
  EXPECT_EQ(late_versions, (std::vector<uint64_t>{2 * kPushes, 2 * kPushes}));
  EXPECT_EQ(shard[0], float(2 * kPushes + 1));
}

TEST(ParameterServer, PushFromTheFutureIsCommError) {
  LoopbackFabric fabric(2);
  std::vector<float> shard(8, 0.0f);
  EXPECT_THROW(run_on_ranks(fabric,
                            [&](Transport& t) {
                              Context ctx(t, 5s);
                              if (t.rank() == 0) {
                                ParameterServer ps(
                                    ctx, shard, {1}, {},
                                    [&](std::span<const float>, const RequestEvent&) {});
                                ps.run();
                              } else {
                                // A client claiming version 5 of a shard still at version 0.
                                const PsRequest bad{.kind = PsRequestKind::kPush, .version = 5};
                                std::vector<float> grad(8, 0.0f);
                                Request a = ctx.isend(0, OpKind::kParameterServer, 0,
                                                      std::as_bytes(std::span(&bad, 1)));
                                Request b = ctx.isend(0, OpKind::kParameterServer, 1,
                                                      std::as_bytes(std::span(grad)));
                                t.wait(a, ctx.deadline());
                                t.wait(b, ctx.deadline());
                                PsReply reply;
                                Request c = ctx.irecv(0, OpKind::kParameterServer, 0,
                                                      std::as_writable_bytes(std::span(&reply, 1)));
                                t.wait(c, ctx.deadline());  // released by the fabric's abort
                              }
                            }),
               CommError);
}

TEST(ParameterServer, ShareShardsGivesEveryRankTheServersParameters) {
  constexpr size_t kParams = 1003;
  for (int servers : {1, 2, 3}) {
    constexpr int kRanks = 5;
    LoopbackFabric fabric(kRanks);
    std::vector<std::vector<float>> params(kRanks, std::vector<float>(kParams, -1.0f));
    const ShardLayout layout(kParams, servers);
    for (int s = 0; s < servers; ++s) {
      std::span<float> mine = layout.slice(std::span<float>(params[size_t(s)]), s);
      for (size_t i = 0; i < mine.size(); ++i) mine[i] = float(layout.offset(s) + i);
    }
    run_on_ranks(fabric, [&](Transport& t) {
      Context ctx(t, 20s);
      share_shards(ctx, layout, params[size_t(t.rank())]);
    });
    std::vector<float> expected(kParams);
    std::iota(expected.begin(), expected.end(), 0.0f);
    for (int r = 0; r < kRanks; ++r) {
      EXPECT_EQ(first_difference(params[size_t(r)], expected), -1)
          << "servers " << servers << " rank " << r;
    }
  }
}

TEST(ParameterServer, GatherServerStatsCollectsEveryServerOnRoot) {
  LoopbackFabric fabric(4);
  std::vector<ServerStats> got;
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    ServerStats mine;
    if (t.rank() < 3) {
      mine.applied = 10 + uint64_t(t.rank());
      mine.dropped = uint64_t(t.rank());
      mine.max_applied_staleness = uint64_t(t.rank());
      mine.staleness_counts.assign(size_t(t.rank()) + 1, 7);
    }
    std::vector<ServerStats> all = gather_server_stats(ctx, 3, 0, mine);
    if (t.rank() == 0) {
      got = all;
    } else {
      EXPECT_TRUE(all.empty()) << "rank " << t.rank();
    }
  });
  ASSERT_EQ(got.size(), 3u);
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(got[size_t(s)].applied, 10u + uint64_t(s)) << "server " << s;
    EXPECT_EQ(got[size_t(s)].dropped, uint64_t(s)) << "server " << s;
    EXPECT_EQ(got[size_t(s)].staleness_counts, std::vector<uint64_t>(size_t(s) + 1, 7))
        << "server " << s;
  }
}

}  // namespace
}  // namespace resync::collectives
