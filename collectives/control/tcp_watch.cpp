// CoordinatorWatch: the watch thread sleeps in ppoll on its connection and an eventfd.
#include "collectives/control/tcp_watch.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cmath>

#include "base/error.h"
#include "collectives/control/tcp_control.h"
#include "collectives/control/wire.h"

namespace resync::collectives {

namespace {
using detail::RecvStatus;
using wire::Message;
using wire::MsgType;
}  // namespace

CoordinatorWatch::CoordinatorWatch(const std::string& endpoint, int rank, double silence_limit_s,
                                   LostHandler on_lost)
    : rank_(rank), silence_limit_s_(silence_limit_s), on_lost_(std::move(on_lost)) {
  RESYNC_CHECK_ARG(std::isfinite(silence_limit_s) && silence_limit_s > 0,
                   "coordinator watch: the silence limit must be > 0 s");
  const size_t colon = endpoint.rfind(':');
  RESYNC_CHECK_ARG(colon != std::string::npos && colon > 0,
                   fmt::format("control endpoint '{}' is not host:port:token", endpoint));
  address_ = endpoint.substr(0, colon);
  const JobToken token = JobToken::from_hex(std::string_view(endpoint).substr(colon + 1));
  const auto deadline = CoordClock::now() + detail::seconds(60);
  fd_ = detail::connect_before(address_, deadline, rank);
  Message hello = wire::message_of(MsgType::kWatchHello);
  hello.token = token;
  hello.rank = rank;
  hello.text = detail::local_host_name();
  std::vector<uint8_t> frame;
  wire::append_frame(hello, frame);
  if (const int err = detail::send_all(fd_.get(), frame); err != 0) {
    detail::throw_sys(fmt::format("rank {}: coordinator watch: send HELLO", rank), err);
  }
  wake_fd_.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_fd_.valid()) detail::throw_sys("coordinator watch: eventfd", errno);
  // The WELCOME is read by the thread like any other message.
  thread_ = std::thread([this] { run(); });
}

CoordinatorWatch::~CoordinatorWatch() {
  stopping_.store(true);
  const uint64_t one = 1;
  while (::write(wake_fd_.get(), &one, sizeof(one)) < 0 && errno == EINTR) {
  }
  thread_.join();
}

void CoordinatorWatch::run() {
  std::vector<uint8_t> in;
  auto lost = [&](const std::string& why) {
    if (!stopping_.load()) on_lost_(why);
  };
  while (!stopping_.load()) {
    pollfd fds[2] = {{fd_.get(), POLLIN, 0}, {wake_fd_.get(), POLLIN, 0}};
    const timespec limit = detail::to_timespec(detail::seconds(silence_limit_s_));
    const int n = ::ppoll(fds, 2, &limit, nullptr);
    if (n < 0) {
      if (errno == EINTR) continue;
      return lost(fmt::format("the watch on the coordinator at {} failed: {}", address_,
                              detail::errno_text(errno)));
    }
    if (stopping_.load()) return;
    if (n == 0) {
      return lost(fmt::format("the coordinator at {} has been silent for {:g} s (rank 0 frozen?)",
                              address_, silence_limit_s_));
    }
    int err = 0;
    const RecvStatus status = detail::recv_append(fd_.get(), in, err);
    if (status == RecvStatus::kClosed || status == RecvStatus::kError) {
      return lost(
          fmt::format("the coordinator at {} closed the connection without ending the "
                      "job (rank 0 died?)",
                      address_));
    }
    while (true) {
      Message msg;
      size_t used = 0;
      try {
        used = wire::decode_frame(in, wire::kMaxFrameBytes, msg);
      } catch (const CommError& e) {
        return lost(fmt::format("the coordinator sent a malformed watch message: {}", e.what()));
      }
      if (used == 0) break;
      in.erase(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(used));
      if (msg.type == MsgType::kEnd) {
        ended_.store(true);
        return;
      }
      if (msg.type == MsgType::kAbort) return lost(msg.text);
      // kWelcome, kHeartbeat: the coordinator is alive.
    }
  }
}

}  // namespace resync::collectives
