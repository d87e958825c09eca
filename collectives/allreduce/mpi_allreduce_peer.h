// MpiAllreducePeer: the MPI library's own in-place float sum (MPI_Allreduce) over a subset of
// the ranks: the baseline `resync bench allreduce` measures resync's all-reduce against.
#pragma once

#include <memory>
#include <span>

namespace resync::collectives {

class MpiAllreducePeer {
 public:
  // Collective over every rank of the job: the ranks in `members` (sorted, distinct) get a
  // communicator of their own, in that order; any other rank gets a peer that is no member.
  explicit MpiAllreducePeer(std::span<const int> members);
  ~MpiAllreducePeer();
  MpiAllreducePeer(const MpiAllreducePeer&) = delete;
  MpiAllreducePeer& operator=(const MpiAllreducePeer&) = delete;

  bool is_member() const;
  // Sums `data` in place over the members (MPI_Allreduce). Members only; every member passes
  // the same count (at most INT_MAX).
  void allreduce_sum(std::span<float> data);
  // Returns once every member has called it. Members only.
  void barrier();

 private:
  struct Comm;  // the MPI communicator, kept out of this header
  std::unique_ptr<Comm> comm_;
};

}  // namespace resync::collectives
