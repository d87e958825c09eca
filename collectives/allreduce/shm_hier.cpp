// ShmAllreduce::allreduce_hier: the shared-memory phases of the hierarchical all-reduce
// (hier_allreduce.h), one ShmAllreduce call around the cross-node exchange, pipelined with it.
#include <fmt/format.h>

#include <cstring>

#include "base/error.h"
#include "collectives/allreduce/float_sum.h"
#include "collectives/allreduce/hier_allreduce.h"
#include "collectives/allreduce/shm_allreduce.h"
#include "collectives/allreduce/shm_protocol.h"

namespace resync::collectives {

using namespace shm;

namespace {

// The exchange's pending transfers are let go if the call leaves early.
class ExchangeGuard {
 public:
  explicit ExchangeGuard(ShmAllreduce::SliceExchange& exchange) : exchange_(exchange) {}
  ~ExchangeGuard() {
    if (!done_) exchange_.abandon();
  }
  ExchangeGuard(const ExchangeGuard&) = delete;
  ExchangeGuard& operator=(const ExchangeGuard&) = delete;
  void done() { done_ = true; }

 private:
  ShmAllreduce::SliceExchange& exchange_;
  bool done_ = false;
};

}  // namespace

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
  const HierSlices sl(data.size(), n_slices, block_elems_, exchange.max_piece_elems());
  RESYNC_CHECK_ARG((n_slices + 1) * sl.piece <= block_elems_,
                   fmt::format("hierarchical all-reduce: {} slices do not fit a {}-byte shm "
                               "block; use larger blocks",
                               n_slices, block_bytes()));
  const size_t n_steps = sl.n_steps();
  const SliceExchange::Groups groups = exchange.groups(n_steps, sl.piece);
  const size_t group_steps = groups.steps;
  // Steps between reducing a piece and sharing it: the window of groups in flight.
  const size_t lag = group_steps * groups.window;
  RESYNC_CHECK_ARG(8 * (n_steps + lag) + 20 < kDone,
                   fmt::format("hierarchical all-reduce of {} floats needs more steps than a "
                               "call can count; use larger blocks",
                               data.size()));
  const bool owner = me < n_slices;
  const std::span<float> slice =
      owner ? data.subspan(sl.begin(me), sl.end(me) - sl.begin(me)) : std::span<float>();
  const size_t group_elems = group_steps * sl.piece;
  const size_t n_groups = (slice.size() + group_elems - 1) / group_elems;

  if (p == 1) {  // nothing to share on this node: the cross-node step is the whole call
    ExchangeGuard guard(exchange);
    exchange.begin(slice, group_elems, seq);
    for (size_t g = 0; g < n_groups + groups.window; ++g) {
      if (g < n_groups) exchange.start(g);
      if (g >= groups.window) exchange.finish(g - groups.window);
    }
    guard.done();
    return;
  }

  // Events, every participant publishing those that exist in this order. Staged(0); then
  // iteration i publishes staged(i+1), reduced(i), shared(i+1-lag), copied(i-lag), numbered
  // 8(i+1) + 1..4; the last copied is kDone. Staging a step ahead gives peers that much time
  // before the waits; sharing a step ahead of copying does the same for the all-gather.
  const auto staged = [](size_t k) { return k == 0 ? uint64_t{1} : 8 * k + 1; };
  const auto reduced = [](size_t k) { return 8 * (k + 1) + 2; };
  const auto shared = [lag](size_t j) { return 8 * (j + lag) + 3; };
  const auto copied = [lag, n_steps](size_t j) {
    return j + 1 == n_steps ? kDone : 8 * (j + lag + 1) + 4;
  };
  const auto wait_owners = [&](Call& call, uint64_t progress) {
    for (int pos = 0; pos < n_slices; ++pos) {
      if (pos != me) call.wait_for(pos, progress);
    }
  };

  Call call(*this, locals, me, seq, data.size(), Kind::kHier, 0);
  // Each half of our set: the reduce-scatter's pieces at s * piece for every slice s (ours
  // excepted if we own one), then, at n_slices * piece, the all-gather's piece if we own one.
  // Step k uses half k % 2 of both regions.
  const size_t gather_at = n_slices * sl.piece;
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
  // Our piece of step k, in local position order, in place (one rank computes each element);
  // at the end of a group its exchange across nodes starts.
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
      const size_t g = k / group_steps;
      if (g < n_groups && ((k + 1) % group_steps == 0 || k + 1 == n_steps)) exchange.start(g);
    }
    call.publish(reduced(k));
  };
  // An owner finishes a group's exchange before it shares the group's first piece.
  const auto share = [&](size_t j) {
    if (owner) {
      if (j % group_steps == 0 && j / group_steps < n_groups) exchange.finish(j / group_steps);
      if (j >= 2) call.wait_for_all(copied(j - 2));  // they copied this half at step j-2
      const size_t b = sl.piece_begin(me, j);
      std::memcpy(call.my_block(static_cast<int>(j % 2)) + gather_at, data.data() + b,
                  (sl.piece_end(me, j) - b) * sizeof(float));
    }
    call.publish(shared(j));
  };
  const auto copy_out = [&](size_t j) {
    for (int i = 1; i <= n_slices; ++i) {
      const int s = (me + i) % n_slices;  // start after our own slice to spread the reads
      if (s == me) continue;
      call.wait_for(s, shared(j));
      const size_t b = sl.piece_begin(s, j);
      std::memcpy(data.data() + b, call.peer_block(s, static_cast<int>(j % 2)) + gather_at,
                  (sl.piece_end(s, j) - b) * sizeof(float));
    }
    call.publish(copied(j));
  };

  try {
    ExchangeGuard guard(exchange);
    if (owner) {
      exchange.begin(slice, group_elems, seq);
      call.set_idle(&exchange);
    }
    claim_set(call);
    stage(0);
    for (size_t i = 0; i < n_steps + lag; ++i) {
      if (i + 1 < n_steps) stage(i + 1);
      if (i < n_steps) reduce(i);
      if (i + 1 >= lag && i + 1 - lag < n_steps) share(i + 1 - lag);
      if (i >= lag) copy_out(i - lag);
      if (owner) exchange.poll();
    }
    guard.done();
    call.finish();
  } catch (const Vanished&) {
    call.mark_vanished();
  }
}

}  // namespace resync::collectives
