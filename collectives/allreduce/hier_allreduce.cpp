#include "collectives/allreduce/hier_allreduce.h"

#include <fmt/format.h>

#include <algorithm>

#include "base/error.h"
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

HierSlices::HierSlices(size_t n_elems, int slices, size_t block_elems)
    : n(n_elems),
      n_slices(slices),
      slice_len(round_up((n_elems + slices - 1) / slices, kLineElems)),
      piece(std::max(kLineElems, block_elems / slices / kLineElems * kLineElems)) {}

HierAllreduce::HierAllreduce(Context& ctx, ShmAllreduce& shm, RingAllreduce& ring,
                             SmallAllreduce& small, size_t small_max_bytes)
    : ctx_(ctx),
      shm_(shm),
      ring_(ring),
      small_(small),
      small_max_bytes_(small_max_bytes),
      node_of_(shm.node_of().begin(), shm.node_of().end()),
      scratch_(ctx.size(), 0) {
  node_members_.reserve(ctx.size());
  owners_.reserve(ctx.size());
}

HierPlan HierAllreduce::plan(std::span<const int> participants) {
  return plan_hier(participants, node_of_, ctx_.rank(), node_members_, owners_, scratch_);
}

void HierAllreduce::allreduce_sum(std::span<float> data, std::span<const int> participants,
                                  uint64_t seq) {
  position_in_participants(participants, ctx_.rank(), ctx_.size(), seq);
  const HierPlan p = plan(participants);
  shm_.allreduce_hier(data, node_members_, seq, p.n_slices, *this);
}

// Across nodes the owners of one slice are a participant list of their own (one rank per
// node); the slices' owner sets are disjoint, so their messages never meet.
void HierAllreduce::exchange_slice(std::span<float> slice, uint64_t seq) {
  if (owners_.size() <= 1) return;
  if (owners_.size() <= kSmallMaxOwners && slice.size_bytes() <= small_max_bytes_) {
    small_.allreduce_sum(slice, owners_, seq);
  } else {
    ring_.allreduce_sum(slice, owners_, seq);
  }
}

}  // namespace resync::collectives
