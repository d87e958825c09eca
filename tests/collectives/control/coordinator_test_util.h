// What the coordinator tests share: a fake clock and helpers to drive a Coordinator.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <initializer_list>
#include <string>

#include "base/error.h"
#include "collectives/control/coordinator.h"

namespace resync::collectives::testing {

using std::chrono::milliseconds;
using std::chrono::seconds;

inline const CoordTime kT0 = CoordTime{} + std::chrono::hours(1);
inline CoordTime at_ms(int64_t ms) { return kT0 + milliseconds(ms); }

inline CoordinatorConfig make_config(int world_size, int backup_workers = 0, int64_t timeout_ms = 0,
                              int min_quorum = 1) {
  CoordinatorConfig c;
  c.world_size = world_size;
  c.backup_workers = backup_workers;
  c.straggler_timeout_ms = timeout_ms;
  c.min_quorum = min_quorum;
  c.stall_warning_s = 0;  // off unless a test is about stalls
  c.stall_abort_s = 0;
  // These tests pin down catch-ups at a close; early catch-ups and busy ranks joining the
  // all-reduce have their own tests below.
  c.early_catch_up = false;
  c.busy_ranks_join = false;
  return c;
}

// Expects exactly one closed round in `d` and returns it.
inline ClosedRound only_close(const Decisions& d) {
  EXPECT_EQ(d.closed.size(), 1u) << "expected exactly one closed round";
  EXPECT_FALSE(d.abort) << "unexpected abort: " << d.abort.value_or("");
  return d.closed.empty() ? ClosedRound{} : d.closed.front();
}

// Every rank in `ranks` reports READY(step) at `now`; all but possibly the last must not close.
inline Decisions all_ready(Coordinator& c, std::initializer_list<int> ranks, uint64_t step,
                    CoordTime now) {
  Decisions last;
  size_t i = 0;
  for (int rank : ranks) {
    last = c.ready(rank, step, now);
    if (++i < ranks.size()) {
      EXPECT_TRUE(last.empty()) << "READY(" << step << ") of rank " << rank
                                << " decided something before the last rank reported";
    }
  }
  return last;
}

inline void expect_invalid(const CoordinatorConfig& c, const std::string& flag) {
  try {
    c.validate();
    ADD_FAILURE() << "expected InvalidArgument naming " << flag;
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(flag), std::string::npos)
        << "message does not name " << flag << ": " << e.what();
  }
}
}  // namespace resync::collectives::testing
