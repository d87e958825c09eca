#include "collectives/coordinator.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

#include "base/error.h"

namespace resync::collectives {
namespace {

// Upper bounds keep every deadline computation far from time_point overflow.
constexpr double kMaxSeconds = 1e8;               // ~3 years
constexpr int64_t kMaxTimeoutMs = 1'000'000'000;  // ~11 days

void check_seconds(double value, const char* flag) {
  RESYNC_CHECK_ARG(std::isfinite(value) && value >= 0.0 && value <= kMaxSeconds,
                   fmt::format("{} must be a number of seconds >= 0 (0 = off), at most {:g}; "
                               "got {}",
                               flag, kMaxSeconds, value));
}

std::chrono::nanoseconds seconds_to_ns(double s) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(s));
}

double to_seconds(CoordClock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

void CoordinatorConfig::validate() const {
  RESYNC_CHECK_ARG(world_size >= 1,
                   fmt::format("the number of ranks must be at least 1, got {}", world_size));
  RESYNC_CHECK_ARG(backup_workers >= 0,
                   fmt::format("--backup-workers must be >= 0, got {}", backup_workers));
  RESYNC_CHECK_ARG(backup_workers < world_size,
                   fmt::format("--backup-workers ({}) must be smaller than the number of ranks "
                               "({}): every step needs at least one gradient",
                               backup_workers, world_size));
  RESYNC_CHECK_ARG(straggler_timeout_ms >= 0 && straggler_timeout_ms <= kMaxTimeoutMs,
                   fmt::format("--straggler-timeout-ms must be >= 0 (0 = no timeout), at most "
                               "{}; got {}",
                               kMaxTimeoutMs, straggler_timeout_ms));
  RESYNC_CHECK_ARG(min_quorum >= 0, fmt::format("--min-quorum must be >= 0, got {}", min_quorum));
  RESYNC_CHECK_ARG(min_quorum <= world_size,
                   fmt::format("--min-quorum ({}) must not exceed the number of ranks ({})",
                               min_quorum, world_size));
  check_seconds(stall_warning_s, "--stall-warning-s");
  check_seconds(stall_abort_s, "--stall-abort-s");
}

Coordinator::Coordinator(const CoordinatorConfig& config, CoordTime now) : config_(config) {
  config_.validate();
  straggler_timeout_ = std::chrono::milliseconds(config_.straggler_timeout_ms);
  stall_warning_ = seconds_to_ns(config_.stall_warning_s);
  stall_abort_ = seconds_to_ns(config_.stall_abort_s);
  const auto w = static_cast<size_t>(config_.world_size);
  state_.assign(w, RankState::kWorking);
  next_step_.assign(w, 0);
  ready_.reserve(w);
  late_.reserve(w);
  last_close_ = now;
  now_ = now;
}

bool Coordinator::accepting(int rank, const char* event) const {
  RESYNC_CHECK_ARG(rank >= 0 && rank < config_.world_size,
                   fmt::format("coordinator: {} from rank {}, outside [0, {})", event, rank,
                               config_.world_size));
  return !finished_ && !aborted_;
}

Decisions Coordinator::ready(int rank, uint64_t step, CoordTime now) {
  Decisions out;
  if (!accepting(rank, "READY")) return out;
  advance(now, out);
  if (finished_ || aborted_) return out;

  const auto r = static_cast<size_t>(rank);
  if (state_[r] != RankState::kWorking) {
    abort_job(fmt::format("protocol violation: rank {} sent READY({}) while it was already "
                          "waiting for an order",
                          rank, step),
              out);
    return out;
  }
  if (step < next_step_[r] || step > open_step_) {
    abort_job(fmt::format("protocol violation: rank {} sent READY({}), expected a step in "
                          "[{}, {}]",
                          rank, step, next_step_[r], open_step_),
              out);
    return out;
  }
  if (final_round_ && step == open_step_) {
    abort_job(fmt::format("rank {} sent READY({}) but other ranks finished training after {} "
                          "steps: the ranks disagree on the number of steps",
                          rank, step, open_step_),
              out);
    return out;
  }
  if (step < open_step_) {
    // Step `step` closed without this rank: its gradient is dropped, a later close catches it up.
    state_[r] = RankState::kLate;
    late_.push_back(rank);
  } else {
    state_[r] = RankState::kReady;
    ready_.push_back(rank);
    if (!first_ready_) first_ready_ = now_;
  }
  maybe_close(out);
  return out;
}

Decisions Coordinator::finish(int rank, uint64_t n_steps, CoordTime now) {
  Decisions out;
  if (!accepting(rank, "FINISH")) return out;
  advance(now, out);
  if (finished_ || aborted_) return out;

  const auto r = static_cast<size_t>(rank);
  if (state_[r] != RankState::kWorking) {
    abort_job(fmt::format("protocol violation: rank {} sent FINISH({}) while it was already "
                          "waiting for an order",
                          rank, n_steps),
              out);
    return out;
  }
  if (n_steps != open_step_) {
    abort_job(fmt::format("rank {} finished training after {} steps but the open step is {}: "
                          "the ranks disagree on the number of steps",
                          rank, n_steps, open_step_),
              out);
    return out;
  }
  if (!final_round_ && !ready_.empty()) {
    auto early = ready_;
    std::sort(early.begin(), early.end());
    abort_job(fmt::format("rank {} finished training after {} steps but ranks {} sent "
                          "READY({}): the ranks disagree on the number of steps",
                          rank, n_steps, early, n_steps),
              out);
    return out;
  }
  final_round_ = true;
  state_[r] = RankState::kFinishing;
  ready_.push_back(rank);
  if (!first_ready_) first_ready_ = now_;
  maybe_close(out);
  return out;
}

Decisions Coordinator::connection_lost(int rank, CoordTime now, const std::string& host) {
  Decisions out;
  if (!accepting(rank, "connection loss")) return out;
  if (now > now_) now_ = now;
  std::string who =
      host.empty() ? fmt::format("rank {}", rank) : fmt::format("rank {} ({})", rank, host);
  abort_job(who + " closed its control connection: it died", out);
  return out;
}

Decisions Coordinator::stop_requested(int rank, CoordTime now) {
  Decisions out;
  if (!accepting(rank, "STOP")) return out;
  advance(now, out);
  // Sticky: every later order carries it, so ranks that missed one round still see it.
  stop_ = true;
  return out;
}

Decisions Coordinator::tick(CoordTime now) {
  Decisions out;
  if (finished_ || aborted_) return out;
  advance(now, out);
  return out;
}

std::optional<CoordTime> Coordinator::timeout_deadline() const {
  if (straggler_timeout_.count() == 0 || !first_ready_ || final_round_) return std::nullopt;
  return *first_ready_ + straggler_timeout_;
}

CoordTime Coordinator::stall_warning_deadline() const {
  return last_close_ + (n_stall_warnings_ + 1) * stall_warning_;
}

std::optional<CoordTime> Coordinator::next_deadline() const {
  if (finished_ || aborted_) return std::nullopt;
  std::optional<CoordTime> best;
  auto consider = [&best](CoordTime t) {
    if (!best || t < *best) best = t;
  };
  // A timeout already past (quorum missing) waits for the next READY, not for the clock.
  if (auto t = timeout_deadline(); t && *t > now_) consider(*t);
  if (stall_warning_.count() > 0) consider(stall_warning_deadline());
  if (stall_abort_.count() > 0) consider(last_close_ + stall_abort_);
  return best;
}

void Coordinator::advance(CoordTime now, Decisions& out) {
  if (now > now_) now_ = now;
  if (auto t = timeout_deadline(); t && *t <= now_) maybe_close(out);
  if (finished_ || aborted_) return;

  const auto stalled = now_ - last_close_;
  if (stall_abort_.count() > 0 && stalled >= stall_abort_) {
    abort_job(fmt::format("no step closed for {:.1f} s (--stall-abort-s {:g}): step {} is still "
                          "waiting for ranks {}",
                          to_seconds(stalled), config_.stall_abort_s, open_step_,
                          ranks_in(RankState::kWorking)),
              out);
    return;
  }
  if (stall_warning_.count() > 0 && now_ >= stall_warning_deadline()) {
    // One report even if several periods passed unobserved; the next one a period later.
    n_stall_warnings_ = stalled / stall_warning_;
    StallReport report;
    report.step = open_step_;
    report.stalled_s = to_seconds(stalled);
    report.missing = ranks_in(RankState::kWorking);
    report.late_queued = ranks_in(RankState::kLate);
    out.stall = std::move(report);
  }
}

void Coordinator::maybe_close(Decisions& out) {
  const auto w = static_cast<size_t>(config_.world_size);
  if (final_round_) {
    if (ready_.size() + late_.size() == w) close_round(false, out);
    return;
  }
  if (ready_.empty()) return;
  const size_t can_report = w - late_.size();
  const size_t target = std::min(static_cast<size_t>(config_.step_quorum()), can_report);
  if (ready_.size() >= target) {
    close_round(false, out);
    return;
  }
  const auto deadline = timeout_deadline();
  const auto quorum = static_cast<size_t>(std::max(config_.min_quorum, 1));
  if (deadline && *deadline <= now_ && ready_.size() >= quorum) close_round(true, out);
}

void Coordinator::close_round(bool timed_out, Decisions& out) {
  ClosedRound round;
  round.step = open_step_;
  round.final_round = final_round_;
  round.stop = stop_;
  round.timed_out = timed_out;
  round.participants = ready_;
  std::sort(round.participants.begin(), round.participants.end());
  RESYNC_CHECK(!round.participants.empty(), "a round closed without participants");

  std::vector<int> late = late_;
  std::sort(late.begin(), late.end());
  for (int late_rank : late) {
    const int donor = round.participants[donor_cursor_++ % round.participants.size()];
    RESYNC_CHECK(donor != late_rank, fmt::format("rank {} chosen as its own donor", late_rank));
    round.catchups.push_back({late_rank, donor});
  }

  if (final_round_) {
    state_.assign(state_.size(), RankState::kDone);
    finished_ = true;
  } else {
    for (int rank : ready_) {
      state_[static_cast<size_t>(rank)] = RankState::kWorking;
      next_step_[static_cast<size_t>(rank)] = open_step_ + 1;
    }
    for (int rank : late_) {
      state_[static_cast<size_t>(rank)] = RankState::kWorking;
      next_step_[static_cast<size_t>(rank)] = open_step_ + 1;
    }
    ++open_step_;
  }
  ready_.clear();
  late_.clear();
  first_ready_.reset();
  last_close_ = now_;
  n_stall_warnings_ = 0;
  out.closed.push_back(std::move(round));
}

void Coordinator::abort_job(std::string reason, Decisions& out) {
  aborted_ = true;
  out.abort = std::move(reason);
}

std::vector<int> Coordinator::ranks_in(RankState state) const {
  std::vector<int> ranks;
  for (size_t r = 0; r < state_.size(); ++r) {
    if (state_[r] == state) ranks.push_back(static_cast<int>(r));
  }
  return ranks;
}

}  // namespace resync::collectives
