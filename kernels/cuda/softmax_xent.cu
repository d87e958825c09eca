#include "kernels/cuda/softmax_xent.h"

#include <climits>
#include <string>

#include "base/error.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/launch.h"
#include "kernels/elementwise.h"

namespace resync::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// The whole op runs in ONE block: batch x n_classes is tiny next to the GEMMs around it (a few
// thousand logits), and a single block sums the per-row losses in a fixed tree without atomics or
// a second pass, so the loss bits are the same on every run.
constexpr unsigned kXentThreads = 256;

template <bool kWithGradient>
__global__ void __launch_bounds__(kXentThreads)
    softmax_xent_kernel(const float* logits, const int32_t* labels, float* dlogits, size_t batch,
                        size_t n_classes, XentDeviceResult* result) {
  __shared__ double s_loss[kXentThreads];
  __shared__ unsigned long long s_correct[kXentThreads];
  __shared__ long long s_bad_row[kXentThreads];  // LLONG_MAX: none

  const float inv_batch = batch > 0 ? 1.0f / static_cast<float>(batch) : 0.0f;
  double loss = 0;
  unsigned long long correct = 0;
  long long bad_row = LLONG_MAX;
  for (size_t r = threadIdx.x; r < batch; r += blockDim.x) {
    const int32_t label = labels[r];
    if (label < 0 || static_cast<size_t>(label) >= n_classes) {
      bad_row = bad_row < static_cast<long long>(r) ? bad_row : static_cast<long long>(r);
      continue;
    }
    // Same steps and order as the CPU kernel: first maximum, sum of shifted exponentials,
    // loss = log(sum) - (z_label - max) in double.
    const float* z = logits + r * n_classes;
    float row_max = z[0];
    size_t arg_max = 0;
    for (size_t c = 1; c < n_classes; ++c) {
      if (z[c] > row_max) {
        row_max = z[c];
        arg_max = c;
      }
    }
    float sum = 0.0f;
    for (size_t c = 0; c < n_classes; ++c) sum += shifted_exp(z[c], row_max);
    loss += static_cast<double>(std::log(sum)) - static_cast<double>(z[label] - row_max);
    correct += arg_max == static_cast<size_t>(label) ? 1 : 0;
    if constexpr (kWithGradient) {
      const float inv_sum = 1.0f / sum;
      float* dz = dlogits + r * n_classes;
      for (size_t c = 0; c < n_classes; ++c) {
        dz[c] = xent_grad(shifted_exp(z[c], row_max), inv_sum, c == static_cast<size_t>(label),
                          inv_batch);
      }
    }
  }

  const unsigned t = threadIdx.x;
  s_loss[t] = loss;
  s_correct[t] = correct;
  s_bad_row[t] = bad_row;
  __syncthreads();
  for (unsigned half = kXentThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      s_loss[t] += s_loss[t + half];
      s_correct[t] += s_correct[t + half];
      s_bad_row[t] = s_bad_row[t] < s_bad_row[t + half] ? s_bad_row[t] : s_bad_row[t + half];
    }
    __syncthreads();
  }
  if (t == 0) {
    const bool bad = s_bad_row[0] != LLONG_MAX;
    result->loss_sum = s_loss[0];
    result->n_correct = s_correct[0];
    result->bad_row = bad ? s_bad_row[0] : -1;
    result->bad_label = bad ? labels[s_bad_row[0]] : 0;
    result->n_classes = static_cast<int>(n_classes);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

void check_shape(const float* logits, const int32_t* labels, size_t batch, size_t n_classes,
                 const XentDeviceResult* result) {
  RESYNC_CHECK_ARG(n_classes > 0 && n_classes <= static_cast<size_t>(INT_MAX),
                   "cuda softmax_xent: n_classes must be in [1, INT_MAX], got " +
                       std::to_string(n_classes));
  RESYNC_CHECK_ARG(batch <= static_cast<size_t>(LLONG_MAX),
                   "cuda softmax_xent: batch " + std::to_string(batch) + " too large");
  RESYNC_CHECK_ARG(batch == 0 || (logits != nullptr && labels != nullptr),
                   "cuda softmax_xent: logits or labels is null");
  RESYNC_CHECK_ARG(result != nullptr, "cuda softmax_xent: result is null");
}

}  // namespace

void softmax_xent_forward_backward(cudaStream_t stream, const float* logits,
                                   const int32_t* labels, float* dlogits, size_t batch,
                                   size_t n_classes, XentDeviceResult* result) {
  check_shape(logits, labels, batch, n_classes, result);
  RESYNC_CHECK_ARG(batch > 0, "cuda softmax_xent: the mean loss of an empty batch is undefined");
  RESYNC_CHECK_ARG(dlogits != nullptr, "cuda softmax_xent: dlogits is null");
  softmax_xent_kernel<true><<<1, kXentThreads, 0, stream>>>(logits, labels, dlogits, batch,
                                                            n_classes, result);
  RESYNC_CHECK_LAUNCH("softmax_xent_kernel<true>");
}

void softmax_xent_forward(cudaStream_t stream, const float* logits, const int32_t* labels,
                          size_t batch, size_t n_classes, XentDeviceResult* result) {
  check_shape(logits, labels, batch, n_classes, result);
  softmax_xent_kernel<false><<<1, kXentThreads, 0, stream>>>(logits, labels, nullptr, batch,
                                                             n_classes, result);
  RESYNC_CHECK_LAUNCH("softmax_xent_kernel<false>");
}

XentSums read_xent_result(const XentDeviceResult* result, cudaStream_t stream) {
  RESYNC_CHECK_ARG(result != nullptr, "cuda softmax_xent: result is null");
  XentDeviceResult host{};
  download(result, std::span<XentDeviceResult>(&host, 1), stream);
  synchronize(stream);
  RESYNC_CHECK_ARG(host.bad_row < 0, "softmax_xent: label " + std::to_string(host.bad_label) +
                                         " of row " + std::to_string(host.bad_row) +
                                         " is outside [0, " + std::to_string(host.n_classes) +
                                         ")");
  return {host.loss_sum, static_cast<size_t>(host.n_correct)};
}

}  // namespace resync::kernels::cuda
