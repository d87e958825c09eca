// SmallAllreduce: latency-optimal in-place float sum of small buffers over any Transport: every
// participant sends its buffer to every other one, then each sums all of them itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "collectives/transport/context.h"
#include "collectives/transport/transport.h"

namespace resync::collectives {

// One round of messages instead of the ring's 2(p-1), at the price of (p-1) buffers in and out
// per rank: right for a few ranks and a few KiB. Every participant adds the same operands in
// the same (participant) order, so all end with bitwise-identical buffers. Same contract as
// RingAllreduce: participants sorted and distinct, every participant passes the same list,
// count and seq; non-participants are never contacted; a missing participant makes the
// others throw TimeoutError after ctx.timeout(). One instance per Context; not thread-safe.
class SmallAllreduce {
 public:
  // `max_elems` sizes the receive buffers up front for that many floats and the whole world
  // (0: on first use); a larger call later grows them once.
  explicit SmallAllreduce(Context& ctx, size_t max_elems = 0);

  void allreduce_sum(std::span<float> data, std::span<const int> participants, uint64_t seq);

  // Floats of receive buffer currently held (for tests of the no-allocation promise).
  size_t scratch_elems() const { return scratch_.size(); }

 private:
  void exchange(std::span<float> data, std::span<const int> participants, int me, uint64_t seq);

  Context& ctx_;
  std::vector<float> scratch_;
  std::vector<Request> recvs_;  // by participant position
  std::vector<Request> sends_;
  std::vector<Request*> pending_;
  std::vector<const float*> srcs_;
};

}  // namespace resync::collectives
