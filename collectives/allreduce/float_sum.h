// Float-sum kernels shared by the all-reduce paths: element-wise sums in a fixed operand order,
// so that the same sum computed on two ranks is bitwise identical.
#pragma once

#include <cstddef>
#include <span>

namespace resync::collectives {

// dst[i] += src[i]. The spans must have the same size and must not overlap.
void add_into(std::span<float> dst, std::span<const float> src);

// dst[i] = ((srcs[0][i] + srcs[1][i]) + srcs[2][i]) + ..., left to right, for i < dst.size(),
// and the same into copy[i] if `copy` is not null (one pass instead of a sum and a memcpy).
// Each source points at dst.size() floats; a source may be dst itself (fastest as the first
// or second source), other overlaps are not allowed. At least one source.
void sum_in_order(std::span<float> dst, std::span<const float* const> srcs, float* copy = nullptr);

}  // namespace resync::collectives
