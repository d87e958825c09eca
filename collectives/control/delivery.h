// deliver(): the one way both hubs carry out the coordinator's Decisions. OrderSink is what a
// hub supplies: how an order reaches a rank (a mailbox in process, a frame over TCP) and how the
// job is aborted.
#pragma once

#include <string>

#include "collectives/control/coordinator.h"
#include "collectives/control/orders.h"

namespace resync::collectives {

class OrderSink {
 public:
  // Hands `order` to `rank`; orders reach one rank in the order they are sent.
  virtual void send(int rank, StepOrder&& order) = 0;
  // Called once every order of `round` was sent (the TCP server winds down after the final one).
  virtual void round_sent(const ClosedRound& round) { (void)round; }
  // Ends the job with `reason`, after every order of the same decisions was sent.
  virtual void abort(const std::string& reason) = 0;
  // How the logs name `rank` (the TCP server adds its host).
  virtual std::string who(int rank) const;

 protected:
  ~OrderSink() = default;
};

// Logs and sends the orders of every closed round, then of every early catch-up, then logs a
// stall and aborts, in that order: an order decided before an abort reaches its rank first.
void deliver(const Decisions& decisions, OrderSink& sink);

}  // namespace resync::collectives
