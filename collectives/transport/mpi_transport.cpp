#include "collectives/transport/mpi_transport.h"

#include <fmt/format.h>
#include <sched.h>

#include <chrono>
#include <climits>
#include <cstring>
#include <ctime>

#include "base/error.h"

namespace resync::collectives {

namespace {

static_assert(sizeof(MPI_Request) <= sizeof(uint64_t), "MPI_Request must fit a request handle");

MPI_Request to_mpi(uint64_t handle) {
  MPI_Request r;
  std::memcpy(&r, &handle, sizeof(r));
  return r;
}

uint64_t from_mpi(MPI_Request r) {
  uint64_t handle = 0;
  std::memcpy(&handle, &r, sizeof(r));
  return handle;
}

// How a waiting rank spends the time between polls. It spins only briefly (a message that is
// about to land costs no context switch), then yields on every poll so a rank sharing the
// core can run, and once the wait is clearly long (a straggler) sleeps between polls.
class Backoff {
 public:
  void pause() {
    ++polls_;
    if (polls_ <= kSpinPolls) return;
    if (polls_ == kSpinPolls + 1) yield_start_ = Clock::now();
    const auto waited = Clock::now() - yield_start_;
    if (waited < kYieldFor) {
      sched_yield();
      return;
    }
    const timespec ts{0, waited < kShortSleepFor ? kShortSleepNs : kLongSleepNs};
    nanosleep(&ts, nullptr);
  }

 private:
  static constexpr unsigned kSpinPolls = 64;
  static constexpr auto kYieldFor = std::chrono::milliseconds(2);
  static constexpr auto kShortSleepFor = std::chrono::milliseconds(200);
  static constexpr long kShortSleepNs = 50'000;
  static constexpr long kLongSleepNs = 500'000;

  unsigned polls_ = 0;
  Clock::time_point yield_start_{};
};

size_t received_bytes(const MPI_Status& status) {
  int count = 0;
  RESYNC_CHECK_MPI(MPI_Get_count(&status, MPI_BYTE, &count));
  return count == MPI_UNDEFINED ? 0 : static_cast<size_t>(count);
}

int checked_count(size_t n_bytes) {
  RESYNC_CHECK_ARG(n_bytes <= static_cast<size_t>(INT_MAX),
                   fmt::format("MPI message of {} bytes exceeds INT_MAX; split it", n_bytes));
  return static_cast<int>(n_bytes);
}

}  // namespace

MpiTransport::MpiTransport(MPI_Comm parent) {
  int initialized = 0;
  RESYNC_CHECK_MPI(MPI_Initialized(&initialized));
  RESYNC_CHECK_ARG(initialized != 0, "MpiTransport needs MPI to be initialised (MpiSession)");
  RESYNC_CHECK_MPI(MPI_Comm_dup(parent, &comm_));
  RESYNC_CHECK_MPI(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  RESYNC_CHECK_MPI(MPI_Comm_rank(comm_, &rank_));
  RESYNC_CHECK_MPI(MPI_Comm_size(comm_, &size_));
  // MPI_TAG_UB is cached on MPI_COMM_WORLD and holds for every communicator.
  void* value = nullptr;
  int found = 0;
  RESYNC_CHECK_MPI(MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &value, &found));
  if (found != 0 && value != nullptr) max_tag_ = *static_cast<int*>(value);
}

MpiTransport::~MpiTransport() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && finalized == 0) MPI_Comm_free(&comm_);
}

uint64_t MpiTransport::post_send(int peer, int tag, std::span<const std::byte> bytes) {
  MPI_Request r = MPI_REQUEST_NULL;
  RESYNC_CHECK_MPI(
      MPI_Isend(bytes.data(), checked_count(bytes.size()), MPI_BYTE, peer, tag, comm_, &r));
  return from_mpi(r);
}

uint64_t MpiTransport::post_recv(int peer, int tag, std::span<std::byte> bytes) {
  MPI_Request r = MPI_REQUEST_NULL;
  RESYNC_CHECK_MPI(
      MPI_Irecv(bytes.data(), checked_count(bytes.size()), MPI_BYTE, peer, tag, comm_, &r));
  return from_mpi(r);
}

bool MpiTransport::test_handle(uint64_t& handle, size_t* n_bytes) {
  MPI_Request r = to_mpi(handle);
  int done = 0;
  MPI_Status status;
  const int rc = MPI_Test(&r, &done, &status);
  handle = from_mpi(r);
  RESYNC_CHECK_MPI(rc);
  if (done == 0) return false;
  *n_bytes = received_bytes(status);
  return true;
}

size_t MpiTransport::wait_handles(std::span<uint64_t* const> handles, Deadline deadline,
                                  size_t* n_bytes) {
  Backoff backoff;
  for (;;) {
    for (size_t i = 0; i < handles.size(); ++i) {
      if (test_handle(*handles[i], n_bytes)) return i;
    }
    if (deadline != kNoDeadline && Clock::now() >= deadline) return handles.size();
    backoff.pause();
  }
}

namespace {

// A receive already matched to a message whose sender stopped (a frozen or abandoned peer)
// cannot be cancelled, and MPI_Wait on it would block until that sender moves again. So wait
// for the cancellation only briefly, yielding; then let go of the request. MPI may still write
// the stale message into the buffer later, which is why receive buffers must outlive the
// transport (see Transport); a rank whose state diverged that way shows up in the final
// parameter checksum comparison.
constexpr auto kCancelGrace = std::chrono::milliseconds(20);

bool finish_cancel(MPI_Request& r, MPI_Status& status) {
  const auto deadline = std::chrono::steady_clock::now() + kCancelGrace;
  for (;;) {
    int done = 0;
    MPI_Test(&r, &done, &status);
    if (done != 0) return true;
    if (std::chrono::steady_clock::now() >= deadline) break;
    sched_yield();
  }
  MPI_Request_free(&r);
  return false;
}

}  // namespace

bool MpiTransport::cancel_handle(uint64_t& handle, size_t* n_bytes) {
  MPI_Request r = to_mpi(handle);
  RESYNC_CHECK_MPI(MPI_Cancel(&r));
  MPI_Status status;
  if (!finish_cancel(r, status)) {
    handle = from_mpi(MPI_REQUEST_NULL);
    return true;  // given up on: nothing was delivered yet
  }
  handle = from_mpi(r);
  int cancelled = 0;
  RESYNC_CHECK_MPI(MPI_Test_cancelled(&status, &cancelled));
  if (cancelled == 0) *n_bytes = received_bytes(status);
  return cancelled != 0;
}

void MpiTransport::abandon_handle(uint64_t handle, Direction direction) noexcept {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized != 0) return;
  MPI_Request r = to_mpi(handle);
  if (r == MPI_REQUEST_NULL) return;
  if (direction == Direction::kReceive) {
    MPI_Cancel(&r);
    MPI_Status status;
    finish_cancel(r, status);
  } else {
    // Cancelling sends is deprecated and unsupported by Open MPI's ob1; detach instead.
    MPI_Request_free(&r);
  }
}

}  // namespace resync::collectives
