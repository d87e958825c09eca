#include "collectives/control/coordinator.h"

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
  RESYNC_CHECK_ARG(repair_window_ms >= 1 && repair_window_ms <= kMaxTimeoutMs,
                   fmt::format("--ring-timeout-ms (the repair window) must be >= 1, at most {}; "
                               "got {}",
                               kMaxTimeoutMs, repair_window_ms));
  check_seconds(stall_warning_s, "--stall-warning-s");
  check_seconds(stall_abort_s, "--stall-abort-s");
  RESYNC_CHECK_ARG(shared_state_node.empty() ||
                       shared_state_node.size() == static_cast<size_t>(world_size),
                   fmt::format("coordinator: {} shared-state node ids for {} ranks",
                               shared_state_node.size(), world_size));
}

bool CoordinatorConfig::share_state(int a, int b) const {
  if (shared_state_node.empty()) return false;
  const int node = shared_state_node[static_cast<size_t>(a)];
  return node >= 0 && node == shared_state_node[static_cast<size_t>(b)];
}

Coordinator::Coordinator(const CoordinatorConfig& config, CoordTime now) : config_(config) {
  config_.validate();
  straggler_timeout_ = std::chrono::milliseconds(config_.straggler_timeout_ms);
  stall_warning_ = seconds_to_ns(config_.stall_warning_s);
  stall_abort_ = seconds_to_ns(config_.stall_abort_s);
  repair_window_ = std::chrono::milliseconds(config_.repair_window_ms);
  const auto w = static_cast<size_t>(config_.world_size);
  state_.assign(w, RankState::kWorking);
  next_step_.assign(w, config_.first_step);
  open_step_ = config_.first_step;
  busy_step_.assign(w, kNoStep);
  early_step_.assign(w, kNoStep);
  early_donor_.assign(w, -1);
  failed_donor_.assign(w, -1);
  failed_donor_step_.assign(w, kNoStep);
  late_holds_.assign(w, kNoStep);
  superseded_.assign(w, false);
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

bool Coordinator::check_report(int rank, uint64_t step, const char* what, Decisions& out) {
  const auto r = static_cast<size_t>(rank);
  if (state_[r] != RankState::kWorking) {
    abort_job(fmt::format("protocol violation: rank {} sent {}({}) while it was already "
                          "waiting for an order",
                          rank, what, step),
              out);
    return false;
  }
  if (step < next_step_[r] || step > open_step_) {
    abort_job(fmt::format("protocol violation: rank {} sent {}({}), expected a step in "
                          "[{}, {}]",
                          rank, what, step, next_step_[r], open_step_),
              out);
    return false;
  }
  if (final_round_ && step == open_step_) {
    abort_job(fmt::format("rank {} sent {}({}) but other ranks finished training after {} "
                          "steps: the ranks disagree on the number of steps",
                          rank, what, step, open_step_),
              out);
    return false;
  }
  return true;
}

bool Coordinator::stale_report(int rank, uint64_t step) const {
  const auto r = static_cast<size_t>(rank);
  if (busy_step_[r] != step) return false;
  // After BUSY(step) the rank may send BUSY/READY(step) again before it sees the order that
  // answers the BUSY: queued as late for it, or already caught up past it.
  return state_[r] == RankState::kLate ||
         (state_[r] == RankState::kWorking && next_step_[r] > step);
}

bool Coordinator::in_last_allreduce(int rank) const {
  if (!last_round_) return false;
  const auto& p = last_round_->participants;
  const auto& q = last_round_->passive;
  return std::binary_search(p.begin(), p.end(), rank) ||
         std::binary_search(q.begin(), q.end(), rank);
}

bool Coordinator::in_last_round(int rank) const {
  if (!last_round_) return false;
  if (in_last_allreduce(rank)) return true;
  return std::any_of(last_round_->catchups.begin(), last_round_->catchups.end(),
                     [rank](const CatchUp& c) { return c.late_rank == rank; });
}

void Coordinator::note_progress(int rank, uint64_t step) {
  if (!last_round_ || step != last_round_->step + 1) return;
  if (superseded_[static_cast<size_t>(rank)] || !in_last_round(rank)) return;
  // This rank holds the result of the last attempt, so it completed: ranks that reported it
  // failed only lost their part and are caught up like late ranks.
  last_round_completed_ = true;
  repair_deadline_.reset();
  for (int failed_rank : ranks_in(RankState::kFailed)) make_late(failed_rank);
}

void Coordinator::make_late(int rank, uint64_t holds_step) {
  const auto r = static_cast<size_t>(rank);
  late_holds_[r] = holds_step;
  state_[r] = RankState::kLate;
  superseded_[r] = false;
  late_.push_back(rank);
}

Decisions Coordinator::ready(int rank, uint64_t step, CoordTime now) {
  Decisions out;
  if (!accepting(rank, "READY")) return out;
  advance(now, out);
  if (finished_ || aborted_) return out;

  const auto r = static_cast<size_t>(rank);
  const bool stale = stale_report(rank, step);
  busy_step_[r] = kNoStep;
  if (stale) return out;
  if (state_[r] == RankState::kBusy && step == open_step_) {
    // Its BUSY wait ran out before the step closed: an ordinary participant after all.
  } else if (!check_report(rank, step, "READY", out)) {
    return out;
  }
  if (step < open_step_ || superseded_[r]) {
    // Step `step` closed without this rank (or its state is from an abandoned attempt): its
    // gradient is dropped, a later close catches it up.
    make_late(rank, superseded_[r] ? kNoStep : step);
  } else {
    state_[r] = RankState::kReady;
    ready_.push_back(rank);
    if (!first_ready_) first_ready_ = now_;
    note_progress(rank, step);
  }
  early_step_[r] = kNoStep;
  maybe_close(out);
  catch_up_early(out);
  return out;
}

Decisions Coordinator::busy(int rank, uint64_t step, CoordTime now) {
  Decisions out;
  if (!accepting(rank, "BUSY")) return out;
  advance(now, out);
  if (finished_ || aborted_) return out;

  const auto r = static_cast<size_t>(rank);
  if (stale_report(rank, step)) return out;
  if (state_[r] == RankState::kBusy && busy_step_[r] == step) return out;  // a repeated BUSY
  busy_step_[r] = kNoStep;
  if (!check_report(rank, step, "BUSY", out)) return out;
  busy_step_[r] = step;
  if (step < open_step_ || superseded_[r]) {
    make_late(rank, superseded_[r] ? kNoStep : step);
  } else if (next_step_[r] != step) {
    abort_job(fmt::format("protocol violation: rank {} sent BUSY({}) but its next step is {}", rank,
                          step, next_step_[r]),
              out);
    return out;
  } else {
    state_[r] = RankState::kBusy;
    note_progress(rank, step);
  }
  early_step_[r] = kNoStep;
  maybe_close(out);
  catch_up_early(out);
  return out;
}

Decisions Coordinator::failed(int rank, uint64_t step, CoordTime now) {
  Decisions out;
  if (!accepting(rank, "FAILED")) return out;
  advance(now, out);
  if (finished_ || aborted_) return out;

  const auto r = static_cast<size_t>(rank);
  busy_step_[r] = kNoStep;
  if (state_[r] == RankState::kLate) return out;  // already queued for a catch-up
  if (state_[r] == RankState::kWorking && early_step_[r] == step && next_step_[r] == step) {
    // Its early catch-up failed (the donor gave up on it, is frozen, or the state arrived
    // torn): try another donor for this step.
    early_step_[r] = kNoStep;
    failed_donor_[r] = early_donor_[r];
    failed_donor_step_[r] = step;
    make_late(rank);
    maybe_close(out);
    catch_up_early(out);
    return out;
  }
  if (state_[r] != RankState::kWorking || next_step_[r] != step + 1) {
    abort_job(fmt::format("protocol violation: rank {} sent FAILED({}) but it {}", rank, step,
                          state_[r] != RankState::kWorking
                              ? std::string("was already waiting for an order")
                              : fmt::format("was last ordered into round {}",
                                            static_cast<int64_t>(next_step_[r]) - 1)),
              out);
    return out;
  }
  const bool participant =
      last_round_ && step == last_round_->step && !superseded_[r] && in_last_allreduce(rank);
  if (!participant || last_round_completed_) {
    // A failed catch-up receive, a participant of an abandoned attempt, or a participant whose
    // peers completed: its state is behind, so it is caught up like a late rank.
    make_late(rank);
    maybe_close(out);
    catch_up_early(out);
    return out;
  }
  state_[r] = RankState::kFailed;
  if (!repair_deadline_) repair_deadline_ = now_ + repair_window_;
  auto has_failed = [this](int p) { return state_[static_cast<size_t>(p)] == RankState::kFailed; };
  const bool all_failed =
      std::all_of(last_round_->participants.begin(), last_round_->participants.end(),
                  has_failed) &&
      std::all_of(last_round_->passive.begin(), last_round_->passive.end(), has_failed);
  if (all_failed) repair(out);  // nobody can complete any more: no need to wait
  return out;
}

Decisions Coordinator::finish(int rank, uint64_t n_steps, CoordTime now) {
  Decisions out;
  if (!accepting(rank, "FINISH")) return out;
  advance(now, out);
  if (finished_ || aborted_) return out;

  const auto r = static_cast<size_t>(rank);
  busy_step_[r] = kNoStep;
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
  if (!final_round_ && (!ready_.empty() || !ranks_in(RankState::kBusy).empty())) {
    auto early = ready_;
    for (int busy_rank : ranks_in(RankState::kBusy)) early.push_back(busy_rank);
    std::sort(early.begin(), early.end());
    abort_job(fmt::format("rank {} finished training after {} steps but ranks {} sent "
                          "READY/BUSY({}): the ranks disagree on the number of steps",
                          rank, n_steps, early, n_steps),
              out);
    return out;
  }
  final_round_ = true;
  if (superseded_[r]) {
    make_late(rank);  // its final state is from an abandoned attempt
  } else {
    state_[r] = RankState::kFinishing;
    ready_.push_back(rank);
    if (!first_ready_) first_ready_ = now_;
    note_progress(rank, n_steps);
  }
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
  if (repair_deadline_) consider(*repair_deadline_);
  if (stall_warning_.count() > 0) consider(stall_warning_deadline());
  if (stall_abort_.count() > 0) consider(last_close_ + stall_abort_);
  return best;
}

void Coordinator::advance(CoordTime now, Decisions& out) {
  if (now > now_) now_ = now;
  if (repair_deadline_ && *repair_deadline_ <= now_) repair(out);
  if (finished_ || aborted_) return;
  if (auto t = timeout_deadline(); t && *t <= now_) maybe_close(out);
  if (finished_ || aborted_) return;

  const auto stalled = now_ - last_close_;
  if (stall_abort_.count() > 0 && stalled >= stall_abort_) {
    abort_job(fmt::format("no step closed for {:.1f} s (--stall-abort-s {:g}): step {} is still "
                          "waiting for ranks {}",
                          to_seconds(stalled), config_.stall_abort_s, open_step_, missing_ranks()),
              out);
    return;
  }
  if (stall_warning_.count() > 0 && now_ >= stall_warning_deadline()) {
    // One report even if several periods passed unobserved; the next one a period later.
    n_stall_warnings_ = stalled / stall_warning_;
    StallReport report;
    report.step = open_step_;
    report.stalled_s = to_seconds(stalled);
    report.missing = missing_ranks();
    report.late_queued = ranks_in(RankState::kLate);
    out.stall = std::move(report);
  }
}

void Coordinator::maybe_close(Decisions& out) {
  const auto w = static_cast<size_t>(config_.world_size);
  if (final_round_) {
    if (!ready_.empty() && ready_.size() + late_.size() == w) close_round(false, out);
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
  if (!final_round_) {
    // Only reachable if a rank outside the last round reported the next step; the failed ranks
    // then take the state after this step rather than wait for a repair.
    for (int failed_rank : ranks_in(RankState::kFailed)) make_late(failed_rank);
    repair_deadline_.reset();
  }
  ClosedRound round;
  round.step = open_step_;
  round.final_round = final_round_;
  round.stop = stop_;
  round.timed_out = timed_out;
  round.participants = ready_;
  std::sort(round.participants.begin(), round.participants.end());
  RESYNC_CHECK(!round.participants.empty(), "a round closed without participants");

  // Busy ranks are awake and listening: they take this step's state instead of computing it,
  // as passive members of the all-reduce or by a catch-up.
  const std::vector<int> busy = ranks_in(RankState::kBusy);
  std::vector<int> late = late_;
  if (config_.busy_ranks_join && !final_round_) {
    round.passive = busy;  // ascending, from ranks_in
  } else {
    late.insert(late.end(), busy.begin(), busy.end());
  }
  std::sort(late.begin(), late.end());
  for (int late_rank : late) {
    bool shared = false;
    const int donor = pick_donor(round.participants, late_rank, &shared);
    RESYNC_CHECK(donor >= 0, fmt::format("no donor for rank {}", late_rank));
    round.catchups.push_back({late_rank, donor, shared});
  }

  if (final_round_) {
    state_.assign(state_.size(), RankState::kDone);
    finished_ = true;
  } else {
    for (int rank : ready_) {
      state_[static_cast<size_t>(rank)] = RankState::kWorking;
      next_step_[static_cast<size_t>(rank)] = open_step_ + 1;
    }
    for (int rank : round.passive) {
      state_[static_cast<size_t>(rank)] = RankState::kWorking;
      next_step_[static_cast<size_t>(rank)] = open_step_ + 1;
    }
    for (int rank : late) {
      state_[static_cast<size_t>(rank)] = RankState::kWorking;
      next_step_[static_cast<size_t>(rank)] = open_step_ + 1;
      superseded_[static_cast<size_t>(rank)] = false;
    }
    last_round_ = round;
    last_round_completed_ = false;
    ++open_step_;
  }
  ready_.clear();
  late_.clear();
  first_ready_.reset();
  last_close_ = now_;
  n_stall_warnings_ = 0;
  out.closed.push_back(std::move(round));
}

void Coordinator::catch_up_early(Decisions& out) {
  // Donors must hold the state of the open step, now or after their update. A pending repair
  // means the last round may not have completed: leave late ranks to it.
  if (!config_.early_catch_up || late_.empty() || final_round_ || repair_deadline_ ||
      finished_ || aborted_) {
    return;
  }
  std::vector<int> holders;
  if (!config_.shared_state_node.empty()) holders_of_open_step(holders);
  std::vector<int> still_late;
  for (int late_rank : late_) {
    const auto lr = static_cast<size_t>(late_rank);
    const int avoid = failed_donor_step_[lr] == open_step_ ? failed_donor_[lr] : -1;
    bool shared = false;
    int donor = -1;
    if (!config_.shared_state_node.empty()) {
      donor = pick_donor(holders, late_rank, &shared, avoid);
      if (!shared) donor = -1;
    }
    // Otherwise only a rank waiting for its order can send its state now.
    if (donor < 0) donor = pick_donor(ready_, late_rank, &shared, avoid);
    if (donor < 0) {
      still_late.push_back(late_rank);
      continue;
    }
    const auto r = static_cast<size_t>(late_rank);
    state_[r] = RankState::kWorking;
    next_step_[r] = open_step_;
    early_step_[r] = open_step_;
    // A failed shared copy is the donor's doing (frozen, or already past the step): do not ask
    // it again. A failed transfer is usually the late rank's (it froze again): the same
    // waiting donor may serve again.
    early_donor_[r] = shared ? donor : -1;
    superseded_[r] = false;
    const bool velocity_only =
        !shared && late_holds_[r] != kNoStep && late_holds_[r] + 1 == open_step_;
    const bool stop = last_round_ && last_round_->stop;
    out.early.push_back({open_step_, late_rank, donor, velocity_only, shared, stop});
  }
  late_ = std::move(still_late);
}

void Coordinator::holders_of_open_step(std::vector<int>& out) const {
  out = ready_;
  if (!last_round_ || last_round_->final_round || last_round_->step + 1 != open_step_) return;
  for (const auto* members : {&last_round_->participants, &last_round_->passive}) {
    for (int rank : *members) {
      const auto r = static_cast<size_t>(rank);
      // A member still working on the open step (or busy in it) holds or is about to hold the
      // state; one queued as late, failed or from an abandoned attempt does not.
      const bool holds = (state_[r] == RankState::kWorking || state_[r] == RankState::kBusy) &&
                         next_step_[r] == open_step_ && early_step_[r] == kNoStep &&
                         !superseded_[r];
      if (holds) out.push_back(rank);
    }
  }
}

int Coordinator::pick_donor(const std::vector<int>& candidates, int late_rank, bool* shared,
                            int avoid) {
  *shared = false;
  const size_t n = candidates.size();
  if (n == 0) return -1;
  const size_t start = donor_cursor_++;
  int fallback = -1;
  for (size_t k = 0; k < n; ++k) {
    const int donor = candidates[(start + k) % n];
    if (donor == late_rank || donor == avoid) continue;
    if (config_.share_state(donor, late_rank)) {
      *shared = true;
      return donor;
    }
    if (fallback < 0) fallback = donor;
  }
  return fallback;
}

void Coordinator::repair(Decisions& out) {
  repair_deadline_.reset();
  const std::vector<int> failed = ranks_in(RankState::kFailed);  // ascending
  if (!last_round_ || failed.empty()) return;
  const uint64_t t = last_round_->step;
  const uint32_t attempt = last_round_->attempt + 1;
  if (attempt >= kMaxStepAttempts) {
    abort_job(fmt::format("step {} failed {} times: its all-reduce timed out in every attempt "
                          "(ranks {} failed last)",
                          t, attempt, failed),
              out);
    return;
  }
  auto is_new_participant = [&failed](int rank) {
    return std::binary_search(failed.begin(), failed.end(), rank);
  };
  auto waits_for_round_t = [&](int rank) {
    const auto r = static_cast<size_t>(rank);
    return state_[r] == RankState::kWorking && next_step_[r] == t + 1;
  };

  ClosedRound round;
  round.step = t;
  round.attempt = attempt;
  round.stop = stop_;
  // The retry keeps every rank's role: a passive member still adds a zero gradient.
  for (int rank : failed) {
    const auto& q = last_round_->passive;
    (std::binary_search(q.begin(), q.end(), rank) ? round.passive : round.participants)
        .push_back(rank);
  }
  // A late rank whose donor retries still waits for that donor's state of step t: keep the
  // pair and send no second order. One whose donor is left out gives up (FAILED) or, if it got
  // a state of the abandoned attempt, reports it (READY): both make it late.
  for (const CatchUp& c : last_round_->catchups) {
    if (!waits_for_round_t(c.late_rank)) continue;
    if (is_new_participant(c.donor_rank)) {
      round.catchups.push_back(c);
      round.ordered_before.push_back(c.late_rank);
    } else {
      superseded_[static_cast<size_t>(c.late_rank)] = true;
    }
  }
  for (const auto* members : {&last_round_->participants, &last_round_->passive}) {
    for (int p : *members) {
      if (!is_new_participant(p) && waits_for_round_t(p)) {
        superseded_[static_cast<size_t>(p)] = true;
      }
    }
  }
  std::vector<int> late = late_;
  std::sort(late.begin(), late.end());
  for (int late_rank : late) {
    bool shared = false;
    const int donor = pick_donor(failed, late_rank, &shared);
    RESYNC_CHECK(donor >= 0, fmt::format("no donor for rank {}", late_rank));
    round.catchups.push_back({late_rank, donor, shared});
    state_[static_cast<size_t>(late_rank)] = RankState::kWorking;
    next_step_[static_cast<size_t>(late_rank)] = t + 1;
    superseded_[static_cast<size_t>(late_rank)] = false;
  }
  late_.clear();
  std::sort(round.catchups.begin(), round.catchups.end(),
            [](const CatchUp& a, const CatchUp& b) { return a.late_rank < b.late_rank; });
  std::sort(round.ordered_before.begin(), round.ordered_before.end());
  for (int rank : failed) {
    state_[static_cast<size_t>(rank)] = RankState::kWorking;
    next_step_[static_cast<size_t>(rank)] = t + 1;
  }
  last_round_ = round;
  last_round_completed_ = false;
  last_close_ = now_;  // a repair counts as a close for the stall clock
  n_stall_warnings_ = 0;
  out.closed.push_back(std::move(round));
}

void Coordinator::abort_job(std::string reason, Decisions& out) {
  aborted_ = true;
  out.abort = std::move(reason);
}

std::vector<int> Coordinator::missing_ranks() const {
  std::vector<int> ranks;
  for (size_t r = 0; r < state_.size(); ++r) {
    if (state_[r] == RankState::kWorking || state_[r] == RankState::kBusy) {
      ranks.push_back(static_cast<int>(r));
    }
  }
  return ranks;
}

std::vector<int> Coordinator::ranks_in(RankState state) const {
  std::vector<int> ranks;
  for (size_t r = 0; r < state_.size(); ++r) {
    if (state_[r] == state) ranks.push_back(static_cast<int>(r));
  }
  return ranks;
}

}  // namespace resync::collectives
