#include "runtime/observe/timeline.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <iterator>
#include <utility>

#include "base/error.h"
#include "base/log.h"

namespace resync::runtime {

namespace {

constexpr Lane kLanes[] = {Lane::kTrain, Lane::kCollectives};

// Writes `text` as the body of a JSON string (without the quotes).
void append_json_string(fmt::memory_buffer& out, std::string_view text) {
  for (char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (u < 0x20) {
      fmt::format_to(std::back_inserter(out), "\\u{:04x}", static_cast<unsigned>(u));
    } else {
      out.push_back(c);
    }
  }
}

// Microseconds with nanosecond digits, as Chrome-trace "ts"/"dur" allow.
void append_us(fmt::memory_buffer& out, int64_t ns) {
  if (ns < 0) {
    out.push_back('-');
    ns = -ns;
  }
  fmt::format_to(std::back_inserter(out), "{}.{:03}", ns / 1000, ns % 1000);
}

int64_t ns_between(Timeline::Clock::time_point a, Timeline::Clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count();
}

}  // namespace

const char* lane_name(Lane lane) {
  switch (lane) {
    case Lane::kTrain:
      return "train";
    case Lane::kCollectives:
      return "collectives";
  }
  return "?";
}

std::string timeline_path(const std::string& file, int rank) {
  return fmt::format("{}.rank{}.json", file, rank);
}

std::unique_ptr<Timeline> make_timeline(const std::string& file, int rank,
                                        TimelineOptions options) {
  if (file.empty()) return std::make_unique<Timeline>();
  return std::make_unique<Timeline>(timeline_path(file, rank), rank, options);
}

void Timeline::FileCloser::operator()(std::FILE* f) const { std::fclose(f); }

Timeline::Timeline() = default;

Timeline::Timeline(const std::string& path, int rank, TimelineOptions options)
    : path_(path), rank_(rank), max_events_(options.max_events) {
  if (path.empty()) return;
  file_.reset(std::fopen(path.c_str(), "w"));
  RESYNC_CHECK_ARG(file_ != nullptr,
                   fmt::format("--timeline: cannot write {}: {}", path, std::strerror(errno)));
  events_.reserve(max_events_);
  // The system time of the steady origin, read between two steady readings, so that ranks
  // line up to within the (microseconds) gap between them plus the hosts' clock offsets.
  const Clock::time_point before = Clock::now();
  const auto unix_now = std::chrono::system_clock::now();
  const Clock::time_point after = Clock::now();
  origin_ = before + (after - before) / 2;
  origin_unix_us_ =
      std::chrono::duration_cast<std::chrono::microseconds>(unix_now.time_since_epoch()).count();
}

Timeline::~Timeline() {
  if (!enabled()) return;
  try {
    write_all(false);
  } catch (const std::exception& e) {
    log::get("train")->warn("timeline {} not written: {}", path_, e.what());
  } catch (...) {
  }
  file_.reset();
}

void Timeline::end(std::string_view name, Clock::time_point begin, int64_t step, Lane lane,
                   TraceArg arg) {
  if (!enabled()) return;
  record(name, begin, Clock::now(), step, lane, arg);
}

void Timeline::record(std::string_view name, Clock::time_point begin, Clock::time_point end,
                      int64_t step, Lane lane, TraceArg arg) {
  if (!enabled()) return;
  if (events_.size() >= max_events_) {
    ++n_dropped_;
    return;
  }
  Event& e = events_.emplace_back();
  e.begin_ns = ns_between(origin_, begin);
  e.dur_ns = std::max<int64_t>(0, ns_between(begin, end));
  e.step = step;
  e.arg = arg;
  e.lane = lane;
  const size_t n = std::min(name.size(), e.name.size() - 1);
  std::memcpy(e.name.data(), name.data(), n);
  e.name[n] = '\0';
}

void Timeline::finish() {
  if (!enabled()) return;
  write_all(true);  // on failure the destructor does not try again: file_ is closed below
  const int rc = std::fclose(file_.release());
  if (rc != 0) {
    throw Error(fmt::format("timeline {}: closing failed: {}", path_, std::strerror(errno)));
  }
}

void Timeline::write_all(bool finished) {
  std::FILE* f = file_.get();
  // Parents before children at equal start, which viewers draw more reliably.
  std::sort(events_.begin(), events_.end(), [](const Event& a, const Event& b) {
    return a.begin_ns != b.begin_ns ? a.begin_ns < b.begin_ns : a.dur_ns > b.dur_ns;
  });

  fmt::memory_buffer out;
  bool write_failed = false;
  const auto flush = [&] {
    if (out.size() > 0 && std::fwrite(out.data(), 1, out.size(), f) != out.size()) {
      write_failed = true;
    }
    out.clear();
  };
  auto it = std::back_inserter(out);
  fmt::format_to(it, "{{\"traceEvents\":[\n");
  fmt::format_to(it,
                 "{{\"ph\":\"M\",\"pid\":{0},\"tid\":0,\"name\":\"process_name\","
                 "\"args\":{{\"name\":\"rank {0}\"}}}},\n"
                 "{{\"ph\":\"M\",\"pid\":{0},\"tid\":0,\"name\":\"process_sort_index\","
                 "\"args\":{{\"sort_index\":{0}}}}}",
                 rank_);
  for (Lane lane : kLanes) {
    const int tid = static_cast<int>(lane);
    fmt::format_to(it,
                   ",\n{{\"ph\":\"M\",\"pid\":{0},\"tid\":{1},\"name\":\"thread_name\","
                   "\"args\":{{\"name\":\"{2}\"}}}},\n"
                   "{{\"ph\":\"M\",\"pid\":{0},\"tid\":{1},\"name\":\"thread_sort_index\","
                   "\"args\":{{\"sort_index\":{1}}}}}",
                   rank_, tid, lane_name(lane));
  }
  for (const Event& e : events_) {
    fmt::format_to(it, ",\n{{\"ph\":\"X\",\"pid\":{},\"tid\":{},\"name\":\"", rank_,
                   static_cast<int>(e.lane));
    append_json_string(out, e.name.data());
    fmt::format_to(it, "\",\"cat\":\"{}\",\"ts\":", lane_name(e.lane));
    append_us(out, e.begin_ns);
    fmt::format_to(it, ",\"dur\":");
    append_us(out, e.dur_ns);
    if (e.step >= 0 || e.arg.key != nullptr) {
      fmt::format_to(it, ",\"args\":{{");
      if (e.step >= 0) fmt::format_to(it, "\"step\":{}", e.step);
      if (e.arg.key != nullptr) {
        fmt::format_to(it, "{}\"", e.step >= 0 ? "," : "");
        append_json_string(out, e.arg.key);
        fmt::format_to(it, "\":{}", e.arg.value);
      }
      out.push_back('}');
    }
    out.push_back('}');
    if (out.size() >= 64 * 1024) flush();
  }
  fmt::format_to(it,
                 "\n],\n\"displayTimeUnit\":\"ms\",\n\"otherData\":{{\"rank\":{},"
                 "\"clock\":\"steady\",\"origin_unix_us\":{},\"events\":{},"
                 "\"dropped_events\":{},\"max_events\":{},\"finished\":{}}}}}\n",
                 rank_, origin_unix_us_, events_.size(), n_dropped_, max_events_, finished);
  flush();
  if (std::fflush(f) != 0) write_failed = true;
  if (write_failed) {
    const int err = errno;
    file_.reset();
    throw Error(fmt::format("timeline {}: write failed: {}", path_, std::strerror(err)));
  }
}

Timeline::Span& Timeline::Span::operator=(Span&& other) noexcept {
  if (this != &other) {
    end();
    timeline_ = std::exchange(other.timeline_, nullptr);
    name_ = other.name_;
    step_ = other.step_;
    lane_ = other.lane_;
    arg_ = other.arg_;
    begin_ = other.begin_;
  }
  return *this;
}

void Timeline::Span::end() {
  if (timeline_ == nullptr) return;
  timeline_->record(name_, begin_, Clock::now(), step_, lane_, arg_);
  timeline_ = nullptr;
}

PhaseRecorder::PhaseRecorder(Timeline& timeline, uint64_t seqs_per_step)
    : timeline_(timeline), seqs_per_step_(std::max<uint64_t>(1, seqs_per_step)) {}

void PhaseRecorder::phase_begin(const collectives::PhaseEvent& event) noexcept {
  if (!timeline_.enabled()) return;
  begin_[static_cast<size_t>(event.phase)] = Timeline::Clock::now();
}

void PhaseRecorder::phase_end(const collectives::PhaseEvent& event) noexcept {
  if (!timeline_.enabled()) return;
  const TraceArg attempt =
      seqs_per_step_ > 1 ? TraceArg{"attempt", static_cast<int64_t>(event.seq % seqs_per_step_)}
                         : TraceArg{"elems", static_cast<int64_t>(event.n_elems)};
  timeline_.record(collectives::phase_name(event.phase), begin_[static_cast<size_t>(event.phase)],
                   Timeline::Clock::now(), static_cast<int64_t>(event.seq / seqs_per_step_),
                   Lane::kCollectives, attempt);
}

}  // namespace resync::runtime
