// PLACEHOLDER written by the lead so the tree links; the issue-4 engineer owns this file and
// replaces it entirely with the real `resync bench` implementation.
#include "runtime/bench.h"

#include <cstdio>

namespace resync::runtime {

int bench_main(int, char**) {
  std::fprintf(stderr, "resync: error: 'resync bench' is not built yet\n");
  return 2;
}

}  // namespace resync::runtime
