#include "collectives/transport/transport.h"

#include <fmt/format.h>

#include <array>

#include "base/error.h"

namespace resync::collectives {

Deadline deadline_after(std::chrono::milliseconds timeout) {
  const Deadline now = Clock::now();
  if (timeout.count() < 0) return now;
  // Compare in milliseconds: converting a huge timeout to the clock's ticks would overflow.
  const auto remaining = std::chrono::floor<std::chrono::milliseconds>(kNoDeadline - now);
  if (timeout >= remaining) return kNoDeadline;
  return now + timeout;
}

Request& Request::operator=(Request&& other) noexcept {
  if (this != &other) {
    reset();
    take(other);
  }
  return *this;
}

void Request::take(Request& other) noexcept {
  owner_ = other.owner_;
  handle_ = other.handle_;
  peer_ = other.peer_;
  tag_ = other.tag_;
  direction_ = other.direction_;
  sequence_ = other.sequence_;
  n_bytes_ = other.n_bytes_;
  other.owner_ = nullptr;
}

void Request::reset() noexcept {
  if (owner_ != nullptr) {
    owner_->abandon_handle(handle_, direction_);
    owner_ = nullptr;
  }
}

Request Transport::make_request(uint64_t handle, int peer, int tag, Direction direction) {
  Request r;
  r.owner_ = this;
  r.handle_ = handle;
  r.peer_ = peer;
  r.tag_ = tag;
  r.direction_ = direction;
  r.sequence_ = static_cast<uint64_t>(tag);
  return r;
}

Request Transport::isend(int peer, int tag, std::span<const std::byte> bytes) {
  RESYNC_CHECK_ARG(peer >= 0 && peer < size(),
                   fmt::format("isend: peer {} outside 0..{}", peer, size() - 1));
  RESYNC_CHECK_ARG(tag >= 0 && tag <= max_tag(),
                   fmt::format("isend: tag {} outside 0..{}", tag, max_tag()));
  return make_request(post_send(peer, tag, bytes), peer, tag, Direction::kSend);
}

Request Transport::irecv(int peer, int tag, std::span<std::byte> bytes) {
  RESYNC_CHECK_ARG(peer >= 0 && peer < size(),
                   fmt::format("irecv: peer {} outside 0..{}", peer, size() - 1));
  RESYNC_CHECK_ARG(tag >= 0 && tag <= max_tag(),
                   fmt::format("irecv: tag {} outside 0..{}", tag, max_tag()));
  return make_request(post_recv(peer, tag, bytes), peer, tag, Direction::kReceive);
}

void Transport::check_owned(const Request& request) const {
  RESYNC_CHECK_ARG(request.owner_ == this, "request belongs to another transport");
}

bool Transport::test(Request& request) {
  if (!request.active()) return true;
  check_owned(request);
  size_t n_bytes = 0;
  if (!test_handle(request.handle_, &n_bytes)) return false;
  request.owner_ = nullptr;
  request.n_bytes_ = n_bytes;
  return true;
}

size_t Transport::wait(Request& request, Deadline deadline) {
  if (!request.active()) return 0;
  check_owned(request);
  size_t n_bytes = 0;
  if (!test_handle(request.handle_, &n_bytes)) {
    std::array<uint64_t*, 1> handles{&request.handle_};
    if (wait_handles(handles, deadline, &n_bytes) != 0) throw_timeout(request);
  }
  request.owner_ = nullptr;
  request.n_bytes_ = n_bytes;
  return n_bytes;
}

size_t Transport::wait_any(std::span<Request* const> requests, Deadline deadline) {
  // Scratch kept across calls: it grows to the largest request list once, then never allocates.
  if (wait_handles_.size() < requests.size()) {
    wait_handles_.resize(requests.size());
    wait_index_.resize(requests.size());
  }
  std::vector<uint64_t*>& handles = wait_handles_;
  std::vector<size_t>& index = wait_index_;
  size_t n_active = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    Request* r = requests[i];
    if (r == nullptr || !r->active()) continue;
    check_owned(*r);
    handles[n_active] = &r->handle_;
    index[n_active] = i;
    ++n_active;
  }
  RESYNC_CHECK_ARG(n_active > 0, "wait_any: no active request");
  size_t n_bytes = 0;
  const size_t got = wait_handles(std::span(handles.data(), n_active), deadline, &n_bytes);
  if (got >= n_active) throw_timeout(*requests[index[0]]);
  requests[index[got]]->owner_ = nullptr;
  requests[index[got]]->n_bytes_ = n_bytes;
  return index[got];
}

bool Transport::cancel(Request& request) {
  if (!request.active()) return false;
  check_owned(request);
  RESYNC_CHECK_ARG(request.direction_ == Direction::kReceive, "only receives can be cancelled");
  size_t n_bytes = 0;
  const bool cancelled = cancel_handle(request.handle_, &n_bytes);
  request.owner_ = nullptr;
  request.n_bytes_ = cancelled ? 0 : n_bytes;
  return cancelled;
}

void Transport::throw_timeout(const Request& request) const {
  const bool is_recv = request.direction() == Direction::kReceive;
  throw TimeoutError(
      fmt::format("{} transport, rank {}: timed out waiting for {} rank {} (seq {}, tag {})",
                  name(), rank(), is_recv ? "a message from" : "a send to", request.peer(),
                  request.sequence(), request.tag()),
      request.peer(), request.sequence());
}

}  // namespace resync::collectives
