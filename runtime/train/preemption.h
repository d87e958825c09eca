// Graceful preemption: SIGTERM/SIGUSR1 handlers that only record which signal came, so the
// training loop can stop every rank at the next step boundary (Slurm's --signal, --requeue).
#pragma once

#include <csignal>
#include <string>

namespace resync::runtime {

// While an instance lives, SIGTERM and SIGUSR1 no longer end the process: the handler records
// the first such signal (async-signal-safe: one lock-free atomic store) and returns. The
// destructor restores the previous dispositions. At most one instance may exist at a time
// (a signal disposition is process-wide); a second one throws resync::Error.
class PreemptionSignals {
 public:
  PreemptionSignals();
  ~PreemptionSignals();
  PreemptionSignals(const PreemptionSignals&) = delete;
  PreemptionSignals& operator=(const PreemptionSignals&) = delete;

  // The first preemption signal received since construction (SIGTERM or SIGUSR1), or 0.
  int received() const;

  // "SIGTERM", "SIGUSR1", else "signal N".
  static std::string name(int signo);

 private:
  struct sigaction previous_term_ {};
  struct sigaction previous_usr1_ {};
};

}  // namespace resync::runtime
