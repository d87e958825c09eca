#include "base/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <mutex>

#include "base/error.h"

namespace resync::log {
namespace {

struct LogState {
  std::mutex mu;
  int rank = -1;
  spdlog::level::level_enum level = spdlog::level::info;
  spdlog::sink_ptr sink;
};

LogState& state() {
  static LogState s;  // logging configuration is process-wide by nature (like spdlog's registry)
  return s;
}

spdlog::level::level_enum effective_level(const LogState& s) {
  if (s.rank > 0 && s.level < spdlog::level::warn) return spdlog::level::warn;
  return s.level;
}

std::string pattern_for(int rank) {
  std::string r = rank < 0 ? "-" : std::to_string(rank);
  return "[%H:%M:%S.%e] [rank " + r + "] [%n] [%^%l%$] %v";
}

std::shared_ptr<spdlog::logger> make_locked(LogState& s, const std::string& name) {
  if (!s.sink) s.sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>(name, s.sink);
  logger->set_pattern(pattern_for(s.rank));
  logger->set_level(effective_level(s));
  spdlog::register_logger(logger);
  return logger;
}

}  // namespace

bool valid_level(const std::string& level) {
  return level == "off" || spdlog::level::from_str(level) != spdlog::level::off;
}

void init(int rank, const std::string& level) {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  RESYNC_CHECK_ARG(valid_level(level), "unknown log level '" + level +
                                           "' (expected trace, debug, info, warn, error, off)");
  s.rank = rank;
  s.level = spdlog::level::from_str(level);
  for (const char* name : {"train", "coll", "data", "ckpt"}) {
    auto logger = spdlog::get(name);
    if (!logger) logger = make_locked(s, name);
    logger->set_pattern(pattern_for(s.rank));
    logger->set_level(effective_level(s));
  }
}

std::shared_ptr<spdlog::logger> get(const std::string& subsystem) {
  if (auto logger = spdlog::get(subsystem)) return logger;
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (auto logger = spdlog::get(subsystem)) return logger;
  return make_locked(s, subsystem);
}

}  // namespace resync::log
