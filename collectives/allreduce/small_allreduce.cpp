#include "collectives/allreduce/small_allreduce.h"

#include <fmt/format.h>

#include "base/error.h"
#include "collectives/allreduce/float_sum.h"
#include "collectives/allreduce/participants.h"

namespace resync::collectives {

SmallAllreduce::SmallAllreduce(Context& ctx, size_t max_elems) : ctx_(ctx) {
  const size_t world = static_cast<size_t>(ctx.size());
  recvs_.resize(world);
  sends_.resize(world);
  pending_.reserve(2 * world);
  srcs_.resize(world);
  if (max_elems > 0 && world > 1) scratch_.assign(max_elems * (world - 1), 0.0f);
}

void SmallAllreduce::allreduce_sum(std::span<float> data, std::span<const int> participants,
                                   uint64_t seq) {
  const int me = position_in_participants(participants, ctx_.rank(), ctx_.size(), seq);
  if (participants.size() == 1 || data.empty()) return;
  const size_t need = data.size() * (participants.size() - 1);
  if (scratch_.size() < need) scratch_.assign(need, 0.0f);
  try {
    exchange(data, participants, me, seq);
  } catch (...) {
    for (Request& r : recvs_) r.reset();
    for (Request& r : sends_) r.reset();
    throw;
  }
}

void SmallAllreduce::exchange(std::span<float> data, std::span<const int> participants, int me,
                              uint64_t seq) {
  const int p = static_cast<int>(participants.size());
  const size_t n = data.size();
  // Participant `pos` (not us) lands in slot pos, or pos-1 above us.
  const auto slot = [&](int pos) {
    return std::span<float>(scratch_).subspan((pos < me ? pos : pos - 1) * n, n);
  };
  // Receives first, then sends, each starting from our right neighbour so that no rank is
  // everybody's first destination.
  for (int k = 1; k < p; ++k) {
    const int pos = (me + k) % p;
    recvs_[pos] =
        ctx_.irecv(participants[pos], OpKind::kAllreduce, seq, std::as_writable_bytes(slot(pos)));
  }
  for (int k = 1; k < p; ++k) {
    const int pos = (me + k) % p;
    sends_[pos] = ctx_.isend(participants[pos], OpKind::kAllreduce, seq,
                             std::as_bytes(std::span<const float>(data)));
  }
  const Deadline deadline = ctx_.deadline();
  Transport& transport = ctx_.transport();
  for (;;) {
    pending_.clear();
    for (int pos = 0; pos < p; ++pos) {
      if (recvs_[pos].active()) pending_.push_back(&recvs_[pos]);
      if (sends_[pos].active()) pending_.push_back(&sends_[pos]);
    }
    if (pending_.empty()) break;
    const size_t done = transport.wait_any(pending_, deadline);
    const Request& r = *pending_[done];
    if (r.direction() == Direction::kReceive && r.transferred_bytes() != n * sizeof(float)) {
      throw CommError(fmt::format(
          "small all-reduce seq {}: rank {} got {} bytes from rank {} for {} floats; do all "
          "participants pass the same element count?",
          seq, ctx_.rank(), r.transferred_bytes(), r.peer(), n));
    }
  }
  for (int pos = 0; pos < p; ++pos) srcs_[pos] = pos == me ? data.data() : slot(pos).data();
  sum_in_order(data, std::span<const float* const>(srcs_.data(), p));
}

}  // namespace resync::collectives
