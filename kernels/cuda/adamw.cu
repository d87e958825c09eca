#include "kernels/cuda/adamw.h"

#include <vector>

#include "base/error.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/launch.h"
#include "kernels/elementwise.h"

namespace resync::kernels::cuda {
namespace {

// A fixed grid for the sum of squares: its shape, not the device, decides the order of sums.
constexpr unsigned kSumBlocks = 256;

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

__global__ void adamw_kernel(float* params, float* m, float* v, const float* grads, size_t n,
                             float grad_scale, AdamWStep s) {
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) {
    float mi = m[i];
    float vi = v[i];
    adamw_moments_element(mi, vi, grads[i], grad_scale, s.beta1, s.one_minus_beta1, s.beta2,
                          s.one_minus_beta2);
    m[i] = mi;
    v[i] = vi;
    adamw_param_element(params[i], mi, vi, s.decay, s.step_size, s.bias2_sqrt, s.eps);
  }
}

__global__ void adamw_params_kernel(float* params, const float* m, const float* v, size_t n,
                                    AdamWStep s) {
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) {
    adamw_param_element(params[i], m[i], v[i], s.decay, s.step_size, s.bias2_sqrt, s.eps);
  }
}

// One partial sum per block: a grid-stride sum per thread, then a tree in shared memory.
__global__ void sum_of_squares_kernel(const float* values, size_t n, double* partials) {
  __shared__ double tree[launch::kBlock];
  double sum = 0;
  for (size_t i = launch::global_index(); i < n; i += launch::grid_stride()) {
    const double x = values[i];
    sum += x * x;
  }
  tree[threadIdx.x] = sum;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) tree[threadIdx.x] += tree[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = tree[0];
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

void adamw_update(cudaStream_t stream, float* params, float* m, float* v, const float* grads,
                  size_t n_elems, float grad_scale, const AdamWStep& s) {
  if (n_elems == 0) return;
  RESYNC_CHECK_ARG(params != nullptr && m != nullptr && v != nullptr && grads != nullptr,
                   "cuda adamw_update: null pointer");
  adamw_kernel<<<launch::blocks_for(n_elems), launch::kBlock, 0, stream>>>(params, m, v, grads,
                                                                            n_elems, grad_scale, s);
  RESYNC_CHECK_LAUNCH("adamw_kernel");
}

void adamw_apply_moments(cudaStream_t stream, float* params, const float* m, const float* v,
                         size_t n_elems, const AdamWStep& s) {
  if (n_elems == 0) return;
  RESYNC_CHECK_ARG(params != nullptr && m != nullptr && v != nullptr,
                   "cuda adamw_apply_moments: null pointer");
  adamw_params_kernel<<<launch::blocks_for(n_elems), launch::kBlock, 0, stream>>>(params, m, v,
                                                                                   n_elems, s);
  RESYNC_CHECK_LAUNCH("adamw_params_kernel");
}

double sum_of_squares(cudaStream_t stream, const float* values, size_t n_elems) {
  if (n_elems == 0) return 0;
  RESYNC_CHECK_ARG(values != nullptr, "cuda sum_of_squares: null pointer");
  DeviceBuffer<double> partials(kSumBlocks);
  sum_of_squares_kernel<<<kSumBlocks, launch::kBlock, 0, stream>>>(values, n_elems,
                                                                    partials.data());
  RESYNC_CHECK_LAUNCH("sum_of_squares_kernel");
  std::vector<double> host(kSumBlocks);
  download(static_cast<const double*>(partials.data()), std::span<double>(host), stream);
  synchronize(stream);
  double sum = 0;
  for (double p : host) sum += p;
  return sum;
}

}  // namespace resync::kernels::cuda
