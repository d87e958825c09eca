#include "runtime/train/preemption.h"

#include <fmt/format.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "base/error.h"

namespace resync::runtime {
namespace {

// A signal handler can reach nothing but static storage, so the received signal lives here.
// Only the one PreemptionSignals instance (see `g_installed`) reads and resets it.
static_assert(std::atomic<int>::is_always_lock_free, "the handler needs a lock-free atomic");
std::atomic<int> g_received{0};
std::atomic<bool> g_installed{false};

extern "C" void record_preemption_signal(int signo) {
  int expected = 0;
  g_received.compare_exchange_strong(expected, signo);  // the first signal wins
}

void install(int signo, struct sigaction& previous) {
  struct sigaction action {};
  action.sa_handler = record_preemption_signal;
  sigemptyset(&action.sa_mask);
  // Restart interrupted system calls: the signal only needs noticing at a step boundary.
  action.sa_flags = SA_RESTART;
  if (::sigaction(signo, &action, &previous) != 0) {
    throw Error(fmt::format("sigaction({}): {}", signo, std::strerror(errno)));
  }
}

}  // namespace

PreemptionSignals::PreemptionSignals() {
  if (g_installed.exchange(true)) {
    throw Error("preemption signal handlers are already installed in this process");
  }
  g_received.store(0);
  try {
    install(SIGTERM, previous_term_);
  } catch (...) {
    g_installed.store(false);
    throw;
  }
  try {
    install(SIGUSR1, previous_usr1_);
  } catch (...) {
    ::sigaction(SIGTERM, &previous_term_, nullptr);
    g_installed.store(false);
    throw;
  }
}

PreemptionSignals::~PreemptionSignals() {
  ::sigaction(SIGUSR1, &previous_usr1_, nullptr);
  ::sigaction(SIGTERM, &previous_term_, nullptr);
  g_installed.store(false);
}

int PreemptionSignals::received() const { return g_received.load(); }

std::string PreemptionSignals::name(int signo) {
  switch (signo) {
    case SIGTERM:
      return "SIGTERM";
    case SIGUSR1:
      return "SIGUSR1";
    default:
      return fmt::format("signal {}", signo);
  }
}

}  // namespace resync::runtime
