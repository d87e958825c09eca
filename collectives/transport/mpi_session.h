// MpiSession: RAII ownership of MPI_Init_thread/MPI_Finalize for one process, with the facts
// about the MPI world that the rest of resync asks for (rank, size, node-local rank, library).
#pragma once

#include <string>

namespace resync::collectives {

enum class ThreadLevel { kSingle, kFunneled, kSerialized, kMultiple };

// "MPI_THREAD_SINGLE", "MPI_THREAD_FUNNELED", ...
const char* thread_level_name(ThreadLevel level);

// Initialises MPI requesting `required` and throws CommError if the library provides less.
// If MPI is already initialised (a test main did it), the session adopts it, checks the
// provided level the same way, and leaves finalisation to whoever initialised it.
// Construct one per process, on the thread that will call MPI; the constructor is collective
// over MPI_COMM_WORLD.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv, ThreadLevel required = ThreadLevel::kFunneled);
  explicit MpiSession(ThreadLevel required = ThreadLevel::kFunneled)
      : MpiSession(nullptr, nullptr, required) {}
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Rank among the processes sharing this node's memory, and their number.
  int node_local_rank() const { return node_local_rank_; }
  int node_local_size() const { return node_local_size_; }
  ThreadLevel provided_level() const { return provided_; }
  std::string provided_level_name() const { return thread_level_name(provided_); }
  // MPI_Get_library_version, first line (e.g. "Open MPI v4.1.4, ...").
  const std::string& library_version() const { return library_version_; }
  const std::string& processor_name() const { return processor_name_; }
  // True if this session called MPI_Init_thread (and will call MPI_Finalize).
  bool owns_mpi() const { return owns_; }
  // Set once every rank has agreed on its set-up: from then on an error on one rank must end
  // the whole job, since its peers wait on it (set-up errors are agreed and end it cleanly).
  void mark_setup_agreed() { setup_agreed_ = true; }
  bool setup_agreed() const { return setup_agreed_; }

 private:
  bool owns_ = false;
  bool setup_agreed_ = false;
  int rank_ = 0;
  int size_ = 1;
  int node_local_rank_ = 0;
  int node_local_size_ = 1;
  ThreadLevel provided_ = ThreadLevel::kSingle;
  std::string library_version_;
  std::string processor_name_;
};

}  // namespace resync::collectives
