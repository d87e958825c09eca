// collectives/state: how a late rank gets a peer's training state: a point-to-point transfer
// (this header) or a one-sided copy out of the donor's region of the node's shared memory under
// a seqlock (shm_state.h). The layout of that state is base/state_layout.h.
//
// Point-to-point transfer of a rank's training state (a list of float buffers plus a small
// header) from one rank to another, e.g. to let a straggler catch up with the fresh state.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "collectives/transport/context.h"

namespace resync::collectives {

struct StateHeader {
  uint64_t step = 0;
  // Free for the caller (epoch, samples seen, RNG state...); carried verbatim.
  std::array<uint64_t, 4> user{};
};

struct StateTransferOptions {
  // Largest message; buffers are cut into chunks of at most this size (whole floats).
  size_t chunk_bytes = 4 << 20;
  // Chunks in flight at once.
  int max_in_flight = 4;
};

// Sends `header` and the contents of `spans` to `dst`, tagged with `seq` (both sides must
// agree on it, e.g. the step of the catch-up). Returns when every byte has left. Throws
// TimeoutError (naming dst) after ctx.timeout().
void send_state(Context& ctx, int dst, uint64_t seq, const StateHeader& header,
                std::span<const std::span<const float>> spans,
                const StateTransferOptions& options = {});

// Receives what send_state() sent from `src` with the same `seq` into `spans`, which must
// have the sender's layout (number and sizes of buffers): a mismatch throws CommError and
// leaves the spans unchanged.
void recv_state(Context& ctx, int src, uint64_t seq, StateHeader& header,
                std::span<const std::span<float>> spans, const StateTransferOptions& options = {});

}  // namespace resync::collectives
