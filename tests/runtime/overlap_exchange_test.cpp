// OverlapExchange over the loopback transport (ranks as threads): buckets cut from the layer
// layout alone, sent as the backward pass reports finished layers, summed exactly, the same on
// every rank; and a step without every rank refused.
#include "runtime/train/overlap_exchange.h"

#include <gtest/gtest.h>

#include <vector>

#include "base/error.h"
#include "collectives/transport/context.h"
#include "collectives/transport/loopback_transport.h"

namespace resync::runtime {
namespace {

constexpr size_t kParams = 1000;
// Where each simulated layer's parameters begin; the backward pass reports them last first.
const std::vector<size_t> kLayerOffsets = {0, 100, 350};

TEST(OverlapExchange, BucketsFollowTheBackwardPassAndSumOnEveryRank) {
  constexpr int kWorld = 3;
  collectives::LoopbackFabric fabric(kWorld);
  std::vector<std::vector<float>> results(kWorld);
  std::vector<size_t> buckets(kWorld);
  collectives::run_on_ranks(fabric, [&](collectives::Transport& transport) {
    const int rank = transport.rank();
    collectives::Context ctx(transport, std::chrono::milliseconds(20'000));
    collectives::Allreducer allreducer(ctx, {.ring = {.segment_bytes = 64}, .max_elems = kParams});
    std::vector<float> grads(kParams);
    OverlapExchange exchange(allreducer, grads, kWorld, /*bucket_elems=*/200);
    for (uint64_t step = 0; step < 3; ++step) {
      const uint64_t seq = step * StepExecutor::kAttemptsPerStep;
      exchange.begin_step(seq);
      // Backward: the last layer's gradients first, each final once its layer is done.
      for (size_t l = kLayerOffsets.size(); l-- > 0;) {
        const size_t end = l + 1 < kLayerOffsets.size() ? kLayerOffsets[l + 1] : kParams;
        for (size_t i = kLayerOffsets[l]; i < end; ++i) {
          grads[i] = static_cast<float>((rank + 1) * (i % 13) + step);
        }
        exchange.gradients_final(kLayerOffsets[l]);
      }
      const std::vector<int> all = {0, 1, 2};
      exchange.allreduce_sum(all, seq);
      for (size_t i = 0; i < kParams; ++i) {
        const float expected = static_cast<float>(6 * (i % 13) + 3 * step);
        ASSERT_EQ(grads[i], expected) << "rank " << rank << " step " << step << " index " << i;
      }
    }
    results[static_cast<size_t>(rank)] = grads;
    buckets[static_cast<size_t>(rank)] = exchange.last_buckets();
    // A step without every rank cannot have been overlapped: refused, not summed wrongly.
    exchange.begin_step(99 * StepExecutor::kAttemptsPerStep);
    const std::vector<int> some = {0, 1};
    EXPECT_THROW(exchange.allreduce_sum(some, 99 * StepExecutor::kAttemptsPerStep), CommError);
  });
  // [350, 1000) after the last layer, [100, 350) after the middle one (250 >= 200), and the
  // first layer's 100 floats by allreduce_sum.
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_EQ(buckets[static_cast<size_t>(r)], 3u) << "rank " << r;
    EXPECT_EQ(results[static_cast<size_t>(r)], results[0]) << "rank " << r;
  }
}

}  // namespace
}  // namespace resync::runtime
