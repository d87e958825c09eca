// ProgressReporter: rank 0's progress of a training run, as one line rewritten in place on a
// terminal, or as a plain line every N seconds in a batch log.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <string_view>

#include "runtime/io/config.h"

namespace resync::runtime {

enum class ProgressMode : uint8_t {
  kOff,    // nothing
  kLive,   // one line, rewritten with '\r' at most every live_interval_s
  kLines,  // a plain line every every_s
};

// The mode for --progress `setting` ("auto", "live", "line", "off"): auto is kLive on a
// terminal and kLines otherwise; live forces the live line. Throws InvalidArgument otherwise.
ProgressMode progress_mode(std::string_view setting, bool is_terminal);

// What one update shows.
struct ProgressUpdate {
  uint64_t step = 0;  // steps completed
  uint64_t total_steps = 0;
  uint64_t epoch = 0;
  double loss = 0;  // latest training loss
  double samples_per_s = 0;
  uint64_t dropped = 0;  // gradients dropped so far
};

struct ProgressOptions {
  double every_s = 30;            // kLines: seconds between lines
  double live_interval_s = 0.25;  // kLive: least seconds between two rewrites
  // kLive: the terminal's columns; the line keeps below it (whole fields are left out from the
  // end), since a wrapped line cannot be rewritten with '\r'. 0: no limit.
  size_t live_width = 0;
};

// "h:mm:ss" of a non-negative number of seconds (rounded to the second); "-:--:--" when it is
// not finite or negative (not known yet).
std::string format_hms(double seconds);

// Not thread-safe. The clock is injected so that tests drive time; the ETA is the remaining
// steps at the average rate since the first update.
class ProgressReporter {
 public:
  using Clock = std::chrono::steady_clock;
  using NowFn = std::function<Clock::time_point()>;

  ProgressReporter(ProgressMode mode, std::ostream& out, ProgressOptions options = {},
                   NowFn now = &Clock::now);

  ProgressMode mode() const { return mode_; }

  // Cheap when nothing is due: one clock read and a comparison.
  void update(const ProgressUpdate& u);
  // Blanks the live line and returns to its start, so that a log line written next (rank 0's
  // epoch summary, a warning) does not run on from the progress text; the next update draws
  // the line again at once. Other modes: nothing.
  void clear_line();
  // Shows the latest update if it was held back, and ends the live line; later updates are
  // ignored. Called once at the end (again: no effect).
  void finish();

  // The text of one update at `now`, without '\r' or newline: the fields that fit in
  // `max_width` columns (0: all of them; the step is always there).
  std::string format(const ProgressUpdate& u, Clock::time_point now, size_t max_width = 0) const;

 private:
  void show(Clock::time_point now);

  ProgressMode mode_;
  std::ostream* out_;
  ProgressOptions options_;
  NowFn now_;
  Clock::time_point start_;
  bool have_first_ = false;  // the ETA's reference point
  Clock::time_point first_time_{};
  uint64_t first_step_ = 0;
  ProgressUpdate last_{};  // valid once have_first_
  bool last_shown_ = false;
  bool shown_any_ = false;
  Clock::time_point last_show_{};
  size_t live_len_ = 0;  // length of the live line on screen, to blank a longer old one
  bool finished_ = false;
};

// Rank 0's reporter on stderr for cfg.progress and cfg.progress_every_s; kOff on other ranks.
// The only place that asks whether stderr is a terminal. Under Open MPI's mpirun a rank's
// stderr is always a pipe (and its stdout always a pty, even when mpirun writes to a file), so
// no rank can tell the user's terminal from a batch log: "auto" gives plain lines there, the
// safe choice for logs, and "live" forces the live line (mpirun forwards it as it comes).
ProgressReporter make_progress_reporter(const TrainConfig& cfg, int rank);

}  // namespace resync::runtime
