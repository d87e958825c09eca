// JSON Lines metrics, written by rank 0: one object per step (or every k-th), per evaluation,
// and a summary at the end. Each line is flushed so a running job can be watched.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
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

struct EvalRecord {
  size_t epoch = 0;
  uint64_t step = 0;
  double test_loss = 0;
  double test_accuracy = 0;
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
};

class MetricsWriter {
 public:
  // An empty path writes nothing. Throws InvalidArgument if the file cannot be created.
  explicit MetricsWriter(const std::string& path);

  bool enabled() const { return file_ != nullptr; }
  void step(const StepRecord& r);
  void eval(const EvalRecord& r);
  void summary(const SummaryRecord& r);

 private:
  void write_line(const std::string& line);

  struct Closer {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  std::unique_ptr<std::FILE, Closer> file_;
  std::string path_;
};

}  // namespace resync::runtime
