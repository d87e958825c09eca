// collectives/ps: the asynchronous mode's data plane.
//
// Parameter-server exchange for asynchronous training (docs/DESIGN.md, "Asynchronous mode"): the
// shard layout, the server loop that applies each gradient as it arrives, and the client side.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "collectives/transport/context.h"

namespace resync::collectives {

// Contiguous, nearly equal shards of a flat buffer of n_elems floats; shard s lives on rank s.
// The first n_elems % n_servers shards hold one element more.
class ShardLayout {
 public:
  ShardLayout(size_t n_elems, int n_servers);

  size_t n_elems() const { return n_elems_; }
  int n_servers() const { return n_servers_; }
  size_t offset(int shard) const;
  size_t size(int shard) const;
  template <typename T>
  std::span<T> slice(std::span<T> whole, int shard) const {
    return whole.subspan(offset(shard), size(shard));
  }

 private:
  size_t n_elems_;
  int n_servers_;
};

enum class PsRequestKind : uint32_t {
  kPush = 1,   // a gradient shard follows; answered with the fresh shard
  kQuery = 2,  // answered with the server's version only
  kPull = 3,   // answered with the fresh shard
  kDone = 4,   // the client sends nothing more; not answered
};

enum class PsOutcome : uint32_t { kApplied = 1, kDropped = 2, kAnswered = 3 };

// What a client sends a server (the payload of a push is a second message).
struct PsRequest {
  PsRequestKind kind = PsRequestKind::kPush;
  uint32_t reserved = 0;
  uint64_t version = 0;          // push: the shard version the gradient was computed on
  uint64_t step = 0;             // the client's own step counter, carried verbatim
  std::array<double, 4> user{};  // free for the caller (telemetry), carried verbatim
};

// What a server answers (the shard, if any, follows as a second message).
struct PsReply {
  PsOutcome outcome = PsOutcome::kAnswered;
  uint32_t reserved = 0;
  uint64_t version = 0;    // the server's version after handling the request
  uint64_t staleness = 0;  // push: server version at arrival minus the request's version
};

// A push or query as the server's observer sees it, after the reply went out.
struct RequestEvent {
  PsRequestKind kind = PsRequestKind::kPush;
  int client = -1;
  uint64_t step = 0;
  uint64_t staleness = 0;  // push only
  bool applied = false;    // push only
  uint64_t version = 0;    // the server's version after handling it
  std::array<double, 4> user{};
};

// Applied and dropped pushes of one server; staleness_counts[k] = applied gradients of
// staleness k.
struct ServerStats {
  uint64_t applied = 0;
  uint64_t dropped = 0;
  uint64_t max_applied_staleness = 0;
  std::vector<uint64_t> staleness_counts;
};

struct ServerOptions {
  int max_staleness = -1;  // drop pushes staler than this; -1 = apply everything
  // No request from any client for this long logs which clients are still active.
  std::chrono::milliseconds idle_warning{60'000};
  // The version to count on from: a resumed shard's (versions never repeat within a run's
  // relaunches, so a copy of the parameters names the state it holds).
  uint64_t first_version = 0;
};

// Serves one shard to a set of client ranks in arrival order: a push is applied (or dropped as
// too stale) and answered with the fresh shard; the version counts the applied updates. A slow
// or frozen client delays nobody: each client has its own pre-posted receives, and the server
// waits for whichever completes first. Not thread-safe; the caller's thread drives the loop.
class ParameterServer {
 public:
  // `push`: the client and step the gradient is for (its version not yet counted).
  using ApplyFn = std::function<void(std::span<const float> grad, const RequestEvent& push)>;
  using ObserveFn = std::function<void(const RequestEvent&)>;

  // `shard` is the server's copy of its parameters, updated by `apply` (which the server calls
  // with each accepted gradient); `observe`, if set, sees every push and query.
  ParameterServer(Context& ctx, std::span<float> shard, std::vector<int> clients,
                  ServerOptions options, ApplyFn apply, ObserveFn observe = {});

  // Serves until every client has sent kDone. Throws CommError on a malformed request.
  void run();

  uint64_t version() const { return version_; }
  const ServerStats& stats() const { return stats_; }

 private:
  struct Slot;
  void handle(Slot& slot);
  void reply(Slot& slot, const PsReply& r, bool with_shard);

  Context* ctx_;
  std::span<float> shard_;
  std::vector<int> clients_;
  ServerOptions options_;
  ApplyFn apply_;
  ObserveFn observe_;
  uint64_t version_ = 0;
  ServerStats stats_;
};

// The result of one push across the client's shards.
struct PushResult {
  int n_dropped = 0;           // shards whose server dropped the gradient as too stale
  uint64_t max_staleness = 0;  // largest staleness any server measured
};

// The client side: pushes gradients to, and pulls parameters from, the servers of `shards`
// (shard s on rank s). Tracks the version of each shard its copy of the parameters holds.
// Waits for the servers up to ctx.timeout() (TimeoutError).
class ParameterClient {
 public:
  ParameterClient(Context& ctx, const ShardLayout& layout, std::vector<int> shards);

  // Sends each shard of `grads` (full length, computed on the versions this client holds) to
  // its server and receives the fresh shards into `params` (full length).
  PushResult push(uint64_t step, std::span<const float> grads, std::span<float> params,
                  const std::array<double, 4>& user = {});
  // How many versions the freshest server shard is ahead of this client's copy.
  uint64_t versions_behind(uint64_t step, const std::array<double, 4>& user = {});
  // Replaces this client's shards of `params` with the servers' current ones.
  void pull(std::span<float> params);
  // Tells every server this client is finished.
  void done();

  std::span<const uint64_t> versions() const { return versions_; }

 private:
  void exchange(PsRequestKind kind, uint64_t step, const std::array<double, 4>& user,
                std::span<const float> grads, std::span<float> params);

  Context* ctx_;
  ShardLayout layout_;
  std::vector<int> shards_;
  std::vector<uint64_t> versions_;
  std::vector<PsRequest> requests_;
  std::vector<PsReply> replies_;
  std::vector<Request> pending_;  // one exchange's receives and sends
};

// After training: every rank receives every server's shard into `params` (full length; a
// server keeps its own shard), so that all ranks hold the final parameters. Collective over
// the context's ranks.
void share_shards(Context& ctx, const ShardLayout& layout, std::span<float> params);

// Collects every server's stats on rank `root` (one entry per server; root's own included).
// Collective over the servers and root.
std::vector<ServerStats> gather_server_stats(Context& ctx, int n_servers, int root,
                                             const ServerStats& mine);

}  // namespace resync::collectives
