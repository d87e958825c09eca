// POSIX socket helpers of the TCP control plane: an owning file descriptor, errno reporting,
// address resolution, connect with a deadline, and send/receive loops that retry EINTR.
#pragma once

#include <sys/socket.h>
#include <time.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace resync::collectives::detail {

// Owns a file descriptor: closes it on destruction. Move-only.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

using SocketTime = std::chrono::steady_clock::time_point;

std::string errno_text(int err);
// Throws resync::CommError "`what`: strerror(err)".
[[noreturn]] void throw_sys(const std::string& what, int err);

std::chrono::nanoseconds seconds(double s);
timespec to_timespec(std::chrono::nanoseconds d);  // negative -> zero

void set_nodelay(int fd);
std::string local_host_name();  // gethostname, else "localhost"
// An IPv4 address of this host that other nodes can reach (see the definition); "127.0.0.1"
// when there is none (a single-node job).
std::string reachable_address();
std::string peer_name(const sockaddr_storage& addr);  // "ip:port" for IPv4, else "?"

// Connects to "host:port" (or "[v6]:port") before `deadline`; returns a blocking socket with
// TCP_NODELAY. Throws CommError naming `rank` and the address if it cannot.
UniqueFd connect_before(const std::string& address, SocketTime deadline, int rank);

// Sends all of `bytes` on a blocking socket (no SIGPIPE). Returns 0, or the errno that stopped
// it (EPIPE if the peer closed).
int send_all(int fd, std::span<const uint8_t> bytes);

enum class RecvStatus { kData, kClosed, kWouldBlock, kError };
// One recv() appended to `in`, retrying EINTR. kError leaves the errno in `err`.
RecvStatus recv_append(int fd, std::vector<uint8_t>& in, int& err);

// Waits in ppoll until `fd` is readable or `deadline` passed (nullopt: forever). Returns false
// on timeout; throws CommError (prefixed by `who`) if ppoll fails.
bool wait_readable(int fd, std::optional<SocketTime> deadline, const std::string& who);

}  // namespace resync::collectives::detail
