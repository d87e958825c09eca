// LocalControlHub: the control plane in one process, for ranks run as threads without MPI.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "collectives/control/control_plane.h"
#include "collectives/control/coordinator.h"

namespace resync::collectives {

namespace detail {
struct LocalHubState;
}  // namespace detail

// In-process control plane: the same Coordinator behind a mutex, a timer thread for its
// deadlines, and one channel object per rank. For the loopback tier (ranks as threads).
// Destroying a rank's channel before its final order counts as that rank dying; destroying
// the hub while the job runs aborts it, so no rank thread waits forever.
class LocalControlHub {
 public:
  explicit LocalControlHub(const CoordinatorConfig& config);
  ~LocalControlHub();
  LocalControlHub(const LocalControlHub&) = delete;
  LocalControlHub& operator=(const LocalControlHub&) = delete;

  // The channel of `rank`, once per rank. It may outlive the hub (then it only reports errors).
  std::unique_ptr<ControlChannel> connect(int rank);
  // Set once the job was aborted.
  std::optional<std::string> abort_reason() const;

 private:
  std::shared_ptr<detail::LocalHubState> state_;
  std::thread timer_;
};

}  // namespace resync::collectives
