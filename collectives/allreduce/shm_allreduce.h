// ShmAllreduce: in-place float sum among the ranks of one node through an MPI-3 shared-memory
// window that is used as plain memory, synchronised by per-rank progress words, never by MPI.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "collectives/transport/context.h"

namespace resync::collectives {

struct ShmOptions {
  // One pipeline block of the blocked path, in bytes (rounded to whole cache lines). Each rank's
  // segment holds four blocks: two sets (consecutive calls) of two halves (consecutive blocks).
  // The small path goes block by block too. 128 KiB measured best at 2 and 4 ranks on 2 cores
  // (docs/benchmarks.md).
  size_t block_bytes = 128 * 1024;
  // Pipeline block of the direct path (nothing is staged, so larger blocks only mean fewer
  // waits; 2 MiB measured best).
  size_t direct_block_bytes = 2 * 1024 * 1024;
  // How long a waiting rank spins before it yields the CPU, in nanoseconds; negative: 20 us when
  // the node has at least as many cores as ranks, otherwise 0 (a spinning waiter would steal the
  // time slice of the very rank it waits for).
  long spin_ns = -1;
  // Floats of this rank's shared buffer (shared_buffer()): data placed there is summed with
  // no copy into the segment (allreduce_direct). 0: none.
  size_t direct_elems = 0;
  // Fault injection for tests: after publishing this many progress events of a call the rank
  // returns from it without finishing, as if it had died there (0: never).
  uint64_t vanish_after_events = 0;
  // Tests and benchmarks on one machine: > 0 splits each real node into fake nodes of this
  // many ranks (by node-local rank), each with a window of its own, so that calls spanning
  // them take the cross-node (hierarchical) path. 0: nodes as MPI sees them.
  int fake_node_size = 0;
};

// One instance per rank, created together by all ranks of `comm` at start-up; reuse it every
// step. Not thread-safe.
//
// Window creation is the only collective part. A call involves its participants alone: each
// rank publishes, in its own segment, how far it got in which call (a 64-bit word per set,
// keyed by the call's seq), and waits only for its participants' words, so any subset of the
// node may run while the other ranks do something else or are gone. Waits spin briefly, then
// yield the CPU, and throw TimeoutError naming the peer once ctx.timeout() has passed since
// the call began; a participant that fails publishes that it abandoned the call, so the others
// fail at once instead of at their deadline.
//
// Every call of a rank must use a seq that differs from its two previous calls' seqs (the step
// does; a repeat throws InvalidArgument). Every participant passes the same participant list,
// element count and seq. All participants end with bitwise-identical buffers.
class ShmAllreduce {
 public:
  // Collective over `comm`, whose ranks must be ctx's ranks (the MpiTransport's communicator).
  ShmAllreduce(Context& ctx, MPI_Comm comm, ShmOptions options = {});
  // Frees the window, which is collective over the node; skipped (the memory is left to the
  // end of the process) while an exception unwinds, since peers may be gone.
  ~ShmAllreduce();
  ShmAllreduce(const ShmAllreduce&) = delete;
  ShmAllreduce& operator=(const ShmAllreduce&) = delete;

  // True if every participant shares this rank's node.
  bool covers(std::span<const int> participants) const;
  // The node of every context rank, named by its lowest context rank (fake nodes included).
  std::span<const int> node_of() const { return node_of_; }
  int node_size() const { return static_cast<int>(segments_.size()); }
  int node_rank() const { return local_of_[ctx_.rank()]; }
  size_t block_bytes() const { return block_elems_ * sizeof(float); }
  bool spins() const { return spin_ns_ > 0; }

  // Latency path: every participant publishes its whole buffer and then sums all of them in
  // participant order, so each computes the identical sum itself; one wait per block (a
  // buffer of up to one block: one wait per call). Each rank reads p-1 buffers, so beyond a
  // few ranks and KiB the blocked path moves less; with two ranks it moves as much.
  void allreduce_small(std::span<float> data, std::span<const int> participants, uint64_t seq);

  // Bandwidth path, block by block: each participant copies its block into its segment, reduces
  // its own chunk of the block straight from the others' segments (participant order), and
  // copies the others' reduced chunks back (reduce-scatter + all-gather without messages).
  void allreduce_blocked(std::span<float> data, std::span<const int> participants, uint64_t seq);

  // This rank's part of the window that peers can read directly (options.direct_elems floats).
  std::span<float> shared_buffer() const { return {segments_[node_rank()].direct, direct_elems_}; }
  bool in_shared_buffer(std::span<const float> data) const;

  // For ShmStateBoard, which keeps each rank's training state in its shared buffer and lets
  // peers copy it one-sided. Context rank `rank`'s shared buffer (every rank of the node has
  // options.direct_elems floats; empty if `rank` is on another node), and the version word of
  // the state kept there (shm::state_word of its control page; nullptr if on another node).
  std::span<float> shared_buffer_of(int rank) const;
  uint64_t* state_word_of(int rank) const;
  int rank() const { return ctx_.rank(); }
  // How long a waiting rank spins before it yields, in nanoseconds (0: yields at once).
  long spin_ns() const { return spin_ns_; }

  // Zero-copy bandwidth path for data inside shared_buffer() (on every participant, anywhere
  // in it): each participant reduces its chunk in place straight from the others' buffers and
  // copies their reduced chunks, with no staging copy. Returns once every participant has
  // finished reading this rank's buffer (so the caller may overwrite it).
  void allreduce_direct(std::span<float> data, std::span<const int> participants, uint64_t seq);

  // The cross-node step of allreduce_hier, group by group: an owner's slice is cut into groups
  // of whole pipeline steps; the owner starts a group once its node sum is in place, and
  // finishes it (the group then holds the sum over all nodes, bit-identical on all of the
  // slice's owners) before sharing it, `window` groups later, so that the network carries
  // groups while the node reduces and shares others. poll() moves pending transfers along
  // without blocking; every wait inside the node calls it.
  class SliceExchange {
   public:
    struct Groups {
      size_t steps;   // pipeline steps per group (>= 1)
      size_t window;  // groups started ahead of the one being finished (>= 1)
    };
    // Same answers on every participant of the call (they depend on the call's plan only):
    // the largest piece a step may move, and the groups of steps.
    virtual size_t max_piece_elems() const = 0;
    virtual Groups groups(size_t n_steps, size_t piece_elems) const = 0;
    // An owner's slice, cut into groups of `group_elems` floats (the last may be shorter).
    virtual void begin(std::span<float> slice, size_t group_elems, uint64_t seq) = 0;
    virtual void start(size_t group) = 0;
    virtual void finish(size_t group) = 0;
    virtual void poll() = 0;
    // Lets go of whatever is pending (after a failure); the next begin() starts afresh.
    virtual void abandon() noexcept = 0;

   protected:
    ~SliceExchange() = default;
  };
  // The node's part of a hierarchical all-reduce (hier_allreduce.h has the slicing and sum
  // order): `node_participants` are the call's participants on this node, the first
  // `n_slices` of them own one HierSlices slice each. Step by step, every participant stages
  // its pieces and each owner sums its piece in place (local position order); at the end of
  // each group the owner starts its exchange across nodes; `window` groups later it finishes
  // it, stages the result piece by piece and everyone copies it. A non-owner waits for the
  // owners throughout, and an owner that fails in `exchange` abandons the call, so a missing
  // rank on another node fails the whole node.
  void allreduce_hier(std::span<float> data, std::span<const int> node_participants, uint64_t seq,
                      int n_slices, SliceExchange& exchange);

 private:
  struct Segment {
    uint64_t* words;  // per set, on its own cache line: progress, count, kind, offset
    float* data;      // [2 sets][2 halves][block_elems_]
    float* direct;    // [direct_elems_]
  };
  // Which algorithm a call runs; published with it, so that mismatches fail loudly.
  enum class Kind : uint64_t { kSmall = 1, kBlocked = 2, kDirect = 3, kHier = 4 };
  class Call;
  struct Block;

  int claim_set(Call& call);
  std::span<const int> begin_call(std::span<const int> participants, uint64_t seq, int* me);

  Context& ctx_;
  ShmOptions options_;
  size_t block_elems_;
  size_t direct_block_elems_;
  size_t direct_elems_;
  long spin_ns_;
  MPI_Comm node_comm_ = MPI_COMM_NULL;
  MPI_Win win_ = MPI_WIN_NULL;
  std::vector<int> local_of_;      // context rank -> node-local rank, -1 if on another node
  std::vector<int> world_of_;      // node-local rank -> context rank
  std::vector<int> node_of_;       // context rank -> its node's lowest context rank
  std::vector<Segment> segments_;  // by node-local rank
  // Per set: seq tag of the last call that used it and that call's other participants (local
  // ranks), who may still read it.
  uint64_t set_tag_[2] = {~0ull, ~0ull};
  std::vector<int> set_readers_[2];
  int last_set_ = 1;
  // Per call, sized once: participants as node-local ranks in order, the set each of them
  // uses for the call, and the sources of a sum.
  std::vector<int> locals_;
  std::vector<int> peer_set_;
  std::vector<size_t> peer_offset_;
  std::vector<const float*> srcs_;
};

}  // namespace resync::collectives
