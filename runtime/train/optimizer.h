// The optimizers over the model's flat parameter buffer (`--optimizer sgd|adamw`), their
// learning-rate schedule and gradient clipping. Their state (SGD: the velocity; AdamW: the first
// and second moments) is part of what a catching-up rank receives; the step count that AdamW's
// bias correction and the schedule need is the training step, which travels beside it.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/sgd.h"

namespace resync::runtime {

enum class OptimizerKind { kSgd, kAdamW };
enum class LrScheduleKind { kConstant, kCosine };

// "sgd" | "adamw"; parse_optimizer throws InvalidArgument for any other name.
std::string_view optimizer_name(OptimizerKind kind);
OptimizerKind parse_optimizer(std::string_view name);

// The learning rate of step s (0-based): linear warm-up over the first warmup_steps
// (lr * (s + 1) / warmup_steps), then constant or a cosine decay from lr to min_lr at
// total_steps. Computed in double and rounded once, so every rank gets the same float; with
// kConstant and no warm-up it is lr itself.
struct LrSchedule {
  LrScheduleKind kind = LrScheduleKind::kConstant;
  uint64_t warmup_steps = 0;
  float min_lr = 0.0f;
  uint64_t total_steps = 0;
  float lr_at(float lr, uint64_t step) const;
};

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kSgd;
  float lr = 0.01f;
  float momentum = 0.0f;  // SGD
  float beta1 = 0.9f;     // AdamW
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  // SGD: L2 added to the gradient; AdamW: decoupled
  float grad_clip = 0.0f;     // largest L2 norm of the averaged gradient; 0 = no clipping
  LrSchedule schedule;

  OptimizerConfig() = default;
  // SGD at a constant rate: what every model trained with before AdamW.
  OptimizerConfig(const kernels::SgdHyper& h)  // NOLINT: implicit on purpose
      : lr(h.lr), momentum(h.momentum), weight_decay(h.weight_decay) {}

  // StateLayout::n_optimizer_buffers: 1 (velocity) or 2 (first and second moments).
  size_t n_buffers() const { return kind == OptimizerKind::kAdamW ? 2 : 1; }
  float lr_at(uint64_t step) const { return schedule.lr_at(lr, step); }
  kernels::SgdHyper sgd_at(uint64_t step) const { return {lr_at(step), momentum, weight_decay}; }
  // AdamW's scalars of training step `step` (its update number t = step + 1).
  kernels::AdamWStep adamw_at(uint64_t step) const;
  // grad_scale times the clipping factor for a summed gradient whose squares sum to sum_sq.
  float clipped_scale(double sum_sq, float grad_scale) const;
};

// One optimizer over n_params parameters and its state buffers (n_buffers() x n_params floats,
// back to back: StateLayout's optimizer parts).
class Optimizer {
 public:
  Optimizer(size_t n_params, OptimizerConfig config);

  // Not copyable: a copy would share the placed state. Moving keeps it (a moved vector keeps its
  // heap buffer, so the views stay valid in the new object).
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;
  Optimizer(Optimizer&&) = default;
  Optimizer& operator=(Optimizer&&) = default;

  const OptimizerConfig& config() const { return config_; }
  size_t n_buffers() const { return config_.n_buffers(); }

  // The update of training step `step` (0-based) with grads * grad_scale (grad_scale folds in
  // the 1/|participants| average of the all-reduced sum), clipped to config().grad_clip.
  // `params` and `grads` may be the slice [offset, offset + size) of the full buffers (an async
  // server's shard): the state's same slice is updated, and clipping sees that slice only.
  void step(std::span<float> params, std::span<const float> grads, float grad_scale,
            uint64_t step, size_t offset = 0);

  // The parameter half of step(): for a rank that holds the parameters before the update of
  // `step` and the state after it (the same bits as step()).
  void apply_update_from_state(std::span<float> params, uint64_t step) const;

  // Moves the state into `storage` (at least n_buffers() x n_params floats, kept alive by the
  // caller), e.g. the node's shared-memory window, from which a late peer copies it. The current
  // values move along; buffer(j) then views storage. InvalidArgument if too small.
  void place_state(std::span<float> storage);

  std::span<float> buffer(size_t j);
  std::span<const float> buffer(size_t j) const;
  // Every buffer, back to back.
  std::span<float> state() { return state_; }
  std::span<const float> state() const { return state_; }

 private:
  OptimizerConfig config_;
  size_t n_params_;
  std::vector<float> owned_;  // the state unless placed elsewhere
  std::span<float> state_;    // the live state
};

}  // namespace resync::runtime
