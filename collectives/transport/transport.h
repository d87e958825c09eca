// collectives/transport: how bytes move between ranks. Transport (this header) with MpiTransport
// (MPI on a private communicator) and LoopbackTransport (ranks as threads, for tests); the
// Context every collective runs with; MpiSession (MPI_Init/Finalize) and the whole-world
// agreements of start-up and end (world.h). The only folder besides allreduce/ and ps/ that
// calls MPI.
//
// Transport: the point-to-point byte mover under every collective (Gloo-style split), and
// Request, the move-only handle of one non-blocking send or receive.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace resync::collectives {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

// A deadline that never passes.
inline constexpr Deadline kNoDeadline = Deadline::max();

// Deadline `timeout` from now, saturating instead of overflowing for huge timeouts.
Deadline deadline_after(std::chrono::milliseconds timeout);

enum class Direction : uint8_t { kSend, kReceive };

class Transport;

// One pending isend/irecv. Inactive once completed by test()/wait()/wait_any()/cancel(), or
// when default-constructed or moved from. Destroying an active request abandons it: a receive
// is cancelled, a send is detached (its buffer must then outlive the transport, because a peer
// may still read it; see Transport).
class Request {
 public:
  Request() = default;
  Request(Request&& other) noexcept { take(other); }
  Request& operator=(Request&& other) noexcept;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  ~Request() { reset(); }

  bool active() const { return owner_ != nullptr; }
  int peer() const { return peer_; }
  int tag() const { return tag_; }
  Direction direction() const { return direction_; }
  // Operation sequence number shown in timeout errors; the Context sets it.
  uint64_t sequence() const { return sequence_; }
  void set_sequence(uint64_t seq) { sequence_ = seq; }
  // Bytes moved, valid once the request has completed (a receive: the message size).
  size_t transferred_bytes() const { return n_bytes_; }

  // Abandons the request if it is active (see the class comment).
  void reset() noexcept;

 private:
  friend class Transport;
  void take(Request& other) noexcept;

  Transport* owner_ = nullptr;
  uint64_t handle_ = 0;  // transport-specific (MPI_Request bits, loopback slot)
  int peer_ = -1;
  int tag_ = -1;
  Direction direction_ = Direction::kSend;
  uint64_t sequence_ = 0;
  size_t n_bytes_ = 0;
};

// Point-to-point transport among `size()` ranks. Messages between one (source, destination,
// tag) triple are matched in posting order (MPI's non-overtaking rule). A receive buffer may be
// larger than the message; a smaller one is an error. Used by one thread per rank.
//
// Buffers must stay valid until the request completes. A send whose request is destroyed
// while active (after a timeout, say) may still be read by a late peer: keep its buffer alive
// as long as the transport.
class Transport {
 public:
  virtual ~Transport() = default;
  Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Largest usable tag (MPI_TAG_UB); at least 32767.
  virtual int max_tag() const = 0;
  virtual std::string name() const = 0;

  Request isend(int peer, int tag, std::span<const std::byte> bytes);
  Request irecv(int peer, int tag, std::span<std::byte> bytes);

  // True if the request has completed (or was inactive); a completed request becomes inactive.
  bool test(Request& request);
  // Blocks until the request completes and returns the bytes transferred. Throws TimeoutError
  // naming the peer and the sequence when `deadline` passes; the request then stays active.
  size_t wait(Request& request, Deadline deadline);
  // Blocks until one of the active requests completes and returns its index; that request
  // becomes inactive. A timeout names the peer of the first active request. At least one
  // request must be active.
  size_t wait_any(std::span<Request* const> requests, Deadline deadline);
  // Cancels a pending receive. Returns true if it was cancelled before any data arrived,
  // false if it had already completed (its data is then in the buffer). Either way the
  // request is inactive afterwards.
  bool cancel(Request& request);

 protected:
  // Implementation interface. `handle` is the implementation's own 64-bit request state.
  virtual uint64_t post_send(int peer, int tag, std::span<const std::byte> bytes) = 0;
  virtual uint64_t post_recv(int peer, int tag, std::span<std::byte> bytes) = 0;
  // Returns true and sets *n_bytes if complete; the handle is released on completion.
  virtual bool test_handle(uint64_t& handle, size_t* n_bytes) = 0;
  // Waits for any of `handles` (all active); returns the index, or `handles.size()` on timeout.
  // The completed handle is released and its byte count stored in *n_bytes.
  virtual size_t wait_handles(std::span<uint64_t* const> handles, Deadline deadline,
                              size_t* n_bytes) = 0;
  // Returns true if cancelled; otherwise the receive had completed with *n_bytes.
  virtual bool cancel_handle(uint64_t& handle, size_t* n_bytes) = 0;
  // Releases an active request that nobody will complete; must not throw.
  virtual void abandon_handle(uint64_t handle, Direction direction) noexcept = 0;

 private:
  friend class Request;
  void check_owned(const Request& request) const;
  [[noreturn]] void throw_timeout(const Request& request) const;
  Request make_request(uint64_t handle, int peer, int tag, Direction direction);

  // wait_any's handles of the active requests and their indices in the caller's list; sized
  // for the common waits up front, grown once for a longer list.
  static constexpr size_t kWaitScratch = 16;
  std::vector<uint64_t*> wait_handles_ = std::vector<uint64_t*>(kWaitScratch);
  std::vector<size_t> wait_index_ = std::vector<size_t>(kWaitScratch);
};

}  // namespace resync::collectives
