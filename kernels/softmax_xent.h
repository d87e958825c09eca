// Fused, numerically stable softmax + cross-entropy over a row-major batch of logits
// [batch x n_classes] with int32 class labels: a training call (loss and gradient) and an
// evaluation call (summed loss and argmax hits).
#pragma once

#include <cstddef>
#include <cstdint>

namespace resync::kernels {

// Training: returns the mean loss over the batch and writes dlogits = (softmax - onehot) / batch
// (the gradient of that mean). If n_correct is given, stores how many rows' argmax (first
// maximum on ties) equals the label. dlogits must not alias logits. batch must be > 0.
// A label outside [0, n_classes) throws InvalidArgument.
float softmax_xent_forward_backward(const float* logits, const int32_t* labels, float* dlogits,
                                    size_t batch, size_t n_classes, size_t* n_correct = nullptr);

struct XentSums {
  double loss_sum = 0;   // summed (not averaged) over the rows, so batches can be added up
  size_t n_correct = 0;  // rows whose argmax equals the label
};

// Evaluation: forward only. batch == 0 gives zeros.
XentSums softmax_xent_forward(const float* logits, const int32_t* labels, size_t batch,
                              size_t n_classes);

}  // namespace resync::kernels
