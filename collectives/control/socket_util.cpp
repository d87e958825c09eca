#include "collectives/control/socket_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <system_error>
#include <utility>

#include "base/error.h"

namespace resync::collectives::detail {

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::string errno_text(int err) { return std::system_category().message(err); }

void throw_sys(const std::string& what, int err) {
  throw CommError(fmt::format("{}: {}", what, errno_text(err)));
}

std::chrono::nanoseconds seconds(double s) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(s));
}

void set_nodelay(int fd) {
  const int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    throw_sys("control plane: setsockopt(TCP_NODELAY)", errno);
  }
}

namespace {

std::string ipv4_text(const in_addr& addr) {
  char text[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &addr, text, sizeof(text));
  return text;
}

bool is_loopback(const in_addr& addr) { return (ntohl(addr.s_addr) >> 24) == 127; }

// "host:port" -> {host, port}; "[v6]:port" is accepted too.
std::pair<std::string, std::string> split_host_port(const std::string& address) {
  const size_t colon = address.rfind(':');
  RESYNC_CHECK_ARG(colon != std::string::npos && colon > 0 && colon + 1 < address.size(),
                   fmt::format("control address '{}' is not host:port", address));
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return {host, address.substr(colon + 1)};
}

}  // namespace

std::string local_host_name() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "localhost";
  return name;
}

// An IPv4 address of this host that other nodes can reach: what the host name resolves to
// (Debian maps it to 127.0.1.1, useless to others, hence the interface scan), else the first
// non-loopback interface that is up, else 127.0.0.1 (a single-node job).
std::string reachable_address() {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(local_host_name().c_str(), nullptr, &hints, &found) == 0) {
    std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> guard(found, freeaddrinfo);
    for (const addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
      const auto* sin = reinterpret_cast<const sockaddr_in*>(ai->ai_addr);
      if (!is_loopback(sin->sin_addr)) return ipv4_text(sin->sin_addr);
    }
  }
  ifaddrs* interfaces = nullptr;
  if (getifaddrs(&interfaces) == 0) {
    std::unique_ptr<ifaddrs, decltype(&freeifaddrs)> guard(interfaces, freeifaddrs);
    for (const ifaddrs* ifa = interfaces; ifa != nullptr; ifa = ifa->ifa_next) {
      if (ifa->ifa_addr == nullptr || ifa->ifa_addr->sa_family != AF_INET) continue;
      if ((ifa->ifa_flags & IFF_UP) == 0 || (ifa->ifa_flags & IFF_LOOPBACK) != 0) continue;
      return ipv4_text(reinterpret_cast<const sockaddr_in*>(ifa->ifa_addr)->sin_addr);
    }
  }
  return "127.0.0.1";
}

std::string peer_name(const sockaddr_storage& addr) {
  if (addr.ss_family == AF_INET) {
    const auto& sin = reinterpret_cast<const sockaddr_in&>(addr);
    return fmt::format("{}:{}", ipv4_text(sin.sin_addr), ntohs(sin.sin_port));
  }
  return "?";
}

timespec to_timespec(std::chrono::nanoseconds d) {
  const auto ns = std::max<int64_t>(0, d.count());
  return timespec{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
}

// Connects to host:port within `deadline`; returns a blocking socket.
UniqueFd connect_before(const std::string& address, SocketTime deadline, int rank) {
  const auto [host, port] = split_host_port(address);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0) {
    throw CommError(fmt::format("rank {}: cannot resolve the control address {}: {}", rank, address,
                                gai_strerror(rc)));
  }
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> guard(found, freeaddrinfo);
  std::string last_error = "no address";
  for (const addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd.valid()) throw_sys("control plane: socket", errno);
    int err = 0;
    if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      err = errno;
      while (err == EINPROGRESS || err == EINTR) {
        const auto left = deadline - std::chrono::steady_clock::now();
        if (left <= std::chrono::nanoseconds(0)) {
          err = ETIMEDOUT;
          break;
        }
        pollfd p{fd.get(), POLLOUT, 0};
        const timespec wait = to_timespec(left);
        const int n = ::ppoll(&p, 1, &wait, nullptr);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
          err = errno;
          break;
        }
        if (n == 0) continue;  // re-checks the deadline
        socklen_t len = sizeof(err);
        if (getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
        break;
      }
    }
    if (err != 0) {
      last_error = errno_text(err);
      continue;
    }
    const int flags = ::fcntl(fd.get(), F_GETFL);
    if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
      throw_sys("control plane: fcntl", errno);
    }
    set_nodelay(fd.get());
    return fd;
  }
  throw CommError(fmt::format("rank {}: cannot connect to the coordinator at {}: {}", rank, address,
                              last_error));
}

int send_all(int fd, std::span<const uint8_t> bytes) {
  size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
    } else if (n == 0) {
      return EPIPE;
    } else if (errno != EINTR) {
      return errno;
    }
  }
  return 0;
}

RecvStatus recv_append(int fd, std::vector<uint8_t>& in, int& err) {
  uint8_t buf[4096];
  while (true) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n > 0) {
      in.insert(in.end(), buf, buf + n);
      return RecvStatus::kData;
    }
    if (n == 0) return RecvStatus::kClosed;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return RecvStatus::kWouldBlock;
    err = errno;
    return RecvStatus::kError;
  }
}

bool wait_readable(int fd, std::optional<SocketTime> deadline, const std::string& who) {
  while (true) {
    pollfd p{fd, POLLIN, 0};
    timespec wait{};
    if (deadline) wait = to_timespec(*deadline - std::chrono::steady_clock::now());
    const int n = ::ppoll(&p, 1, deadline ? &wait : nullptr, nullptr);
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) throw_sys(who + ": ppoll", errno);
  }
}

}  // namespace resync::collectives::detail
