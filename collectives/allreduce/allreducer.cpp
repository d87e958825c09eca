#include "collectives/allreduce/allreducer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>

#include "base/error.h"
#include "collectives/transport/mpi_transport.h"
#include "collectives/allreduce/participants.h"

namespace resync::collectives {

namespace {

// Latency-optimal thresholds, measured on the development machine (docs/benchmarks.md). The
// direct exchange moves (p-1) buffers per rank where the ring moves 2(p-1)/p of one, so it
// stops paying off sooner the more ranks take part.
// Shared memory: with two ranks publishing whole buffers moves no more across the cores than
// the blocked path and waits once instead of per block; with more, each rank reads p-1 whole
// buffers and that stops paying off sooner.
constexpr size_t kShmSmallMaxBytesTwoRanks = 256 * 1024;
constexpr size_t kShmSmallMaxBytes = 32 * 1024;
constexpr size_t kSmallMaxBytes = 16 * 1024;
constexpr int kSmallMaxRanks = 8;

}  // namespace

const char* path_name(AllreducePath path) {
  switch (path) {
    case AllreducePath::kLocal:
      return "local";
    case AllreducePath::kSmall:
      return "small";
    case AllreducePath::kRing:
      return "ring";
    case AllreducePath::kShmSmall:
      return "shm-small";
    case AllreducePath::kShm:
      return "shm";
    case AllreducePath::kShmDirect:
      return "shm-direct";
    case AllreducePath::kHier:
      return "hier";
  }
  return "?";
}

std::optional<AllreducePath> path_from_name(const std::string& name) {
  for (AllreducePath path : {AllreducePath::kLocal, AllreducePath::kSmall, AllreducePath::kRing,
                             AllreducePath::kShmSmall, AllreducePath::kShm,
                             AllreducePath::kShmDirect, AllreducePath::kHier}) {
    if (name == path_name(path)) return path;
  }
  return std::nullopt;
}

Allreducer::Allreducer(Context& ctx, AllreducerOptions options)
    : ctx_(ctx),
      options_(options),
      ring_(ctx,
            [&] {
              RingOptions ring = options.ring;
              ring.max_elems = std::max(ring.max_elems, options.max_elems);
              return ring;
            }()),
      small_(ctx, std::min(options.max_elems,
                           options.small_max_bytes.value_or(kSmallMaxBytes) / sizeof(float))) {
  if (options_.shm.fake_node_size == 0) {
    const char* env = std::getenv("RESYNC_FAKE_NODE_SIZE");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      RESYNC_CHECK_ARG(*end == '\0' && v >= 0 && v < (1 << 20),
                       fmt::format("RESYNC_FAKE_NODE_SIZE={}: not a rank count", env));
      options_.shm.fake_node_size = static_cast<int>(v);
    }
  }
  if (options_.use_shm == ShmUse::kAuto) {
    if (auto* mpi = dynamic_cast<MpiTransport*>(&ctx.transport())) {
      shm_ = std::make_unique<ShmAllreduce>(ctx, mpi->comm(), options_.shm);
      HierOptions hier = options_.hier;
      hier.small_max_bytes = small_max_bytes(AllreducePath::kSmall, 2);
      hier_ = std::make_unique<HierAllreduce>(ctx, *shm_, ring_, small_, hier);
    }
  }
  world_.resize(ctx.size());
  std::iota(world_.begin(), world_.end(), 0);
}

Allreducer::~Allreducer() = default;

size_t Allreducer::small_max_bytes(AllreducePath path, int p) const {
  if (path == AllreducePath::kShmSmall) {
    return options_.small_max_bytes.value_or(p == 2 ? kShmSmallMaxBytesTwoRanks
                                                    : kShmSmallMaxBytes);
  }
  return options_.small_max_bytes.value_or(kSmallMaxBytes);
}

void Allreducer::set_phase_observer(PhaseObserver* observer) {
  observer_ = observer;
  ring_.set_phase_observer(observer);
}

std::span<float> Allreducer::shared_buffer() const {
  return shm_ ? shm_->shared_buffer() : std::span<float>();
}

AllreducePath Allreducer::path_for(std::span<const float> data,
                                   std::span<const int> participants) const {
  const int p = static_cast<int>(participants.size());
  if (p <= 1 || data.empty()) return AllreducePath::kLocal;
  if (options_.force) return *options_.force;
  const size_t n_bytes = data.size_bytes();
  if (shm_ && shm_->covers(participants)) {
    if (n_bytes <= small_max_bytes(AllreducePath::kShmSmall, p)) return AllreducePath::kShmSmall;
    return shm_->in_shared_buffer(data) ? AllreducePath::kShmDirect : AllreducePath::kShm;
  }
  // Across nodes: worth it once some node has two participants to sum before crossing (with
  // one per node the hierarchical path is the flat exchange plus overhead).
  if (hier_ && hier_->plan(participants).max_local >= 2) return AllreducePath::kHier;
  if (p <= kSmallMaxRanks && n_bytes <= small_max_bytes(AllreducePath::kSmall, p)) {
    return AllreducePath::kSmall;
  }
  return AllreducePath::kRing;
}

void Allreducer::allreduce_sum(std::span<float> data) {
  allreduce_sum(data, world_, ctx_.next_sequence());
}

void Allreducer::allreduce_sum(std::span<float> data, std::span<const int> participants,
                               uint64_t seq) {
  position_in_participants(participants, ctx_.rank(), ctx_.size(), seq);
  const AllreducePath path = path_for(data, participants);
  const bool shm_path = path == AllreducePath::kShm || path == AllreducePath::kShmSmall ||
                        path == AllreducePath::kShmDirect;
  RESYNC_CHECK_ARG(!shm_path || (shm_ && shm_->covers(participants)),
                   fmt::format("all-reduce seq {}: path {} needs every participant on this "
                               "node's shared memory",
                               seq, path_name(path)));
  RESYNC_CHECK_ARG(path != AllreducePath::kHier || hier_,
                   fmt::format("all-reduce seq {}: path hier needs shared memory", seq));
  last_path_ = path;
  // The ring reports its own phases; the other exchanges are one phase each.
  const bool whole = path != AllreducePath::kLocal && path != AllreducePath::kRing;
  ScopedPhase phase(whole ? observer_ : nullptr, {AllreducePhase::kWhole, seq, data.size(),
                                                  static_cast<int>(participants.size())});
  switch (path) {
    case AllreducePath::kLocal:
      return;
    case AllreducePath::kSmall:
      small_.allreduce_sum(data, participants, seq);
      return;
    case AllreducePath::kRing:
      ring_.allreduce_sum(data, participants, seq);
      return;
    case AllreducePath::kShmSmall:
      shm_->allreduce_small(data, participants, seq);
      return;
    case AllreducePath::kShm:
      shm_->allreduce_blocked(data, participants, seq);
      return;
    case AllreducePath::kShmDirect:
      shm_->allreduce_direct(data, participants, seq);
      return;
    case AllreducePath::kHier:
      hier_->allreduce_sum(data, participants, seq);
      return;
  }
}

std::string Allreducer::describe() const {
  std::string shm = "off";
  if (shm_) {
    shm = fmt::format(
        "{} ranks on this node{}, {} KiB blocks, shm-small up to {} B ({} B for "
        "two ranks), shared buffer {} floats, waits {}; hier across nodes",
        node_size(),
        options_.shm.fake_node_size > 0
            ? fmt::format(" (fake nodes of {} ranks)", options_.shm.fake_node_size)
            : "",
        shm_->block_bytes() / 1024, small_max_bytes(AllreducePath::kShmSmall, 3),
        small_max_bytes(AllreducePath::kShmSmall, 2), shm_->shared_buffer().size(),
        shm_->spins() ? "spin then yield" : "yield at once");
  }
  return fmt::format(
      "all-reduce: shared memory {}; small up to {} B; ring segments {} KiB{}", shm,
      small_max_bytes(AllreducePath::kSmall, 2), ring_.options().segment_bytes / 1024,
      options_.force ? fmt::format("; forced path {}", path_name(*options_.force)) : "");
}

}  // namespace resync::collectives
