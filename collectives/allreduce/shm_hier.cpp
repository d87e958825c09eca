// ShmAllreduce::allreduce_hier: the shared-memory phases of the hierarchical all-reduce
// (hier_allreduce.h), one ShmAllreduce call around the cross-node exchange.
#include <fmt/format.h>

#include <cstring>

#include "base/error.h"
#include "collectives/allreduce/float_sum.h"
#include "collectives/allreduce/hier_allreduce.h"
#include "collectives/allreduce/shm_allreduce.h"
#include "collectives/allreduce/shm_protocol.h"

namespace resync::collectives {

using namespace shm;

void ShmAllreduce::allreduce_hier(std::span<float> data, std::span<const int> node_participants,
                                  uint64_t seq, int n_slices, SliceExchange& exchange) {
  int me = 0;
  const std::span<const int> locals = begin_call(node_participants, seq, &me);
  const int p = static_cast<int>(locals.size());
  RESYNC_CHECK_ARG(n_slices >= 1 && n_slices <= p,
                   fmt::format("hierarchical all-reduce seq {}: {} slices for {} ranks on the "
                               "node",
                               seq, n_slices, p));
  if (data.empty()) return;
  if (p == 1) {  // nothing to share on this node: the cross-node step is the whole call
    exchange.exchange_slice(data, seq);
    return;
  }
  const HierSlices sl(data.size(), n_slices, block_elems_);
  RESYNC_CHECK_ARG(n_slices * sl.piece <= block_elems_,
                   fmt::format("hierarchical all-reduce: {} slices do not fit a {}-byte shm "
                               "block; use larger blocks",
                               n_slices, block_bytes()));
  const size_t n_steps = sl.n_steps();
  RESYNC_CHECK_ARG(4 * n_steps + 5 < kDone,
                   fmt::format("hierarchical all-reduce of {} floats needs more steps than a "
                               "call can count; use larger blocks",
                               data.size()));
  const bool owner = me < n_slices;
  // Events, every participant publishing all of them in this order. Reduce-scatter: staged(0),
  // then per step k staged(k+1) and reduced(k). Exchanged. All-gather: shared(0), then per step
  // shared(k+1) and copied(k), the last one kDone. Staging a step ahead gives peers that much
  // time before the waits.
  const auto staged = [](size_t k) { return 2 * k + 1; };
  const auto reduced = [](size_t k) { return 2 * k + 4; };
  const uint64_t exchanged = reduced(n_steps - 1) + 1;
  const auto shared = [exchanged](size_t k) { return exchanged + 2 * k + 1; };
  const auto copied = [exchanged, n_steps](size_t k) {
    return k + 1 == n_steps ? kDone : exchanged + 2 * k + 4;
  };
  const auto wait_owners = [&](Call& call, uint64_t progress) {
    for (int pos = 0; pos < n_slices; ++pos) {
      if (pos != me) call.wait_for(pos, progress);
    }
  };

  Call call(*this, locals, me, seq, data.size(), Kind::kHier, 0);
  // Reduce-scatter. Step k goes through half k % 2 of our set, piece s at offset s * piece.
  const auto stage = [&](size_t k) {
    if (k >= 2) wait_owners(call, reduced(k - 2));  // they read this half at step k-2
    float* half = call.my_block(static_cast<int>(k % 2));
    for (int s = 0; s < n_slices; ++s) {
      if (s == me) continue;  // an owner sums its own piece straight from its buffer
      const size_t b = sl.piece_begin(s, k);
      std::memcpy(half + s * sl.piece, data.data() + b, (sl.piece_end(s, k) - b) * sizeof(float));
    }
    call.publish(staged(k));
  };
  // Our piece of step k, in local position order, in place (one rank computes each element).
  const auto reduce = [&](size_t k) {
    if (owner) {
      call.wait_for_all(staged(k));
      const size_t b = sl.piece_begin(me, k);
      const int half = static_cast<int>(k % 2);
      for (int pos = 0; pos < p; ++pos) {
        srcs_[pos] = pos == me ? data.data() + b : call.peer_block(pos, half) + me * sl.piece;
      }
      sum_in_order(data.subspan(b, sl.piece_end(me, k) - b),
                   std::span<const float* const>(srcs_.data(), p));
    }
    call.publish(reduced(k));
  };
  // All-gather. An owner stages its piece of step k at the start of half k % 2.
  const auto share = [&](size_t k) {
    if (owner) {
      // Before reusing a half: owners read it in the reduce-scatter, everyone at step k-2.
      if (k < 2) wait_owners(call, reduced(n_steps - 1));
      if (k >= 2) call.wait_for_all(copied(k - 2));
      const size_t b = sl.piece_begin(me, k);
      std::memcpy(call.my_block(static_cast<int>(k % 2)), data.data() + b,
                  (sl.piece_end(me, k) - b) * sizeof(float));
    }
    call.publish(shared(k));
  };
  const auto copy_out = [&](size_t k) {
    for (int i = 1; i <= n_slices; ++i) {
      const int s = (me + i) % n_slices;  // start after our own slice to spread the reads
      if (s == me) continue;
      call.wait_for(s, shared(k));
      const size_t b = sl.piece_begin(s, k);
      std::memcpy(data.data() + b, call.peer_block(s, static_cast<int>(k % 2)),
                  (sl.piece_end(s, k) - b) * sizeof(float));
    }
    call.publish(copied(k));
  };

  try {
    claim_set(call);
    stage(0);
    for (size_t k = 0; k < n_steps; ++k) {
      if (k + 1 < n_steps) stage(k + 1);
      reduce(k);
    }
    if (owner && sl.end(me) > sl.begin(me)) {
      exchange.exchange_slice(data.subspan(sl.begin(me), sl.end(me) - sl.begin(me)), seq);
    }
    call.publish(exchanged);
    share(0);
    for (size_t k = 0; k < n_steps; ++k) {
      if (k + 1 < n_steps) share(k + 1);
      copy_out(k);
    }
    call.finish();
  } catch (const Vanished&) {
    call.mark_vanished();
  }
}

}  // namespace resync::collectives
