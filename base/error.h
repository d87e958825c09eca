// Typed exceptions of resync and the one family of check macros that raise them.
// Library code throws; only main() turns errors into exit codes (0 ok, 1 runtime, 2 bad input).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace resync {

// Base of every error resync raises.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad flag, config value or API argument: the user can fix it (exit code 2).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// Malformed or unreadable input file (data set, checkpoint): exit code 2.
class DataError : public Error {
 public:
  using Error::Error;
};

// A communication failure (MPI error, peer gone, protocol violation).
class CommError : public Error {
 public:
  using Error::Error;
};

// An operation with a peer did not finish before its deadline.
class TimeoutError : public CommError {
 public:
  TimeoutError(const std::string& what, int peer, uint64_t seq)
      : CommError(what), peer_(peer), seq_(seq) {}
  int peer() const { return peer_; }
  uint64_t seq() const { return seq_; }

 private:
  int peer_;
  uint64_t seq_;
};

// A loss, gradient or parameter that became NaN or infinite during training (a diverging
// run): a runtime failure (exit code 1) that ends the whole job. The message is one line naming
// the step and the rank, e.g. "non-finite loss (nan) at step 17 on rank 2". `reported_by_peer`:
// another rank reports the same failure (it saw the same values, or this rank told it), so this
// rank prints nothing unless that rank fails to end the job (see runtime/io/cli.cpp).
class NonFiniteError : public Error {
 public:
  NonFiniteError(const std::string& what, uint64_t step, int rank, bool reported_by_peer = false)
      : Error(what), step_(step), rank_(rank), reported_by_peer_(reported_by_peer) {}
  uint64_t step() const { return step_; }
  int rank() const { return rank_; }
  bool reported_by_peer() const { return reported_by_peer_; }

 private:
  uint64_t step_;
  int rank_;
  bool reported_by_peer_;
};

// A CUDA, cuBLAS or NCCL failure.
class DeviceError : public Error {
 public:
  using Error::Error;
};

// Which library a failed check belongs to; selects the exception type.
enum class CheckKind { kInternal, kArgument, kMpi, kCuda, kCublas, kNccl, kSystem };

namespace detail {
// Records expression, file:line, rank and host, and throws the matching typed exception.
[[noreturn]] void check_failed(CheckKind kind, const char* expr, const char* file, int line,
                               const std::string& detail);
// Library-specific decoders: defined next to the library that owns the status code.
[[noreturn]] void mpi_check_failed(int code, const char* expr, const char* file, int line);
[[noreturn]] void cuda_check_failed(int code, const char* expr, const char* file, int line);
[[noreturn]] void cublas_check_failed(int code, const char* expr, const char* file, int line);
[[noreturn]] void nccl_check_failed(int code, const char* expr, const char* file, int line);
}  // namespace detail

// Rank shown in error messages and log lines of this process (-1 until MPI is up).
void set_process_rank(int rank);
int process_rank();

}  // namespace resync

// Internal invariant / precondition checks.
#define RESYNC_CHECK(cond, ...)                                                              \
  do {                                                                                       \
    if (!(cond)) [[unlikely]]                                                                \
      ::resync::detail::check_failed(::resync::CheckKind::kInternal, #cond, __FILE__, __LINE__, \
                                     ::std::string(__VA_ARGS__));                            \
  } while (0)

#define RESYNC_CHECK_ARG(cond, ...)                                                          \
  do {                                                                                       \
    if (!(cond)) [[unlikely]]                                                                \
      ::resync::detail::check_failed(::resync::CheckKind::kArgument, #cond, __FILE__, __LINE__, \
                                     ::std::string(__VA_ARGS__));                            \
  } while (0)

// MPI calls: needs an MPI_ERRORS_RETURN communicator for the code to reach us.
#define RESYNC_CHECK_MPI(expr)                                                    \
  do {                                                                            \
    int resync_rc_ = (expr);                                                      \
    if (resync_rc_ != 0 /* MPI_SUCCESS */) [[unlikely]]                           \
      ::resync::detail::mpi_check_failed(resync_rc_, #expr, __FILE__, __LINE__);  \
  } while (0)

#define RESYNC_CHECK_CUDA(expr)                                                   \
  do {                                                                            \
    int resync_rc_ = static_cast<int>(expr);                                      \
    if (resync_rc_ != 0 /* cudaSuccess */) [[unlikely]]                           \
      ::resync::detail::cuda_check_failed(resync_rc_, #expr, __FILE__, __LINE__); \
  } while (0)

#define RESYNC_CHECK_CUBLAS(expr)                                                   \
  do {                                                                              \
    int resync_rc_ = static_cast<int>(expr);                                        \
    if (resync_rc_ != 0 /* CUBLAS_STATUS_SUCCESS */) [[unlikely]]                   \
      ::resync::detail::cublas_check_failed(resync_rc_, #expr, __FILE__, __LINE__); \
  } while (0)

#define RESYNC_CHECK_NCCL(expr)                                                   \
  do {                                                                            \
    int resync_rc_ = static_cast<int>(expr);                                      \
    if (resync_rc_ != 0 /* ncclSuccess */) [[unlikely]]                           \
      ::resync::detail::nccl_check_failed(resync_rc_, #expr, __FILE__, __LINE__); \
  } while (0)
