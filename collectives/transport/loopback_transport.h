// LoopbackFabric: N in-process transports, one per rank-as-thread, over shared mailboxes; and
// run_on_ranks(), which runs one function per rank on its own thread. The fast, deterministic
// test tier of every collective.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>

#include "collectives/transport/transport.h"

namespace resync::collectives {

// Sends are rendezvous: a send completes only when a matching receive has taken the data, so an
// algorithm that would rely on MPI buffering small messages deadlocks here instead of in
// production. An abandoned (destroyed while pending) send is withdrawn, where MPI might still
// deliver it. Transports (and requests on them) must not outlive the fabric.
class LoopbackFabric {
 public:
  explicit LoopbackFabric(int n_ranks, int max_tag = std::numeric_limits<int>::max());
  ~LoopbackFabric();
  LoopbackFabric(const LoopbackFabric&) = delete;
  LoopbackFabric& operator=(const LoopbackFabric&) = delete;

  int size() const;
  Transport& transport(int rank);

  // Matched messages and their bytes from `src` to `dst` so far.
  uint64_t messages_delivered(int src, int dst) const;
  uint64_t bytes_delivered(int src, int dst) const;
  // Operations posted but not yet matched anywhere on the fabric (0 once everyone is done).
  size_t pending_operations() const;

  // Makes every pending and future operation on the fabric throw CommError(reason), so that
  // ranks blocked on a failed rank end instead of hanging.
  void abort(const std::string& reason);

  struct State;

 private:
  std::unique_ptr<State> state_;
};

// Runs body(transport) for every rank of the fabric, each on its own thread, and joins them.
// The first rank to throw aborts the fabric (releasing the others) and its exception is
// rethrown here after all threads have ended.
void run_on_ranks(LoopbackFabric& fabric, const std::function<void(Transport&)>& body);

}  // namespace resync::collectives
