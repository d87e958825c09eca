// runtime/observe: what a run reports: JSON Lines metrics (this header), rank 0's progress line
// (progress.h) and the per-rank Chrome-trace timeline (timeline.h).
//
// JSON Lines metrics, written by rank 0: one object per step (or every k-th), per evaluation,
// and a summary at the end. Each line is flushed so a running job can be watched.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace resync::runtime {

struct StepRecord {
  uint64_t step = 0;
  size_t epoch = 0;
  double loss = 0;
  double step_ms = 0;     // whole step on rank 0
  double compute_ms = 0;  // forward + backward (+ injected delay, reported separately)
  double wait_ms = 0;     // waiting for the step's PLAN
  double comm_ms = 0;     // ring all-reduce + state transfers
  double delay_ms = 0;    // injected straggler delay on rank 0
  double elapsed_s = 0;   // since training started, at the end of this step
  std::vector<int> participants;
  std::vector<int> dropped;  // ranks whose gradient for this step was dropped
  std::vector<int> late;     // ranks that caught up after this step
};

// --mode async: one worker step as parameter server 0 saw its push (rank 0 is server 0, and
// every push reaches every server). Written as a "step" event with "mode":"async".
struct AsyncStepRecord {
  uint64_t step = 0;   // the worker's own step
  size_t epoch = 0;
  int worker = -1;     // world rank of the worker
  double loss = 0;
  double step_ms = 0;     // time between this worker's previous push and this one, at server 0
  double compute_ms = 0;  // forward + backward on the worker
  double delay_ms = 0;    // injected straggler delay on the worker
  double comm_ms = 0;     // the worker's previous push-and-reply round trip
  uint64_t staleness = 0;  // server 0's version at arrival minus the version computed on
  bool applied = true;     // false: dropped by --max-staleness
  uint64_t version = 0;    // server 0's version after handling the push
  double elapsed_s = 0;
};

// --mode async: staleness of the gradients one parameter server applied, at the end.
struct StalenessRecord {
  int server = 0;
  uint64_t applied = 0;
  uint64_t dropped = 0;       // pushes dropped as staler than --max-staleness
  uint64_t refreshed = 0;     // worker steps discarded before pushing (all workers; server 0)
  uint64_t max_staleness = 0;  // largest staleness of an applied gradient
  double mean_staleness = 0;
  std::vector<uint64_t> histogram;  // histogram[k]: applied gradients of staleness k
};

struct EvalRecord {
  size_t epoch = 0;
  uint64_t step = 0;
  double test_loss = 0;
  double test_accuracy = 0;  // token accuracy on text
  double test_bits_per_byte = -1;  // text (byte tokens) only: test_loss / ln 2; else < 0
  double elapsed_s = 0;
};

struct SummaryRecord {
  uint64_t steps = 0;
  double elapsed_s = 0;
  double samples_per_s = 0;
  double test_accuracy = 0;
  std::string param_checksum;
  bool ranks_agree = false;
  uint64_t dropped_gradients = 0;
  uint64_t catch_ups = 0;
  std::optional<uint64_t> resumed_from_step;  // the step of the checkpoint --resume loaded
  std::string stopped_by;  // e.g. "SIGTERM" for a preempted run; empty otherwise
};

class MetricsWriter {
 public:
  // An empty path writes nothing. `append` continues an existing file (a resumed run adds its
  // records after the interrupted run's). Throws InvalidArgument if the file cannot be opened.
  explicit MetricsWriter(const std::string& path, bool append = false);

  bool enabled() const { return file_ != nullptr; }
  void step(const StepRecord& r);
  void eval(const EvalRecord& r);
  void summary(const SummaryRecord& r);
  void async_step(const AsyncStepRecord& r);
  void staleness(const StalenessRecord& r);

 private:
  void write_line(const std::string& line);

  struct Closer {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  std::unique_ptr<std::FILE, Closer> file_;
  std::string path_;
};

}  // namespace resync::runtime
