// Checks that stop a diverging run: a loss, gradient or state that turned NaN or infinite ends
// the job (exit 1) with one line naming the step and the rank, before it is pushed, applied or
// written to a checkpoint. The training loops call these every step, so the value check is one
// branch-free pass (it vectorises) and looks for the culprit only after it failed.
//
// One line per job: a NonFiniteError is printed by the rank that raises it, which then ends the
// job (MPI abort). Where several ranks see the same values (sync mode's summed gradient), only
// one of them reports (check_finite_shared); the others raise a NonFiniteError marked
// reported_by_peer, print nothing and wait for that rank to end the job.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "base/error.h"

namespace resync::runtime {

// True if every value is finite (neither NaN nor +-inf). One pass over `values`.
bool all_finite(std::span<const float> values);

// Index of the first NaN or +-inf in `values`, or values.size() if there is none.
size_t first_non_finite(std::span<const float> values);

// The errors the checks below throw (for a rank that reports another rank's failure):
//   "non-finite loss (nan) at step 17 on rank 2"
//   "non-finite gradient (inf at index 1234 of 669706) at step 17 on rank 2"
NonFiniteError non_finite_loss_error(double loss, uint64_t step, int rank,
                                     bool reported_by_peer = false);
NonFiniteError non_finite_values_error(std::string_view what, double value, size_t index,
                                       size_t count, uint64_t step, int rank,
                                       bool reported_by_peer = false);

// Throws non_finite_loss_error if `loss` is NaN or inf.
void check_finite_loss(double loss, uint64_t step, int rank);

// Throws non_finite_values_error, naming the first bad value, if any value is NaN or inf;
// `what` names the buffer ("gradient", "parameters", ...).
void check_finite_values(std::span<const float> values, std::string_view what, uint64_t step,
                         int rank);

// For values that every rank of a group holds bit for bit (sync mode's summed gradient after
// the all-reduce): like check_finite_values, but only `reporter` (a member of the group, e.g.
// its lowest rank) reports; the others' NonFiniteError is marked reported_by_peer.
void check_finite_shared(std::span<const float> values, std::string_view what, uint64_t step,
                         int rank, int reporter);

}  // namespace resync::runtime
