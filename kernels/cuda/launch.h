// Launch helpers shared by the kernels/cuda/*.cu files: grid sizing for grid-stride loops and the
// launch check that follows every kernel launch. Included by .cu files only.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>

#include "base/error.h"

namespace resync::kernels::cuda::launch {

constexpr unsigned kBlock = 256;
// Grid-stride loops cover any size, so the grid is capped (and fits every grid dimension limit).
constexpr size_t kMaxBlocks = 65535;

// Blocks of `block` threads for n_items work items (n_items > 0).
inline unsigned blocks_for(size_t n_items, unsigned block = kBlock) {
  return static_cast<unsigned>(std::min((n_items + block - 1) / block, kMaxBlocks));
}

#ifdef __CUDACC__
// Index and stride of a 1-D grid-stride loop, in size_t so that > 2^32 elements work.
__device__ inline size_t global_index() {
  return static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline size_t grid_stride() { return static_cast<size_t>(gridDim.x) * blockDim.x; }
#endif

}  // namespace resync::kernels::cuda::launch

// After every launch: a bad configuration shows up here, named by the kernel; a fault inside the
// kernel surfaces at the next synchronisation.
#define RESYNC_CHECK_LAUNCH(kernel_name)                                                     \
  do {                                                                                       \
    const cudaError_t resync_launch_rc_ = cudaGetLastError();                                \
    if (resync_launch_rc_ != cudaSuccess) [[unlikely]]                                       \
      ::resync::detail::cuda_check_failed(static_cast<int>(resync_launch_rc_),               \
                                          "launch of " kernel_name, __FILE__, __LINE__);     \
  } while (0)
