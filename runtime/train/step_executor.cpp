// The rank side of the step protocol; the coordinator's side is collectives/control.
#include "runtime/train/step_executor.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <thread>

#include "base/error.h"
#include "base/log.h"
#include "collectives/state/state_transfer.h"
#include "runtime/train/checksum.h"
#include "runtime/train/finite.h"
#include "runtime/train/train_common.h"

namespace resync::runtime {
namespace {

using Clock = std::chrono::steady_clock;
using collectives::OrderKind;
using collectives::StepOrder;

// The step counter of the state a donor sends after `order`'s round: the state it computes
// order.step from (early catch-up, final round), else the one after the step's update.
uint64_t state_version(const StepOrder& order) {
  return order.final_round || order.early ? order.step : order.step + 1;
}

}  // namespace

StepExecutor::StepExecutor(Options options, collectives::Context& ctx,
                           collectives::ControlChannel& control, GradientExchange& exchange,
                           StepState& state, collectives::ShmStateBoard* board, Timeline& timeline)
    : options_(options),
      ctx_(ctx),
      control_(control),
      exchange_(exchange),
      state_(state),
      board_(board),
      timeline_(timeline),
      rank_(control.rank()) {
  members_.reserve(static_cast<size_t>(ctx.size()));
  sent_.reserve(state.layout().n_parts());
}

void StepExecutor::resumed_at(uint64_t step) {
  StableState::Change(stable_).done(step);
  if (board_ == nullptr || step == 0) return;  // a fresh state is version 0 already
  board_->begin_update();
  board_->publish(step);
}

StepReport StepExecutor::run(uint64_t step, double delay_ms) {
  auto log = log::get("train");
  StepReport report;
  const Clock::time_point t_wait = Clock::now();
  order_ = await_order(step, delay_ms);
  report.wait_ms = std::max(0.0, ms_since(t_wait) - delay_ms);
  timeline_.end("wait_plan", t_wait, static_cast<int64_t>(step), Lane::kTrain,
                {"delay_us", static_cast<int64_t>(delay_ms * 1000)});

  // Carry out orders until this step is done; a timed-out ring or catch-up asks for another.
  const Clock::time_point t_comm = Clock::now();
  for (;;) {
    if (order_.kind == OrderKind::kServe) {  // a late rank needs this state now
      serve_catch_ups(order_);
      order_ = control_.next_order();
      continue;
    }
    if (order_.kind == OrderKind::kCatchUp) {  // too late: this rank's gradient was dropped
      if (std::optional<uint64_t> next = catch_up(order_, step)) {
        report.outcome = StepReport::Outcome::kCaughtUp;
        report.next_step = *next;
        report.final_round = order_.final_round;
        report.stop = order_.stop;
        break;
      }
      order_ = control_.failed(order_.step);
      continue;
    }
    if (participate(order_)) {
      report.outcome = StepReport::Outcome::kUpdated;
      report.next_step = step + 1;
      report.stop = order_.stop;
      break;
    }
  }
  report.comm_ms = ms_since(t_comm);
  report.order = &order_;
  return report;
}

StepOrder StepExecutor::await_order(uint64_t step, double delay_ms) {
  if (delay_ms > 0) {
    const auto delay = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::duration<double, std::milli>(delay_ms));
    // With backup workers or a timeout the rank stays reachable while it is slow: if its step
    // closes without it, it is caught up at once.
    if (options_.straggler_mode) {
      if (std::optional<StepOrder> early = control_.busy(step, delay)) return std::move(*early);
    } else {
      std::this_thread::sleep_for(delay);  // straggler injection: a sleep on purpose
    }
  }
  return control_.ready(step);
}

bool StepExecutor::participate(StepOrder& order) {
  // Gradient exchange over the participants only. A busy rank joins with a zero gradient: the
  // sum is the participants', and it ends the step with everyone's state without a catch-up.
  // A retry (repair) finds a partial sum in the buffer, summed in place: it computes the
  // gradient again, to the bit the same, rather than every step paying for a copy kept against
  // so rare an event.
  const bool passive = order.is_passive(rank_);
  const std::span<float> grads = state_.gradient();
  if (passive) {
    std::fill(grads.begin(), grads.end(), 0.0f);
  } else if (order.attempt > 0) {
    auto span = timeline_.span("compute", static_cast<int64_t>(order.step), Lane::kTrain,
                               {"attempt", static_cast<int64_t>(order.attempt)});
    state_.recompute_gradient();
  }
  try {
    auto span = timeline_.span("allreduce", static_cast<int64_t>(order.step), Lane::kTrain,
                               {"attempt", static_cast<int64_t>(order.attempt)});
    order.allreduce_members(members_);
    exchange_.allreduce_sum(members_, order.step * kAttemptsPerStep + order.attempt);
  } catch (const TimeoutError& e) {
    if (!options_.straggler_mode) throw;  // plain sync waits for everyone
    log::get("train")->warn("step {}: all-reduce over {} failed ({}); reporting it", order.step,
                            fmt::join(order.participants, ","), e.what());
    order = control_.failed(order.step);
    return false;
  }
  if (passive) ++passive_steps_;
  // Every member holds the same sum: the lowest participant reports a diverged run, once. A
  // rank's non-finite loss shows here too, its gradient having spoiled the sum.
  if (options_.check_summed_gradient) {
    check_finite_shared(grads, "summed gradient", order.step, rank_,
                        order.participants.empty() ? rank_ : order.participants.front());
  }

  // The averaged update, then the fresh state to the late ranks this rank serves.
  {
    StableState::Change change(stable_);
    if (board_) board_->begin_update();
    state_.apply_update(1.0f / float(std::max<size_t>(1, order.participants.size())),
                        order.step);
    if (board_) board_->publish(order.step + 1);
    change.done(order.step + 1);
  }
  serve_catch_ups(order);
  return true;
}

std::array<uint64_t, 2> StepExecutor::state_checksums() {
  const std::span<const std::span<float>> parts = state_.host_state();
  uint64_t optimizer = 0;
  for (std::span<const float> buffer : parts.subspan(1)) {
    optimizer = optimizer * 0x100000001b3ull ^ checksum64(buffer);
  }
  return {checksum64(parts[0]), optimizer};
}

// Sends this rank's state to every late rank it serves after `order`'s round. A late rank that
// froze again cannot receive: give up on it after the ring timeout (it will report the failed
// catch-up and be served again), never stall the participants.
void StepExecutor::serve_catch_ups(const StepOrder& order) {
  const std::vector<int> served = order.late_ranks_served_by(rank_);
  if (served.empty()) return;
  state_.download_state();
  const std::span<const std::span<float>> parts = state_.host_state();
  // A rank one step behind needs only the optimizer buffers (StepOrder::velocity_only).
  sent_.assign(parts.begin() + (order.velocity_only ? 1 : 0), parts.end());
  collectives::StateHeader header{.step = state_version(order)};
  const std::array<uint64_t, 2> sums = state_checksums();
  header.user[0] = sums[0];
  header.user[1] = sums[1];
  for (int late : served) {
    auto span = timeline_.span("serve_catch_up", static_cast<int64_t>(order.step), Lane::kTrain,
                               {"late_rank", late});
    try {
      collectives::send_state(ctx_, late, collectives::state_sequence(order), header, sent_);
    } catch (const TimeoutError& e) {
      log::get("train")->warn("step {}: could not catch up rank {}: {}", order.step, late,
                              e.what());
    }
  }
}

std::optional<uint64_t> StepExecutor::catch_up(const StepOrder& order, uint64_t from_step) {
  auto span = timeline_.span("catch_up", static_cast<int64_t>(order.step), Lane::kTrain,
                             {"donor", order.donor});
  auto log = log::get("train");
  std::optional<uint64_t> version;
  // Until the catch-up completes the state is torn: a rescue meanwhile does not save it.
  StableState::Change change(stable_);
  if (order.shared) {
    version = catch_up_shared(order, state_version(order));
  } else {
    // A velocity-only catch-up updates the parameters this rank holds: fetch them first.
    if (order.velocity_only) state_.download_state();
    if (board_) board_->begin_update();
    const std::span<const std::span<float>> parts = state_.host_state();
    const std::span<const std::span<float>> received =
        order.velocity_only ? parts.subspan(1) : parts;
    collectives::StateHeader header;
    try {
      collectives::recv_state(ctx_, order.donor, collectives::state_sequence(order), header,
                              received);
    } catch (const TimeoutError& e) {
      log->warn("catch-up from rank {} after step {} failed: {}", order.donor, order.step,
                e.what());
      return std::nullopt;
    }
    // The donor's state is version header.step: the update it holds is that of step - 1.
    if (order.velocity_only) {
      if (header.step == 0) {
        log->warn("catch-up from rank {} after step {}: optimizer state of step 0; asking again",
                  order.donor, order.step);
        return std::nullopt;
      }
      state_.apply_update_from_optimizer_state(header.step - 1);
    }
    const std::array<uint64_t, 2> sums = state_checksums();
    if (header.user[0] != sums[0] || header.user[1] != sums[1]) {
      log->warn("catch-up from rank {} after step {} arrived torn; asking again", order.donor,
                order.step);
      ++torn_catch_ups_;
      return std::nullopt;
    }
    state_.upload_state();
    if (board_) board_->publish(header.step);
    version = header.step;
  }
  if (!version) return std::nullopt;
  change.done(*version);
  steps_skipped_ += *version - from_step;
  ++catch_ups_;
  log->debug("caught up from rank {}{}: step {} -> {}", order.donor,
             order.shared          ? " (shared memory)"
             : order.velocity_only ? " (optimizer state only)"
                                   : "",
             from_step, *version);
  return version;
}

// The donor's state straight out of its region of the node's shared memory: nothing is sent.
std::optional<uint64_t> StepExecutor::catch_up_shared(const StepOrder& order, uint64_t version) {
  RESYNC_CHECK(board_ != nullptr, "a shared catch-up without a shared-memory state");
  board_->begin_update();
  if (!board_->copy_from(order.donor, version, board_->state(), options_.state_timeout)) {
    // A donor that has already moved past the step is a race of short steps, not a fault.
    const uint64_t donor_at = board_->published(order.donor);
    const bool moved_on = donor_at != collectives::ShmStateBoard::kWriting && donor_at > version;
    log::get("train")->log(moved_on ? spdlog::level::debug : spdlog::level::warn,
                           "catch-up from rank {}'s shared memory to step {} failed (it is at "
                           "{}); asking again",
                           order.donor, version, donor_at);
    return std::nullopt;  // the region stays marked as being written: nobody copies it
  }
  board_->publish(version);
  return version;
}

StepReport StepExecutor::finish(uint64_t step) {
  StepReport report;
  order_ = control_.finish(step);
  report.stop = order_.stop;  // the same on every rank (the coordinator's flag is sticky)
  report.final_round = true;
  report.next_step = step;
  report.order = &order_;
  if (order_.kind == OrderKind::kCatchUp) {
    // The coordinator is done after the final round: nothing can repair a failed transfer.
    const std::optional<uint64_t> next = catch_up(order_, step);
    if (!next) {
      throw CommError(fmt::format("the final catch-up from rank {} failed", order_.donor));
    }
    report.outcome = StepReport::Outcome::kCaughtUp;
    report.next_step = *next;
  } else {
    serve_catch_ups(order_);
  }
  return report;
}

}  // namespace resync::runtime
