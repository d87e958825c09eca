#include "collectives/allreduce/shm_allreduce.h"

#include <fmt/format.h>
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <ctime>
#include <exception>

#include "base/error.h"
#include "collectives/allreduce/float_sum.h"
#include "collectives/allreduce/participants.h"
#include "collectives/allreduce/shm_protocol.h"

namespace resync::collectives {

using namespace shm;

ShmAllreduce::ShmAllreduce(Context& ctx, MPI_Comm comm, ShmOptions options)
    : ctx_(ctx),
      options_(options),
      block_elems_(round_up(std::max<size_t>(options.block_bytes, 64), 64) / sizeof(float)),
      direct_block_elems_(round_up(std::max<size_t>(options.direct_block_bytes, 64), 64) /
                          sizeof(float)),
      direct_elems_(options.direct_elems) {
  RESYNC_CHECK_ARG(options.block_bytes <= (size_t{1} << 30),
                   fmt::format("shm block of {} bytes is above 1 GiB", options.block_bytes));
  int comm_rank = 0;
  int comm_size = 0;
  RESYNC_CHECK_MPI(MPI_Comm_rank(comm, &comm_rank));
  RESYNC_CHECK_MPI(MPI_Comm_size(comm, &comm_size));
  RESYNC_CHECK_ARG(comm_rank == ctx.rank() && comm_size == ctx.size(),
                   "ShmAllreduce: the communicator's ranks must be the context's ranks");

  // The node: its lowest context rank names it; every rank learns every rank's node and place.
  RESYNC_CHECK_MPI(
      MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, comm_rank, MPI_INFO_NULL, &node_comm_));
  RESYNC_CHECK_MPI(MPI_Comm_set_errhandler(node_comm_, MPI_ERRORS_RETURN));
  int node_rank = 0;
  int node_size = 0;
  RESYNC_CHECK_MPI(MPI_Comm_rank(node_comm_, &node_rank));
  // Ranks sharing this machine's cores (fake nodes share them too): decides whether waits spin.
  int machine_ranks = 0;
  RESYNC_CHECK_MPI(MPI_Comm_size(node_comm_, &machine_ranks));
  if (options.fake_node_size > 0) {
    // A subcommunicator of a shared-memory one still allows MPI_Win_allocate_shared.
    MPI_Comm fake = MPI_COMM_NULL;
    RESYNC_CHECK_MPI(
        MPI_Comm_split(node_comm_, node_rank / options.fake_node_size, node_rank, &fake));
    MPI_Comm_free(&node_comm_);
    node_comm_ = fake;
    RESYNC_CHECK_MPI(MPI_Comm_set_errhandler(node_comm_, MPI_ERRORS_RETURN));
    RESYNC_CHECK_MPI(MPI_Comm_rank(node_comm_, &node_rank));
  }
  RESYNC_CHECK_MPI(MPI_Comm_size(node_comm_, &node_size));
  int leader = comm_rank;
  RESYNC_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &leader, 1, MPI_INT, MPI_MIN, node_comm_));
  std::vector<int> placement(2 * static_cast<size_t>(comm_size));
  const int mine[2] = {leader, node_rank};
  RESYNC_CHECK_MPI(MPI_Allgather(mine, 2, MPI_INT, placement.data(), 2, MPI_INT, comm));
  local_of_.assign(comm_size, -1);
  world_of_.assign(node_size, -1);
  node_of_.resize(comm_size);
  for (int r = 0; r < comm_size; ++r) {
    node_of_[r] = placement[2 * r];
    if (placement[2 * r] != leader) continue;
    local_of_[r] = placement[2 * r + 1];
    world_of_[placement[2 * r + 1]] = r;
  }

  // The window: each rank's segment on its own pages (alloc_shared_noncontig), so the pages
  // a rank writes are first touched, and placed, by that rank.
  MPI_Info info = MPI_INFO_NULL;
  RESYNC_CHECK_MPI(MPI_Info_create(&info));
  RESYNC_CHECK_MPI(MPI_Info_set(info, "alloc_shared_noncontig", "true"));
  // Open MPI aligns segments to 8 bytes only: ask for a line more and align each one
  // ourselves. Every process maps the window at a page boundary, so the offset this adds is
  // the same in all of them.
  const size_t blocks_bytes = 4 * block_elems_ * sizeof(float);
  const size_t n_bytes =
      kControlBytes + blocks_bytes + round_up(direct_elems_ * sizeof(float), 4096);
  void* base = nullptr;
  const int rc = MPI_Win_allocate_shared(static_cast<MPI_Aint>(n_bytes + kLineBytes), 1, info,
                                         node_comm_, &base, &win_);
  MPI_Info_free(&info);
  RESYNC_CHECK_MPI(rc);
  RESYNC_CHECK_MPI(MPI_Win_set_errhandler(win_, MPI_ERRORS_RETURN));
  segments_.resize(node_size);
  for (int l = 0; l < node_size; ++l) {
    MPI_Aint size = 0;
    int disp_unit = 0;
    void* ptr = nullptr;
    RESYNC_CHECK_MPI(MPI_Win_shared_query(win_, l, &size, &disp_unit, &ptr));
    RESYNC_CHECK(static_cast<size_t>(size) >= n_bytes + kLineBytes && ptr != nullptr,
                 fmt::format("shared segment of node rank {} has {} bytes", l, size));
    const uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
    char* aligned = static_cast<char*>(ptr) + (kLineBytes - address % kLineBytes) % kLineBytes;
    segments_[l] = Segment{reinterpret_cast<uint64_t*>(aligned),
                           reinterpret_cast<float*>(aligned + kControlBytes),
                           reinterpret_cast<float*>(aligned + kControlBytes + blocks_bytes)};
  }
  // One passive-target epoch for the window's lifetime: from here on it is plain memory.
  RESYNC_CHECK_MPI(MPI_Win_lock_all(MPI_MODE_NOCHECK, win_));
  uint64_t* my_words = segments_[node_rank].words;
  store(set_word(my_words, 0), 0, std::memory_order_relaxed);
  store(set_word(my_words, 1), 0, std::memory_order_relaxed);
  // Version 0 of our state; the barrier below publishes it with the rest of the segment.
  store(state_word(my_words), 0, std::memory_order_relaxed);
  store(state_version_word(my_words), 0, std::memory_order_relaxed);
  // Touch our own blocks now, so no call pays for page faults.
  std::memset(segments_[node_rank].data, 0, blocks_bytes + direct_elems_ * sizeof(float));
  RESYNC_CHECK_MPI(MPI_Win_sync(win_));
  RESYNC_CHECK_MPI(MPI_Barrier(node_comm_));
  RESYNC_CHECK_MPI(MPI_Win_sync(win_));

  spin_ns_ = options.spin_ns >= 0 ? options.spin_ns : (machine_ranks <= usable_cpus() ? 20'000 : 0);
  locals_.resize(node_size);
  peer_set_.resize(node_size);
  peer_offset_.resize(node_size);
  srcs_.resize(node_size);
  set_readers_[0].reserve(node_size);
  set_readers_[1].reserve(node_size);
}

ShmAllreduce::~ShmAllreduce() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized != 0) return;
  if (win_ != MPI_WIN_NULL) MPI_Win_unlock_all(win_);
  // MPI_Win_free synchronises the node: with peers possibly gone, leave it to process exit.
  if (std::uncaught_exceptions() > 0) return;
  if (win_ != MPI_WIN_NULL) MPI_Win_free(&win_);
  if (node_comm_ != MPI_COMM_NULL) MPI_Comm_free(&node_comm_);
}

bool ShmAllreduce::in_shared_buffer(std::span<const float> data) const {
  const float* begin = segments_[node_rank()].direct;
  return !data.empty() && data.data() >= begin &&
         data.data() + data.size() <= begin + direct_elems_;
}

std::span<float> ShmAllreduce::shared_buffer_of(int rank) const {
  const int l = rank >= 0 && rank < static_cast<int>(local_of_.size()) ? local_of_[rank] : -1;
  return l < 0 ? std::span<float>() : std::span<float>(segments_[l].direct, direct_elems_);
}

uint64_t* ShmAllreduce::state_word_of(int rank) const {
  const int l = rank >= 0 && rank < static_cast<int>(local_of_.size()) ? local_of_[rank] : -1;
  return l < 0 ? nullptr : state_word(segments_[l].words);
}

bool ShmAllreduce::covers(std::span<const int> participants) const {
  for (int r : participants) {
    if (r < 0 || r >= static_cast<int>(local_of_.size()) || local_of_[r] < 0) return false;
  }
  return true;
}

std::span<const int> ShmAllreduce::begin_call(std::span<const int> participants, uint64_t seq,
                                              int* me) {
  *me = position_in_participants(participants, ctx_.rank(), ctx_.size(), seq);
  RESYNC_CHECK_ARG(
      covers(participants),
      fmt::format("shared-memory all-reduce seq {}: a participant is on another node", seq));
  const uint64_t tag = tag_of(seq);
  RESYNC_CHECK_ARG(tag != set_tag_[0] && tag != set_tag_[1],
                   fmt::format("shared-memory all-reduce: seq {} repeats one of this rank's two "
                               "previous calls; use a fresh seq per call (e.g. the step)",
                               seq));
  for (size_t i = 0; i < participants.size(); ++i) locals_[i] = local_of_[participants[i]];
  return std::span<const int>(locals_.data(), participants.size());
}

// Picks the set this call writes: one that no participant of its previous call can still be
// reading. Usually the set the previous call did not use; the other one if a rank is stuck
// in (or frozen in) the call before. Claiming it stores our word for the new call first and
// then checks the readers again, so that a late reader either sees the new word and leaves
// the old data alone, or is seen here and waited for (Dekker-style, through seq_cst fences;
// the reader stores its own word before loading ours).
int ShmAllreduce::claim_set(Call& call) {
  uint64_t* mine = segments_[locals_[call.me()]].words;
  const auto first_busy_reader = [&](int set) {
    for (int j : set_readers_[set]) {
      int their_set = -1;
      const uint64_t progress = progress_in(segments_[j].words, set_tag_[set], &their_set);
      if (their_set >= 0 && progress < kDone) return j;
    }
    return -1;
  };
  Backoff backoff(spin_ns_, call.deadline());
  for (;;) {
    for (int set : {1 - last_set_, last_set_}) {
      if (first_busy_reader(set) >= 0) continue;
      store(set_word(mine, set), make_word(call.tag(), 0), std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      call.set_claimed(set);
      for (int j = first_busy_reader(set); j >= 0; j = first_busy_reader(set)) {
        if (!backoff.pause()) {
          throw TimeoutError(fmt::format("shared-memory all-reduce: rank {} is still reading "
                                         "this rank's data of an earlier call",
                                         world_of_[j]),
                             world_of_[j], call.seq());
        }
      }
      set_tag_[set] = call.tag();
      set_readers_[set].clear();
      for (int pos = 0; pos < call.p(); ++pos) {
        if (pos != call.me()) set_readers_[set].push_back(locals_[pos]);
      }
      last_set_ = set;
      return set;
    }
    if (!backoff.pause()) {
      const int j = std::max(first_busy_reader(0), first_busy_reader(1));
      throw TimeoutError(
          fmt::format("shared-memory all-reduce: ranks of earlier calls still read both of this "
                      "rank's buffers (rank {})",
                      j >= 0 ? world_of_[j] : -1),
          j >= 0 ? world_of_[j] : -1, call.seq());
    }
  }
}

void ShmAllreduce::allreduce_small(std::span<float> data, std::span<const int> participants,
                                   uint64_t seq) {
  int me = 0;
  const std::span<const int> locals = begin_call(participants, seq, &me);
  if (participants.size() == 1 || data.empty()) return;
  const size_t n = data.size();
  const size_t n_blocks = (n + block_elems_ - 1) / block_elems_;
  RESYNC_CHECK_ARG(2 * n_blocks + 3 < kDone,
                   fmt::format("shared-memory all-reduce of {} floats needs more than the {} "
                               "blocks a call can count; use larger blocks",
                               n, kDone / 2 - 2));
  // Events: copy-in of block 0, then per block b the copy-in of b+1 (if any) and the sum of
  // b; the last sum is kDone. Copying the next block in before summing this one gives the
  // peers that much time to publish theirs.
  const auto copied_in = [](size_t b) { return b == 0 ? uint64_t{1} : 2 * b; };
  const auto summed = [n_blocks](size_t b) { return b + 1 == n_blocks ? kDone : 2 * b + 3; };

  Call call(*this, locals, me, seq, n, Kind::kSmall, 0);
  const int p = call.p();
  // Block b goes through half b % 2 of our set, whole.
  const auto copy_in = [&](size_t b) {
    const size_t base = b * block_elems_;
    // The half was last used by block b-2: every participant must have summed that.
    if (b >= 2) call.wait_for_all(summed(b - 2));
    std::memcpy(call.my_block(static_cast<int>(b % 2)), data.data() + base,
                std::min(block_elems_, n - base) * sizeof(float));
    call.publish(copied_in(b));
  };
  // Everyone sums every element of block b, all in participant order: identical bits.
  const auto sum = [&](size_t b) {
    const size_t base = b * block_elems_;
    call.wait_for_all(copied_in(b));
    for (int pos = 0; pos < p; ++pos) {
      srcs_[pos] = pos == me ? data.data() + base : call.peer_block(pos, static_cast<int>(b % 2));
    }
    sum_in_order(std::span<float>(data.data() + base, std::min(block_elems_, n - base)),
                 std::span<const float* const>(srcs_.data(), p));
    call.publish(summed(b));
  };

  try {
    claim_set(call);
    copy_in(0);
    for (size_t b = 0; b < n_blocks; ++b) {
      if (b + 1 < n_blocks) copy_in(b + 1);
      sum(b);
    }
    call.finish();
  } catch (const Vanished&) {
    call.mark_vanished();
  }
}

void ShmAllreduce::allreduce_blocked(std::span<float> data, std::span<const int> participants,
                                     uint64_t seq) {
  int me = 0;
  const std::span<const int> locals = begin_call(participants, seq, &me);
  if (participants.size() == 1 || data.empty()) return;
  const size_t n = data.size();
  const size_t n_blocks = (n + block_elems_ - 1) / block_elems_;
  RESYNC_CHECK_ARG(3 * n_blocks + 4 < kDone,
                   fmt::format("shared-memory all-reduce of {} floats needs more than the {} "
                               "blocks a call can count; use larger blocks",
                               n, kDone / 3 - 2));
  // Events, in the order every participant publishes them: copy-in of block 0, reduce of 0,
  // then per block b >= 1 copy-in of b, copy-out of b-1, reduce of b; finally copy-out of the
  // last block. Copying block b in before copying b-1 out gives the peers that much time to
  // finish reducing b-1, so the waits rarely block.
  const auto copied_in = [](size_t b) { return b == 0 ? uint64_t{1} : 3 * b; };
  const auto reduced = [](size_t b) { return 3 * b + 2; };
  const auto copied_out = [n_blocks](size_t b) { return b + 1 == n_blocks ? kDone : 3 * b + 4; };

  Call call(*this, locals, me, seq, n, Kind::kBlocked, 0);
  const int p = call.p();
  // Block b goes through half b % 2 of our set; peers read it there.
  const auto copy_in = [&](size_t b) {
    const Block blk(b, n, block_elems_, p);
    // The half was last used by block b-2: every participant must have copied that out.
    if (b >= 2) call.wait_for_all(copied_out(b - 2));
    float* mine = call.my_block(static_cast<int>(b % 2));
    const float* block = data.data() + blk.base;
    std::memcpy(mine, block, blk.begin(me) * sizeof(float));
    std::memcpy(mine + blk.end(me), block + blk.end(me), (blk.len - blk.end(me)) * sizeof(float));
    call.publish(copied_in(b));
  };
  // Reduce-scatter: our chunk, summed straight from the segments (ours first, then the others
  // in participant order: one rank computes each chunk, so the order needs only be fixed),
  // into our buffer and our segment.
  const auto reduce = [&](size_t b) {
    const Block blk(b, n, block_elems_, p);
    const int half = static_cast<int>(b % 2);
    call.wait_for_all(copied_in(b));
    float* block = data.data() + blk.base;
    const size_t c0 = blk.begin(me);
    srcs_[0] = block + c0;
    for (int pos = 0, k = 1; pos < p; ++pos) {
      if (pos != me) srcs_[k++] = call.peer_block(pos, half) + c0;
    }
    sum_in_order(std::span<float>(block + c0, blk.end(me) - c0),
                 std::span<const float* const>(srcs_.data(), p), call.my_block(half) + c0);
    call.publish(reduced(b));
  };
  // All-gather: everyone else's reduced chunk, each as soon as it is ready.
  const auto copy_out = [&](size_t b) {
    const Block blk(b, n, block_elems_, p);
    const int half = static_cast<int>(b % 2);
    float* block = data.data() + blk.base;
    for (int k = 1; k < p; ++k) {
      const int pos = (me + k) % p;
      call.wait_for(pos, reduced(b));
      const size_t q0 = blk.begin(pos);
      std::memcpy(block + q0, call.peer_block(pos, half) + q0, (blk.end(pos) - q0) * sizeof(float));
    }
    call.publish(copied_out(b));
  };

  try {
    claim_set(call);
    copy_in(0);
    reduce(0);
    for (size_t b = 1; b < n_blocks; ++b) {
      copy_in(b);
      copy_out(b - 1);
      reduce(b);
    }
    copy_out(n_blocks - 1);
    call.finish();
  } catch (const Vanished&) {
    call.mark_vanished();
  }
}

void ShmAllreduce::allreduce_direct(std::span<float> data, std::span<const int> participants,
                                    uint64_t seq) {
  int me = 0;
  const std::span<const int> locals = begin_call(participants, seq, &me);
  if (participants.size() == 1 || data.empty()) return;
  RESYNC_CHECK_ARG(in_shared_buffer(data),
                   fmt::format("direct shared-memory all-reduce seq {}: the data is not inside "
                               "this rank's shared_buffer()",
                               seq));
  const size_t n = data.size();
  const size_t n_blocks = (n + direct_block_elems_ - 1) / direct_block_elems_;
  RESYNC_CHECK_ARG(n_blocks + 2 < kDone,
                   fmt::format("shared-memory all-reduce of {} floats needs more than the {} "
                               "blocks a call can count; use larger blocks",
                               n, kDone - 2));
  // Events: 1 once the call has begun (our buffer holds our input), b+2 once our chunk of
  // block b is reduced in place, kDone once we have copied everyone else's chunks.
  const auto reduced = [](size_t b) { return b + 2; };
  const size_t offset = static_cast<size_t>(data.data() - segments_[node_rank()].direct);
  Call call(*this, locals, me, seq, n, Kind::kDirect, offset);
  const int p = call.p();
  // Reduce-scatter in place: our chunk of block b, summed straight from the peers' buffers
  // (ours first, then participant order). Nobody else writes that chunk, and peers read it
  // only once we say so.
  const auto reduce = [&](size_t b) {
    const Block blk(b, n, direct_block_elems_, p);
    const size_t c0 = blk.begin(me);
    srcs_[0] = data.data() + blk.base + c0;
    for (int pos = 0, k = 1; pos < p; ++pos) {
      if (pos != me) srcs_[k++] = call.peer_direct(pos) + blk.base + c0;
    }
    sum_in_order(std::span<float>(data.data() + blk.base + c0, blk.end(me) - c0),
                 std::span<const float* const>(srcs_.data(), p));
    call.confirm_all_present();
    call.publish(reduced(b));
  };
  // All-gather: peer pos's reduced chunk, once it is ready; it is also the moment pos has
  // stopped reading our copy of that chunk, which we overwrite here.
  const auto gather = [&](size_t b) {
    const Block blk(b, n, direct_block_elems_, p);
    for (int k = 1; k < p; ++k) {
      const int pos = (me + k) % p;
      call.wait_for(pos, reduced(b));
      const size_t q0 = blk.base + blk.begin(pos);
      std::memcpy(data.data() + q0, call.peer_direct(pos) + q0,
                  (blk.end(pos) - blk.begin(pos)) * sizeof(float));
      call.confirm_present(pos);
    }
  };

  try {
    claim_set(call);
    call.publish(1);
    call.wait_for_all(1);
    reduce(0);
    for (size_t b = 1; b < n_blocks; ++b) {
      reduce(b);
      gather(b - 1);
    }
    gather(n_blocks - 1);
    call.publish(kDone);
    // Peers read our buffer until they are done; our caller may overwrite it once we return.
    call.wait_for_all(kDone);
    call.finish();
  } catch (const Vanished&) {
    call.mark_vanished();
  }
}

}  // namespace resync::collectives
