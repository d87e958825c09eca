// collectives/allreduce: in-place float sums over a step's participants. The Allreducer (this
// header) picks a path per call: shared memory inside a node (shm_allreduce.h), a latency-optimal
// exchange for small buffers (small_allreduce.h), the pipelined ring (ring_allreduce.h) or,
// across nodes, the hierarchical path (hier_allreduce.h), all summing in one fixed order
// (float_sum.h) so participants agree bit for bit. Also the NCCL communicator (--collective
// nccl) and the MPI_Allreduce peer of the benchmark.
//
// Allreducer: the gradient all-reduce of the training loop. Per call it picks shared memory
// (participants on one node), the hierarchical path (participants on several nodes, some node
// with two or more of them: shared memory inside each node, 1/S of the buffer per owner rank
// across nodes, see hier_allreduce.h for the slicing and sum order), a latency-optimal
// exchange (small buffers) or the ring (one participant per node, or no shared memory).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "collectives/transport/context.h"
#include "collectives/allreduce/hier_allreduce.h"
#include "collectives/allreduce/ring_allreduce.h"
#include "collectives/allreduce/shm_allreduce.h"
#include "collectives/allreduce/small_allreduce.h"

namespace resync::collectives {

enum class AllreducePath : uint8_t {
  kLocal,      // one participant or no data: nothing to exchange
  kSmall,      // SmallAllreduce: every participant sends its buffer to every other one
  kRing,       // RingAllreduce: pipelined reduce-scatter + all-gather over the transport
  kShmSmall,   // ShmAllreduce::allreduce_small: all buffers published in shared memory
  kShm,        // ShmAllreduce::allreduce_blocked: reduce-scatter + all-gather in shared memory
  kShmDirect,  // ShmAllreduce::allreduce_direct: as kShm, data in shared_buffer(), no copies
  kHier,       // HierAllreduce: shm reduce-scatter per node, slices across nodes, shm all-gather
};

// "local", "small", "ring", "shm-small", "shm", "shm-direct", "hier".
const char* path_name(AllreducePath path);
// The path named `name`, or nullopt.
std::optional<AllreducePath> path_from_name(const std::string& name);

enum class ShmUse : uint8_t {
  kAuto,  // shared memory among the ranks of a node when the transport is an MpiTransport
  kOff,   // point-to-point paths only
};

struct AllreducerOptions {
  RingOptions ring{};  // the point-to-point ring (across nodes, or without shared memory)
  // shm.fake_node_size: split each node into fake nodes (tests, benchmarks on one machine);
  // when 0, the environment variable RESYNC_FAKE_NODE_SIZE, read here only, may set it.
  ShmOptions shm{};
  // The hierarchical path's exchange between nodes (its small_max_bytes is taken from the
  // point-to-point small path's threshold below).
  HierOptions hier{};
  ShmUse use_shm = ShmUse::kAuto;
  // Largest buffer, in bytes, that takes a latency-optimal path (kSmall, kShmSmall); nullopt:
  // the thresholds measured on the development machine (see docs/benchmarks.md).
  std::optional<size_t> small_max_bytes = std::nullopt;
  // Forces this path for every call (benchmarks, tests); a call the path cannot serve (shared
  // memory with a participant on another node, a small path above its limit) throws
  // InvalidArgument. kLocal is still taken for one participant or no data. kHier also
  // serves participants on one node (one slice owner per slice, nothing crosses).
  std::optional<AllreducePath> force = std::nullopt;
  // Largest buffer expected, in floats, to size buffers once up front (0: on first use).
  size_t max_elems = 0;
};

// One instance per Context, constructed by every rank at start-up; reuse it every step. Not
// thread-safe. When ctx's transport is an MpiTransport (and use_shm is kAuto) the constructor
// is collective over that transport's communicator: it creates the node's shared-memory
// window. With any other transport (loopback) it is local and only the point-to-point paths
// exist.
//
// Contract of every path (as RingAllreduce): in-place float sum over the sorted participant
// list; every participant passes the same list, element count and seq; all participants end
// with bitwise-identical buffers; ranks outside the list are never waited for; a participant
// that does not show up makes the others throw TimeoutError after ctx.timeout(). The path is
// a function of (element count, participant list, options, whether the data lies in
// shared_buffer()), so participants agree on it without talking. The shared-memory paths also
// need each call of a rank to use a seq that differs from its two previous calls' (the step
// does); so does kHier, which keys its shared-memory phases by the call's seq.
//
// kHier (hier_allreduce.h has the details): with L_j participants on node j, S = min over the
// nodes of the call of L_j slices; the participant at local position s < S owns slice s on its
// node (extra ranks only contribute and receive). Sum order: each node's sum in local position
// order, then the node sums in the cross-node exchange's order, computed once and copied, so
// all participants on all nodes agree bit for bit. It does not reproduce one node's shm bits
// (2 nodes x 2 ranks: (x0+x1)+(x2+x3); 4 ranks on one node: ((x_o+..)+..)+.. with the chunk's
// owner first): matching them would send every raw operand across nodes. Single-node calls
// keep the shm paths, so single-node results are unchanged.
class Allreducer {
 public:
  explicit Allreducer(Context& ctx, AllreducerOptions options = {});
  ~Allreducer();
  Allreducer(const Allreducer&) = delete;
  Allreducer& operator=(const Allreducer&) = delete;

  void allreduce_sum(std::span<float> data, std::span<const int> participants, uint64_t seq);
  // Over every rank of the context with seq = ctx.next_sequence().
  void allreduce_sum(std::span<float> data);

  // The path a call with these arguments takes (validates nothing).
  AllreducePath path_for(std::span<const float> data, std::span<const int> participants) const;

  // This rank's part of the node's shared-memory window (options.shm.direct_elems floats;
  // empty without shared memory). A buffer placed there (e.g. the gradients) is summed
  // without staging copies (kShmDirect) whenever every participant passes its own shared
  // buffer; participants that disagree get a CommError.
  std::span<float> shared_buffer() const;
  AllreducePath last_path() const { return last_path_; }
  // Sees the ring's reduce-scatter and all-gather, and every other non-local path as one
  // kWhole phase. Not owned; must outlive the calls made while set. nullptr turns it off.
  void set_phase_observer(PhaseObserver* observer);
  // Whether the shared-memory window exists, and the ranks it spans (1 without it; fake
  // nodes count as nodes).
  bool has_shm() const { return shm_ != nullptr; }
  int node_size() const { return shm_ ? shm_->node_size() : 1; }
  // The shared-memory all-reducer itself (e.g. for a ShmStateBoard over its shared buffers);
  // nullptr without shared memory. Owned by this Allreducer.
  ShmAllreduce* shm() const { return shm_.get(); }
  // One line for the start-up log: paths available and thresholds.
  std::string describe() const;

 private:
  size_t small_max_bytes(AllreducePath path, int p) const;

  Context& ctx_;
  AllreducerOptions options_;
  RingAllreduce ring_;
  SmallAllreduce small_;
  std::unique_ptr<ShmAllreduce> shm_;
  std::unique_ptr<HierAllreduce> hier_;  // with shm_
  std::vector<int> world_;
  PhaseObserver* observer_ = nullptr;
  AllreducePath last_path_ = AllreducePath::kLocal;
};

}  // namespace resync::collectives
