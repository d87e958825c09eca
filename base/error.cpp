#include "base/error.h"

#include <fmt/format.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

namespace resync {
namespace {
std::atomic<int> g_process_rank{-1};  // diagnostics only: which rank a message comes from

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "?";
  return buf;
}
}  // namespace

void set_process_rank(int rank) { g_process_rank.store(rank, std::memory_order_relaxed); }
int process_rank() { return g_process_rank.load(std::memory_order_relaxed); }

namespace detail {

[[noreturn]] [[gnu::cold]] void check_failed(CheckKind kind, const char* expr, const char* file,
                                             int line, const std::string& detail) {
  const char* base = std::strrchr(file, '/');
  std::string msg = detail.empty() ? std::string(expr) : detail;
  if (kind != CheckKind::kArgument) {
    msg = fmt::format("{} [{} at {}:{}, rank {}, host {}]", msg, expr, base ? base + 1 : file,
                      line, process_rank(), host_name());
  }
  switch (kind) {
    case CheckKind::kArgument:
      throw InvalidArgument(msg);
    case CheckKind::kMpi:
      throw CommError(msg);
    case CheckKind::kCuda:
    case CheckKind::kCublas:
    case CheckKind::kNccl:
      throw DeviceError(msg);
    case CheckKind::kInternal:
    case CheckKind::kSystem:
      break;
  }
  throw Error(msg);
}

}  // namespace detail
}  // namespace resync
