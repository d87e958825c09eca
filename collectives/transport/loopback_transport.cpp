#include "collectives/transport/loopback_transport.h"

#include <fmt/format.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/error.h"

namespace resync::collectives {

namespace {

enum class OpState : uint8_t { kFree, kPending, kDone };

struct Op {
  Direction direction = Direction::kSend;
  OpState state = OpState::kFree;
  bool truncated = false;
  int peer = -1;
  int tag = -1;
  uint32_t generation = 0;
  const std::byte* send_buf = nullptr;
  std::byte* recv_buf = nullptr;
  size_t n_bytes = 0;      // buffer size
  size_t n_delivered = 0;  // bytes moved (receives: message size)
};

// Posted and not yet matched operations for one (source, tag) pair at one destination. At
// most one of the two queues is non-empty at any time. Entries are slots in the owner's ops.
struct Mailbox {
  std::deque<uint32_t> sends;  // slots of the source rank
  std::deque<uint32_t> recvs;  // slots of the destination rank
};

uint64_t mailbox_key(int src, int tag) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(src)) << 32) | static_cast<uint32_t>(tag);
}

uint64_t make_handle(uint32_t slot, uint32_t generation) {
  return (static_cast<uint64_t>(generation) << 32) | slot;
}
uint32_t handle_slot(uint64_t handle) { return static_cast<uint32_t>(handle); }
uint32_t handle_generation(uint64_t handle) { return static_cast<uint32_t>(handle >> 32); }

}  // namespace

struct LoopbackFabric::State {
  struct RankState {
    std::deque<Op> ops;  // deque: slots keep their address while the table grows
    std::vector<uint32_t> free_slots;
    std::unordered_map<uint64_t, Mailbox> inbox;  // messages to this rank, by (src, tag)
    std::condition_variable cv;
  };

  explicit State(int n, int tag_ub) : n_ranks(n), max_tag(tag_ub), delivered(n * n), bytes(n * n) {
    for (int r = 0; r < n; ++r) ranks.push_back(std::make_unique<RankState>());
  }

  const int n_ranks;
  const int max_tag;
  mutable std::mutex mu;  // guards everything below; one lock keeps matching simple
  std::vector<std::unique_ptr<RankState>> ranks;
  std::vector<uint64_t> delivered;
  std::vector<uint64_t> bytes;
  bool aborted = false;
  std::string abort_reason;
  std::vector<std::unique_ptr<Transport>> transports;

  void check_not_aborted() const {
    if (aborted) throw CommError("loopback fabric aborted: " + abort_reason);
  }

  uint32_t alloc_op(int owner) {
    RankState& rs = *ranks[owner];
    if (rs.free_slots.empty()) {
      rs.ops.emplace_back();
      return static_cast<uint32_t>(rs.ops.size() - 1);
    }
    const uint32_t slot = rs.free_slots.back();
    rs.free_slots.pop_back();
    return slot;
  }

  void free_op(int owner, uint32_t slot) {
    Op& op = ranks[owner]->ops[slot];
    op.state = OpState::kFree;
    ++op.generation;
    ranks[owner]->free_slots.push_back(slot);
  }

  Op& op_for(int owner, uint64_t handle) {
    Op& op = ranks[owner]->ops.at(handle_slot(handle));
    RESYNC_CHECK(op.generation == handle_generation(handle) && op.state != OpState::kFree,
                 "stale loopback request handle");
    return op;
  }

  // Moves the data of a matched pair and completes both sides.
  void deliver(int src, uint32_t send_slot, int dst, uint32_t recv_slot) {
    Op& s = ranks[src]->ops[send_slot];
    Op& r = ranks[dst]->ops[recv_slot];
    if (s.n_bytes > r.n_bytes) {
      r.truncated = true;
    } else if (s.n_bytes > 0) {
      std::memcpy(r.recv_buf, s.send_buf, s.n_bytes);
    }
    s.n_delivered = s.n_bytes;
    r.n_delivered = s.n_bytes;
    s.state = OpState::kDone;
    r.state = OpState::kDone;
    delivered[src * n_ranks + dst] += 1;
    bytes[src * n_ranks + dst] += s.n_bytes;
    ranks[src]->cv.notify_all();
    ranks[dst]->cv.notify_all();
  }

  // Removes a pending operation from the mailbox it waits in.
  void unlink(int owner, uint32_t slot) {
    Op& op = ranks[owner]->ops[slot];
    const bool is_send = op.direction == Direction::kSend;
    const int dst = is_send ? op.peer : owner;
    const int src = is_send ? owner : op.peer;
    auto it = ranks[dst]->inbox.find(mailbox_key(src, op.tag));
    RESYNC_CHECK(it != ranks[dst]->inbox.end(), "pending loopback operation without mailbox");
    std::deque<uint32_t>& queue = is_send ? it->second.sends : it->second.recvs;
    queue.erase(std::find(queue.begin(), queue.end(), slot));
    if (it->second.sends.empty() && it->second.recvs.empty()) ranks[dst]->inbox.erase(it);
  }
};

namespace {

class LoopbackTransport final : public Transport {
 public:
  LoopbackTransport(LoopbackFabric::State& fabric, int rank) : f_(fabric), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return f_.n_ranks; }
  int max_tag() const override { return f_.max_tag; }
  std::string name() const override { return "loopback"; }

 protected:
  uint64_t post_send(int peer, int tag, std::span<const std::byte> bytes) override {
    std::lock_guard lock(f_.mu);
    f_.check_not_aborted();
    const uint32_t slot = f_.alloc_op(rank_);
    Op& op = f_.ranks[rank_]->ops[slot];
    op = Op{Direction::kSend, OpState::kPending, false,   peer,         tag,
            op.generation,    bytes.data(),      nullptr, bytes.size(), 0};
    const uint64_t key = mailbox_key(rank_, tag);
    auto& inbox = f_.ranks[peer]->inbox;
    auto it = inbox.find(key);
    if (it != inbox.end() && !it->second.recvs.empty()) {
      const uint32_t recv_slot = it->second.recvs.front();
      it->second.recvs.pop_front();
      if (it->second.recvs.empty() && it->second.sends.empty()) inbox.erase(it);
      f_.deliver(rank_, slot, peer, recv_slot);
    } else {
      inbox[key].sends.push_back(slot);
    }
    return make_handle(slot, op.generation);
  }

  uint64_t post_recv(int peer, int tag, std::span<std::byte> bytes) override {
    std::lock_guard lock(f_.mu);
    f_.check_not_aborted();
    const uint32_t slot = f_.alloc_op(rank_);
    Op& op = f_.ranks[rank_]->ops[slot];
    op = Op{Direction::kReceive, OpState::kPending, false,        peer,         tag,
            op.generation,       nullptr,           bytes.data(), bytes.size(), 0};
    const uint64_t key = mailbox_key(peer, tag);
    auto& inbox = f_.ranks[rank_]->inbox;
    auto it = inbox.find(key);
    if (it != inbox.end() && !it->second.sends.empty()) {
      const uint32_t send_slot = it->second.sends.front();
      it->second.sends.pop_front();
      if (it->second.recvs.empty() && it->second.sends.empty()) inbox.erase(it);
      f_.deliver(peer, send_slot, rank_, slot);
    } else {
      inbox[key].recvs.push_back(slot);
    }
    return make_handle(slot, op.generation);
  }

  bool test_handle(uint64_t& handle, size_t* n_bytes) override {
    std::lock_guard lock(f_.mu);
    return complete_if_done(handle, n_bytes);
  }

  size_t wait_handles(std::span<uint64_t* const> handles, Deadline deadline,
                      size_t* n_bytes) override {
    std::unique_lock lock(f_.mu);
    for (;;) {
      for (size_t i = 0; i < handles.size(); ++i) {
        if (complete_if_done(*handles[i], n_bytes)) return i;
      }
      if (deadline == kNoDeadline) {
        f_.ranks[rank_]->cv.wait(lock);
      } else if (f_.ranks[rank_]->cv.wait_until(lock, deadline) == std::cv_status::timeout) {
        for (size_t i = 0; i < handles.size(); ++i) {
          if (complete_if_done(*handles[i], n_bytes)) return i;
        }
        return handles.size();
      }
    }
  }

  bool cancel_handle(uint64_t& handle, size_t* n_bytes) override {
    std::lock_guard lock(f_.mu);
    Op& op = f_.op_for(rank_, handle);
    const uint32_t slot = handle_slot(handle);
    if (op.state == OpState::kPending) {
      f_.unlink(rank_, slot);
      f_.free_op(rank_, slot);
      return true;
    }
    // Already matched: complete it as test() would (including a truncation error).
    return !complete_if_done(handle, n_bytes);
  }

  void abandon_handle(uint64_t handle, Direction /*direction*/) noexcept override {
    std::lock_guard lock(f_.mu);
    const uint32_t slot = handle_slot(handle);
    if (slot >= f_.ranks[rank_]->ops.size()) return;
    Op& op = f_.ranks[rank_]->ops[slot];
    if (op.generation != handle_generation(handle) || op.state == OpState::kFree) return;
    if (op.state == OpState::kPending) f_.unlink(rank_, slot);
    f_.free_op(rank_, slot);
  }

 private:
  // Caller holds the lock. Releases the slot of a finished operation.
  bool complete_if_done(uint64_t handle, size_t* n_bytes) {
    Op& op = f_.op_for(rank_, handle);
    if (op.state != OpState::kDone) {
      f_.check_not_aborted();
      return false;
    }
    const bool truncated = op.truncated;
    const size_t n_msg = op.n_delivered;
    const size_t n_buf = op.n_bytes;
    const int peer = op.peer;
    const int tag = op.tag;
    f_.free_op(rank_, handle_slot(handle));
    if (truncated) {
      throw CommError(fmt::format(
          "loopback rank {}: message of {} bytes from rank {} (tag {}) exceeds the {}-byte "
          "receive buffer",
          rank_, n_msg, peer, tag, n_buf));
    }
    *n_bytes = n_msg;
    return true;
  }

  LoopbackFabric::State& f_;
  const int rank_;
};

}  // namespace

LoopbackFabric::LoopbackFabric(int n_ranks, int max_tag) {
  RESYNC_CHECK_ARG(n_ranks >= 1, fmt::format("loopback fabric needs >= 1 rank, got {}", n_ranks));
  RESYNC_CHECK_ARG(max_tag >= 32767, "max_tag must be at least 32767 (MPI's guarantee)");
  state_ = std::make_unique<State>(n_ranks, max_tag);
  for (int r = 0; r < n_ranks; ++r) {
    state_->transports.push_back(std::make_unique<LoopbackTransport>(*state_, r));
  }
}

LoopbackFabric::~LoopbackFabric() = default;

int LoopbackFabric::size() const { return state_->n_ranks; }

Transport& LoopbackFabric::transport(int rank) {
  RESYNC_CHECK_ARG(rank >= 0 && rank < state_->n_ranks, fmt::format("no loopback rank {}", rank));
  return *state_->transports[rank];
}

uint64_t LoopbackFabric::messages_delivered(int src, int dst) const {
  std::lock_guard lock(state_->mu);
  return state_->delivered.at(src * state_->n_ranks + dst);
}

uint64_t LoopbackFabric::bytes_delivered(int src, int dst) const {
  std::lock_guard lock(state_->mu);
  return state_->bytes.at(src * state_->n_ranks + dst);
}

size_t LoopbackFabric::pending_operations() const {
  std::lock_guard lock(state_->mu);
  size_t n = 0;
  for (const auto& rs : state_->ranks) {
    for (const auto& [key, box] : rs->inbox) n += box.sends.size() + box.recvs.size();
  }
  return n;
}

void LoopbackFabric::abort(const std::string& reason) {
  std::lock_guard lock(state_->mu);
  if (state_->aborted) return;
  state_->aborted = true;
  state_->abort_reason = reason;
  for (auto& rs : state_->ranks) rs->cv.notify_all();
}

void run_on_ranks(LoopbackFabric& fabric, const std::function<void(Transport&)>& body) {
  const int n = fabric.size();
  std::mutex mu;
  std::exception_ptr first_error;
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(fabric.transport(r));
      } catch (const std::exception& e) {
        {
          std::lock_guard lock(mu);
          if (!first_error) first_error = std::current_exception();
        }
        fabric.abort(fmt::format("rank {} failed: {}", r, e.what()));
      } catch (...) {
        {
          std::lock_guard lock(mu);
          if (!first_error) first_error = std::current_exception();
        }
        fabric.abort(fmt::format("rank {} failed", r));
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace resync::collectives
