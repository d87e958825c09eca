// HierAllreduce: in-place float sum over participants spread over several nodes. Inside each
// node the participants reduce-scatter through shared memory into S slices, the slice owners
// of all nodes sum their slice across nodes, and the owners share the result through shared
// memory again. Between two nodes the three phases are pipelined: the owners swap their node
// sums group by group (one message each way, below the MPI eager limit), several groups in
// flight, while their nodes reduce the next groups and share the finished ones; across three
// or more nodes each slice goes through one ring (or direct exchange) once the node has
// reduced it. Also the pure parts (the plan of a call and the slicing), kept apart so that
// they can be tested without MPI.
//
// Slicing. A node with L participants splits the buffer into S contiguous slices, S = the
// smallest nonzero local count over the nodes of the call, so every node cuts the same slices
// and each slice has one owner on every node: the participant at local position s < S (local
// positions in sorted world-rank order) owns slice s. A node's extra participants (positions
// >= S, with uneven counts such as 2+3) only contribute to the node sum and receive the
// result. Every owner carries 1/S of the buffer across, over its own set of peers (the
// slices' owner sets are disjoint), so S ranks per node work the network at once instead of
// one leader; a 1+3 split has S = 1 and one carrier per node.
//
// Sum order. Element e of slice s: on each node, the node sum x_a + x_b + ... left to right in
// local position order (one owner computes it); then, across nodes, those node sums: between
// two nodes in owner order (the lower world rank's first, computed by both owners alike);
// across more, in the order of the cross-node exchange (the ring's order over the slice's
// owners, sorted by world rank; participant order for the direct exchange of small slices).
// One rank computes each node sum and the others copy it, so all participants on all nodes
// end bit-identical.
// This is NOT the order of one node's shared-memory path: 4 ranks on one node sum
// ((x_o + x_a) + x_b) + x_c (the chunk's owner first, then participant order), while 2 nodes x
// 2 ranks sum (x0 + x1) + (x2 + x3). Float addition is not associative, so the bits differ in
// the last place. Matching them would need every raw operand to cross the network (L times
// the cross-node bytes: the node sums are what make the path cheaper), so 2x2 and 4x1 agree
// to rounding only, and a run's bits depend on how its ranks are placed on nodes; the training
// checksums of single-node runs are untouched because those calls still take the shm path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "collectives/allreduce/ring_allreduce.h"
#include "collectives/allreduce/shm_allreduce.h"
#include "collectives/allreduce/small_allreduce.h"
#include "collectives/transport/context.h"

namespace resync::collectives {

// One rank's view of a hierarchical call.
struct HierPlan {
  int n_nodes = 0;      // nodes with at least one participant
  int n_slices = 0;     // S: smallest nonzero local count
  int max_local = 0;    // largest local count
  int local_pos = -1;   // this rank's position among its node's participants
  int local_count = 0;  // L: participants on this rank's node
};

// Plans the call of `rank` over sorted `participants`, `node_of[r]` naming the node of world
// rank r (any id, e.g. the node's lowest rank). Fills `node_members` with this node's
// participants (sorted) and, if this rank owns a slice, `owners` with that slice's owners on all
// nodes (sorted); `owners` is left empty otherwise. Both are cleared first; no allocation once
// they hold participants.size() ints. `scratch` must hold node_of.size() ints, all zero; it
// is zero again on return.
HierPlan plan_hier(std::span<const int> participants, std::span<const int> node_of, int rank,
                   std::vector<int>& node_members, std::vector<int>& owners,
                   std::span<int> scratch);

// The S contiguous slices of an n-element buffer, each starting at a whole cache line (16
// floats) so that owners never share a line; trailing slices may be empty when n is small.
// Step k of the shared-memory phases moves piece k of every slice (`piece` floats of each,
// (S + 1) * piece <= the shm block: S pieces staged for the reduce-scatter, and an owner's
// piece for the all-gather; and at most `max_piece` floats, a message across nodes), so all
// owners work at every step.
struct HierSlices {
  size_t n;
  int n_slices;
  size_t slice_len;  // of every slice but the last ones, which may be shorter or empty
  size_t piece;      // floats of one slice per step
  HierSlices(size_t n_elems, int slices, size_t block_elems, size_t max_piece = SIZE_MAX);
  size_t begin(int s) const { return std::min(n, s * slice_len); }
  size_t end(int s) const { return std::min(n, (s + 1) * slice_len); }
  size_t n_steps() const { return (end(0) + piece - 1) / piece; }
  size_t piece_begin(int s, size_t k) const { return std::min(end(s), begin(s) + k * piece); }
  size_t piece_end(int s, size_t k) const { return std::min(end(s), begin(s) + (k + 1) * piece); }
};

struct HierOptions {
  // Between two nodes the slice's two owners swap their node sums group by group (a group:
  // as many whole pipeline steps as fit this many bytes, one message each way), while the
  // nodes reduce the next groups and share the last ones. Below Open MPI's TCP eager limit
  // (btl_tcp_eager_limit, 64 KiB with its header): a larger message waits for a rendezvous
  // handshake, which a busy link delays behind its queue (docs/benchmarks.md).
  size_t message_bytes = 60 * 1024;
  // About this many bytes of groups in flight per owner each way (at least one group, at
  // most kMaxWindow): enough to keep a 1 Gbit/s link busy while a rank is descheduled.
  size_t in_flight_bytes = 640 * 1024;
  // Largest slice that crosses three or more nodes by direct exchange (if at most 8 owners)
  // instead of the ring.
  size_t small_max_bytes = 16 * 1024;
};

// Owned by the Allreducer, which passes its point-to-point paths; one per Context.
class HierAllreduce : private ShmAllreduce::SliceExchange {
 public:
  HierAllreduce(Context& ctx, ShmAllreduce& shm, RingAllreduce& ring, SmallAllreduce& small,
                HierOptions options);

  // This rank's plan for `participants` (no allocation).
  HierPlan plan(std::span<const int> participants);
  // Same contract as every Allreducer path; seq also keys the shared-memory call, so it must
  // differ from this rank's two previous calls' seqs (as for ShmAllreduce).
  void allreduce_sum(std::span<float> data, std::span<const int> participants, uint64_t seq);

 private:
  // SliceExchange. Two nodes: each owner sends its node sum of a group to the other owner
  // and sums the two in owner (world rank) order, both sides alike; the messages of one call
  // between the two share a tag and match in posting order. Three or more: the whole slice
  // at once, through the ring (or the direct exchange when small), after the node's reduce.
  size_t max_piece_elems() const override;
  Groups groups(size_t n_steps, size_t piece_elems) const override;
  void begin(std::span<float> slice, size_t group_elems, uint64_t seq) override;
  void start(size_t group) override;
  void finish(size_t group) override;
  void poll() override;
  void abandon() noexcept override;
  std::span<float> group_span(size_t group) const;
  std::span<float> slot(size_t group) const;
  size_t window_for(size_t group_elems) const;

  static constexpr size_t kMaxWindow = 64;

  Context& ctx_;
  ShmAllreduce& shm_;
  RingAllreduce& ring_;
  SmallAllreduce& small_;
  HierOptions options_;
  std::vector<int> node_of_;
  std::vector<int> node_members_;
  std::vector<int> owners_;
  std::vector<int> scratch_;
  int n_nodes_ = 0;  // of the current call
  // The current call's exchange (an owner's).
  std::span<float> slice_;
  size_t group_elems_ = 0;
  size_t n_groups_ = 0;
  size_t n_slots_ = 0;  // window + 1
  uint64_t seq_ = 0;
  Deadline deadline_{};
  size_t posted_ = 0;  // receives posted (groups 0..posted_-1)
  // Two nodes: a receive slot of group_elems_ floats and a request each way per group in
  // flight (group g in slot g % n_slots_). Receive buffers are sized once: a receive
  // abandoned after a timeout may still land in them.
  std::vector<float> incoming_;
  std::vector<Request> recvs_;
  std::vector<Request> sends_;
  std::vector<const float*> srcs_;
};

}  // namespace resync::collectives
