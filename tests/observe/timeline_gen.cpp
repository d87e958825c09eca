// Writes PREFIX.rank<N>.json for N ranks with the real Timeline, for timeline_merge_test.py:
// every rank records a "marker" span at one shared instant (the merge must line them up),
// nested spans, ring phases through the PhaseRecorder, and a name that needs JSON escaping.
// Rank 1 has room for few events, so its file reports dropped events.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "runtime/observe/timeline.h"

using resync::runtime::Lane;
using resync::runtime::PhaseRecorder;
using resync::runtime::Timeline;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s PREFIX N_RANKS\n", argv[0]);
    return 2;
  }
  try {
    const std::string prefix = argv[1];
    const int n_ranks = std::atoi(argv[2]);
    std::vector<std::unique_ptr<Timeline>> ranks;
    for (int r = 0; r < n_ranks; ++r) {
      // Origins 3 ms apart (a busy wait, not a synchronisation), so that a merge that did not
      // shift the ranks would leave the shared marker visibly apart.
      const auto spin_until = Timeline::Clock::now() + std::chrono::milliseconds(3);
      while (r > 0 && Timeline::Clock::now() < spin_until) {
      }
      const size_t max_events = r == 1 ? 4 : 1000;
      ranks.push_back(std::make_unique<Timeline>(resync::runtime::timeline_path(prefix, r), r,
                                                 resync::runtime::TimelineOptions{max_events}));
    }
    const Timeline::Clock::time_point marker = Timeline::Clock::now();
    for (int r = 0; r < n_ranks; ++r) {
      Timeline& t = *ranks[r];
      t.record("marker", marker, marker + std::chrono::milliseconds(1), 0);
      PhaseRecorder phases(t, 16);
      for (int64_t step = 0; step < 3; ++step) {
        auto compute = t.span("compute", step);
        { auto wait = t.span("wait_plan", step); }
        compute.end();
        auto allreduce = t.span("allreduce", step);
        const resync::collectives::PhaseEvent rs{
            resync::collectives::AllreducePhase::kReduceScatter, uint64_t(step) * 16, 10, 2};
        phases.phase_begin(rs);
        phases.phase_end(rs);
      }
      t.record("odd \"name\"\t\\", marker, marker, -1, Lane::kTrain, {"n", -3});
      t.finish();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "timeline_gen: %s\n", e.what());
    return 1;
  }
  return 0;
}
