// The step coordinator's decision logic: given READY/BUSY/FAILED/FINISH arrivals and a clock,
// decides when a step closes (or is re-closed after a failed all-reduce), who takes part, who
// catches up from whom, when to warn about a stall or abort.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace resync::collectives {

// The coordinator never reads a clock itself: every event carries `now`, so tests drive it with
// a fake clock and the event loops (TCP server, in-process hub) pass steady_clock::now().
using CoordClock = std::chrono::steady_clock;
using CoordTime = CoordClock::time_point;

// The knobs of the straggler-tolerant step, as given on the command line.
struct CoordinatorConfig {
  int world_size = 1;                // W
  uint64_t first_step = 0;           // the first step to close (a resumed run's checkpoint step)
  int backup_workers = 0;            // b: a step closes when W - b ranks are ready
  int64_t straggler_timeout_ms = 0;  // close this long after the first READY if quorum; 0 = never
  int min_quorum = 1;                // ready ranks needed for a timeout close (0 acts as 1)
  double stall_warning_s = 60.0;     // warn (and repeat) when no step closed for this long; 0 = off
  double stall_abort_s = 0.0;        // abort the job when no step closed for this long; 0 = off
  int64_t repair_window_ms = 2000;   // after a FAILED, how long completions may still prove the
                                     // round done before it is re-closed (--ring-timeout-ms)
  bool early_catch_up = true;        // catch late ranks up during the open step (EarlyCatchUp)
  bool busy_ranks_join = true;       // busy ranks join the all-reduce with a zero gradient
                                     // (ClosedRound::passive) instead of being caught up
  // Per rank, the node whose shared memory holds its training state (-1: none; empty: no rank
  // has one). A late rank is preferably given a donor with the same node id: it then copies
  // the donor's state itself (CatchUp::shared) and the donor does nothing.
  std::vector<int> shared_state_node;

  // Throws resync::InvalidArgument naming the offending flag (--backup-workers,
  // --straggler-timeout-ms, --min-quorum, --stall-warning-s, --stall-abort-s, --ring-timeout-ms).
  void validate() const;
  // Gradients per step when every rank is responsive: W - b.
  int step_quorum() const { return world_size - backup_workers; }
  // True if rank a can copy rank b's state out of shared memory (same node, both in it).
  bool share_state(int a, int b) const;
};

// A late rank and the participant whose full state it takes after the closing step.
struct CatchUp {
  int late_rank = -1;
  int donor_rank = -1;
  // Same node (CoordinatorConfig::shared_state_node): the late rank copies the donor's state
  // out of shared memory once the donor has published it; the donor sends nothing.
  bool shared = false;
  bool operator==(const CatchUp&) const = default;
};

// A late rank caught up while the open step is still collecting READYs, instead of at its
// close: it takes the state `donor` holds to compute `step` and then computes `step` itself.
// Without this, a late rank could not report before the next close, and that close would wait
// for every other rank, including a slow one the backup workers were meant to skip.
// `shared`: the donor shares the late rank's node and holds that state or will after its update
// of step - 1 (a member of that round); the late rank copies it out of shared memory.
// Otherwise the donor sent READY(step), holds the state, sends it now (kServe) and goes on
// waiting for its order.
struct EarlyCatchUp {
  uint64_t step = 0;
  int late_rank = -1;
  int donor_rank = -1;
  // The late rank holds exactly the state of step - 1 (it reported READY/BUSY(step - 1)): the
  // optimizer's new velocity is enough to recompute the parameters, half the bytes. Never with
  // `shared`, which copies the whole state at memory speed.
  bool velocity_only = false;
  bool shared = false;
  // The round before `step` carried `stop`: the others end after it, so the late rank takes the
  // state of `step` and finishes too, instead of computing `step` alone.
  bool stop = false;
  bool operator==(const EarlyCatchUp&) const = default;
};

// A round for one step may close more than once: after a failed all-reduce it is re-closed with
// the ranks that reported the failure; at this attempt the job is aborted.
inline constexpr uint32_t kMaxStepAttempts = 16;

// The coordinator closed a round: a training step, or the final round at the end of training.
struct ClosedRound {
  uint64_t step = 0;
  uint32_t attempt = 0;           // 0, then +1 for each re-close of `step` (ring repair)
  bool final_round = false;       // FINISH round: no all-reduce, only catch-ups
  bool stop = false;              // a rank asked to stop: every rank ends after this round
  bool timed_out = false;         // closed by the straggler timeout, not by the W - b count
  std::vector<int> participants;  // sorted; their gradients (if any) make the step
  // Sorted; ranks that sent BUSY: they take part in the all-reduce with a zero gradient, so
  // they end the step with everyone's state and need no catch-up. Not counted in the average.
  std::vector<int> passive;
  std::vector<CatchUp> catchups;  // sorted by late rank; donors are participants
  // Late ranks of `catchups` that already hold their CATCHUP order (same step and donor) from
  // an earlier attempt and are still waiting for the state: they get no second order. Sorted.
  std::vector<int> ordered_before;
};

// No round closed for a while: these ranks have not reported for the open step.
struct StallReport {
  uint64_t step = 0;
  double stalled_s = 0.0;        // seconds since the last close (or since start)
  std::vector<int> missing;      // ranks neither ready, finished, failed nor queued as late
  std::vector<int> late_queued;  // ranks waiting to be caught up at the next close
};

// What the event loop must do after an event. Usually empty.
struct Decisions {
  std::vector<ClosedRound> closed;   // in order; send PLAN to participants, CATCHUP to late ranks
  std::vector<EarlyCatchUp> early;   // after `closed`: SERVE to the donor, CATCHUP to the late rank
  std::optional<StallReport> stall;  // log it (rank 0, coll logger)
  std::optional<std::string> abort;  // send ABORT{reason} to every rank; the job is over
  bool empty() const { return closed.empty() && early.empty() && !stall && !abort; }
};

// Pure, single-threaded state machine of the synchronous step protocol (see docs/DESIGN.md,
// "The synchronous step"). Not thread-safe: its owner serialises the events.
//
// Closing rule for the open step t: close when min(W - b, W - |late queue|) ranks sent READY(t)
// (ranks queued as late cannot send READY(t) before a close catches them up, so waiting for
// them would deadlock), or when straggler_timeout_ms passed since the first READY(t) and at
// least min_quorum ranks are ready. Ranks that sent BUSY(t) do not count as ready; the close of
// t takes them along as passive members of its all-reduce (busy_ranks_join), or catches them
// up. The final round closes when every rank has sent FINISH(T) or is
// queued as late. After a close or an abort, events about a finished job are ignored.
//
// Early catch-up: while the open step t collects READYs (and no repair is pending), a late rank
// is not left waiting for the close: it copies the state of t from a rank on its node that has
// it or is about to, or a rank that sent READY(t) sends it that state at once; the late rank
// then computes step t like everyone else (see EarlyCatchUp).
//
// Donors: round-robin over the round's participants (early: over the candidates above),
// preferring one on the late rank's node (CatchUp::shared).
//
// Ring repair: a participant of the last closed round t that reports FAILED(t) waits; if no
// member of round t proves it completed (READY/BUSY/FINISH(t + 1)) within repair_window_ms, or
// once every participant failed, step t is re-closed with the failed ranks (attempt + 1).
class Coordinator {
 public:
  // Validates `config`; `now` starts the stall clock (all ranks are connected).
  Coordinator(const CoordinatorConfig& config, CoordTime now);

  // Rank `rank` computed its gradient for `step` and waits for its order.
  Decisions ready(int rank, uint64_t step, CoordTime now);
  // Rank `rank` is slow at `step` but listening: if `step` closes without it, it is caught up
  // in that same close. A BUSY for a step that already closed counts as a late READY.
  Decisions busy(int rank, uint64_t step, CoordTime now);
  // Rank `rank`'s all-reduce of round `step` (or its catch-up receive) timed out; it waits for
  // an order: a re-close of `step` (repair) or a catch-up.
  Decisions failed(int rank, uint64_t step, CoordTime now);
  // Rank `rank` finished training after `n_steps` steps and waits for its final order.
  Decisions finish(int rank, uint64_t n_steps, CoordTime now);
  // The control connection of `rank` closed before its final order: that rank died. `host`
  // (may be empty) only decorates the reason.
  Decisions connection_lost(int rank, CoordTime now, const std::string& host = "");
  // A rank asks that all ranks stop at the next round boundary (preemption).
  Decisions stop_requested(int rank, CoordTime now);
  // Time passed: fires due timeouts, repairs, stall warnings and stall aborts.
  Decisions tick(CoordTime now);

  // When tick() next has something to do, if ever. The event loop sleeps until then.
  std::optional<CoordTime> next_deadline() const;

  // The step READY messages are collected for (the next one to close).
  uint64_t open_step() const { return open_step_; }
  bool finished() const { return finished_; }
  bool aborted() const { return aborted_; }
  const CoordinatorConfig& config() const { return config_; }

 private:
  enum class RankState { kWorking, kReady, kBusy, kFailed, kFinishing, kLate, kDone };
  static constexpr uint64_t kNoStep = ~uint64_t{0};

  void advance(CoordTime now, Decisions& out);
  void maybe_close(Decisions& out);
  void close_round(bool timed_out, Decisions& out);
  void repair(Decisions& out);
  void catch_up_early(Decisions& out);
  // A donor for `late_rank` among `candidates` (round-robin): one sharing its node if any
  // (*shared = true), else any other; -1 if there is none.
  // Skips `avoid` (a donor that already failed this late rank for the open step).
  int pick_donor(const std::vector<int>& candidates, int late_rank, bool* shared,
                 int avoid = -1);
  // Ranks that hold the open step's state or will once their update of the last round is done
  // (for shared early catch-ups): READY(open step) first, then the last round's members.
  void holders_of_open_step(std::vector<int>& out) const;
  // `holds_step`: the step whose state the rank holds exactly (its late READY/BUSY), or kNoStep.
  void make_late(int rank, uint64_t holds_step = kNoStep);
  // Checks a report of `step` from a rank in state kWorking; aborts (returns false) if invalid.
  bool check_report(int rank, uint64_t step, const char* what, Decisions& out);
  // True if `rank` reporting `step` is a BUSY/READY that raced an order it already got or a
  // queueing it already had (to be ignored).
  bool stale_report(int rank, uint64_t step) const;
  // A member of the last round reported the next step: it holds the round's result.
  void note_progress(int rank, uint64_t step);
  bool in_last_round(int rank) const;
  // Participant or passive member of the last round's all-reduce.
  bool in_last_allreduce(int rank) const;
  void abort_job(std::string reason, Decisions& out);
  // Checks the rank is in range (else InvalidArgument); false once the job is over.
  bool accepting(int rank, const char* event) const;
  std::optional<CoordTime> timeout_deadline() const;
  CoordTime stall_warning_deadline() const;
  std::vector<int> ranks_in(RankState state) const;
  std::vector<int> missing_ranks() const;  // not reported for the open step (working or busy)

  CoordinatorConfig config_;
  std::chrono::nanoseconds straggler_timeout_;
  std::chrono::nanoseconds stall_warning_;
  std::chrono::nanoseconds stall_abort_;

  std::vector<RankState> state_;
  std::vector<uint64_t> next_step_;  // lowest step each rank may report next
  std::vector<int> ready_;           // READY(open_step_) or FINISH, in arrival order
  std::vector<int> late_;            // late ranks waiting for a close, in arrival order
  std::vector<uint64_t> busy_step_;  // step of the rank's last BUSY (kNoStep: none pending)
  std::vector<uint64_t> early_step_;  // step of the rank's pending early catch-up, or kNoStep
  std::vector<int> early_donor_;      // the donor of that early catch-up if shared, else -1
  // A node peer whose shared copy for this rank failed at step failed_donor_step_ (it may be
  // frozen): not asked again for that step, so the rank is not sent to it over and over.
  std::vector<int> failed_donor_;
  std::vector<uint64_t> failed_donor_step_;
  std::vector<uint64_t> late_holds_;  // a late rank's exact state (make_late), or kNoStep
  // Members of an abandoned attempt that were left out of its re-close: whatever state they
  // report next is from that attempt, so they are caught up instead of taking part.
  std::vector<bool> superseded_;
  std::optional<ClosedRound> last_round_;  // last regular round (attempt) closed
  bool last_round_completed_ = false;      // a member of last_round_ reported the next step
  std::optional<CoordTime> repair_deadline_;
  std::chrono::nanoseconds repair_window_;
  uint64_t open_step_ = 0;
  bool final_round_ = false;  // FINISH(open_step_) has arrived from someone
  std::optional<CoordTime> first_ready_;
  CoordTime last_close_;
  CoordTime now_;                 // latest time seen; deadlines at or before it are done
  int64_t n_stall_warnings_ = 0;  // warnings issued since the last close
  size_t donor_cursor_ = 0;       // round-robin over participants spreads catch-up load
  bool stop_ = false;
  bool finished_ = false;
  bool aborted_ = false;
};

}  // namespace resync::collectives
