// collectives/control: the control plane of the synchronous step protocol. The pure
// Coordinator (coordinator.h) decides; its Decisions become per-rank orders (orders.h), delivered
// the same way by both hubs (delivery.h): in process for ranks as threads (local_hub.h), or over
// TCP from rank 0 (tcp_control.h, wire format in wire.h, sockets in socket_util.h).
//
// This header defines ControlChannel, one rank's end of the control plane, which the training
// loop talks to whichever hub is behind it.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>

#include "collectives/control/orders.h"

namespace resync::collectives {

// One rank's end of the control plane. The training thread is its only user, except
// request_stop(), which any thread may call.
class ControlChannel {
 public:
  virtual ~ControlChannel() = default;

  // After computing the gradient of `step`: reports READY(step) and blocks (in the kernel, no
  // spinning) until this rank's order (possibly the final one, see StepOrder). Throws
  // resync::CommError with the coordinator's reason if the job was aborted, or if the
  // coordinator is gone.
  virtual StepOrder ready(uint64_t step) = 0;
  // During a long delay in computing `step` (this rank is slow but awake): reports BUSY(step)
  // and waits up to `max_wait` (in the kernel) for an order. Returns it if one came: a kCatchUp
  // when `step` closed without this rank (its gradient is no longer needed), possibly the final
  // order. Returns nullopt when the wait ran out: finish computing and call ready(step) as usual
  // (an order that arrives meanwhile is what ready(step) then returns). Errors as ready().
  virtual std::optional<StepOrder> busy(uint64_t step, std::chrono::nanoseconds max_wait) = 0;
  // After the all-reduce of the order for `step`, or the catch-up receive of a kCatchUp for
  // `step`, timed out: reports FAILED(step) and blocks like ready() for the next order: a
  // re-close of `step` (kParticipate, attempt + 1) or a kCatchUp. Errors as ready().
  virtual StepOrder failed(uint64_t step) = 0;
  // After the last step (`n_steps` = T, or step + 1 after a `stop` order): reports FINISH and
  // blocks until the final order (final_round = true). Errors as ready().
  virtual StepOrder finish(uint64_t n_steps) = 0;
  // After carrying out a kServe order: blocks like ready() for this rank's next order (another
  // kServe, or the order of the step it reported). Errors as ready().
  virtual StepOrder next_order() = 0;
  // Asks that every rank stops at the next round boundary (the order's `stop` flag).
  virtual void request_stop() = 0;

  virtual int rank() const = 0;
};

}  // namespace resync::collectives
