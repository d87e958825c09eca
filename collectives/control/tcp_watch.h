// CoordinatorWatch: a rank's second, listen-only connection to rank 0's coordinator, on a thread
// of its own. It is how a rank learns within a second that the job cannot go on, even while its
// training thread is blocked inside an all-reduce with a rank that died: the coordinator sends
// HEARTBEAT every TcpServerOptions::heartbeat_s, ABORT when it aborts the job (a rank died, a
// stall), END after the final round. The watch reports a loss once: an ABORT, the connection
// closing without END (rank 0 died), or silence for longer than the limit (rank 0 frozen).
#pragma once

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "collectives/control/socket_util.h"

namespace resync::collectives {

class CoordinatorWatch {
 public:
  // Called once, on the watch thread, with one line saying what happened.
  using LostHandler = std::function<void(const std::string& why)>;

  // Connects to `endpoint` (TcpControlServer::endpoint()) as `rank` and starts watching.
  // `silence_limit_s` > 0: no message for this long counts as a lost coordinator. Throws
  // CommError if it cannot connect, InvalidArgument for a bad limit.
  CoordinatorWatch(const std::string& endpoint, int rank, double silence_limit_s,
                   LostHandler on_lost);
  // Stops watching (no report after it returns) and closes the connection.
  ~CoordinatorWatch();
  CoordinatorWatch(const CoordinatorWatch&) = delete;
  CoordinatorWatch& operator=(const CoordinatorWatch&) = delete;

  // True once END arrived: the job ended normally.
  bool ended() const { return ended_.load(); }

 private:
  void run();

  int rank_;
  std::string address_;
  double silence_limit_s_;
  LostHandler on_lost_;
  detail::UniqueFd fd_;
  detail::UniqueFd wake_fd_;  // eventfd: the destructor wakes the thread through it
  std::atomic<bool> stopping_{false};
  std::atomic<bool> ended_{false};
  std::thread thread_;
};

}  // namespace resync::collectives
