#include "collectives/transport/context.h"

#include <fmt/format.h>

#include "base/error.h"

namespace resync::collectives {

namespace {
constexpr uint64_t kOpKinds = 4;
}  // namespace

Context::Context(Transport& transport, std::chrono::milliseconds timeout)
    : transport_(&transport), rank_(transport.rank()), size_(transport.size()), timeout_(timeout) {
  const int max_tag = transport.max_tag();
  RESYNC_CHECK_ARG(max_tag >= 32767,
                   fmt::format("transport tag upper bound {} is below MPI's 32767", max_tag));
  const uint64_t n_tags = static_cast<uint64_t>(max_tag) + 1;
  window_ = 1;
  while (window_ * 2 * kOpKinds <= n_tags) window_ *= 2;
}

int Context::tag(OpKind kind, uint64_t seq) const {
  return static_cast<int>((seq & (window_ - 1)) * kOpKinds + static_cast<uint64_t>(kind));
}

Request Context::isend(int peer, OpKind kind, uint64_t seq, std::span<const std::byte> bytes) {
  Request r = transport_->isend(peer, tag(kind, seq), bytes);
  r.set_sequence(seq);
  return r;
}

Request Context::irecv(int peer, OpKind kind, uint64_t seq, std::span<std::byte> bytes) {
  Request r = transport_->irecv(peer, tag(kind, seq), bytes);
  r.set_sequence(seq);
  return r;
}

}  // namespace resync::collectives
