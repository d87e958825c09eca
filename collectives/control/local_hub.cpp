#include "collectives/control/local_hub.h"

#include <fmt/format.h>

#include <condition_variable>
#include <deque>
#include <mutex>

#include "base/error.h"
#include "base/log.h"
#include "collectives/control/delivery.h"

namespace resync::collectives {

namespace detail {

// The hub's shared state; as the OrderSink of deliver(), it puts orders into the mailboxes.
struct LocalHubState final : OrderSink {
  explicit LocalHubState(const CoordinatorConfig& config)
      : coordinator(config, CoordClock::now()),
        mailbox(static_cast<size_t>(config.world_size)),
        handed_out(static_cast<size_t>(config.world_size), false) {}

  // Carries out the coordinator's decisions; caller holds `mu`.
  void apply(Decisions&& d) {
    timer_cv.notify_one();  // any event may move the next deadline (e.g. a first READY)
    if (d.empty()) return;
    deliver(d, *this);
    orders_cv.notify_all();
  }

  void send(int rank, StepOrder&& order) override {
    mailbox[static_cast<size_t>(rank)].push_back(std::move(order));
  }
  void abort(const std::string& reason) override { set_abort(reason); }

  void set_abort(std::string reason) {
    if (abort_reason) return;
    log::get("coll")->error("control: aborting the job: {}", reason);
    abort_reason = std::move(reason);
    orders_cv.notify_all();
  }

  std::mutex mu;
  std::condition_variable orders_cv;  // rank threads wait for their mailbox
  std::condition_variable timer_cv;   // the timer thread waits for the next deadline
  Coordinator coordinator;
  std::vector<std::deque<StepOrder>> mailbox;  // a donor may get SERVE, then its PLAN
  std::vector<bool> handed_out;
  std::optional<std::string> abort_reason;
  bool shutdown = false;
};

}  // namespace detail

namespace {

enum class Report { kReady, kFinish, kFailed };

const char* report_name(Report report) {
  switch (report) {
    case Report::kReady:
      return "READY";
    case Report::kFinish:
      return "FINISH";
    case Report::kFailed:
      return "FAILED";
  }
  return "?";
}

class LocalChannel final : public ControlChannel {
 public:
  LocalChannel(std::shared_ptr<detail::LocalHubState> state, int rank)
      : state_(std::move(state)), rank_(rank) {}

  ~LocalChannel() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (!done_) state_->apply(state_->coordinator.connection_lost(rank_, CoordClock::now()));
  }

  StepOrder ready(uint64_t step) override { return exchange(Report::kReady, step); }
  StepOrder finish(uint64_t n_steps) override { return exchange(Report::kFinish, n_steps); }
  StepOrder failed(uint64_t step) override { return exchange(Report::kFailed, step); }

  StepOrder next_order() override {
    std::unique_lock<std::mutex> lock(state_->mu);
    check_open("waiting for an order");
    return wait_and_take(lock, state_->mailbox[static_cast<size_t>(rank_)]);
  }

  std::optional<StepOrder> busy(uint64_t step, std::chrono::nanoseconds max_wait) override {
    std::unique_lock<std::mutex> lock(state_->mu);
    check_open("BUSY");
    check_abort();
    auto& slot = state_->mailbox[static_cast<size_t>(rank_)];
    if (slot.empty()) {
      state_->apply(state_->coordinator.busy(rank_, step, CoordClock::now()));
      state_->orders_cv.wait_for(lock, max_wait,
                                 [&] { return !slot.empty() || state_->abort_reason; });
    }
    if (slot.empty()) {
      check_abort();
      answered_busy_ = false;
      return std::nullopt;
    }
    return take(slot);
  }

  void request_stop() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->abort_reason || done_) return;
    state_->apply(state_->coordinator.stop_requested(rank_, CoordClock::now()));
  }

  int rank() const override { return rank_; }

 private:
  StepOrder exchange(Report report, uint64_t step) {
    const char* what = report_name(report);
    std::unique_lock<std::mutex> lock(state_->mu);
    check_open(what);
    auto& slot = state_->mailbox[static_cast<size_t>(rank_)];
    // Only the answer to a BUSY whose wait ran out may be waiting already.
    RESYNC_CHECK(slot.empty() || (report == Report::kReady && !answered_busy_),
                 fmt::format("rank {}: an order arrived before {}", rank_, what));
    if (slot.empty()) check_abort();
    const auto now = CoordClock::now();
    // Reported even when the answer is there, as over TCP; the coordinator ignores it then.
    switch (report) {
      case Report::kReady:
        state_->apply(state_->coordinator.ready(rank_, step, now));
        break;
      case Report::kFinish:
        state_->apply(state_->coordinator.finish(rank_, step, now));
        break;
      case Report::kFailed:
        state_->apply(state_->coordinator.failed(rank_, step, now));
        break;
    }
    return wait_and_take(lock, slot);
  }

  StepOrder wait_and_take(std::unique_lock<std::mutex>& lock, std::deque<StepOrder>& slot) {
    state_->orders_cv.wait(lock, [&] { return !slot.empty() || state_->abort_reason; });
    // An order decided before an abort is delivered first, as over TCP where it precedes it.
    if (slot.empty()) check_abort();
    return take(slot);
  }

  StepOrder take(std::deque<StepOrder>& slot) {
    StepOrder order = std::move(slot.front());
    slot.pop_front();
    answered_busy_ = true;
    if (order.final_round) done_ = true;
    return order;
  }

  void check_open(const char* what) const {
    if (done_) {
      throw CommError(
          fmt::format("rank {}: {} after the final order: the control channel is "
                      "closed",
                      rank_, what));
    }
  }

  void check_abort() const {
    if (state_->abort_reason) {
      throw CommError(
          fmt::format("rank {}: job aborted by the coordinator: {}", rank_, *state_->abort_reason));
    }
  }

  std::shared_ptr<detail::LocalHubState> state_;
  int rank_;
  bool done_ = false;  // guarded by state_->mu
  // False between a BUSY whose wait ran out and the next order: that order may arrive early.
  bool answered_busy_ = true;  // guarded by state_->mu
};

}  // namespace

LocalControlHub::LocalControlHub(const CoordinatorConfig& config)
    : state_(std::make_shared<detail::LocalHubState>(config)) {
  timer_ = std::thread([state = state_] {
    std::unique_lock<std::mutex> lock(state->mu);
    while (!state->shutdown) {
      const auto deadline = state->coordinator.next_deadline();
      if (deadline) {
        state->timer_cv.wait_until(lock, *deadline);
      } else {
        state->timer_cv.wait(lock);
      }
      if (state->shutdown) break;
      state->apply(state->coordinator.tick(CoordClock::now()));
    }
  });
}

LocalControlHub::~LocalControlHub() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->shutdown = true;
    if (!state_->coordinator.finished() && !state_->coordinator.aborted()) {
      state_->set_abort("the in-process coordinator shut down before the job finished");
    }
    state_->timer_cv.notify_one();
  }
  timer_.join();
}

std::unique_ptr<ControlChannel> LocalControlHub::connect(int rank) {
  std::lock_guard<std::mutex> lock(state_->mu);
  const int world_size = state_->coordinator.config().world_size;
  RESYNC_CHECK_ARG(rank >= 0 && rank < world_size,
                   fmt::format("rank {} outside [0, {})", rank, world_size));
  RESYNC_CHECK_ARG(!state_->handed_out[static_cast<size_t>(rank)],
                   fmt::format("rank {} is already connected", rank));
  state_->handed_out[static_cast<size_t>(rank)] = true;
  return std::make_unique<LocalChannel>(state_, rank);
}

std::optional<std::string> LocalControlHub::abort_reason() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->abort_reason;
}

}  // namespace resync::collectives
