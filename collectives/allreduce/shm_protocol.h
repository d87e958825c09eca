// Internals of ShmAllreduce shared by its .cpp files: the layout of the per-rank progress
// words in the window, how a rank waits, and the per-call state with its waits.
#pragma once

#include <fmt/format.h>
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <ctime>

#include "base/error.h"
#include "collectives/allreduce/shm_allreduce.h"

namespace resync::collectives {

namespace shm {

// Segment layout: a 4 KiB control page (one progress word per set, each on its own cache line,
// written only by the owner), then the data blocks.
constexpr size_t kLineBytes = 64;
constexpr size_t kControlBytes = 4096;
constexpr size_t kWordStride = kLineBytes / sizeof(uint64_t);
// Chunks start at whole cache lines, so that reading a peer's chunk never pulls in a line it
// is still writing.
constexpr size_t kChunkAlignElems = kLineBytes / sizeof(float);

// A progress word: the call's seq (its low 42 bits, the "tag") above a 22-bit progress count.
// Progress 0: the call has begun, nothing published; kDone: the owner has finished the call
// (its data stays valid until it reuses the set); kAbandoned: it gave up (timeout, failure).
constexpr int kProgressBits = 22;
constexpr uint64_t kProgressMask = (uint64_t{1} << kProgressBits) - 1;
constexpr uint64_t kAbandoned = kProgressMask;
constexpr uint64_t kDone = kProgressMask - 1;
constexpr uint64_t kTagMask = (uint64_t{1} << (64 - kProgressBits)) - 1;

inline uint64_t tag_of(uint64_t seq) { return seq & kTagMask; }
inline uint64_t make_word(uint64_t tag, uint64_t progress) {
  return (tag << kProgressBits) | progress;
}

inline uint64_t load(uint64_t* word) {
  return std::atomic_ref<uint64_t>(*word).load(std::memory_order_acquire);
}
inline void store(uint64_t* word, uint64_t value,
                  std::memory_order order = std::memory_order_release) {
  std::atomic_ref<uint64_t>(*word).store(value, order);
}

inline uint64_t* set_word(uint64_t* words, int set) { return words + set * kWordStride; }
// Beside each progress word, on its line, written before the call's first progress: its
// element count and kind of call (so that mismatches fail instead of reading garbage), and
// where its data lies in the owner's shared buffer (direct calls).
inline uint64_t* count_word(uint64_t* words, int set) { return words + set * kWordStride + 1; }
inline uint64_t* kind_word(uint64_t* words, int set) { return words + set * kWordStride + 2; }
inline uint64_t* offset_word(uint64_t* words, int set) { return words + set * kWordStride + 3; }

// Line 2 of the control page (lines 0 and 1 are the sets'): the training state the owner keeps
// in its shared buffer (ShmStateBoard), written only by the owner. A seqlock: the sequence word
// is even while the state is stable and odd while the owner rewrites it, and only grows; beside
// it, the version (training step) of the state last published. Both 0 from window creation on.
constexpr int kStateLine = 2;
inline uint64_t* state_word(uint64_t* words) { return words + kStateLine * kWordStride; }
inline uint64_t* state_version_word(uint64_t* words) { return state_word(words) + 1; }
static_assert((kStateLine + 1) * kLineBytes <= kControlBytes);

inline const char* kind_name(uint64_t kind) {
  switch (kind) {
    case 1:
      return "small";
    case 2:
      return "blocked";
    case 3:
      return "direct (shared buffer)";
    case 4:
      return "hierarchical";
  }
  return "?";
}

// Progress of the owner of `words` in the call `tag` and which of its sets that call uses; 0
// and set -1 if it holds no word of that call (not begun, or two calls past it).
inline uint64_t progress_in(uint64_t* words, uint64_t tag, int* set) {
  *set = -1;
  for (int k = 0; k < 2; ++k) {
    const uint64_t w = load(set_word(words, k));
    if ((w >> kProgressBits) == tag) {
      *set = k;
      return w & kProgressMask;
    }
  }
  return 0;
}

// How a waiting rank spends its time: spinning only briefly (a flag that is about to flip
// costs no context switch), then yielding on every poll so that a rank sharing the core runs,
// then, once the wait is clearly long (a straggler), sleeping between polls.
class Backoff {
 public:
  Backoff(long spin_ns, Deadline deadline) : spin_ns_(spin_ns), deadline_(deadline) {}

  // Returns false once the deadline has passed.
  bool pause() {
    ++polls_;
    if (polls_ == 1) start_ = Clock::now();
    if (spin_ns_ > 0 && !spinning_done_) {
      _mm_pause();
      if ((polls_ & 31) != 0) return true;
      spinning_done_ = Clock::now() - start_ >= std::chrono::nanoseconds(spin_ns_);
      return true;
    }
    const Clock::time_point now = Clock::now();
    if (now >= deadline_) return false;
    const auto waited = now - start_;
    if (waited < kYieldFor) {
      sched_yield();
      return true;
    }
    const timespec ts{0, waited < kShortSleepFor ? kShortSleepNs : kLongSleepNs};
    nanosleep(&ts, nullptr);
    return true;
  }

 private:
  static constexpr auto kYieldFor = std::chrono::milliseconds(5);
  static constexpr auto kShortSleepFor = std::chrono::milliseconds(200);
  static constexpr long kShortSleepNs = 20'000;
  static constexpr long kLongSleepNs = 500'000;

  long spin_ns_;
  Deadline deadline_;
  uint64_t polls_ = 0;
  bool spinning_done_ = false;
  Clock::time_point start_{};
};

// Thrown by the vanish fault injection; caught at the top of the call, which then returns.
struct Vanished {};

inline size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

inline int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

}  // namespace shm

// One call's view: who takes part (as node-local ranks), our set, what we have published, and
// the waits. Lives on the stack of one allreduce_* call.
class ShmAllreduce::Call {
 public:
  Call(ShmAllreduce& shm, std::span<const int> locals, int me, uint64_t seq, size_t n_elems,
       Kind kind, size_t offset)
      : shm_(shm),
        locals_(locals),
        me_(me),
        n_elems_(n_elems),
        kind_(static_cast<uint64_t>(kind)),
        offset_(offset),
        seq_(seq),
        tag_(shm::tag_of(seq)),
        deadline_(shm.ctx_.deadline()),
        mine_(shm.segments_[locals[me]].words) {}

  ~Call() {
    // Whatever made us leave early (timeout, bad input, a peer's failure), say so at once, so
    // that peers waiting for us fail now rather than at their deadline.
    if (set_ >= 0 && !finished_ && !vanished_) {
      shm::store(shm::set_word(mine_, set_), shm::make_word(tag_, shm::kAbandoned));
      // Our caller's next writes to its buffer must not become visible before this word:
      // a peer still reading the buffer checks the word afterwards (confirm_present).
      std::atomic_thread_fence(std::memory_order_release);
    }
  }

  int p() const { return static_cast<int>(locals_.size()); }
  int me() const { return me_; }
  uint64_t seq() const { return seq_; }
  uint64_t tag() const { return tag_; }
  Deadline deadline() const { return deadline_; }
  void set_claimed(int set) {
    set_ = set;
    shm::store(shm::count_word(mine_, set), n_elems_, std::memory_order_relaxed);
    shm::store(shm::kind_word(mine_, set), kind_, std::memory_order_relaxed);
    shm::store(shm::offset_word(mine_, set), offset_, std::memory_order_relaxed);
  }
  void mark_vanished() { vanished_ = true; }
  // Called on every poll of a wait (the hierarchical path's transfers across nodes, which only
  // move while this rank calls into MPI); nullptr: nothing.
  void set_idle(SliceExchange* idle) { idle_ = idle; }
  // From here on nobody relies on our buffers any more: leaving is not abandoning.
  void finish() { finished_ = true; }

  // Our block `half` of our set.
  float* my_block(int half) const { return block_of(locals_[me_], set_, half); }
  // Participant `pos`'s block `half` of the set it uses for this call (known after a wait).
  const float* peer_block(int pos, int half) const {
    return block_of(locals_[pos], shm_.peer_set_[pos], half);
  }
  // Participant `pos`'s data in its shared buffer (direct calls, known after a wait).
  const float* peer_direct(int pos) const {
    return shm_.segments_[locals_[pos]].direct + shm_.peer_offset_[pos];
  }

  // After reading participant `pos`'s own buffer: it must still be in the call, or its caller
  // may have been overwriting what we read (seqlock-style: the reads come before this load).
  void confirm_present(int pos) const {
    std::atomic_thread_fence(std::memory_order_acquire);
    const int j = locals_[pos];
    const uint64_t w =
        std::atomic_ref<uint64_t>(*shm::set_word(shm_.segments_[j].words, shm_.peer_set_[pos]))
            .load(std::memory_order_relaxed);
    if ((w >> shm::kProgressBits) != tag_ || (w & shm::kProgressMask) == shm::kAbandoned) {
      throw TimeoutError(fmt::format("shared-memory all-reduce seq {}: rank {} abandoned the call "
                                     "while rank {} was reading its buffer",
                                     seq_, shm_.world_of_[j], shm_.ctx_.rank()),
                         shm_.world_of_[j], seq_);
    }
  }
  void confirm_all_present() const {
    for (int pos = 0; pos < p(); ++pos) {
      if (pos != me_) confirm_present(pos);
    }
  }

  void publish(uint64_t progress) {
    shm::store(shm::set_word(mine_, set_), shm::make_word(tag_, progress));
    ++n_published_;
    const uint64_t vanish = shm_.options_.vanish_after_events;
    if (vanish != 0 && n_published_ >= vanish && !finished_) throw shm::Vanished{};
  }

  // Waits until participant `pos` has published `progress` in this call.
  void wait_for(int pos, uint64_t progress) {
    const int j = locals_[pos];
    shm::Backoff backoff(shm_.spin_ns_, deadline_);
    for (;;) {
      int set = 0;
      const uint64_t got = shm::progress_in(shm_.segments_[j].words, tag_, &set);
      if (got == shm::kAbandoned) {
        throw TimeoutError(
            fmt::format("shared-memory all-reduce seq {}: rank {} abandoned the call (it timed "
                        "out or failed)",
                        seq_, shm_.world_of_[j]),
            shm_.world_of_[j], seq_);
      }
      if (got >= progress) {
        uint64_t* words = shm_.segments_[j].words;
        const uint64_t their_n = shm::load(shm::count_word(words, set));
        const uint64_t their_kind = shm::load(shm::kind_word(words, set));
        if (their_n != n_elems_ || their_kind != kind_) {
          throw CommError(fmt::format(
              "shared-memory all-reduce seq {}: rank {} passes {} floats ({}), rank {} passes "
              "{} ({}); all participants must pass the same element count, and all or none "
              "of them their shared buffer",
              seq_, shm_.world_of_[j], their_n, shm::kind_name(their_kind), shm_.ctx_.rank(),
              n_elems_, shm::kind_name(kind_)));
        }
        shm_.peer_set_[pos] = set;
        shm_.peer_offset_[pos] = shm::load(shm::offset_word(words, set));
        return;
      }
      if (idle_ != nullptr) idle_->poll();
      if (!backoff.pause()) {
        throw TimeoutError(
            fmt::format("shared-memory all-reduce seq {}: rank {} waited {} ms for rank {} "
                        "(progress {} of {}); is it alive, and does it know it takes part?",
                        seq_, shm_.ctx_.rank(), shm_.ctx_.timeout().count(), shm_.world_of_[j], got,
                        progress),
            shm_.world_of_[j], seq_);
      }
    }
  }

  void wait_for_all(uint64_t progress) {
    for (int pos = 0; pos < p(); ++pos) {
      if (pos != me_) wait_for(pos, progress);
    }
  }

 private:
  float* block_of(int local, int set, int half) const {
    return shm_.segments_[local].data + (static_cast<size_t>(set) * 2 + half) * shm_.block_elems_;
  }

  ShmAllreduce& shm_;
  std::span<const int> locals_;
  int me_;
  size_t n_elems_;
  uint64_t kind_;
  size_t offset_;
  uint64_t seq_;
  uint64_t tag_;
  Deadline deadline_;
  uint64_t* mine_;
  SliceExchange* idle_ = nullptr;
  int set_ = -1;
  uint64_t n_published_ = 0;
  bool finished_ = false;
  bool vanished_ = false;
};

// Where block b of an n-element buffer lies, and participant pos's chunk of it: chunks start
// at whole cache lines, so a rank reading a peer's chunk never pulls in a line still written.
struct ShmAllreduce::Block {
  size_t base;
  size_t len;
  size_t chunk;
  Block(size_t b, size_t n, size_t block_elems, int p)
      : base(b * block_elems),
        len(std::min(block_elems, n - base)),
        chunk(shm::round_up((len + p - 1) / p, shm::kChunkAlignElems)) {}
  size_t begin(int pos) const { return std::min(len, pos * chunk); }
  size_t end(int pos) const { return std::min(len, (pos + 1) * chunk); }
};

}  // namespace resync::collectives
