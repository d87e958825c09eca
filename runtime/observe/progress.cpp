#include "runtime/observe/progress.h"

#include <fmt/format.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>

#include "base/error.h"

namespace resync::runtime {

namespace {

double seconds_between(ProgressReporter::Clock::time_point a,
                       ProgressReporter::Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

ProgressMode progress_mode(std::string_view setting, bool is_terminal) {
  if (setting == "auto") return is_terminal ? ProgressMode::kLive : ProgressMode::kLines;
  if (setting == "live") return ProgressMode::kLive;
  if (setting == "line") return ProgressMode::kLines;
  if (setting == "off") return ProgressMode::kOff;
  RESYNC_CHECK_ARG(false,
                   fmt::format("--progress must be auto, live, line or off, got '{}'", setting));
  return ProgressMode::kOff;
}

std::string format_hms(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0 || seconds > 1e9) return "-:--:--";
  const auto s = static_cast<uint64_t>(std::llround(seconds));
  return fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
}

ProgressReporter::ProgressReporter(ProgressMode mode, std::ostream& out, ProgressOptions options,
                                   NowFn now)
    : mode_(mode), out_(&out), options_(options), now_(std::move(now)) {
  RESYNC_CHECK_ARG(options_.every_s > 0 && options_.live_interval_s >= 0,
                   fmt::format("progress intervals must be positive, got every {} s, live {} s",
                               options_.every_s, options_.live_interval_s));
  start_ = mode_ == ProgressMode::kOff ? Clock::time_point() : now_();
  last_show_ = start_;
}

std::string ProgressReporter::format(const ProgressUpdate& u, Clock::time_point now,
                                     size_t max_width) const {
  double eta_s = -1;
  if (u.step >= u.total_steps) {
    eta_s = 0;
  } else if (have_first_ && u.step > first_step_) {
    eta_s = seconds_between(first_time_, now) / double(u.step - first_step_) *
            double(u.total_steps - u.step);
  }
  const double percent = u.total_steps > 0 ? 100.0 * double(u.step) / double(u.total_steps) : 0;
  // Most telling first: a narrow terminal loses whole fields from the end.
  const std::string fields[] = {
      fmt::format("step {}/{} ({:.1f}%)", u.step, u.total_steps, percent),
      fmt::format("ETA {}", format_hms(eta_s)),
      fmt::format("loss {:.4f}", u.loss),
      fmt::format("dropped {}", u.dropped),
      fmt::format("epoch {}", u.epoch),
      fmt::format("{:.0f} samples/s", u.samples_per_s),
  };
  std::string line = fields[0];
  for (size_t i = 1; i < std::size(fields); ++i) {
    if (max_width > 0 && line.size() + 3 + fields[i].size() > max_width) break;
    line += " | ";
    line += fields[i];
  }
  return line;
}

void ProgressReporter::update(const ProgressUpdate& u) {
  if (mode_ == ProgressMode::kOff || finished_) return;
  const Clock::time_point now = now_();
  if (!have_first_) {
    have_first_ = true;
    first_time_ = now;
    first_step_ = u.step;
  }
  last_ = u;
  last_shown_ = false;
  const double since_s = seconds_between(last_show_, now);
  const bool due = mode_ == ProgressMode::kLive
                       ? (live_len_ == 0 || since_s >= options_.live_interval_s)
                       : since_s >= options_.every_s;
  if (due) show(now);
}

void ProgressReporter::show(Clock::time_point now) {
  if (mode_ == ProgressMode::kLive) {
    // One column short of the width: a line that fills it makes some terminals wrap.
    const std::string text =
        format(last_, now, options_.live_width > 0 ? options_.live_width - 1 : 0);
    // Spaces rather than an escape sequence blank what a longer previous line left: works on
    // any terminal.
    const size_t pad = live_len_ > text.size() ? live_len_ - text.size() : 0;
    *out_ << '\r' << text << std::string(pad, ' ');
    live_len_ = text.size();
  } else {
    *out_ << "progress: " << format(last_, now) << " | elapsed "
          << format_hms(seconds_between(start_, now)) << '\n';
  }
  out_->flush();
  last_show_ = now;
  last_shown_ = true;
  shown_any_ = true;
}

void ProgressReporter::clear_line() {
  if (mode_ != ProgressMode::kLive || finished_ || live_len_ == 0) return;
  *out_ << '\r' << std::string(live_len_, ' ') << '\r';
  out_->flush();
  live_len_ = 0;  // the next update redraws at once
  last_shown_ = false;
}

void ProgressReporter::finish() {
  if (mode_ == ProgressMode::kOff || finished_) return;
  finished_ = true;
  if (have_first_ && !last_shown_) show(now_());
  if (mode_ == ProgressMode::kLive && shown_any_) {
    *out_ << '\n';
    out_->flush();
  }
}

namespace {

// Columns of the terminal on `fd`, else $COLUMNS, else 80.
size_t terminal_width(int fd) {
  winsize size{};
  if (ioctl(fd, TIOCGWINSZ, &size) == 0 && size.ws_col > 0) return size.ws_col;
  if (const char* columns = std::getenv("COLUMNS")) {
    const long n = std::strtol(columns, nullptr, 10);
    if (n > 0) return static_cast<size_t>(n);
  }
  return 80;
}

}  // namespace

ProgressReporter make_progress_reporter(const TrainConfig& cfg, int rank) {
  const int fd = fileno(stderr);
  const bool is_terminal = isatty(fd) == 1;
  const ProgressMode mode =
      rank == 0 ? progress_mode(cfg.progress, is_terminal) : ProgressMode::kOff;
  return ProgressReporter(mode, std::cerr,
                          {.every_s = cfg.progress_every_s,
                           .live_width = mode == ProgressMode::kLive ? terminal_width(fd) : 0});
}

}  // namespace resync::runtime
