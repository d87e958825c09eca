// The all-reduce phase observer over the loopback transport: the ring reports reduce-scatter
// then all-gather (and the reduce-scatter ends only once this rank's chunk is fully summed),
// other paths report one "allreduce" phase, nothing is reported without an exchange, and a
// call that times out still closes its open phase.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <numeric>
#include <string>
#include <vector>

#include "base/error.h"
#include "collectives/allreduce/allreducer.h"
#include "collectives/transport/context.h"
#include "collectives/transport/loopback_transport.h"
#include "collectives/allreduce/ring_allreduce.h"
#include "ring_test_util.h"
#include "runtime/observe/timeline.h"

namespace resync::collectives {
namespace {

using namespace std::chrono_literals;
using test::expect_sum_of;
using test::fill_input;
using test::first_bitwise_difference;

struct Call {
  bool begin;
  AllreducePhase phase;
  uint64_t seq;
  size_t n_elems;
  int n_participants;
};

// Records every callback and snapshots the buffer when each phase ends.
class RecordingObserver : public PhaseObserver {
 public:
  explicit RecordingObserver(std::span<const float> data = {}) : data_(data) { calls.reserve(64); }
  void phase_begin(const PhaseEvent& e) noexcept override {
    calls.push_back({true, e.phase, e.seq, e.n_elems, e.n_participants});
  }
  void phase_end(const PhaseEvent& e) noexcept override {
    calls.push_back({false, e.phase, e.seq, e.n_elems, e.n_participants});
    if (e.phase == AllreducePhase::kReduceScatter)
      after_reduce_scatter.assign(data_.begin(), data_.end());
    if (e.phase == AllreducePhase::kAllGather) after_all_gather.assign(data_.begin(), data_.end());
  }

  std::vector<Call> calls;
  std::vector<float> after_reduce_scatter;
  std::vector<float> after_all_gather;

 private:
  std::span<const float> data_;
};

std::string describe(const std::vector<Call>& calls) {
  std::string s;
  for (const Call& c : calls) {
    s += std::string(c.begin ? "begin " : "end ") + phase_name(c.phase) + " seq " +
         std::to_string(c.seq) + "; ";
  }
  return s.empty() ? "(no calls)" : s;
}

// Expects exactly begin/end of each phase in order, with the call's seq, count and ring size.
void expect_calls(const std::vector<Call>& calls, std::vector<AllreducePhase> phases, uint64_t seq,
                  size_t n_elems, int p, int rank) {
  ASSERT_EQ(calls.size(), 2 * phases.size()) << "rank " << rank << ": " << describe(calls);
  for (size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    EXPECT_EQ(c.begin, i % 2 == 0) << "rank " << rank << " call " << i << ": " << describe(calls);
    EXPECT_EQ(c.phase, phases[i / 2])
        << "rank " << rank << " call " << i << ": " << describe(calls);
    EXPECT_EQ(c.seq, seq) << "rank " << rank << " call " << i;
    EXPECT_EQ(c.n_elems, n_elems) << "rank " << rank << " call " << i;
    EXPECT_EQ(c.n_participants, p) << "rank " << rank << " call " << i;
  }
}

std::vector<int> all_ranks(int n) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

// The chunk of position `pos` in a ring of p over n elements (RingAllreduce's split).
std::pair<size_t, size_t> chunk(size_t n, int p, int pos) {
  const size_t base = n / p;
  const size_t rem = n % p;
  const size_t c = static_cast<size_t>(pos);
  return {c * base + std::min(c, rem), base + (c < rem ? 1 : 0)};
}

TEST(PhaseObserver, RingReportsReduceScatterThenAllGather) {
  for (int world : {2, 3, 4, 5}) {
    for (size_t n : {size_t{1}, size_t{3}, size_t{17}, size_t{1000}}) {
      SCOPED_TRACE("world " + std::to_string(world) + ", " + std::to_string(n) + " elems");
      LoopbackFabric fabric(world);
      std::vector<RecordingObserver> observers(world);
      std::vector<std::vector<float>> results(world);
      const std::vector<int> everyone = all_ranks(world);
      run_on_ranks(fabric, [&](Transport& t) {
        Context ctx(t, 20s);
        RingAllreduce ring(ctx, RingOptions{.segment_bytes = 64});  // many segments
        std::vector<float> data(n);
        fill_input(data, t.rank());
        observers[t.rank()] = RecordingObserver(data);
        ring.set_phase_observer(&observers[t.rank()]);
        ring.allreduce_sum(data, everyone, 9);
        results[t.rank()] = std::move(data);
      });
      for (int r = 0; r < world; ++r) {
        const RecordingObserver& o = observers[r];
        expect_calls(o.calls, {AllreducePhase::kReduceScatter, AllreducePhase::kAllGather}, 9, n,
                     world, r);
        expect_sum_of(results[r], everyone, r);
        // When the reduce-scatter ends, the chunk this rank owns (position r+1) is final.
        const auto [begin, len] = chunk(n, world, (r + 1) % world);
        ASSERT_EQ(o.after_reduce_scatter.size(), n) << "rank " << r;
        for (size_t i = begin; i < begin + len; ++i) {
          EXPECT_EQ(o.after_reduce_scatter[i], results[r][i])
              << "rank " << r << " index " << i << " not yet summed when reduce_scatter ended";
        }
        EXPECT_EQ(first_bitwise_difference(o.after_all_gather, results[r]), -1)
            << "rank " << r << ": buffer still changed after all_gather ended";
      }
    }
  }
}

TEST(PhaseObserver, NoExchangeNoCallsAndOutsidersAreNotCalled) {
  LoopbackFabric fabric(4);
  std::vector<RecordingObserver> observers(4);
  std::vector<RecordingObserver> unset(4);
  const std::vector<int> pair = {0, 2};
  run_on_ranks(fabric, [&](Transport& t) {
    Context ctx(t, 20s);
    RingAllreduce ring(ctx);
    RecordingObserver& o = observers[t.rank()];
    ring.set_phase_observer(&o);
    std::vector<float> empty;
    ring.allreduce_sum(empty, all_ranks(4), 1);  // no data
    std::vector<float> data(10);
    const std::vector<int> alone = {t.rank()};
    ring.allreduce_sum(data, alone, 2);  // one participant
    if (t.rank() == 0 || t.rank() == 2) ring.allreduce_sum(data, pair, 3);
    ring.set_phase_observer(nullptr);  // off again: the next call reports nothing
    ring.allreduce_sum(data, all_ranks(4), 4);
  });
  for (int r : {1, 3})
    EXPECT_TRUE(observers[r].calls.empty()) << "rank " << r << ": " << describe(observers[r].calls);
  for (int r : pair) {
    expect_calls(observers[r].calls, {AllreducePhase::kReduceScatter, AllreducePhase::kAllGather},
                 3, 10, 2, r);
  }
}

TEST(PhaseObserver, TimedOutCallStillClosesItsPhase) {
  LoopbackFabric fabric(3);
  std::vector<RecordingObserver> observers(3);
  std::vector<int> timed_out(3, 0);
  run_on_ranks(fabric, [&](Transport& t) {
    if (t.rank() == 2) return;  // never shows up
    Context ctx(t, 150ms);
    RingAllreduce ring(ctx, RingOptions{.segment_bytes = 64});
    ring.set_phase_observer(&observers[t.rank()]);
    std::vector<float> data(1000);
    try {
      ring.allreduce_sum(data, all_ranks(3), 41);
    } catch (const TimeoutError&) {
      timed_out[t.rank()] = 1;
    }
  });
  for (int r : {0, 1}) {
    const std::vector<Call>& calls = observers[r].calls;
    EXPECT_EQ(timed_out[r], 1) << "rank " << r << " did not time out";
    ASSERT_FALSE(calls.empty()) << "rank " << r;
    int open = 0;
    for (const Call& c : calls) {
      open += c.begin ? 1 : -1;
      EXPECT_TRUE(open == 0 || open == 1) << "rank " << r << ": " << describe(calls);
    }
    EXPECT_EQ(open, 0) << "rank " << r << " left a phase open: " << describe(calls);
    EXPECT_EQ(calls.front().phase, AllreducePhase::kReduceScatter) << "rank " << r;
  }
}

TEST(PhaseObserver, AllreducerReportsRingPhasesOrOneWholePhase) {
  struct Case {
    std::optional<AllreducePath> force;
    size_t n_elems;
    std::vector<AllreducePhase> phases;
  };
  const std::vector<Case> cases = {
      {AllreducePath::kSmall, 100, {AllreducePhase::kWhole}},
      {std::nullopt, 100, {AllreducePhase::kWhole}},  // small enough for the direct exchange
      {std::nullopt, 20'000, {AllreducePhase::kReduceScatter, AllreducePhase::kAllGather}},
      {AllreducePath::kRing, 100, {AllreducePhase::kReduceScatter, AllreducePhase::kAllGather}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::to_string(c.n_elems) + " elems, forced " +
                 (c.force ? path_name(*c.force) : "-"));
    LoopbackFabric fabric(3);
    std::vector<RecordingObserver> observers(3);
    std::vector<std::vector<float>> results(3);
    run_on_ranks(fabric, [&](Transport& t) {
      Context ctx(t, 20s);
      Allreducer allreducer(ctx, {.use_shm = ShmUse::kOff, .force = c.force});
      allreducer.set_phase_observer(&observers[t.rank()]);
      std::vector<float> data(c.n_elems);
      fill_input(data, t.rank());
      allreducer.allreduce_sum(data, all_ranks(3), 5);
      const std::vector<int> alone = {t.rank()};
      allreducer.allreduce_sum(data, alone, 6);  // local: nothing reported
      results[t.rank()] = std::move(data);
    });
    for (int r = 0; r < 3; ++r) {
      expect_calls(observers[r].calls, c.phases, 5, c.n_elems, 3, r);
      expect_sum_of(results[r], all_ranks(3), r);
    }
  }
}

TEST(PhaseObserver, PhaseRecorderPutsRingPhasesOnTheTimeline) {
  LoopbackFabric fabric(3);
  std::vector<std::vector<std::string>> names(3);
  std::vector<std::vector<int64_t>> steps(3);
  run_on_ranks(fabric, [&](Transport& t) {
    const std::string path =
        (std::filesystem::temp_directory_path() / ("resync_observe_" + std::to_string(getpid()) +
                                                   "_ring" + std::to_string(t.rank()) + ".json"))
            .string();
    runtime::Timeline timeline(path, t.rank());
    runtime::PhaseRecorder recorder(timeline, 16);
    Context ctx(t, 20s);
    RingAllreduce ring(ctx);
    ring.set_phase_observer(&recorder);
    std::vector<float> data(1000);
    for (uint64_t step = 0; step < 3; ++step) ring.allreduce_sum(data, all_ranks(3), step * 16);
    for (const auto& e : timeline.events()) {
      EXPECT_EQ(e.lane, runtime::Lane::kCollectives) << "rank " << t.rank();
      names[t.rank()].push_back(e.name.data());
      steps[t.rank()].push_back(e.step);
    }
    timeline.finish();
    std::filesystem::remove(path);
  });
  const std::vector<std::string> want_names = {"reduce_scatter", "all_gather",     "reduce_scatter",
                                               "all_gather",     "reduce_scatter", "all_gather"};
  const std::vector<int64_t> want_steps = {0, 0, 1, 1, 2, 2};
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(names[r], want_names) << "rank " << r;
    EXPECT_EQ(steps[r], want_steps) << "rank " << r;
  }
}

}  // namespace
}  // namespace resync::collectives
