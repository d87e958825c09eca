// Fused, numerically stable softmax + cross-entropy over device logits [batch x n_classes] with
// int32 labels: the CUDA twins of kernels/softmax_xent.h. The sums stay on the device until read,
// so a training step need not wait for them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/softmax_xent.h"

namespace resync::kernels::cuda {

// What one call leaves in device memory; read it with read_xent_result.
struct XentDeviceResult {
  double loss_sum;               // summed (not averaged) over the rows
  unsigned long long n_correct;  // rows whose argmax (first maximum) equals the label
  long long bad_row;             // first row with a label outside [0, n_classes), or -1
  int bad_label;                 // that row's label
  int n_classes;
};

// Training: writes dlogits = (softmax - onehot) / batch and *result (device memory). The mean
// loss is result.loss_sum / batch. batch must be > 0, dlogits must not alias logits. A bad label
// leaves its dlogits row unwritten and is reported by read_xent_result.
void softmax_xent_forward_backward(cudaStream_t stream, const float* logits,
                                   const int32_t* labels, float* dlogits, size_t batch,
                                   size_t n_classes, XentDeviceResult* result);

// Evaluation: forward only. batch == 0 gives zeros.
void softmax_xent_forward(cudaStream_t stream, const float* logits, const int32_t* labels,
                          size_t batch, size_t n_classes, XentDeviceResult* result);

// Waits for `stream`, copies *result (device) to the host and returns its sums. Throws
// InvalidArgument, as the CPU kernels do, when a label was outside [0, n_classes).
XentSums read_xent_result(const XentDeviceResult* result, cudaStream_t stream);

}  // namespace resync::kernels::cuda
