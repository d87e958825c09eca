// Context: what every collective operation runs with on one rank — the transport, rank and
// size, the default timeout, and the operation sequence numbers that keep rounds apart.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>

#include "collectives/transport/transport.h"

namespace resync::collectives {

// Which family of operation a message belongs to; part of every tag, so that an all-reduce
// and a state transfer with the same sequence number never match each other's messages.
enum class OpKind : uint8_t { kAllreduce = 0, kStateTransfer = 1, kParameterServer = 2, kTest = 3 };

inline constexpr std::chrono::milliseconds kDefaultTimeout{60'000};

// Not thread-safe: one Context per rank, used by the thread that drives its collectives.
class Context {
 public:
  explicit Context(Transport& transport, std::chrono::milliseconds timeout = kDefaultTimeout);

  Transport& transport() const { return *transport_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }
  Deadline deadline() const { return deadline_after(timeout_); }

  // Returns the next sequence number of this context's own counter. Ranks that take part in
  // the same operations in the same order agree on it; an operation over a subset of ranks
  // passes an explicit sequence (e.g. the step) instead.
  uint64_t next_sequence() { return next_seq_++; }

  // Tag of operation `kind` with sequence `seq`: the sequence folded modulo a window (a power
  // of two that fits MPI_TAG_UB, at least 8192), so messages of rounds fewer than a window
  // apart never match.
  int tag(OpKind kind, uint64_t seq) const;
  uint64_t sequence_window() const { return window_; }

  // Posts a send/receive tagged for (kind, seq), recording seq for timeout messages.
  Request isend(int peer, OpKind kind, uint64_t seq, std::span<const std::byte> bytes);
  Request irecv(int peer, OpKind kind, uint64_t seq, std::span<std::byte> bytes);

 private:
  Transport* transport_;
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  uint64_t window_;
  uint64_t next_seq_ = 0;
};

}  // namespace resync::collectives
