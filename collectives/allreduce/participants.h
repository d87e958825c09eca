// Checks of a participant list (sorted, distinct world ranks including the caller), shared by
// every all-reduce path.
#pragma once

#include <cstdint>
#include <span>

namespace resync::collectives {

// Position of `rank` in `participants`. Throws InvalidArgument if the list is not sorted and
// distinct, names a rank outside 0..world-1, or does not contain `rank`.
int position_in_participants(std::span<const int> participants, int rank, int world, uint64_t seq);

}  // namespace resync::collectives
