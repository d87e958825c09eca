#include "collectives/allreduce/participants.h"

#include <fmt/format.h>

#include "base/error.h"

namespace resync::collectives {

int position_in_participants(std::span<const int> participants, int rank, int world, uint64_t seq) {
  const int p = static_cast<int>(participants.size());
  int me = -1;
  for (int i = 0; i < p; ++i) {
    const int r = participants[i];
    RESYNC_CHECK_ARG(r >= 0 && r < world,
                     fmt::format("participant {} outside world 0..{}", r, world - 1));
    RESYNC_CHECK_ARG(i == 0 || participants[i - 1] < r, "participants must be sorted and distinct");
    if (r == rank) me = i;
  }
  RESYNC_CHECK_ARG(me >= 0,
                   fmt::format("rank {} is not among the {} participants of seq {}", rank, p, seq));
  return me;
}

}  // namespace resync::collectives
