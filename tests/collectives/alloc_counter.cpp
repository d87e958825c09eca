// Replaces global operator new/delete to count allocations. A separate translation unit, so
// the compiler never inlines these into callers (and never sees malloc/free pairs as mixed).
#include "alloc_counter.h"

#include <cstdlib>
#include <new>

namespace {
thread_local bool g_counting = false;
thread_local size_t g_allocations = 0;
}  // namespace

void* operator new(size_t n) {
  if (g_counting) ++g_allocations;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }

namespace resync::collectives::test {
void start_counting_allocations() {
  g_allocations = 0;
  g_counting = true;
}
size_t stop_counting_allocations() {
  g_counting = false;
  return g_allocations;
}
}  // namespace resync::collectives::test
