// Test harness: runs one rank's training loop against a ControlChannel, with a simulated model
// state (steps applied and a digest of every participant set) and simulated state transfer
// between rank threads, so tests can check that all ranks end with the same state.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "base/error.h"
#include "collectives/control/control_plane.h"

namespace resync::collectives::testing {

struct SimState {
  uint64_t n_steps = 0;  // updates applied
  uint64_t digest = 0;   // folds in the participant set of every applied step
  bool operator==(const SimState&) const = default;
};

inline SimState apply_step(SimState s, const StepOrder& order) {
  s.n_steps = order.step + 1;
  s.digest = s.digest * 1000003u ^ (order.step + 1);
  for (int p : order.participants) s.digest = s.digest * 31u + static_cast<uint64_t>(p) + 1u;
  return s;
}

// Stands in for the MPI state transfer from a donor to a late rank.
class StateExchange {
 public:
  // Keyed by state_sequence() of the order, as the MPI transfer is tagged.
  void put(int late_rank, uint64_t seq, const SimState& state) {
    std::lock_guard<std::mutex> lock(mu_);
    boxes_[{late_rank, seq}] = state;
    cv_.notify_all();
  }
  // The bound only turns a harness bug into a failure instead of a hang; it never paces a test.
  SimState take(int late_rank, uint64_t seq) {
    std::unique_lock<std::mutex> lock(mu_);
    const auto key = std::make_pair(late_rank, seq);
    if (!cv_.wait_for(lock, std::chrono::seconds(20), [&] { return boxes_.count(key) > 0; })) {
      throw Error("rank " + std::to_string(late_rank) + " never received its state of sequence " +
                  std::to_string(seq));
    }
    SimState s = boxes_[key];
    boxes_.erase(key);
    return s;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::pair<int, uint64_t>, SimState> boxes_;
};

// A one-shot event a thread can wait for.
class Gate {
 public:
  void open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

struct RankHooks {
  std::function<void(uint64_t step)> before_ready;          // e.g. wait at a gate (straggler)
  std::function<void(const StepOrder& order)> after_order;  // e.g. open a gate
};

struct RankResult {
  SimState state;
  std::vector<StepOrder> orders;  // every order received, the final one included
  int n_catchups = 0;
  int n_early_catchups = 0;  // of n_catchups: received while the step was still open
  int n_served_early = 0;    // kServe orders carried out
  std::string error;  // CommError text if the run ended with one
};

// One rank's loop, as the runtime will write it: READY, then all-reduce+update or catch-up,
// then FINISH and the final catch-ups.
inline RankResult run_rank(ControlChannel& channel, uint64_t n_steps, StateExchange& exchange,
                           const RankHooks& hooks = {}) {
  RankResult out;
  const int me = channel.rank();
  try {
    uint64_t t = 0;
    bool stop = false;
    while (t < n_steps && !stop) {
      if (hooks.before_ready) hooks.before_ready(t);
      StepOrder order = channel.ready(t);
      while (order.kind == OrderKind::kServe) {  // our state of step t, to a late rank, now
        EXPECT_EQ(order.step, t) << "rank " << me;
        for (int late : order.late_ranks_served_by(me)) {
          exchange.put(late, state_sequence(order), out.state);
          ++out.n_served_early;
        }
        order = channel.next_order();
      }
      out.orders.push_back(order);
      stop = order.stop;
      if (order.final_round) {
        // This rank's last READY was late: the final round catches it up; training is over.
        EXPECT_EQ(order.kind, OrderKind::kCatchUp) << "rank " << me;
        EXPECT_EQ(order.step, n_steps) << "rank " << me;
        out.state = exchange.take(me, state_sequence(order));
        EXPECT_EQ(out.state.n_steps, order.step) << "rank " << me;
        ++out.n_catchups;
        return out;
      }
      if (order.kind == OrderKind::kParticipate) {
        EXPECT_EQ(order.step, t) << "rank " << me;
        EXPECT_TRUE(std::count(order.participants.begin(), order.participants.end(), me))
            << "rank " << me << " told to participate in step " << order.step
            << " without being in P";
        out.state = apply_step(out.state, order);
        for (int late : order.late_ranks_served_by(me)) {
          exchange.put(late, state_sequence(order), out.state);
        }
        t = order.step + 1;
      } else {
        EXPECT_GE(order.step, t) << "rank " << me << " caught up to an older step";
        EXPECT_NE(order.donor, me) << "rank " << me << " is its own donor";
        out.state = exchange.take(me, state_sequence(order));
        // An early catch-up brings the state to compute order.step with; a regular one the
        // state after it.
        const uint64_t next = order.early ? order.step : order.step + 1;
        EXPECT_EQ(out.state.n_steps, next) << "rank " << me;
        ++out.n_catchups;
        if (order.early) ++out.n_early_catchups;
        t = next;
      }
      if (hooks.after_order) hooks.after_order(order);
    }
    StepOrder final_order = channel.finish(t);
    out.orders.push_back(final_order);
    EXPECT_TRUE(final_order.final_round) << "rank " << me;
    EXPECT_TRUE(final_order.participants.empty()) << "rank " << me << ": no all-reduce at the end";
    if (final_order.kind == OrderKind::kParticipate) {
      for (int late : final_order.late_ranks_served_by(me)) {
        exchange.put(late, state_sequence(final_order), out.state);
      }
    } else {
      out.state = exchange.take(me, state_sequence(final_order));
      ++out.n_catchups;
    }
  } catch (const CommError& e) {
    out.error = e.what();
  }
  return out;
}

}  // namespace resync::collectives::testing
