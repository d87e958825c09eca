// TcpControlClient: one rank's control connection; it blocks in the kernel while it waits.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "base/error.h"
#include "collectives/control/tcp_control.h"

namespace resync::collectives {

namespace {

using detail::errno_text;
using detail::RecvStatus;
using detail::seconds;
using wire::Message;
using wire::message_of;
using wire::MsgType;

}  // namespace

TcpControlClient::TcpControlClient(const std::string& address, const JobToken& token, int rank,
                                   const TcpClientOptions& options)
    : address_(address), rank_(rank) {
  RESYNC_CHECK_ARG(rank >= 0, fmt::format("control client: rank {} is negative", rank));
  RESYNC_CHECK_ARG(std::isfinite(options.connect_timeout_s) && options.connect_timeout_s > 0,
                   "control client: connect timeout must be > 0 s");
  const auto deadline = CoordClock::now() + seconds(options.connect_timeout_s);
  fd_ = detail::connect_before(address, deadline, rank);

  Message hello = message_of(MsgType::kHello);
  hello.token = token;
  hello.rank = rank;
  hello.text = detail::local_host_name();
  send_frame(hello);
  Message reply;
  try {
    const double left = std::chrono::duration<double>(deadline - CoordClock::now()).count();
    reply = receive(std::max(left, 0.001));
  } catch (const CommError& e) {
    close_connection();
    throw CommError(
        fmt::format("rank {}: the coordinator at {} did not accept the connection "
                    "(wrong job token, rank already connected or out of range?): {}",
                    rank, address, e.what()));
  }
  if (reply.type == MsgType::kAbort) {
    close_connection();
    throw CommError(fmt::format("rank {}: job aborted by the coordinator: {}", rank, reply.text));
  }
  if (reply.type != MsgType::kWelcome) {
    close_connection();
    throw CommError(fmt::format("rank {}: unexpected reply (type {}) to HELLO from {}", rank,
                                static_cast<int>(reply.type), address));
  }
}

std::unique_ptr<TcpControlClient> TcpControlClient::connect(const std::string& endpoint, int rank,
                                                            const TcpClientOptions& options) {
  const size_t colon = endpoint.rfind(':');
  RESYNC_CHECK_ARG(colon != std::string::npos && colon > 0,
                   fmt::format("control endpoint '{}' is not host:port:token", endpoint));
  const JobToken token = JobToken::from_hex(std::string_view(endpoint).substr(colon + 1));
  return std::make_unique<TcpControlClient>(endpoint.substr(0, colon), token, rank, options);
}

TcpControlClient::~TcpControlClient() = default;

StepOrder TcpControlClient::ready(uint64_t step) { return exchange(MsgType::kReady, step); }

StepOrder TcpControlClient::finish(uint64_t n_steps) { return exchange(MsgType::kFinish, n_steps); }

StepOrder TcpControlClient::failed(uint64_t step) { return exchange(MsgType::kFailed, step); }

StepOrder TcpControlClient::next_order() {
  if (ended_) throw CommError(*ended_);
  try {
    return take_order(receive(-1.0));
  } catch (const CommError& e) {
    ended_ = e.what();
    close_connection();
    throw;
  }
}

std::optional<StepOrder> TcpControlClient::busy(uint64_t step, std::chrono::nanoseconds max_wait) {
  if (ended_) throw CommError(*ended_);
  try {
    Message report = message_of(MsgType::kBusy);
    report.step = step;
    send_frame(report);
    std::optional<Message> reply = receive_until(CoordClock::now() + max_wait);
    if (!reply) return std::nullopt;  // a partial frame stays in in_ for ready()
    return take_order(std::move(*reply));
  } catch (const CommError& e) {
    ended_ = e.what();
    close_connection();
    throw;
  }
}

void TcpControlClient::request_stop() {
  std::lock_guard<std::mutex> lock(write_mu_);
  if (!fd_.valid()) return;  // the job is already over; the error, if any, reaches ready()
  send_locked(message_of(MsgType::kStop));
}

StepOrder TcpControlClient::exchange(MsgType type, uint64_t step) {
  if (ended_) throw CommError(*ended_);
  try {
    Message report = message_of(type);
    report.step = step;
    send_frame(report);
    return take_order(receive(-1.0));
  } catch (const CommError& e) {
    ended_ = e.what();
    close_connection();
    throw;
  }
}

StepOrder TcpControlClient::take_order(Message reply) {
  if (reply.type == MsgType::kOrder) {
    if (reply.order.final_round) {
      ended_ = fmt::format("rank {}: the control channel is closed after the final order", rank_);
      close_connection();
    }
    return std::move(reply.order);
  }
  if (reply.type == MsgType::kAbort) {
    throw CommError(fmt::format("rank {}: job aborted by the coordinator: {}", rank_, reply.text));
  }
  throw CommError(fmt::format("rank {}: unexpected control message (type {}) from {}", rank_,
                              static_cast<int>(reply.type), address_));
}

void TcpControlClient::send_frame(const Message& msg) {
  std::lock_guard<std::mutex> lock(write_mu_);
  RESYNC_CHECK(fd_.valid(), fmt::format("rank {}: control connection used after closing", rank_));
  send_locked(msg);
}

void TcpControlClient::send_locked(const Message& msg) {
  std::vector<uint8_t> frame;
  wire::append_frame(msg, frame);
  const int err = detail::send_all(fd_.get(), frame);
  if (err != 0) {
    throw CommError(
        fmt::format("rank {}: lost the control connection to the coordinator at "
                    "{} (rank 0 died?): {}",
                    rank_, address_, errno_text(err)));
  }
}

Message TcpControlClient::receive(double timeout_s) {
  std::optional<CoordTime> deadline;
  if (timeout_s >= 0) deadline = CoordClock::now() + seconds(timeout_s);
  std::optional<Message> msg = receive_until(deadline);
  if (!msg) {
    throw CommError(fmt::format("rank {}: no reply from the coordinator at {} within {:g} s", rank_,
                                address_, timeout_s));
  }
  return std::move(*msg);
}

std::optional<Message> TcpControlClient::receive_until(std::optional<CoordTime> deadline) {
  while (true) {
    Message msg;
    const size_t used = wire::decode_frame(in_, wire::kMaxFrameBytes, msg);
    if (used > 0) {
      in_.erase(in_.begin(), in_.begin() + static_cast<std::ptrdiff_t>(used));
      return msg;
    }
    // Sleeps in the kernel until the coordinator speaks: a waiting rank burns no CPU.
    if (deadline &&
        !detail::wait_readable(fd_.get(), deadline, fmt::format("rank {}: control plane", rank_))) {
      return std::nullopt;
    }
    int err = 0;
    const RecvStatus status = detail::recv_append(fd_.get(), in_, err);
    if (status == RecvStatus::kClosed) {
      throw CommError(
          fmt::format("rank {}: the coordinator at {} closed the control connection "
                      "(rank 0 died or exited)",
                      rank_, address_));
    }
    if (status == RecvStatus::kError) {
      throw CommError(
          fmt::format("rank {}: lost the control connection to the coordinator at "
                      "{}: {}",
                      rank_, address_, errno_text(err)));
    }
  }
}

void TcpControlClient::close_connection() {
  std::lock_guard<std::mutex> lock(write_mu_);
  fd_.reset();
}

}  // namespace resync::collectives
