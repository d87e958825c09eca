#include "collectives/state/state_transfer.h"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "base/error.h"

namespace resync::collectives {

namespace {

constexpr uint64_t kMagic = 0x5245'5359'4e43'5354ULL;  // "RESYNCST"

// First message of a transfer. The chunk size travels too, so that the receiver cuts its
// buffers exactly as the sender did.
struct WireHeader {
  uint64_t magic;
  uint64_t step;
  std::array<uint64_t, 4> user;
  uint64_t n_spans;
  uint64_t n_elems;
  uint64_t layout_hash;
  uint64_t chunk_elems;
};

// FNV-1a over the span sizes: a cheap fingerprint of the layout.
template <typename Spans>
uint64_t layout_hash(const Spans& spans) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (const auto& s : spans) {
    uint64_t n = s.size();
    for (int i = 0; i < 8; ++i) {
      h ^= (n >> (8 * i)) & 0xff;
      h *= 0x100000001b3ULL;
    }
  }
  return h;
}

template <typename Spans>
uint64_t total_elems(const Spans& spans) {
  uint64_t n = 0;
  for (const auto& s : spans) n += s.size();
  return n;
}

size_t chunk_elems_of(const StateTransferOptions& options) {
  RESYNC_CHECK_ARG(
      options.max_in_flight >= 1 && options.max_in_flight <= 64,
      fmt::format("state transfer max_in_flight must be in 1..64, got {}", options.max_in_flight));
  return std::max<size_t>(1, options.chunk_bytes / sizeof(float));
}

// Walks every chunk of every span in order, posting at most `max_in_flight` operations and
// waiting for the oldest when the window is full.
template <typename Spans, typename Post>
void stream_chunks(Context& ctx, const Spans& spans, size_t chunk_elems, int max_in_flight,
                   Deadline deadline, const Post& post) {
  std::vector<Request> window(max_in_flight);
  size_t n_posted = 0;
  size_t n_done = 0;
  for (const auto& s : spans) {
    for (size_t offset = 0; offset < s.size(); offset += chunk_elems) {
      if (n_posted - n_done == window.size()) {
        ctx.transport().wait(window[n_done % window.size()], deadline);
        ++n_done;
      }
      window[n_posted % window.size()] =
          post(s.subspan(offset, std::min(chunk_elems, s.size() - offset)));
      ++n_posted;
    }
  }
  for (; n_done < n_posted; ++n_done)
    ctx.transport().wait(window[n_done % window.size()], deadline);
}

}  // namespace

void send_state(Context& ctx, int dst, uint64_t seq, const StateHeader& header,
                std::span<const std::span<const float>> spans,
                const StateTransferOptions& options) {
  RESYNC_CHECK_ARG(dst != ctx.rank(), "send_state to itself");
  const size_t chunk_elems = chunk_elems_of(options);
  const Deadline deadline = ctx.deadline();
  const WireHeader wire{kMagic,       header.step,        header.user,
                        spans.size(), total_elems(spans), layout_hash(spans),
                        chunk_elems};
  Request head = ctx.isend(dst, OpKind::kStateTransfer, seq,
                           std::as_bytes(std::span<const WireHeader, 1>(&wire, 1)));
  stream_chunks(ctx, spans, chunk_elems, options.max_in_flight, deadline,
                [&](std::span<const float> chunk) {
                  return ctx.isend(dst, OpKind::kStateTransfer, seq, std::as_bytes(chunk));
                });
  ctx.transport().wait(head, deadline);
}

void recv_state(Context& ctx, int src, uint64_t seq, StateHeader& header,
                std::span<const std::span<float>> spans, const StateTransferOptions& options) {
  RESYNC_CHECK_ARG(src != ctx.rank(), "recv_state from itself");
  chunk_elems_of(options);
  const Deadline deadline = ctx.deadline();
  WireHeader wire{};
  Request head = ctx.irecv(src, OpKind::kStateTransfer, seq,
                           std::as_writable_bytes(std::span<WireHeader, 1>(&wire, 1)));
  const size_t n_got = ctx.transport().wait(head, deadline);
  if (n_got != sizeof(wire) || wire.magic != kMagic) {
    throw CommError(fmt::format("state transfer seq {} from rank {}: malformed header ({} bytes)",
                                seq, src, n_got));
  }
  if (wire.n_spans != spans.size() || wire.n_elems != total_elems(spans) ||
      wire.layout_hash != layout_hash(spans)) {
    throw CommError(fmt::format(
        "state transfer seq {} from rank {}: sender has {} buffers / {} floats, receiver {} / "
        "{} (or their sizes differ)",
        seq, src, wire.n_spans, wire.n_elems, spans.size(), total_elems(spans)));
  }
  RESYNC_CHECK(wire.chunk_elems > 0, "state transfer header with zero chunk size");
  stream_chunks(ctx, spans, wire.chunk_elems, options.max_in_flight, deadline,
                [&](std::span<float> chunk) {
                  return ctx.irecv(src, OpKind::kStateTransfer, seq, std::as_writable_bytes(chunk));
                });
  header.step = wire.step;
  header.user = wire.user;
}

}  // namespace resync::collectives
