// Float-sum kernels shared by the all-reduce paths: element-wise sums in a fixed operand order,
// so that the same sum computed on two ranks is bitwise identical.
#pragma once

#include <cstddef>
#include <span>

namespace resync::collectives {

// dst[i] += src[i]. The spans must have the same size and must not overlap.
void add_into(std::span<float> dst, std::span<const float> src);

// dst[i] = ((srcs[0][i] + srcs[1][i]) + srcs[2][i]) + ..., left to right, for i < dst.size().
// Each source points at dst.size() floats; a source may be dst itself (the sum is staged in
// registers a tile at a time), other overlaps are not allowed. At least one source.
void sum_in_order(std::span<float> dst, std::span<const float* const> srcs);

}  // namespace resync::collectives
