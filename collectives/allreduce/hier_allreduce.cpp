#include "collectives/allreduce/hier_allreduce.h"

#include <fmt/format.h>

#include <algorithm>

#include "base/error.h"
#include "collectives/allreduce/float_sum.h"
#include "collectives/allreduce/participants.h"

namespace resync::collectives {

namespace {

constexpr size_t kLineElems = 16;  // floats per cache line
constexpr int kSmallMaxOwners = 8;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

HierPlan plan_hier(std::span<const int> participants, std::span<const int> node_of, int rank,
                   std::vector<int>& node_members, std::vector<int>& owners,
                   std::span<int> scratch) {
  HierPlan plan;
  node_members.clear();
  owners.clear();
  // Count per node in scratch (indexed by node id); then read the counts back.
  for (int r : participants) {
    if (scratch[node_of[r]]++ == 0) ++plan.n_nodes;
  }
  plan.n_slices = static_cast<int>(participants.size());
  const int my_node = node_of[rank];
  for (int r : participants) {
    const int c = scratch[node_of[r]];
    plan.n_slices = std::min(plan.n_slices, c);
    plan.max_local = std::max(plan.max_local, c);
    if (node_of[r] == my_node) {
      if (r == rank) plan.local_pos = static_cast<int>(node_members.size());
      node_members.push_back(r);
    }
  }
  plan.local_count = static_cast<int>(node_members.size());
  for (int r : participants) scratch[node_of[r]] = 0;
  if (plan.local_pos >= 0 && plan.local_pos < plan.n_slices) {
    // Owners of our slice: the participant at our local position on every node. Participants
    // come sorted, so the owners do too.
    for (int r : participants) {
      if (scratch[node_of[r]]++ == plan.local_pos) owners.push_back(r);
    }
    for (int r : participants) scratch[node_of[r]] = 0;
  }
  return plan;
}

HierSlices::HierSlices(size_t n_elems, int slices, size_t block_elems, size_t max_piece)
    : n(n_elems),
      n_slices(slices),
      slice_len(round_up((n_elems + slices - 1) / slices, kLineElems)),
      piece(std::max(kLineElems,
                     std::min(max_piece, block_elems / (slices + 1)) / kLineElems * kLineElems)) {}

HierAllreduce::HierAllreduce(Context& ctx, ShmAllreduce& shm, RingAllreduce& ring,
                             SmallAllreduce& small, HierOptions options)
    : ctx_(ctx),
      shm_(shm),
      ring_(ring),
      small_(small),
      options_(options),
      node_of_(shm.node_of().begin(), shm.node_of().end()),
      scratch_(ctx.size(), 0) {
  RESYNC_CHECK_ARG(options_.message_bytes >= kLineElems * sizeof(float),
                   fmt::format("hierarchical all-reduce: messages of {} bytes are below one "
                               "cache line",
                               options_.message_bytes));
  node_members_.reserve(ctx.size());
  owners_.reserve(ctx.size());
  // A group is at most one message, and the window holds at most in_flight_bytes of them
  // besides the one being finished.
  incoming_.resize(
      (std::max(options_.in_flight_bytes, options_.message_bytes) + options_.message_bytes) /
      sizeof(float));
  recvs_.resize(kMaxWindow + 1);
  sends_.resize(kMaxWindow + 1);
  srcs_.resize(2);
}

HierPlan HierAllreduce::plan(std::span<const int> participants) {
  return plan_hier(participants, node_of_, ctx_.rank(), node_members_, owners_, scratch_);
}

void HierAllreduce::allreduce_sum(std::span<float> data, std::span<const int> participants,
                                  uint64_t seq) {
  position_in_participants(participants, ctx_.rank(), ctx_.size(), seq);
  const HierPlan p = plan(participants);
  n_nodes_ = p.n_nodes;
  shm_.allreduce_hier(data, node_members_, seq, p.n_slices, *this);
}

size_t HierAllreduce::max_piece_elems() const {
  return options_.message_bytes / sizeof(float);
}

HierAllreduce::Groups HierAllreduce::groups(size_t n_steps, size_t piece_elems) const {
  if (n_nodes_ != 2) return {std::max<size_t>(1, n_steps), 1};
  const size_t steps = std::max<size_t>(1, options_.message_bytes / sizeof(float) / piece_elems);
  return {steps, window_for(steps * piece_elems)};
}

size_t HierAllreduce::window_for(size_t group_elems) const {
  return std::clamp<size_t>(options_.in_flight_bytes / (group_elems * sizeof(float)), 1,
                            kMaxWindow);
}

std::span<float> HierAllreduce::group_span(size_t group) const {
  const size_t b = group * group_elems_;
  return slice_.subspan(b, std::min(group_elems_, slice_.size() - b));
}

std::span<float> HierAllreduce::slot(size_t group) const {
  return std::span<float>(const_cast<float*>(incoming_.data()) + (group % n_slots_) * group_elems_,
                          group_span(group).size());
}

void HierAllreduce::begin(std::span<float> slice, size_t group_elems, uint64_t seq) {
  slice_ = owners_.size() <= 1 ? std::span<float>() : slice;
  group_elems_ = group_elems;
  n_groups_ = (slice_.size() + group_elems - 1) / group_elems;
  seq_ = seq;
  deadline_ = ctx_.deadline();
  posted_ = 0;
  if (owners_.size() != 2 || n_groups_ == 0) return;
  n_slots_ = window_for(group_elems) + 1;
  RESYNC_CHECK(n_slots_ * group_elems_ <= incoming_.size(),
               fmt::format("hierarchical all-reduce: {} groups of {} floats overflow the "
                           "receive buffer",
                           n_slots_, group_elems_));
  // Receives go up ahead, so that a group's message finds its buffer as it arrives.
  const int peer = owners_[0] == ctx_.rank() ? owners_[1] : owners_[0];
  for (; posted_ < std::min(n_groups_, n_slots_); ++posted_) {
    recvs_[posted_ % n_slots_] =
        ctx_.irecv(peer, OpKind::kAllreduce, seq_, std::as_writable_bytes(slot(posted_)));
  }
}

void HierAllreduce::start(size_t group) {
  if (owners_.size() != 2 || group >= n_groups_) return;
  const int peer = owners_[0] == ctx_.rank() ? owners_[1] : owners_[0];
  sends_[group % n_slots_] =
      ctx_.isend(peer, OpKind::kAllreduce, seq_, std::as_bytes(group_span(group)));
}

void HierAllreduce::finish(size_t group) {
  if (owners_.size() <= 1 || group >= n_groups_) return;
  if (owners_.size() > 2) {  // the whole slice, once it is reduced (groups() made it one group)
    if (owners_.size() <= kSmallMaxOwners && slice_.size_bytes() <= options_.small_max_bytes) {
      small_.allreduce_sum(slice_, owners_, seq_);
    } else {
      ring_.allreduce_sum(slice_, owners_, seq_);
    }
    return;
  }
  Transport& transport = ctx_.transport();
  const size_t s = group % n_slots_;
  Request* waits[2] = {&recvs_[s], &sends_[s]};
  // Our send reads the node sum that the total overwrites: both must be done.
  while (recvs_[s].active() || sends_[s].active()) transport.wait_any(waits, deadline_);
  const std::span<float> mine = group_span(group);
  const size_t n_got = recvs_[s].transferred_bytes();
  const int peer = owners_[0] == ctx_.rank() ? owners_[1] : owners_[0];
  if (n_got != mine.size_bytes()) {
    throw CommError(fmt::format(
        "hierarchical all-reduce seq {}: rank {} got {} bytes from rank {} for a {}-byte group; "
        "do all participants pass the same element count?",
        seq_, ctx_.rank(), n_got, peer, mine.size_bytes()));
  }
  // Owner order (the lower world rank's node sum first), the same on both owners.
  const bool first = owners_[0] == ctx_.rank();
  const float* theirs = slot(group).data();
  srcs_[0] = first ? mine.data() : theirs;
  srcs_[1] = first ? theirs : mine.data();
  sum_in_order(mine, std::span<const float* const>(srcs_.data(), 2));
  // The slot is free: post the receive of the group it serves next.
  if (posted_ < n_groups_) {
    recvs_[s] = ctx_.irecv(peer, OpKind::kAllreduce, seq_, std::as_writable_bytes(slot(posted_)));
    ++posted_;
  }
}

void HierAllreduce::poll() {
  if (owners_.size() != 2) return;
  // One test moves the whole MPI progress engine; completed requests just turn inactive.
  Transport& transport = ctx_.transport();
  for (size_t s = 0; s < n_slots_; ++s) {
    if (recvs_[s].active()) {
      transport.test(recvs_[s]);
      return;
    }
    if (sends_[s].active()) {
      transport.test(sends_[s]);
      return;
    }
  }
}

void HierAllreduce::abandon() noexcept {
  for (Request& r : recvs_) r.reset();
  for (Request& r : sends_) r.reset();
  slice_ = {};
  n_groups_ = 0;
}

}  // namespace resync::collectives
