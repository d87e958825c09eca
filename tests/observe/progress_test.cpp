// ProgressReporter on a fake clock: the live line (rewritten with '\r', rate-limited, padded
// over a longer old line, ended by finish()), plain lines every N seconds, the ETA and modes.
#include "runtime/observe/progress.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "base/error.h"

namespace resync::runtime {
namespace {

using namespace std::chrono_literals;
using Clock = ProgressReporter::Clock;

// A clock that moves only when the test says so.
struct FakeClock {
  Clock::time_point now = Clock::time_point(1000s);
  ProgressReporter::NowFn fn() {
    return [this] { return now; };
  }
};

size_t count_char(const std::string& s, char c) { return std::count(s.begin(), s.end(), c); }

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}

ProgressUpdate at_step(uint64_t step, uint64_t total, uint64_t dropped = 0) {
  return {.step = step,
          .total_steps = total,
          .epoch = step / 10,
          .loss = 0.5,
          .samples_per_s = 1234.4,
          .dropped = dropped};
}

TEST(Progress, ModeFromSettingAndTerminal) {
  EXPECT_EQ(progress_mode("auto", true), ProgressMode::kLive);
  EXPECT_EQ(progress_mode("auto", false), ProgressMode::kLines);
  EXPECT_EQ(progress_mode("live", false), ProgressMode::kLive);
  EXPECT_EQ(progress_mode("line", true), ProgressMode::kLines);
  EXPECT_EQ(progress_mode("off", true), ProgressMode::kOff);
  EXPECT_THROW(progress_mode("bar", true), InvalidArgument);
}

TEST(Progress, FormatsHoursMinutesSeconds) {
  EXPECT_EQ(format_hms(0), "0:00:00");
  EXPECT_EQ(format_hms(83.4), "0:01:23");
  EXPECT_EQ(format_hms(12 * 3600 + 61), "12:01:01");
  EXPECT_EQ(format_hms(-1), "-:--:--");
  EXPECT_EQ(format_hms(std::numeric_limits<double>::quiet_NaN()), "-:--:--");
  EXPECT_EQ(format_hms(std::numeric_limits<double>::infinity()), "-:--:--");
}

TEST(Progress, LiveLineIsRewrittenAtMostFourTimesASecondAndEndedByFinish) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter p(ProgressMode::kLive, out, {.every_s = 30, .live_interval_s = 0.25},
                     clock.fn());
  // A step every 100 ms for 2 s: shown at 0.1 (first), 0.4, 0.7, ..., 1.9 s.
  for (uint64_t step = 1; step <= 20; ++step) {
    clock.now += 100ms;
    p.update(at_step(step, 20));
  }
  const std::string live = out.str();
  EXPECT_EQ(count_char(live, '\r'), 7u) << live;
  EXPECT_EQ(count_char(live, '\n'), 0u) << "a live line must not scroll: " << live;
  EXPECT_EQ(live.find("step 20/20"), std::string::npos) << "the 20th update was due 0.1 s after "
                                                           "the 19th and should be held back";
  p.finish();
  p.finish();                 // once only
  p.update(at_step(21, 20));  // after finish: ignored
  const std::string all = out.str();
  ASSERT_EQ(all.back(), '\n');
  EXPECT_EQ(count_char(all, '\n'), 1u) << all;
  const std::vector<std::string> frames = split(all.substr(0, all.size() - 1), '\r');
  const std::string& last = frames.back();
  EXPECT_NE(last.find("step 20/20 (100.0%)"), std::string::npos) << last;
  EXPECT_NE(last.find("ETA 0:00:00"), std::string::npos) << last;
  EXPECT_NE(last.find("epoch 2"), std::string::npos) << last;
  EXPECT_NE(last.find("loss 0.5000"), std::string::npos) << last;
  EXPECT_NE(last.find("1234 samples/s"), std::string::npos) << last;
}

TEST(Progress, LiveLineBlanksWhatALongerLineLeft) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter p(ProgressMode::kLive, out, {}, clock.fn());
  p.update(at_step(1, 100, 123456789));
  clock.now += 1s;
  p.update(at_step(2, 100, 0));
  const std::vector<std::string> frames = split(out.str(), '\r');
  ASSERT_EQ(frames.size(), 3u) << out.str();  // "", first, second
  EXPECT_GT(frames[1].size(), p.format(at_step(2, 100, 0), clock.now).size());
  EXPECT_EQ(frames[2].size(), frames[1].size()) << "the shorter line does not cover the old one";
  EXPECT_EQ(frames[2].find_last_not_of(' ') + 1, p.format(at_step(2, 100, 0), clock.now).size());
}

TEST(Progress, LiveLineKeepsBelowTheTerminalWidthInWholeFields) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter p(ProgressMode::kLive, out, {.live_width = 50}, clock.fn());
  p.update(at_step(1234, 100000, 17));
  p.finish();
  std::string line = out.str();
  ASSERT_EQ(line.front(), '\r');
  ASSERT_EQ(line.back(), '\n');
  line = line.substr(1, line.size() - 2);
  const std::string full = p.format(at_step(1234, 100000, 17), clock.now);
  EXPECT_LE(line.size(), 49u) << line;
  EXPECT_EQ(full.rfind(line, 0), 0u) << "not a prefix of the full line: " << line;
  EXPECT_EQ(full.compare(line.size(), 3, " | "), 0) << "cut inside a field: " << line;
  EXPECT_NE(line.find("step 1234/100000"), std::string::npos) << line;
  EXPECT_NE(line.find("ETA"), std::string::npos) << line;
  EXPECT_GT(full.size(), 49u) << "the full line should not have fitted: " << full;
  // Plain lines go to logs: never cut.
  EXPECT_EQ(p.format(at_step(1234, 100000, 17), clock.now, 0), full);
}

TEST(Progress, ClearLineMakesRoomForALogLineAndTheNextUpdateRedraws) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter p(ProgressMode::kLive, out, {.live_interval_s = 0.25}, clock.fn());
  p.update(at_step(1, 10));
  const size_t shown = out.str().size() - 1;  // without the leading '\r'
  p.clear_line();
  EXPECT_EQ(out.str().substr(shown + 1), "\r" + std::string(shown, ' ') + "\r");
  out << "[info] epoch 0 done\n";  // what the logger writes meanwhile
  clock.now += 10ms;               // well inside the rate limit
  p.update(at_step(2, 10));
  const std::string text = out.str();
  const size_t log_end = text.find("done\n") + 5;
  EXPECT_EQ(text.substr(log_end, 14), "\rstep 2/10 (20") << "not redrawn after the log line";
  p.clear_line();
  p.finish();  // the cleared line is drawn once more, then ended
  const std::string tail = out.str().substr(text.size());
  const size_t redraw = tail.rfind("\rstep 2/10");
  ASSERT_NE(redraw, std::string::npos) << "finish() did not redraw the cleared line: " << tail;
  EXPECT_EQ(tail.find_first_not_of(" \r"), redraw + 1) << tail;
  EXPECT_EQ(tail.back(), '\n') << tail;

  std::ostringstream plain;
  ProgressReporter lines(ProgressMode::kLines, plain, {.every_s = 1}, clock.fn());
  lines.clear_line();
  EXPECT_EQ(plain.str(), "");
}

TEST(Progress, PlainLinesEveryNSecondsWithEta) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter p(ProgressMode::kLines, out, {.every_s = 30}, clock.fn());
  // One step a second for 100 s: lines at 30, 60 and 90 s, then finish() shows step 100.
  for (uint64_t step = 1; step <= 100; ++step) {
    clock.now += 1s;
    p.update(at_step(step, 100, step / 50));
  }
  EXPECT_EQ(count_char(out.str(), '\n'), 3u) << out.str();
  p.finish();
  const std::string text = out.str();
  EXPECT_EQ(count_char(text, '\r'), 0u) << "no carriage returns in a batch log";
  std::vector<std::string> lines = split(text, '\n');
  ASSERT_EQ(lines.back(), "");
  lines.pop_back();
  ASSERT_EQ(lines.size(), 4u) << text;
  for (const std::string& line : lines) EXPECT_EQ(line.rfind("progress: step ", 0), 0u) << line;
  // At 30 s: step 30 of 100, 1 step/s since the first update -> 70 s left.
  EXPECT_NE(lines[0].find("step 30/100 (30.0%)"), std::string::npos) << lines[0];
  EXPECT_NE(lines[0].find("ETA 0:01:10"), std::string::npos) << lines[0];
  EXPECT_NE(lines[0].find("elapsed 0:00:30"), std::string::npos) << lines[0];
  EXPECT_NE(lines[0].find("dropped 0"), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find("step 60/100"), std::string::npos) << lines[1];
  EXPECT_NE(lines[1].find("dropped 1"), std::string::npos) << lines[1];
  EXPECT_NE(lines[2].find("step 90/100"), std::string::npos) << lines[2];
  EXPECT_NE(lines[3].find("step 100/100 (100.0%)"), std::string::npos) << lines[3];
  EXPECT_NE(lines[3].find("ETA 0:00:00"), std::string::npos) << lines[3];
  EXPECT_NE(lines[3].find("dropped 2"), std::string::npos) << lines[3];
}

TEST(Progress, EtaUnknownUntilTwoUpdates) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter p(ProgressMode::kLive, out, {}, clock.fn());
  p.update(at_step(5, 1000));
  EXPECT_NE(out.str().find("ETA -:--:--"), std::string::npos) << out.str();
  clock.now += 2s;  // 10 steps in 2 s -> 985 left at 5 steps/s = 197 s
  p.update(at_step(15, 1000));
  EXPECT_NE(out.str().find("ETA 0:03:17"), std::string::npos) << out.str();
}

TEST(Progress, FinishWithoutHeldBackUpdateAddsNothingButTheNewline) {
  FakeClock clock;
  std::ostringstream lines_out;
  ProgressReporter lines(ProgressMode::kLines, lines_out, {.every_s = 1}, clock.fn());
  clock.now += 1s;
  lines.update(at_step(1, 2));
  lines.finish();
  EXPECT_EQ(count_char(lines_out.str(), '\n'), 1u) << lines_out.str();

  std::ostringstream never_out;
  ProgressReporter never(ProgressMode::kLive, never_out, {}, clock.fn());
  never.finish();
  EXPECT_EQ(never_out.str(), "") << "nothing shown, nothing to end";
}

TEST(Progress, OffPrintsNothing) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter p(ProgressMode::kOff, out, {.every_s = 1}, clock.fn());
  for (uint64_t step = 1; step <= 10; ++step) {
    clock.now += 10s;
    p.update(at_step(step, 10));
  }
  p.finish();
  EXPECT_EQ(out.str(), "");
}

TEST(Progress, FactoryIsOffOnOtherRanksAndHonoursTheSetting) {
  TrainConfig cfg;
  cfg.progress = "line";
  EXPECT_EQ(make_progress_reporter(cfg, 1).mode(), ProgressMode::kOff);
  EXPECT_EQ(make_progress_reporter(cfg, 0).mode(), ProgressMode::kLines);
  cfg.progress = "off";
  EXPECT_EQ(make_progress_reporter(cfg, 0).mode(), ProgressMode::kOff);
}

}  // namespace
}  // namespace resync::runtime
