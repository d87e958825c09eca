// Timeline: a per-rank recorder of Chrome-trace "complete" events (compute, waits, ring phases,
// catch-up, checkpoint), written as JSON that Perfetto / chrome://tracing open.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "collectives/allreduce/ring_allreduce.h"

namespace resync::runtime {

// The track (Chrome-trace "tid") an event is drawn on. Spans on one lane must nest, never
// overlap partially, so the collectives' phases have a lane of their own.
enum class Lane : uint8_t {
  kTrain = 1,        // the training loop: compute, wait_plan, catch_up, checkpoint, eval
  kCollectives = 2,  // phases inside the all-reduce: reduce_scatter, all_gather, allreduce
};

// "train", "collectives" (the thread_name shown for the lane).
const char* lane_name(Lane lane);

// One integer argument of an event besides the step (shown under "args" in the viewer).
struct TraceArg {
  const char* key = nullptr;  // a string literal; nullptr: no argument
  int64_t value = 0;
};

struct TimelineOptions {
  // Events kept at most; the memory is reserved up front (~80 bytes an event) and later
  // events are only counted (otherData.dropped_events).
  size_t max_events = 100'000;
};

// FILE.rank<N>.json, the file of rank N for --timeline FILE.
std::string timeline_path(const std::string& file, int rank);

// One rank's timeline. Disabled (default-constructed, or an empty path) it records nothing,
// and every call returns at once: no clock read, no allocation. Enabled, it holds at most
// options.max_events events in memory and writes them at finish() or, if the run failed
// before that, from the destructor (best effort). Timestamps come from steady_clock; the
// file records the system_clock time of its zero so that timeline_merge can put ranks on one
// axis. Not thread-safe: one thread (the training loop) records.
class Timeline {
 public:
  using Clock = std::chrono::steady_clock;

  class Span;

  Timeline();
  // Opens `path` for writing at once, so a bad path fails at start-up (InvalidArgument), not
  // after training. An empty path gives a disabled timeline.
  Timeline(const std::string& path, int rank, TimelineOptions options = {});
  ~Timeline();
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;

  bool enabled() const { return file_ != nullptr; }
  const std::string& path() const { return path_; }

  // A span from now until the returned object ends (destruction or end()). `name` must stay
  // valid until then (a literal); it is copied when the span ends, truncated to 31 bytes.
  // step < 0: no step argument.
  [[nodiscard]] Span span(std::string_view name, int64_t step = -1, Lane lane = Lane::kTrain,
                          TraceArg arg = {});

  // For spans that cross code: begin() is the start time (a default time point when
  // disabled, without reading the clock), end() records [begin, now].
  Clock::time_point begin() const { return enabled() ? Clock::now() : Clock::time_point(); }
  void end(std::string_view name, Clock::time_point begin, int64_t step = -1,
           Lane lane = Lane::kTrain, TraceArg arg = {});

  // Records an interval the caller already measured (no clock read here).
  void record(std::string_view name, Clock::time_point begin, Clock::time_point end,
              int64_t step = -1, Lane lane = Lane::kTrain, TraceArg arg = {});

  // One recorded span (what the file's "X" events are made of).
  struct Event {
    int64_t begin_ns;  // since the timeline's origin
    int64_t dur_ns;
    int64_t step;
    TraceArg arg;
    Lane lane;
    std::array<char, 32> name;  // NUL-terminated
  };
  // In recording order (sorted by start once written).
  std::span<const Event> events() const { return events_; }
  size_t n_events() const { return events_.size(); }
  uint64_t n_dropped() const { return n_dropped_; }

  // Writes the file and closes it; later records are ignored. Throws Error if writing fails.
  // Called once; the destructor does it (silently) when nobody did.
  void finish();

 private:
  struct FileCloser {
    void operator()(std::FILE* f) const;
  };

  // finished = false marks a file written from the destructor (the run failed).
  void write_all(bool finished);

  std::string path_;
  int rank_ = 0;
  size_t max_events_ = 0;
  std::unique_ptr<std::FILE, FileCloser> file_;
  Clock::time_point origin_{};
  int64_t origin_unix_us_ = 0;  // system_clock at origin_, microseconds since the epoch
  std::vector<Event> events_;
  uint64_t n_dropped_ = 0;
};

// RAII span of a Timeline; move-only. Ends at destruction unless ended before.
class Timeline::Span {
 public:
  Span() = default;
  Span(Span&& other) noexcept { *this = std::move(other); }
  Span& operator=(Span&& other) noexcept;
  ~Span() { end(); }

  // Records the span now (once); later calls do nothing.
  void end();

 private:
  friend class Timeline;
  Span(Timeline* timeline, std::string_view name, int64_t step, Lane lane, TraceArg arg)
      : timeline_(timeline),
        name_(name),
        step_(step),
        lane_(lane),
        arg_(arg),
        begin_(Clock::now()) {}

  Timeline* timeline_ = nullptr;  // nullptr: disabled or already ended
  std::string_view name_;
  int64_t step_ = -1;
  Lane lane_ = Lane::kTrain;
  TraceArg arg_;
  Clock::time_point begin_{};
};

// Rank `rank`'s timeline for --timeline `file`: writing FILE.rank<N>.json, or disabled when
// `file` is empty. Throws InvalidArgument if the file cannot be created.
std::unique_ptr<Timeline> make_timeline(const std::string& file, int rank,
                                        TimelineOptions options = {});

inline Timeline::Span Timeline::span(std::string_view name, int64_t step, Lane lane, TraceArg arg) {
  if (!enabled()) return Span();
  return Span(this, name, step, lane, arg);
}

// Records the all-reduce phases reported by a RingAllreduce / Allreducer on the collectives
// lane: names from collectives::phase_name, step = seq / seqs_per_step, args attempt = seq %
// seqs_per_step (the training loop gives each attempt of a step its own seq). Set it on the
// collective only when the timeline is enabled, so a run without --timeline pays nothing.
class PhaseRecorder : public collectives::PhaseObserver {
 public:
  explicit PhaseRecorder(Timeline& timeline, uint64_t seqs_per_step = 1);

  void phase_begin(const collectives::PhaseEvent& event) noexcept override;
  void phase_end(const collectives::PhaseEvent& event) noexcept override;

 private:
  Timeline& timeline_;
  uint64_t seqs_per_step_;
  std::array<Timeline::Clock::time_point, 3> begin_{};  // per AllreducePhase
};

}  // namespace resync::runtime
