#include "collectives/ps/parameter_server.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <exception>
#include <utility>

#include "base/error.h"
#include "base/log.h"

namespace resync::collectives {
namespace {

// A request and its reply go as a header message and, for shards, a payload message. Between
// one client and one server the exchange is strictly request-reply and never abandoned (no
// timeouts inside the protocol), so MPI's per-(source, tag) ordering matches messages and the
// tags only separate the kinds of message.
constexpr uint64_t kHeaderSeq = 0;
constexpr uint64_t kPayloadSeq = 1;
constexpr uint64_t kShareSeq = 2;
constexpr uint64_t kStatsSeq = 3;

// Staleness histograms stop growing here; larger values land in the last bin.
constexpr uint64_t kMaxStalenessBin = 1 << 16;

template <typename T>
std::span<const std::byte> bytes_of(const T& value) {
  return std::as_bytes(std::span<const T>(&value, 1));
}

template <typename T>
std::span<std::byte> bytes_of(T& value) {
  return std::as_writable_bytes(std::span<T>(&value, 1));
}

bool valid_kind(PsRequestKind kind) {
  return kind == PsRequestKind::kPush || kind == PsRequestKind::kQuery ||
         kind == PsRequestKind::kPull || kind == PsRequestKind::kDone;
}

}  // namespace

ShardLayout::ShardLayout(size_t n_elems, int n_servers) : n_elems_(n_elems), n_servers_(n_servers) {
  RESYNC_CHECK_ARG(n_servers >= 1,
                   fmt::format("a shard layout needs >= 1 server, got {}", n_servers));
}

size_t ShardLayout::offset(int shard) const {
  RESYNC_CHECK_ARG(shard >= 0 && shard < n_servers_,
                   fmt::format("shard {} outside 0..{}", shard, n_servers_ - 1));
  const size_t s = static_cast<size_t>(shard);
  const size_t base = n_elems_ / static_cast<size_t>(n_servers_);
  const size_t extra = n_elems_ % static_cast<size_t>(n_servers_);
  return s * base + std::min(s, extra);
}

size_t ShardLayout::size(int shard) const {
  return (shard + 1 < n_servers_ ? offset(shard + 1) : n_elems_) - offset(shard);
}

// ---- server ---------------------------------------------------------------------------------

// One client's receives and the reply buffers that must outlive their sends.
struct ParameterServer::Slot {
  int client = -1;
  bool done = false;
  PsRequest request;
  Request header;   // pending receive of the next request header
  Request payload;  // pending receive of the next gradient shard
  bool header_ready = false;
  bool payload_ready = false;
  std::vector<float> grad;
  PsReply reply;
  std::vector<float> out;  // the shard as sent: the live shard changes under an in-flight send
  Request reply_header;
  Request reply_payload;
};

ParameterServer::ParameterServer(Context& ctx, std::span<float> shard, std::vector<int> clients,
                                 ServerOptions options, ApplyFn apply, ObserveFn observe)
    : ctx_(&ctx),
      shard_(shard),
      clients_(std::move(clients)),
      options_(options),
      apply_(std::move(apply)),
      observe_(std::move(observe)),
      version_(options.first_version) {
  RESYNC_CHECK_ARG(apply_ != nullptr, "a parameter server needs an apply function");
  for (int c : clients_) {
    RESYNC_CHECK_ARG(c >= 0 && c < ctx.size() && c != ctx.rank(),
                     fmt::format("parameter server {}: bad client rank {}", ctx.rank(), c));
  }
}

void ParameterServer::reply(Slot& slot, const PsReply& r, bool with_shard) {
  Transport& t = ctx_->transport();
  // The client answered the previous reply before sending this request, so it has arrived.
  if (slot.reply_header.active()) t.wait(slot.reply_header, ctx_->deadline());
  if (slot.reply_payload.active()) t.wait(slot.reply_payload, ctx_->deadline());
  slot.reply = r;
  slot.reply_header = ctx_->isend(slot.client, OpKind::kParameterServer, kHeaderSeq,
                                  bytes_of(std::as_const(slot.reply)));
  if (with_shard) {
    std::copy(shard_.begin(), shard_.end(), slot.out.begin());
    slot.reply_payload = ctx_->isend(slot.client, OpKind::kParameterServer, kPayloadSeq,
                                     std::as_bytes(std::span<const float>(slot.out)));
  }
}

void ParameterServer::handle(Slot& slot) {
  const PsRequest& req = slot.request;
  RequestEvent event{.kind = req.kind, .client = slot.client, .step = req.step, .user = req.user};
  switch (req.kind) {
    case PsRequestKind::kPush: {
      if (req.version > version_) {
        throw CommError(fmt::format(
            "parameter server {}: client {} pushed a gradient of version {}, ahead of {}",
            ctx_->rank(), slot.client, req.version, version_));
      }
      event.staleness = version_ - req.version;
      event.applied = options_.max_staleness < 0 ||
                      event.staleness <= static_cast<uint64_t>(options_.max_staleness);
      if (event.applied) {
        apply_(slot.grad, event);
        ++version_;
        ++stats_.applied;
        const uint64_t bin = std::min(event.staleness, kMaxStalenessBin);
        if (stats_.staleness_counts.size() <= bin) stats_.staleness_counts.resize(bin + 1, 0);
        ++stats_.staleness_counts[bin];
        stats_.max_applied_staleness = std::max(stats_.max_applied_staleness, event.staleness);
      } else {
        ++stats_.dropped;
      }
      reply(slot,
            {.outcome = event.applied ? PsOutcome::kApplied : PsOutcome::kDropped,
             .version = version_,
             .staleness = event.staleness},
            true);
      break;
    }
    case PsRequestKind::kQuery:
      reply(slot, {.outcome = PsOutcome::kAnswered, .version = version_}, false);
      break;
    case PsRequestKind::kPull:
      reply(slot, {.outcome = PsOutcome::kAnswered, .version = version_}, true);
      break;
    case PsRequestKind::kDone:
      slot.done = true;
      slot.payload.reset();  // cancels the receive no push will match
      break;
  }
  event.version = version_;
  if (observe_ && (req.kind == PsRequestKind::kPush || req.kind == PsRequestKind::kQuery)) {
    observe_(event);
  }
}

void ParameterServer::run() {
  Transport& t = ctx_->transport();
  std::vector<Slot> slots(clients_.size());
  // If serving fails (a malformed request; apply or observe threw, e.g. on a non-finite
  // gradient), the receives still posted may complete into the slots' buffers while the
  // exception ends this rank: those buffers are then leaked, never freed under MPI.
  struct LeakOnThrow {
    std::vector<Slot>& slots;
    int uncaught = std::uncaught_exceptions();
    ~LeakOnThrow() {
      if (std::uncaught_exceptions() > uncaught) new std::vector<Slot>(std::move(slots));
    }
  } leak_on_throw{slots};
  auto post_header = [&](Slot& s) {
    s.header = ctx_->irecv(s.client, OpKind::kParameterServer, kHeaderSeq, bytes_of(s.request));
    s.header_ready = false;
  };
  auto post_payload = [&](Slot& s) {
    s.payload = ctx_->irecv(s.client, OpKind::kParameterServer, kPayloadSeq,
                            std::as_writable_bytes(std::span<float>(s.grad)));
    s.payload_ready = false;
  };
  for (size_t i = 0; i < slots.size(); ++i) {
    slots[i].client = clients_[i];
    slots[i].grad.resize(shard_.size());
    slots[i].out.resize(shard_.size());
    post_header(slots[i]);
    post_payload(slots[i]);
  }

  size_t n_active = slots.size();
  std::vector<Request*> waiting;
  std::vector<Slot*> owner;
  while (n_active > 0) {
    waiting.clear();
    owner.clear();
    for (Slot& s : slots) {
      if (s.done) continue;
      if (s.header.active()) {
        waiting.push_back(&s.header);
        owner.push_back(&s);
      }
      if (s.payload.active()) {
        waiting.push_back(&s.payload);
        owner.push_back(&s);
      }
    }
    size_t index = 0;
    try {
      index = t.wait_any(waiting, deadline_after(options_.idle_warning));
    } catch (const TimeoutError&) {
      std::vector<int> active;
      for (const Slot& s : slots) {
        if (!s.done) active.push_back(s.client);
      }
      log::get("coll")->warn("parameter server {}: no request for {} s; waiting for ranks {}",
                             ctx_->rank(), options_.idle_warning.count() / 1000.0,
                             fmt::join(active, ","));
      continue;
    }
    Slot& s = *owner[index];
    if (waiting[index] == &s.header) {
      s.header_ready = true;
      if (!valid_kind(s.request.kind)) {
        throw CommError(fmt::format("parameter server {}: malformed request from rank {}",
                                    ctx_->rank(), s.client));
      }
    } else {
      s.payload_ready = true;
    }
    // A push is complete once its gradient has arrived too; other requests are header-only.
    if (!s.header_ready) continue;
    const bool push = s.request.kind == PsRequestKind::kPush;
    if (push && !s.payload_ready) continue;
    handle(s);
    if (s.done) {
      --n_active;
      continue;
    }
    post_header(s);
    if (push) post_payload(s);
  }
  // Every client received its last reply before saying done, so these complete at once.
  for (Slot& s : slots) {
    if (s.reply_header.active()) t.wait(s.reply_header, ctx_->deadline());
    if (s.reply_payload.active()) t.wait(s.reply_payload, ctx_->deadline());
  }
}

// ---- client ---------------------------------------------------------------------------------

ParameterClient::ParameterClient(Context& ctx, const ShardLayout& layout, std::vector<int> shards)
    : ctx_(&ctx),
      layout_(layout),
      shards_(std::move(shards)),
      versions_(shards_.size(), 0),
      requests_(shards_.size()),
      replies_(shards_.size()) {
  pending_.reserve(4 * shards_.size());
  for (int s : shards_) {
    RESYNC_CHECK_ARG(s >= 0 && s < layout.n_servers() && s != ctx.rank(),
                     fmt::format("rank {}: cannot be a client of shard {}", ctx.rank(), s));
  }
}

void ParameterClient::exchange(PsRequestKind kind, uint64_t step, const std::array<double, 4>& user,
                               std::span<const float> grads, std::span<float> params) {
  Transport& t = ctx_->transport();
  const bool sends_shard = kind == PsRequestKind::kPush;
  const bool gets_shard = kind == PsRequestKind::kPush || kind == PsRequestKind::kPull;
  const bool answered = kind != PsRequestKind::kDone;
  const size_t n = shards_.size();
  std::vector<Request>& pending = pending_;  // capacity reserved once: no allocation per push
  pending.clear();
  // Receives first, so a reply never waits for a buffer.
  for (size_t i = 0; i < n; ++i) {
    const int server = shards_[i];
    if (answered) {
      pending.push_back(
          ctx_->irecv(server, OpKind::kParameterServer, kHeaderSeq, bytes_of(replies_[i])));
    }
    if (gets_shard) {
      pending.push_back(ctx_->irecv(server, OpKind::kParameterServer, kPayloadSeq,
                                    std::as_writable_bytes(layout_.slice(params, server))));
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const int server = shards_[i];
    requests_[i] = {.kind = kind, .version = versions_[i], .step = step, .user = user};
    pending.push_back(ctx_->isend(server, OpKind::kParameterServer, kHeaderSeq,
                                  bytes_of(std::as_const(requests_[i]))));
    if (sends_shard) {
      pending.push_back(ctx_->isend(server, OpKind::kParameterServer, kPayloadSeq,
                                    std::as_bytes(layout_.slice(grads, server))));
    }
  }
  const Deadline deadline = ctx_->deadline();
  for (Request& r : pending) t.wait(r, deadline);
}

PushResult ParameterClient::push(uint64_t step, std::span<const float> grads,
                                 std::span<float> params, const std::array<double, 4>& user) {
  RESYNC_CHECK_ARG(grads.size() == layout_.n_elems() && params.size() == layout_.n_elems(),
                   fmt::format("push of {} gradients / {} parameters, layout of {}", grads.size(),
                               params.size(), layout_.n_elems()));
  exchange(PsRequestKind::kPush, step, user, grads, params);
  PushResult result;
  for (size_t i = 0; i < shards_.size(); ++i) {
    const PsReply& r = replies_[i];
    if (r.outcome != PsOutcome::kApplied && r.outcome != PsOutcome::kDropped) {
      throw CommError(
          fmt::format("rank {}: bad push reply from rank {}", ctx_->rank(), shards_[i]));
    }
    if (r.outcome == PsOutcome::kDropped) ++result.n_dropped;
    result.max_staleness = std::max(result.max_staleness, r.staleness);
    versions_[i] = r.version;
  }
  return result;
}

uint64_t ParameterClient::versions_behind(uint64_t step, const std::array<double, 4>& user) {
  exchange(PsRequestKind::kQuery, step, user, {}, {});
  uint64_t behind = 0;
  for (size_t i = 0; i < shards_.size(); ++i) {
    behind = std::max(behind, replies_[i].version - versions_[i]);
  }
  return behind;
}

void ParameterClient::pull(std::span<float> params) {
  RESYNC_CHECK_ARG(
      params.size() == layout_.n_elems(),
      fmt::format("pull into {} parameters, layout of {}", params.size(), layout_.n_elems()));
  exchange(PsRequestKind::kPull, 0, {}, {}, params);
  for (size_t i = 0; i < shards_.size(); ++i) versions_[i] = replies_[i].version;
}

void ParameterClient::done() { exchange(PsRequestKind::kDone, 0, {}, {}, {}); }

// ---- after training ---------------------------------------------------------------------------

void share_shards(Context& ctx, const ShardLayout& layout, std::span<float> params) {
  RESYNC_CHECK_ARG(
      params.size() == layout.n_elems(),
      fmt::format("share_shards: {} parameters, layout of {}", params.size(), layout.n_elems()));
  const int me = ctx.rank();
  std::vector<Request> pending;
  for (int s = 0; s < layout.n_servers(); ++s) {
    if (s != me) {
      pending.push_back(ctx.irecv(s, OpKind::kParameterServer, kShareSeq,
                                  std::as_writable_bytes(layout.slice(params, s))));
    }
  }
  if (me < layout.n_servers()) {
    const std::span<const float> mine = layout.slice(std::span<const float>(params), me);
    for (int peer = 0; peer < ctx.size(); ++peer) {
      if (peer != me) {
        pending.push_back(
            ctx.isend(peer, OpKind::kParameterServer, kShareSeq, std::as_bytes(mine)));
      }
    }
  }
  const Deadline deadline = ctx.deadline();
  for (Request& r : pending) ctx.transport().wait(r, deadline);
}

std::vector<ServerStats> gather_server_stats(Context& ctx, int n_servers, int root,
                                             const ServerStats& mine) {
  // Fixed part: applied, dropped, max staleness, number of histogram bins.
  using Fixed = std::array<uint64_t, 4>;
  Transport& t = ctx.transport();
  const int me = ctx.rank();
  if (me != root) {
    if (me >= n_servers) return {};
    const Fixed fixed = {mine.applied, mine.dropped, mine.max_applied_staleness,
                         mine.staleness_counts.size()};
    Request a = ctx.isend(root, OpKind::kParameterServer, kStatsSeq, bytes_of(fixed));
    Request b = ctx.isend(root, OpKind::kParameterServer, kStatsSeq,
                          std::as_bytes(std::span<const uint64_t>(mine.staleness_counts)));
    t.wait(a, ctx.deadline());
    t.wait(b, ctx.deadline());
    return {};
  }
  std::vector<ServerStats> all(static_cast<size_t>(n_servers));
  for (int s = 0; s < n_servers; ++s) {
    if (s == me) {
      all[static_cast<size_t>(s)] = mine;
      continue;
    }
    Fixed fixed{};
    Request a = ctx.irecv(s, OpKind::kParameterServer, kStatsSeq, bytes_of(fixed));
    t.wait(a, ctx.deadline());
    ServerStats& st = all[static_cast<size_t>(s)];
    st.applied = fixed[0];
    st.dropped = fixed[1];
    st.max_applied_staleness = fixed[2];
    RESYNC_CHECK(fixed[3] <= kMaxStalenessBin + 1, "staleness histogram too large");
    st.staleness_counts.resize(fixed[3]);
    Request b = ctx.irecv(s, OpKind::kParameterServer, kStatsSeq,
                          std::as_writable_bytes(std::span<uint64_t>(st.staleness_counts)));
    t.wait(b, ctx.deadline());
  }
  return all;
}

}  // namespace resync::collectives
