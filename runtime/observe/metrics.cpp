#include "runtime/observe/metrics.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>

#include "base/error.h"

namespace resync::runtime {
namespace {

// JSON has no NaN/Infinity; a diverged loss is written as null.
std::string num(double v) { return std::isfinite(v) ? fmt::format("{:.6g}", v) : "null"; }

std::string ranks(const std::vector<int>& r) { return fmt::format("[{}]", fmt::join(r, ",")); }

// Wall-clock seconds since the epoch: lines of a relaunched job's appended file line up in time.
std::string unix_time() {
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  return fmt::format("{:.3f}", std::chrono::duration<double>(now).count());
}

}  // namespace

MetricsWriter::MetricsWriter(const std::string& path, bool append) : path_(path) {
  if (path.empty()) return;
  file_.reset(std::fopen(path.c_str(), append ? "a" : "w"));
  if (!file_) {
    throw InvalidArgument(
        fmt::format("--metrics '{}': cannot create the file ({})", path, std::strerror(errno)));
  }
}

void MetricsWriter::write_line(const std::string& line) {
  if (!file_) return;
  if (std::fputs(line.c_str(), file_.get()) < 0 || std::fputc('\n', file_.get()) < 0 ||
      std::fflush(file_.get()) != 0) {
    throw Error(fmt::format("--metrics '{}': write failed ({})", path_, std::strerror(errno)));
  }
}

void MetricsWriter::step(const StepRecord& r) {
  if (!file_) return;  // nothing to format: no --metrics on this rank
  write_line(fmt::format(
      R"({{"event":"step","step":{},"epoch":{},"loss":{},"step_ms":{},"compute_ms":{},)"
      R"("wait_ms":{},"comm_ms":{},"delay_ms":{},"elapsed_s":{},"participants":{},"dropped":{},)"
      R"("late":{},"time":{}}})",
      r.step, r.epoch, num(r.loss), num(r.step_ms), num(r.compute_ms), num(r.wait_ms),
      num(r.comm_ms), num(r.delay_ms), num(r.elapsed_s), ranks(r.participants), ranks(r.dropped),
      ranks(r.late), unix_time()));
}

void MetricsWriter::eval(const EvalRecord& r) {
  if (!file_) return;  // nothing to format: no --metrics on this rank
  // Text data adds bits per byte (the loss is in nats per byte token).
  const std::string bits = r.test_bits_per_byte >= 0
                               ? fmt::format(R"("test_bits_per_byte":{},)", num(r.test_bits_per_byte))
                               : std::string();
  write_line(fmt::format(
      R"({{"event":"eval","epoch":{},"step":{},"test_loss":{},{}"test_accuracy":{},"elapsed_s":{}}})",
      r.epoch, r.step, num(r.test_loss), bits, num(r.test_accuracy), num(r.elapsed_s)));
}

void MetricsWriter::summary(const SummaryRecord& r) {
  if (!file_) return;  // nothing to format: no --metrics on this rank
  write_line(fmt::format(
      R"({{"event":"summary","steps":{},"elapsed_s":{},"samples_per_s":{},"test_accuracy":{},)"
      R"("param_checksum":"{}","ranks_agree":{},"dropped_gradients":{},"catch_ups":{},)"
      R"("resumed_from_step":{},"stopped_by":{}}})",
      r.steps, num(r.elapsed_s), num(r.samples_per_s), num(r.test_accuracy), r.param_checksum,
      r.ranks_agree ? "true" : "false", r.dropped_gradients, r.catch_ups,
      r.resumed_from_step ? std::to_string(*r.resumed_from_step) : "null",
      r.stopped_by.empty() ? "null" : "\"" + r.stopped_by + "\""));
}

void MetricsWriter::async_step(const AsyncStepRecord& r) {
  if (!file_) return;  // nothing to format: no --metrics on this rank
  write_line(fmt::format(
      R"({{"event":"step","mode":"async","step":{},"epoch":{},"worker":{},"loss":{},"step_ms":{},)"
      R"("compute_ms":{},"delay_ms":{},"comm_ms":{},"staleness":{},"applied":{},"version":{},)"
      R"("elapsed_s":{},"time":{}}})",
      r.step, r.epoch, r.worker, num(r.loss), num(r.step_ms), num(r.compute_ms), num(r.delay_ms),
      num(r.comm_ms), r.staleness, r.applied ? "true" : "false", r.version, num(r.elapsed_s), unix_time()));
}

void MetricsWriter::staleness(const StalenessRecord& r) {
  if (!file_) return;  // nothing to format: no --metrics on this rank
  write_line(fmt::format(
      R"({{"event":"staleness","server":{},"applied":{},"dropped":{},"refreshed":{},)"
      R"("max_staleness":{},"mean_staleness":{},"histogram":[{}]}})",
      r.server, r.applied, r.dropped, r.refreshed, r.max_staleness, num(r.mean_staleness),
      fmt::join(r.histogram, ",")));
}

}  // namespace resync::runtime
