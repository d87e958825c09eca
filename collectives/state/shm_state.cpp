#include "collectives/state/shm_state.h"

#include <fmt/format.h>

#include <atomic>
#include <cstring>

#include "base/error.h"
#include "collectives/allreduce/shm_protocol.h"

namespace resync::collectives {

namespace {

// kWriting stays distinguishable from every version.
constexpr uint64_t kMaxVersion = ShmStateBoard::kWriting - 1;

uint64_t* version_word(uint64_t* sequence) { return sequence + 1; }  // shm::state_version_word

Deadline deadline_in(std::chrono::nanoseconds timeout) {
  const Clock::time_point now = Clock::now();
  if (timeout <= std::chrono::nanoseconds::zero()) return now;
  if (timeout >= kNoDeadline - now) return kNoDeadline;
  return now + std::chrono::duration_cast<Clock::duration>(timeout);
}

}  // namespace

ShmStateBoard::ShmStateBoard(ShmAllreduce& shm, size_t offset, size_t count)
    : shm_(&shm),
      offset_(offset),
      count_(count),
      my_sequence_(shm.state_word_of(shm.rank())),
      my_version_word_(my_sequence_ ? version_word(my_sequence_) : nullptr) {
  const size_t n_elems = shm.shared_buffer().size();
  RESYNC_CHECK_ARG(offset <= n_elems && count <= n_elems - offset,
                   fmt::format("shared-memory state board: region [{}, {}+{}) is not inside "
                               "the shared buffer of {} floats",
                               offset, offset, count, n_elems));
  RESYNC_CHECK(my_sequence_ != nullptr,
               "shared-memory state board: no version word for this rank");
  // Another board over the same window may have published before us: continue its versions.
  my_version_ = shm::load(my_version_word_);
}

std::span<float> ShmStateBoard::state() const {
  return shm_->shared_buffer().subspan(offset_, count_);
}

bool ShmStateBoard::covers(int rank) const { return shm_->state_word_of(rank) != nullptr; }

uint64_t* ShmStateBoard::word_of(int rank, const char* what) const {
  uint64_t* word = shm_->state_word_of(rank);
  RESYNC_CHECK_ARG(word != nullptr,
                   fmt::format("shared-memory state board: {} rank {} does not share the node "
                               "of rank {}",
                               what, rank, shm_->rank()));
  return word;
}

void ShmStateBoard::begin_update() {
  const uint64_t seq = shm::load(my_sequence_);
  if ((seq & 1) != 0) return;
  shm::store(my_sequence_, seq + 1, std::memory_order_relaxed);
  // Orders the odd word before the caller's writes to the region: a reader whose copy saw
  // any of them sees the odd word (or a later one) when it reads the word again.
  std::atomic_thread_fence(std::memory_order_release);
}

void ShmStateBoard::publish(uint64_t version) {
  const uint64_t seq = shm::load(my_sequence_);
  RESYNC_CHECK_ARG((seq & 1) != 0, fmt::format("shared-memory state board: publish({}) without "
                                               "begin_update() before the region was written",
                                               version));
  RESYNC_CHECK_ARG(version >= my_version_ && version <= kMaxVersion,
                   fmt::format("shared-memory state board: publish({}) after version {}; "
                               "versions must not decrease",
                               version, my_version_));
  shm::store(my_version_word_, version, std::memory_order_relaxed);
  // Release: the region's and the version's writes are visible before the even word.
  shm::store(my_sequence_, seq + 1);
  my_version_ = version;
}

uint64_t ShmStateBoard::published(int rank) const {
  uint64_t* sequence = word_of(rank, "asked for");
  if ((shm::load(sequence) & 1) != 0) return kWriting;
  return shm::load(version_word(sequence));
}

bool ShmStateBoard::copy_from(int donor, uint64_t version, std::span<float> out,
                              std::chrono::nanoseconds timeout) {
  RESYNC_CHECK_ARG(out.size() == count_,
                   fmt::format("shared-memory state board: copy of {} floats into a buffer of {}",
                               count_, out.size()));
  RESYNC_CHECK_ARG(version <= kMaxVersion,
                   fmt::format("shared-memory state board: version {} is out of range", version));
  uint64_t* sequence = word_of(donor, "donor");
  const float* src = shm_->shared_buffer_of(donor).data() + offset_;
  shm::Backoff backoff(shm_->spin_ns(), deadline_in(timeout));
  for (;;) {
    const uint64_t s1 = shm::load(sequence);
    // At least the version published with s1 (a later one if the owner published since).
    const uint64_t v = shm::load(version_word(sequence));
    // Versions never decrease: a later one will not give this one back.
    if (v > version) return false;
    // While the owner writes, the version word may already say what it is about to publish,
    // and a rewrite of `version` may publish it again: wait rather than decide.
    if (v == version && (s1 & 1) == 0) {
      if (count_ > 0) std::memcpy(out.data(), src, count_ * sizeof(float));
      // Seqlock check: the copy's reads come before this load, so a rewrite that any of them
      // saw shows in the word (the writer made it odd before writing).
      std::atomic_thread_fence(std::memory_order_acquire);
      const uint64_t s2 = std::atomic_ref<uint64_t>(*sequence).load(std::memory_order_relaxed);
      if (s2 == s1) return true;
      continue;  // overlapped by a rewrite: look again
    }
    if (timeout <= std::chrono::nanoseconds::zero() || !backoff.pause()) return false;
  }
}

}  // namespace resync::collectives
