#include "models/cuda/device_model.h"

#include <fmt/format.h>

#include <algorithm>
#include <utility>

#include "base/error.h"

namespace resync::models::cuda {

namespace kc = kernels::cuda;

DeviceModel::DeviceModel(DevicePlan plan, size_t max_batch)
    : plan_(std::move(plan)), max_batch_(max_batch) {
  RESYNC_CHECK_ARG(max_batch_ > 0, "model: max batch must be > 0");
  RESYNC_CHECK_ARG(!plan_.layers.empty(), "model: no layers");
  size_t workspace_elems = 0;
  for (const DeviceLayerPlan& layer : plan_.layers) {
    layers_.push_back(make_device_layer(layer, max_batch_));
    workspace_elems = std::max(workspace_elems, layers_.back()->workspace_elems());
    acts_.emplace_back(max_batch_ * layer.out_size);
    dacts_.emplace_back(max_batch_ * layer.out_size);
  }
  workspace_ = kc::DeviceBuffer<float>(workspace_elems);
  for (auto& layer : layers_) layer->set_workspace({workspace_.data(), workspace_.size()});
  xent_ = kc::DeviceBuffer<kc::XentDeviceResult>(1);
}

DeviceModel::~DeviceModel() = default;

void DeviceModel::bind(float* params, float* grads) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DeviceLayerPlan& layer = plan_.layers[i];
    // A tied head owns no parameters: it works on the embedding's wte and its gradient.
    const size_t offset =
        layer.kind == DeviceLayerKind::kTiedLmHead ? layer.tied_offset : layer.param_offset;
    layers_[i]->bind(params + offset, grads + offset);
  }
}

void DeviceModel::check_batch(size_t batch) const {
  RESYNC_CHECK_ARG(batch <= max_batch_,
                   fmt::format("batch of {} exceeds the model's max batch {}", batch, max_batch_));
}

void DeviceModel::forward(const kc::CudaContext& ctx, const float* x, size_t batch) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->forward(ctx, input_of(i, x), acts_[i].data(), batch);
  }
}

void DeviceModel::forward_backward(const kc::CudaContext& ctx, const float* x,
                                   const int32_t* labels, size_t batch) {
  check_batch(batch);
  RESYNC_CHECK_ARG(batch > 0, "model: empty training batch");
  forward(ctx, x, batch);
  // The mean over every label (batch x labels_per_sample rows of logits), as the CPU Model.
  kc::softmax_xent_forward_backward(ctx.stream(), acts_.back().data(), labels, dacts_.back().data(),
                                    batch * labels_per_sample(), plan_.n_classes, xent_.data());
  // Backward, mirrored: the first layer needs no gradient for the input batch.
  for (size_t i = layers_.size(); i-- > 0;) {
    float* dx = i == 0 ? nullptr : dacts_[i - 1].data();
    layers_[i]->backward(ctx, input_of(i, x), acts_[i].data(), dacts_[i].data(), dx, batch);
  }
}

void DeviceModel::forward_loss(const kc::CudaContext& ctx, const float* x, const int32_t* labels,
                               size_t batch) {
  check_batch(batch);
  if (batch > 0) forward(ctx, x, batch);
  // batch == 0 still writes zero sums, so read_loss() never returns a previous batch's.
  kc::softmax_xent_forward(ctx.stream(), acts_.back().data(), labels, batch * labels_per_sample(),
                           plan_.n_classes, xent_.data());
}

kernels::XentSums DeviceModel::read_loss(const kc::CudaContext& ctx) const {
  const kernels::XentSums sums = kc::read_xent_result(xent_.data(), ctx.stream());
  for (const auto& layer : layers_) layer->check_inputs(ctx);
  return sums;
}

}  // namespace resync::models::cuda
