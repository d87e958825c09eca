// StateLayout: the one description of a rank's training state and of where it lies in memory.
// The state is the parameters, k optimizer buffers of the same length (SGD momentum: its
// velocity; AdamW: two moments) and the step count. The parts lie back to back, parameters
// first, wherever the state is kept whole: a rank's region of the node's shared-memory window
// (after its gradient), a catch-up transfer, a checkpoint. The step count travels beside the
// floats (the transfer header, the shared window's version word, the checkpoint's meta).
#pragma once

#include <cstddef>
#include <span>

namespace resync {

struct StateLayout {
  size_t n_params = 0;
  size_t n_optimizer_buffers = 0;

  // Parameters, then each optimizer buffer.
  size_t n_parts() const { return 1 + n_optimizer_buffers; }
  size_t n_floats() const { return n_parts() * n_params; }
  size_t n_optimizer_floats() const { return n_optimizer_buffers * n_params; }

  // Part `i` (0: the parameters, 1 + j: optimizer buffer j) of a region of n_floats() floats.
  template <class T>
  std::span<T> part(std::span<T> region, size_t i) const {
    return region.subspan(i * n_params, n_params);
  }

  // A rank's region of the node's shared-memory window: its gradient, then its state.
  size_t window_floats() const { return n_params + n_floats(); }
  size_t window_state_offset() const { return n_params; }
  template <class T>
  std::span<T> window_gradient(std::span<T> window) const {
    return window.first(n_params);
  }
  template <class T>
  std::span<T> window_state(std::span<T> window) const {
    return window.subspan(window_state_offset(), n_floats());
  }

  bool operator==(const StateLayout&) const = default;
};

}  // namespace resync
