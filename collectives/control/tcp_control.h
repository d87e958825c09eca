// The TCP control plane: the coordinator server (a thread on rank 0 that sleeps in the kernel,
// in ppoll, and never calls MPI; tcp_server.cpp) and the client every rank uses
// (tcp_client.cpp), with a job-token handshake.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "collectives/control/control_plane.h"
#include "collectives/control/coordinator.h"
#include "collectives/control/socket_util.h"
#include "collectives/control/wire.h"

namespace resync::collectives {

struct TcpServerOptions {
  CoordinatorConfig coordinator;
  std::string advertise_host;      // host/IP the other ranks connect to; empty = this host's
                                   // address (hostname, else first non-loopback IPv4, else
                                   // 127.0.0.1)
  uint16_t port = 0;               // 0 = any free port; the server listens on all interfaces
  double startup_timeout_s = 120;  // every rank must have said HELLO by then, else ABORT
  double hello_timeout_s = 2;      // a new connection must present the token by then
  double linger_s = 5;             // after the job ended: how long to wait for clients to close
  double heartbeat_s = 0.5;        // HEARTBEAT on every watch connection this often
};

// Rank 0's coordinator. The constructor binds and listens and starts the coordinator thread; the
// runtime then broadcasts endpoint() over MPI and every rank (rank 0 included) connects a
// TcpControlClient to it. The destructor aborts a job that is still running (the clients see
// ABORT), waits up to linger_s for the clients to close, and joins the thread.
class TcpControlServer {
 public:
  // Throws InvalidArgument for bad options, CommError if the socket cannot be set up.
  explicit TcpControlServer(const TcpServerOptions& options);
  ~TcpControlServer();
  TcpControlServer(const TcpControlServer&) = delete;
  TcpControlServer& operator=(const TcpControlServer&) = delete;

  std::string address() const;  // "host:port"
  const JobToken& token() const;
  std::string endpoint() const;  // "host:port:token-hex": the one string to broadcast
  uint16_t port() const;

  // Connections closed for a missing/wrong token, bad rank, duplicate rank or silence.
  size_t refused_connections() const;
  // Set once the coordinator aborted the job.
  std::optional<std::string> abort_reason() const;

 private:
  struct Impl;  // the coordinator thread and its connections, in tcp_server.cpp
  std::unique_ptr<Impl> impl_;
};

struct TcpClientOptions {
  double connect_timeout_s = 60;  // TCP connect plus the coordinator's WELCOME
};

// One rank's control connection. ready()/finish()/failed() send their report and block in recv()
// until the order arrives; busy() waits in ppoll for at most its max_wait. After the final order
// (or an abort) the connection is closed; destroying the client earlier closes it too, which the
// coordinator treats as this rank's death.
class TcpControlClient final : public ControlChannel {
 public:
  // `address` is "host:port". Throws CommError if it cannot connect or the coordinator refuses.
  TcpControlClient(const std::string& address, const JobToken& token, int rank,
                   const TcpClientOptions& options = {});
  // `endpoint` is TcpControlServer::endpoint(): "host:port:token-hex".
  static std::unique_ptr<TcpControlClient> connect(const std::string& endpoint, int rank,
                                                   const TcpClientOptions& options = {});
  ~TcpControlClient() override;

  StepOrder ready(uint64_t step) override;
  StepOrder finish(uint64_t n_steps) override;
  std::optional<StepOrder> busy(uint64_t step, std::chrono::nanoseconds max_wait) override;
  StepOrder failed(uint64_t step) override;
  StepOrder next_order() override;
  void request_stop() override;
  int rank() const override { return rank_; }

 private:
  StepOrder exchange(wire::MsgType type, uint64_t step);
  void send_frame(const wire::Message& msg);
  void send_locked(const wire::Message& msg);  // caller holds write_mu_
  wire::Message receive(double timeout_s);     // timeout_s < 0: no timeout
  // The next message, or nullopt if `deadline` passed first (nullopt deadline: no limit).
  std::optional<wire::Message> receive_until(std::optional<CoordTime> deadline);
  StepOrder take_order(wire::Message reply);  // an order, or throws for ABORT/anything else
  void close_connection();

  std::string address_;
  int rank_;
  std::mutex write_mu_;  // request_stop() may run on another thread than ready()
  detail::UniqueFd fd_;  // closed under write_mu_; read only by the training thread
  std::vector<uint8_t> in_;
  std::optional<std::string> ended_;  // why the channel is closed (final order, abort, loss)
};

}  // namespace resync::collectives
