// TcpControlServer: rank 0's coordinator thread, one ppoll loop over the listening socket and
// every rank's connection.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <list>
#include <thread>

#include "base/error.h"
#include "base/log.h"
#include "collectives/control/delivery.h"
#include "collectives/control/tcp_control.h"

namespace resync::collectives {

namespace {

using detail::errno_text;
using detail::RecvStatus;
using detail::seconds;
using detail::throw_sys;
using detail::to_timespec;
using wire::Message;
using wire::message_of;
using wire::MsgType;

}  // namespace

struct TcpControlServer::Impl {
  struct Conn {
    detail::UniqueFd fd;
    std::string peer;  // ip:port, for logs
    int rank = -1;     // -1 until its HELLO is accepted
    std::string host;  // from the HELLO
    CoordTime hello_deadline;
    std::vector<uint8_t> in;
    std::vector<uint8_t> out;
    size_t out_sent = 0;
    bool eof = false;         // the peer closed, or the socket failed
    bool write_shut = false;  // shutdown(SHUT_WR) done while draining
    bool refused = false;     // to be closed and forgotten
    bool watch = false;       // a watch connection (tcp_watch.h): heartbeats, END or ABORT
  };
  enum class Phase { kStartup, kRunning, kDraining, kDone };
  struct Sink;  // deliver()'s OrderSink

  explicit Impl(const TcpServerOptions& options);
  void run();
  void step();
  std::optional<CoordTime> next_wake() const;
  void accept_all(CoordTime now);
  void read_some(Conn& conn);
  void flush(Conn& conn);
  void send(Conn& conn, const Message& msg);
  void handle_pending(Conn& conn, CoordTime now);
  void refuse(Conn& conn, const std::string& reason);
  void handle_frames(Conn& conn, CoordTime now);
  void apply(Decisions&& d, CoordTime now);
  void send_to_watchers(const Message& msg);
  void abort_all(const std::string& reason, CoordTime now);
  void drain(CoordTime now);
  std::string who(int rank) const;

  TcpServerOptions opts;
  JobToken token;
  std::string host;
  uint16_t port = 0;
  detail::UniqueFd listen_fd;
  detail::UniqueFd wake_fd;  // eventfd: the destructor wakes the thread through it
  std::shared_ptr<spdlog::logger> log;
  std::atomic<size_t> n_refused{0};
  std::atomic<bool> shutdown{false};
  mutable std::mutex mu;
  std::optional<std::string> abort_reason;  // guarded by mu

  // Owned by the coordinator thread once it runs.
  Phase phase = Phase::kStartup;
  std::list<Conn> conns;  // std::list: by_rank keeps pointers into it
  std::vector<Conn*> by_rank;
  std::vector<Conn*> watch_by_rank;  // each rank's watch connection, once it said WATCH_HELLO
  CoordTime next_heartbeat;
  std::optional<Coordinator> coordinator;
  CoordTime startup_deadline;
  CoordTime linger_deadline;
  std::thread thread;
};

TcpControlServer::Impl::Impl(const TcpServerOptions& options) : opts(options) {
  opts.coordinator.validate();
  RESYNC_CHECK_ARG(std::isfinite(opts.startup_timeout_s) && opts.startup_timeout_s > 0,
                   "control plane: start-up timeout must be > 0 s");
  RESYNC_CHECK_ARG(std::isfinite(opts.hello_timeout_s) && opts.hello_timeout_s > 0,
                   "control plane: HELLO timeout must be > 0 s");
  RESYNC_CHECK_ARG(std::isfinite(opts.linger_s) && opts.linger_s >= 0,
                   "control plane: linger time must be >= 0 s");
  RESYNC_CHECK_ARG(std::isfinite(opts.heartbeat_s) && opts.heartbeat_s > 0,
                   "control plane: heartbeat interval must be > 0 s");
  log = log::get("coll");
  token = JobToken::random();

  listen_fd.reset(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listen_fd.valid()) throw_sys("control plane: socket", errno);
  const int one = 1;
  if (setsockopt(listen_fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0) {
    throw_sys("control plane: setsockopt(SO_REUSEADDR)", errno);
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(opts.port);
  if (::bind(listen_fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    throw_sys(fmt::format("control plane: bind to port {}", opts.port), errno);
  }
  if (::listen(listen_fd.get(), SOMAXCONN) != 0) throw_sys("control plane: listen", errno);
  socklen_t len = sizeof(addr);
  if (getsockname(listen_fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw_sys("control plane: getsockname", errno);
  }
  port = ntohs(addr.sin_port);
  host = opts.advertise_host.empty() ? detail::reachable_address() : opts.advertise_host;

  wake_fd.reset(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_fd.valid()) throw_sys("control plane: eventfd", errno);
  by_rank.assign(static_cast<size_t>(opts.coordinator.world_size), nullptr);
  watch_by_rank.assign(by_rank.size(), nullptr);
  startup_deadline = CoordClock::now() + seconds(opts.startup_timeout_s);
  next_heartbeat = CoordClock::now() + seconds(opts.heartbeat_s);
}

std::string TcpControlServer::Impl::who(int rank) const {
  const Conn* conn = by_rank[static_cast<size_t>(rank)];
  if (conn == nullptr || conn->host.empty()) return fmt::format("rank {}", rank);
  return fmt::format("rank {} ({})", rank, conn->host);
}

void TcpControlServer::Impl::run() {
  try {
    while (phase != Phase::kDone) step();
  } catch (const std::exception& e) {
    // The thread must not die silently: tell every client, so no rank waits forever.
    const std::string reason = fmt::format("the coordinator failed: {}", e.what());
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!abort_reason) abort_reason = reason;
    }
    log->error("control: {}", reason);
    Message abort = message_of(MsgType::kAbort);
    abort.text = reason;
    for (Conn& conn : conns) {
      if (conn.rank < 0 || conn.eof) continue;
      conn.out.clear();
      conn.out_sent = 0;
      wire::append_frame(abort, conn.out);
      flush(conn);
    }
  }
  conns.clear();
  by_rank.assign(by_rank.size(), nullptr);
  watch_by_rank.assign(watch_by_rank.size(), nullptr);
}

std::optional<CoordTime> TcpControlServer::Impl::next_wake() const {
  std::optional<CoordTime> wake;
  auto consider = [&wake](CoordTime t) {
    if (!wake || t < *wake) wake = t;
  };
  if (phase == Phase::kStartup) consider(startup_deadline);
  if (phase == Phase::kRunning) {
    if (auto d = coordinator->next_deadline()) consider(*d);
  }
  if (phase == Phase::kDraining) consider(linger_deadline);
  if (phase == Phase::kStartup || phase == Phase::kRunning) {
    consider(next_heartbeat);
    for (const Conn& conn : conns) {
      if (conn.rank < 0) consider(conn.hello_deadline);
    }
  }
  return wake;
}

void TcpControlServer::Impl::step() {
  const bool accepting = phase == Phase::kStartup || phase == Phase::kRunning;
  std::vector<pollfd> fds;
  std::vector<Conn*> polled;
  fds.push_back({wake_fd.get(), POLLIN, 0});
  if (accepting) fds.push_back({listen_fd.get(), POLLIN, 0});
  const size_t first_conn = fds.size();
  for (Conn& conn : conns) {
    if (conn.eof) continue;
    short events = POLLIN;
    if (conn.out_sent < conn.out.size()) events |= POLLOUT;
    fds.push_back({conn.fd.get(), events, 0});
    polled.push_back(&conn);
  }

  // Sleep in the kernel until a socket is readable or the next deadline: never spin.
  const auto before = CoordClock::now();
  const auto wake = next_wake();
  timespec wait{};
  if (wake) wait = to_timespec(*wake - before);
  const int n_ready = ::ppoll(fds.data(), fds.size(), wake ? &wait : nullptr, nullptr);
  if (n_ready < 0) {
    if (errno == EINTR) return;
    throw_sys("control plane: ppoll", errno);
  }
  const auto now = CoordClock::now();

  if (fds[0].revents != 0) {
    uint64_t count = 0;
    while (::read(wake_fd.get(), &count, sizeof(count)) < 0 && errno == EINTR) {
    }
  }
  if (shutdown.load()) {
    abort_all("the coordinator shut down before the job finished (rank 0 is exiting)", now);
  }
  if (accepting && (fds[1].revents & POLLIN) != 0) accept_all(now);
  for (size_t i = 0; i < polled.size(); ++i) {
    const short revents = fds[first_conn + i].revents;
    if ((revents & POLLOUT) != 0) flush(*polled[i]);
    if ((revents & (POLLIN | POLLHUP | POLLERR)) != 0) read_some(*polled[i]);
  }

  if (phase == Phase::kStartup || phase == Phase::kRunning) {
    for (Conn& conn : conns) {
      if (conn.rank < 0) handle_pending(conn, now);
    }
  }
  if (phase == Phase::kStartup) {
    const auto n_connected = static_cast<size_t>(
        std::count_if(by_rank.begin(), by_rank.end(), [](const Conn* c) { return c != nullptr; }));
    for (const Conn* conn : by_rank) {
      if (conn != nullptr && conn->eof) {
        abort_all(who(conn->rank) + " closed its control connection during start-up", now);
        break;
      }
    }
    if (phase == Phase::kStartup && n_connected == by_rank.size()) {
      coordinator.emplace(opts.coordinator, now);
      phase = Phase::kRunning;
      log->info("control: all {} ranks connected; coordinator running", by_rank.size());
    } else if (phase == Phase::kStartup && now >= startup_deadline) {
      std::vector<int> missing;
      for (size_t r = 0; r < by_rank.size(); ++r) {
        if (by_rank[r] == nullptr) missing.push_back(static_cast<int>(r));
      }
      abort_all(
          fmt::format("start-up: only {} of {} ranks connected to the control plane at "
                      "{}:{} within {:g} s; missing ranks {}",
                      n_connected, by_rank.size(), host, port, opts.startup_timeout_s, missing),
          now);
    }
  }
  if (phase == Phase::kRunning) {
    for (Conn* conn : by_rank) {
      if (phase != Phase::kRunning) break;
      handle_frames(*conn, now);
    }
    for (Conn* conn : by_rank) {
      if (phase != Phase::kRunning) break;
      if (conn->eof) apply(coordinator->connection_lost(conn->rank, now, conn->host), now);
    }
    if (phase == Phase::kRunning) apply(coordinator->tick(now), now);
  }
  if ((phase == Phase::kStartup || phase == Phase::kRunning) && now >= next_heartbeat) {
    send_to_watchers(message_of(MsgType::kHeartbeat));
    next_heartbeat = now + seconds(opts.heartbeat_s);
  }
  if (phase == Phase::kDraining) drain(now);
  conns.remove_if([](const Conn& c) { return c.refused; });
}

void TcpControlServer::Impl::send_to_watchers(const Message& msg) {
  for (Conn* conn : watch_by_rank) {
    if (conn != nullptr) send(*conn, msg);
  }
}

void TcpControlServer::Impl::accept_all(CoordTime now) {
  while (true) {
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    const int fd = ::accept4(listen_fd.get(), reinterpret_cast<sockaddr*>(&addr), &len,
                             SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      // EMFILE and friends: keep serving the ranks already connected.
      log->warn("control: accept failed: {}", errno_text(errno));
      return;
    }
    Conn& conn = conns.emplace_back();
    conn.fd.reset(fd);
    conn.peer = detail::peer_name(addr);
    conn.hello_deadline = now + seconds(opts.hello_timeout_s);
    detail::set_nodelay(fd);
  }
}

void TcpControlServer::Impl::read_some(Conn& conn) {
  while (!conn.eof) {
    // An unknown peer gets no more than a HELLO's worth of buffer.
    if (conn.rank < 0 && conn.in.size() > wire::kMaxHelloBytes + wire::kFrameHeaderBytes) return;
    int err = 0;
    const size_t before = conn.in.size();
    const RecvStatus status = detail::recv_append(conn.fd.get(), conn.in, err);
    if (phase == Phase::kDraining) conn.in.resize(before);  // the job is over: discard
    if (status == RecvStatus::kData) continue;
    if (status == RecvStatus::kWouldBlock) return;
    conn.eof = true;  // orderly close or a reset: the peer is gone either way
  }
}

void TcpControlServer::Impl::flush(Conn& conn) {
  while (conn.out_sent < conn.out.size() && !conn.eof) {
    const ssize_t n = ::send(conn.fd.get(), conn.out.data() + conn.out_sent,
                             conn.out.size() - conn.out_sent, MSG_NOSIGNAL);
    if (n > 0) {
      conn.out_sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;  // POLLOUT resumes it
    conn.eof = true;
  }
  conn.out.clear();
  conn.out_sent = 0;
}

void TcpControlServer::Impl::send(Conn& conn, const Message& msg) {
  if (conn.eof) return;
  wire::append_frame(msg, conn.out);
  flush(conn);
}

void TcpControlServer::Impl::refuse(Conn& conn, const std::string& reason) {
  // Counted before the socket closes, so a peer that sees EOF also sees the count.
  n_refused.fetch_add(1);
  log->warn("control: refused a connection from {}: {}; the job goes on", conn.peer, reason);
  conn.refused = true;
}

void TcpControlServer::Impl::handle_pending(Conn& conn, CoordTime now) {
  if (conn.refused) return;
  Message msg;
  size_t used = 0;
  try {
    used = wire::decode_frame(conn.in, wire::kMaxHelloBytes, msg);
  } catch (const CommError& e) {
    refuse(conn, e.what());
    return;
  }
  if (used == 0) {
    if (conn.eof) {
      refuse(conn, "closed before presenting the job token");
    } else if (now >= conn.hello_deadline) {
      refuse(conn, fmt::format("no HELLO within {:g} s", opts.hello_timeout_s));
    }
    return;
  }
  const bool watch = msg.type == MsgType::kWatchHello;
  if (msg.type != MsgType::kHello && !watch) {
    return refuse(conn, "the first message is not a HELLO");
  }
  if (!(msg.token == token)) return refuse(conn, "wrong job token");
  if (msg.rank >= static_cast<int>(by_rank.size())) {
    return refuse(conn, fmt::format("rank {} outside [0, {})", msg.rank, by_rank.size()));
  }
  std::vector<Conn*>& table = watch ? watch_by_rank : by_rank;
  if (table[static_cast<size_t>(msg.rank)] != nullptr) {
    return refuse(conn, fmt::format("rank {} is already connected{}", msg.rank,
                                    watch ? " (watch)" : ""));
  }
  conn.rank = msg.rank;
  conn.host = msg.text;
  conn.watch = watch;
  conn.in.erase(conn.in.begin(), conn.in.begin() + static_cast<std::ptrdiff_t>(used));
  table[static_cast<size_t>(msg.rank)] = &conn;
  log->debug("control: {} connected {}from {}", who(conn.rank), watch ? "its watch " : "",
             conn.peer);
  send(conn, message_of(MsgType::kWelcome));
}

void TcpControlServer::Impl::handle_frames(Conn& conn, CoordTime now) {
  size_t offset = 0;
  while (phase == Phase::kRunning) {
    Message msg;
    size_t used = 0;
    try {
      used = wire::decode_frame(std::span<const uint8_t>(conn.in).subspan(offset),
                                wire::kMaxFrameBytes, msg);
    } catch (const CommError& e) {
      abort_all(fmt::format("{} sent a malformed control message: {}", who(conn.rank), e.what()),
                now);
      break;
    }
    if (used == 0) break;
    offset += used;
    switch (msg.type) {
      case MsgType::kReady:
        apply(coordinator->ready(conn.rank, msg.step, now), now);
        break;
      case MsgType::kFinish:
        apply(coordinator->finish(conn.rank, msg.step, now), now);
        break;
      case MsgType::kBusy:
        apply(coordinator->busy(conn.rank, msg.step, now), now);
        break;
      case MsgType::kFailed:
        log->warn("control: {} reports a failed all-reduce or catch-up for step {}", who(conn.rank),
                  msg.step);
        apply(coordinator->failed(conn.rank, msg.step, now), now);
        break;
      case MsgType::kStop:
        log->info("control: {} asked all ranks to stop", who(conn.rank));
        apply(coordinator->stop_requested(conn.rank, now), now);
        break;
      default:
        abort_all(fmt::format("{} sent an unexpected control message (type {})", who(conn.rank),
                              static_cast<int>(msg.type)),
                  now);
        break;
    }
  }
  conn.in.erase(conn.in.begin(),
                conn.in.begin() + static_cast<std::ptrdiff_t>(std::min(offset, conn.in.size())));
}

// deliver()'s sink on the coordinator thread: an order is a frame on its rank's connection.
struct TcpControlServer::Impl::Sink final : OrderSink {
  Sink(Impl& owner, CoordTime at) : impl(owner), now(at) {}
  void send(int rank, StepOrder&& order) override {
    Message msg = message_of(MsgType::kOrder);
    msg.order = std::move(order);
    impl.send(*impl.by_rank[static_cast<size_t>(rank)], msg);
  }
  void round_sent(const ClosedRound& round) override {
    if (!round.final_round) return;
    impl.log->info("control: final round closed after {} steps ({} late ranks caught up)",
                   round.step, round.catchups.size());
    impl.send_to_watchers(message_of(MsgType::kEnd));
    impl.phase = Phase::kDraining;
    impl.linger_deadline = now + seconds(impl.opts.linger_s);
  }
  void abort(const std::string& reason) override { impl.abort_all(reason, now); }
  std::string who(int rank) const override { return impl.who(rank); }

  Impl& impl;
  CoordTime now;
};

void TcpControlServer::Impl::apply(Decisions&& d, CoordTime now) {
  Sink sink(*this, now);
  deliver(d, sink);
}

void TcpControlServer::Impl::abort_all(const std::string& reason, CoordTime now) {
  if (phase == Phase::kDraining || phase == Phase::kDone) return;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!abort_reason) abort_reason = reason;
  }
  log->error("control: aborting the job: {}", reason);
  Message msg = message_of(MsgType::kAbort);
  msg.text = reason;
  for (Conn& conn : conns) {
    if (conn.rank >= 0) send(conn, msg);
  }
  phase = Phase::kDraining;
  linger_deadline = now + seconds(opts.linger_s);
}

void TcpControlServer::Impl::drain(CoordTime now) {
  // Closing while a client still has unread orders could reset the connection and destroy
  // them, so wait (up to linger_s) until every client has read its last order and closed.
  bool all_closed = true;
  for (Conn& conn : conns) {
    if (conn.rank < 0) {
      conn.refused = true;  // the job is over: unknown peers are just closed
      continue;
    }
    if (conn.out_sent < conn.out.size()) {
      all_closed = false;
      continue;
    }
    if (!conn.write_shut && !conn.eof) {
      ::shutdown(conn.fd.get(), SHUT_WR);
      conn.write_shut = true;
    }
    if (!conn.eof) all_closed = false;
  }
  if (all_closed || now >= linger_deadline) {
    if (!all_closed && opts.linger_s > 0) {
      log->warn("control: some clients did not close their connection within {:g} s",
                opts.linger_s);
    }
    phase = Phase::kDone;
  }
}

TcpControlServer::TcpControlServer(const TcpServerOptions& options)
    : impl_(std::make_unique<Impl>(options)) {
  const CoordinatorConfig& c = impl_->opts.coordinator;
  impl_->log->info(
      "control: coordinator listening on {} for {} ranks (backup workers {}, "
      "straggler timeout {} ms, min quorum {}, stall warning {:g} s, stall abort "
      "{:g} s)",
      address(), c.world_size, c.backup_workers, c.straggler_timeout_ms, c.min_quorum,
      c.stall_warning_s, c.stall_abort_s);
  impl_->thread = std::thread([impl = impl_.get()] { impl->run(); });
}

TcpControlServer::~TcpControlServer() {
  impl_->shutdown.store(true);
  const uint64_t one = 1;
  while (::write(impl_->wake_fd.get(), &one, sizeof(one)) < 0 && errno == EINTR) {
  }
  impl_->thread.join();
}

std::string TcpControlServer::address() const {
  return fmt::format("{}:{}", impl_->host, impl_->port);
}
const JobToken& TcpControlServer::token() const { return impl_->token; }
std::string TcpControlServer::endpoint() const {
  return fmt::format("{}:{}", address(), impl_->token.hex());
}
uint16_t TcpControlServer::port() const { return impl_->port; }
size_t TcpControlServer::refused_connections() const { return impl_->n_refused.load(); }
std::optional<std::string> TcpControlServer::abort_reason() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->abort_reason;
}

}  // namespace resync::collectives
