// ShmStateBoard: each rank of a node keeps its training state in its ShmAllreduce shared
// buffer under a version seqlock, so a late rank copies a donor's state one-sided.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>

#include "collectives/allreduce/shm_allreduce.h"

namespace resync::collectives {

// Every rank of a node keeps a state region of `count` floats at `offset` in its own
// shared_buffer(); all ranks of the node use the same offset and count. The owner rewrites its
// region between begin_update() and publish(v); a reader copies a donor's region without the
// donor taking part (no message, no wait on the donor's side) and never keeps a copy that
// overlapped a rewrite.
//
// A seqlock in the owner's control page (shm::state_word): a sequence word, even while the
// region is stable and odd while the owner rewrites it, that only grows; beside it the version
// (training step) of the state last published. Both start at 0 (the region's contents at
// window creation: zeros). Published versions never decrease; the same version may be
// published again (a rank whose state was from an abandoned step attempt is caught up to that
// step's agreed state) and a reader still never keeps a copy that overlapped the rewrite.
//
// Not thread-safe; the owner's begin_update/publish and its own writes to state() come from
// one thread. The ShmAllreduce must outlive the board.
class ShmStateBoard {
 public:
  // Not collective. Throws InvalidArgument if [offset, offset + count) is not inside
  // shared_buffer().
  ShmStateBoard(ShmAllreduce& shm, size_t offset, size_t count);

  // This rank's region (live: the owner writes it between begin_update and publish).
  std::span<float> state() const;
  size_t offset() const { return offset_; }
  size_t count() const { return count_; }
  // Whether context rank `rank` shares this node (false for ranks out of range).
  bool covers(int rank) const;

  // Writer side, this rank only. begin_update marks the region as being rewritten (no-op if
  // it already is); publish(version) says it now holds the state of `version`, which must not
  // be below the last published one and must follow a begin_update (else InvalidArgument).
  void begin_update();
  void publish(uint64_t version);

  // Copies `donor`'s region into `out` (exactly count() floats) once the donor has published
  // `version`. Waits (spinning briefly, then yielding, then sleeping in short naps, as
  // ShmAllreduce's waits do) while the donor's version is lower or it is rewriting its state;
  // returns false without waiting once the donor has published a later version, or when
  // `timeout` has passed. A copy that a rewrite overlapped
  // is discarded and the word read again. Returns true only with an untorn copy of `version`;
  // after false, `out` holds unspecified values. The donor may be this rank; `out` must not
  // overlap the donor's region. A late rank takes a donor's state into its own region with
  // begin_update(), copy_from(donor, v, state(), ...) and, on success, publish(v).
  bool copy_from(int donor, uint64_t version, std::span<float> out,
                 std::chrono::nanoseconds timeout);

  // For logs and tests: `rank`'s last published version, or kWriting while it rewrites it.
  static constexpr uint64_t kWriting = ~uint64_t{0};
  uint64_t published(int rank) const;

 private:
  uint64_t* word_of(int rank, const char* what) const;

  ShmAllreduce* shm_;  // not owned
  size_t offset_;
  size_t count_;
  uint64_t* my_sequence_;  // this rank's seqlock words (only it writes them)
  uint64_t* my_version_word_;
  uint64_t my_version_ = 0;
};

}  // namespace resync::collectives
