// Timeline: disabled costs nothing, events and their nesting, the overflow cap, the JSON file
// (written by finish() or, after a failure, by the destructor) and the phase recorder.
#include "runtime/observe/timeline.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

#include "alloc_counter.h"
#include "base/error.h"

namespace resync::runtime {
namespace {

using namespace std::chrono_literals;
using collectives::test::start_counting_allocations;
using collectives::test::stop_counting_allocations;

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("resync_observe_" + std::to_string(getpid()) + "_" + name))
      .string();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

size_t count_of(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos;
       pos = text.find(needle, pos + needle.size())) {
    ++n;
  }
  return n;
}

std::string name_of(const Timeline::Event& e) { return e.name.data(); }

TEST(Timeline, PathPerRank) { EXPECT_EQ(timeline_path("out/trace", 3), "out/trace.rank3.json"); }

TEST(Timeline, MadeFromTheFlag) {
  EXPECT_FALSE(make_timeline("", 0)->enabled());
  const std::string file = temp_path("flag");
  std::unique_ptr<Timeline> t = make_timeline(file, 4);
  EXPECT_TRUE(t->enabled());
  EXPECT_EQ(t->path(), file + ".rank4.json");
  t->finish();
  EXPECT_TRUE(std::filesystem::exists(file + ".rank4.json"));
  std::filesystem::remove(file + ".rank4.json");
}

TEST(Timeline, DisabledRecordsNothingAndNeitherAllocatesNorWrites) {
  Timeline off;
  Timeline empty_path("", 2);
  for (Timeline* t : {&off, &empty_path}) {
    EXPECT_FALSE(t->enabled());
    start_counting_allocations();
    for (int step = 0; step < 100; ++step) {
      auto s = t->span("compute", step);
      const auto b = t->begin();
      t->end("wait_plan", b, step);
      t->record("eval", Timeline::Clock::now(), Timeline::Clock::now(), step);
    }
    const size_t n_allocs = stop_counting_allocations();
    EXPECT_EQ(n_allocs, 0u) << "a disabled timeline allocated";
    EXPECT_EQ(t->n_events(), 0u);
    EXPECT_EQ(t->n_dropped(), 0u);
    EXPECT_EQ(t->begin(), Timeline::Clock::time_point()) << "begin() read the clock";
    t->finish();  // no file, no error
  }
}

TEST(Timeline, EnabledRecordingDoesNotAllocate) {
  const std::string path = temp_path("noalloc.json");
  {
    Timeline t(path, 0, {.max_events = 64});
    start_counting_allocations();
    for (int step = 0; step < 100; ++step) {  // past the cap too
      auto s = t.span("compute", step);
    }
    const size_t n_allocs = stop_counting_allocations();
    EXPECT_EQ(n_allocs, 0u) << "recording allocated (events must be reserved up front)";
    EXPECT_EQ(t.n_events(), 64u);
  }
  std::filesystem::remove(path);
}

TEST(Timeline, SpansNestAndCarryStepAndLane) {
  const std::string path = temp_path("nest.json");
  Timeline t(path, 1);
  {
    auto outer = t.span("allreduce", 7);
    { auto inner = t.span("reduce_scatter", 7, Lane::kCollectives, {"attempt", 2}); }
    auto second = t.span("all_gather", 7, Lane::kCollectives);
    second.end();
    second.end();  // a second end records nothing
  }
  ASSERT_EQ(t.n_events(), 3u);
  // RAII: the inner spans end (and are recorded) before the outer one.
  const Timeline::Event& rs = t.events()[0];
  const Timeline::Event& ag = t.events()[1];
  const Timeline::Event& outer = t.events()[2];
  EXPECT_EQ(name_of(rs), "reduce_scatter");
  EXPECT_EQ(name_of(ag), "all_gather");
  EXPECT_EQ(name_of(outer), "allreduce");
  EXPECT_EQ(outer.lane, Lane::kTrain);
  EXPECT_EQ(rs.lane, Lane::kCollectives);
  EXPECT_EQ(rs.step, 7);
  EXPECT_STREQ(rs.arg.key, "attempt");
  EXPECT_EQ(rs.arg.value, 2);
  for (const Timeline::Event* child : {&rs, &ag}) {
    EXPECT_GE(child->begin_ns, outer.begin_ns) << name_of(*child) << " starts before its parent";
    EXPECT_LE(child->begin_ns + child->dur_ns, outer.begin_ns + outer.dur_ns)
        << name_of(*child) << " ends after its parent";
  }
  EXPECT_LE(rs.begin_ns + rs.dur_ns, ag.begin_ns) << "siblings overlap";
}

TEST(Timeline, MovedSpanIsRecordedOnce) {
  Timeline t(temp_path("move.json"), 0);
  {
    Timeline::Span a = t.span("checkpoint", 3);
    Timeline::Span b = std::move(a);
    a.end();  // moved-from: nothing
  }
  EXPECT_EQ(t.n_events(), 1u);
  std::filesystem::remove(t.path());
}

TEST(Timeline, ExplicitBeginEndAndRecordedIntervals) {
  Timeline t(temp_path("explicit.json"), 0);
  const auto b = t.begin();
  EXPECT_NE(b, Timeline::Clock::time_point());
  t.end("catch_up", b, 4);
  const auto t0 = Timeline::Clock::now();
  t.record("compute", t0, t0 + 5ms, 5);
  t.record("backwards", t0, t0 - 1ms, 5);  // a reversed interval is clamped, not negative
  ASSERT_EQ(t.n_events(), 3u);
  EXPECT_EQ(name_of(t.events()[0]), "catch_up");
  EXPECT_GE(t.events()[0].dur_ns, 0);
  EXPECT_EQ(t.events()[1].dur_ns, 5'000'000);
  EXPECT_EQ(t.events()[2].dur_ns, 0);
  // Long names are cut to fit the fixed event, not allocated.
  t.record(std::string(100, 'x'), t0, t0, -1);
  EXPECT_EQ(name_of(t.events()[3]), std::string(31, 'x'));
  std::filesystem::remove(t.path());
}

TEST(Timeline, OverflowIsCountedAndReported) {
  const std::string path = temp_path("overflow.json");
  Timeline t(path, 0, {.max_events = 3});
  for (int i = 0; i < 10; ++i)
    t.record("compute", Timeline::Clock::now(), Timeline::Clock::now(), i);
  EXPECT_EQ(t.n_events(), 3u);
  EXPECT_EQ(t.n_dropped(), 7u);
  t.finish();
  const std::string text = read_file(path);
  EXPECT_EQ(count_of(text, "\"ph\":\"X\""), 3u) << text;
  EXPECT_NE(text.find("\"dropped_events\":7"), std::string::npos) << text;
  EXPECT_NE(text.find("\"max_events\":3"), std::string::npos) << text;
  std::filesystem::remove(path);
}

TEST(Timeline, FileHasTraceEventsMetadataAndClockOrigin) {
  const std::string path = temp_path("file.json");
  Timeline t(path, 3);
  const auto t0 = Timeline::Clock::now();
  t.record("compute", t0 + 2ms, t0 + 3ms, 1);
  t.record("quote\"back\\slash\nline", t0, t0 + 1ms, -1);
  t.finish();
  t.record("after_finish", t0, t0, 2);  // ignored: the file is written
  const std::string text = read_file(path);
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(text.rfind("{\"traceEvents\":[", 0), 0u) << text;
  EXPECT_NE(text.find("\"displayTimeUnit\":\"ms\""), std::string::npos);
  EXPECT_NE(text.find("\"name\":\"process_name\",\"args\":{\"name\":\"rank 3\"}"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("\"name\":\"thread_name\",\"args\":{\"name\":\"train\"}"), std::string::npos);
  EXPECT_NE(text.find("\"name\":\"thread_name\",\"args\":{\"name\":\"collectives\"}"),
            std::string::npos);
  EXPECT_NE(text.find("\"otherData\":{\"rank\":3,"), std::string::npos) << text;
  EXPECT_NE(text.find("\"origin_unix_us\":"), std::string::npos);
  EXPECT_NE(text.find("\"finished\":true"), std::string::npos);
  EXPECT_NE(text.find("quote\\\"back\\\\slash\\u000aline"), std::string::npos) << text;
  EXPECT_EQ(text.find("after_finish"), std::string::npos);
  // Sorted by start: the escaped name (t0) comes before compute (t0 + 2 ms).
  EXPECT_LT(text.find("quote"), text.find("\"compute\"")) << text;
  EXPECT_NE(text.find("\"dur\":1000.000,\"args\":{\"step\":1}"), std::string::npos) << text;
  EXPECT_EQ(text.back(), '\n');
  std::filesystem::remove(path);
}

TEST(Timeline, DestructorWritesAfterAFailure) {
  const std::string path = temp_path("failed.json");
  try {
    Timeline t(path, 0);
    auto s = t.span("compute", 0);
    throw std::runtime_error("the run failed");
  } catch (const std::runtime_error&) {
  }
  const std::string text = read_file(path);
  EXPECT_NE(text.find("\"name\":\"compute\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"finished\":false"), std::string::npos) << text;
  std::filesystem::remove(path);
}

TEST(Timeline, UnwritablePathFailsAtConstruction) {
  EXPECT_THROW(Timeline("/nonexistent-dir-resync/trace.rank0.json", 0), InvalidArgument);
}

TEST(PhaseRecorder, RecordsPhasesOnTheCollectivesLaneWithStepAndAttempt) {
  Timeline t(temp_path("phases.json"), 0);
  PhaseRecorder rec(t, 16);
  using collectives::AllreducePhase;
  const uint64_t seq = 5 * 16 + 2;  // step 5, attempt 2
  rec.phase_begin({AllreducePhase::kReduceScatter, seq, 100, 3});
  rec.phase_end({AllreducePhase::kReduceScatter, seq, 100, 3});
  rec.phase_begin({AllreducePhase::kAllGather, seq, 100, 3});
  rec.phase_end({AllreducePhase::kAllGather, seq, 100, 3});
  rec.phase_begin({AllreducePhase::kWhole, 16, 4, 2});
  rec.phase_end({AllreducePhase::kWhole, 16, 4, 2});
  ASSERT_EQ(t.n_events(), 3u);
  EXPECT_EQ(name_of(t.events()[0]), "reduce_scatter");
  EXPECT_EQ(name_of(t.events()[1]), "all_gather");
  EXPECT_EQ(name_of(t.events()[2]), "allreduce");
  for (const auto& e : t.events()) EXPECT_EQ(e.lane, Lane::kCollectives);
  EXPECT_EQ(t.events()[0].step, 5);
  EXPECT_EQ(t.events()[0].arg.value, 2);
  EXPECT_EQ(t.events()[2].step, 1);
  EXPECT_EQ(t.events()[2].arg.value, 0);
  EXPECT_GE(t.events()[1].begin_ns, t.events()[0].begin_ns + t.events()[0].dur_ns);

  Timeline off;
  PhaseRecorder quiet(off);
  quiet.phase_begin({AllreducePhase::kWhole, 0, 1, 2});
  quiet.phase_end({AllreducePhase::kWhole, 0, 1, 2});
  EXPECT_EQ(off.n_events(), 0u);
  std::filesystem::remove(t.path());
}

}  // namespace
}  // namespace resync::runtime
