// Counts C++ heap allocations made by the calling thread between start and stop, through a
// replaced global operator new (linked into the test binary that includes alloc_counter.cpp).
#pragma once

#include <cstddef>

namespace resync::collectives::test {
void start_counting_allocations();
size_t stop_counting_allocations();  // returns the count since start
}  // namespace resync::collectives::test
