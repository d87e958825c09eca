#include "runtime/train/optimizer.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <numbers>

#include "base/error.h"

namespace resync::runtime {

std::string_view optimizer_name(OptimizerKind kind) {
  return kind == OptimizerKind::kAdamW ? "adamw" : "sgd";
}

OptimizerKind parse_optimizer(std::string_view name) {
  if (name == "sgd") return OptimizerKind::kSgd;
  if (name == "adamw") return OptimizerKind::kAdamW;
  throw InvalidArgument(fmt::format("unknown optimizer '{}' (sgd, adamw)", name));
}

float LrSchedule::lr_at(float lr, uint64_t step) const {
  if (step < warmup_steps) {
    return static_cast<float>(double(lr) * double(step + 1) / double(warmup_steps));
  }
  if (kind == LrScheduleKind::kConstant) return lr;
  // Cosine from lr at the end of the warm-up down to min_lr at total_steps (and after).
  const uint64_t decay_steps = total_steps > warmup_steps ? total_steps - warmup_steps : 1;
  const double progress = std::min(1.0, double(step - warmup_steps) / double(decay_steps));
  const double coeff = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return static_cast<float>(double(min_lr) + coeff * (double(lr) - double(min_lr)));
}

kernels::AdamWStep OptimizerConfig::adamw_at(uint64_t step) const {
  return kernels::adamw_step({.beta1 = beta1, .beta2 = beta2, .eps = eps,
                              .weight_decay = weight_decay},
                             lr_at(step), step + 1);
}

float OptimizerConfig::clipped_scale(double sum_sq, float grad_scale) const {
  const double factor = kernels::clip_factor(sum_sq, grad_scale, grad_clip);
  return factor == 1.0 ? grad_scale : static_cast<float>(double(grad_scale) * factor);
}

Optimizer::Optimizer(size_t n_params, OptimizerConfig config)
    : config_(config),
      n_params_(n_params),
      owned_(config.n_buffers() * n_params, 0.0f),
      state_(owned_) {}

std::span<float> Optimizer::buffer(size_t j) { return state_.subspan(j * n_params_, n_params_); }
std::span<const float> Optimizer::buffer(size_t j) const {
  return state_.subspan(j * n_params_, n_params_);
}

void Optimizer::step(std::span<float> params, std::span<const float> grads, float grad_scale,
                     uint64_t step, size_t offset) {
  RESYNC_CHECK_ARG(offset + params.size() <= n_params_,
                   fmt::format("optimizer: slice [{}, {}) of {} parameters", offset,
                               offset + params.size(), n_params_));
  const size_t n = params.size();
  const float scale = config_.grad_clip > 0
                          ? config_.clipped_scale(kernels::sum_of_squares(grads), grad_scale)
                          : grad_scale;
  if (config_.kind == OptimizerKind::kAdamW) {
    kernels::adamw_update(params, buffer(0).subspan(offset, n), buffer(1).subspan(offset, n),
                          grads, scale, config_.adamw_at(step));
  } else {
    kernels::sgd_momentum_update(params, buffer(0).subspan(offset, n), grads, scale,
                                 config_.sgd_at(step));
  }
}

void Optimizer::apply_update_from_state(std::span<float> params, uint64_t step) const {
  if (config_.kind == OptimizerKind::kAdamW) {
    kernels::adamw_apply_moments(params, buffer(0), buffer(1), config_.adamw_at(step));
  } else {
    kernels::sgd_apply_velocity(params, buffer(0), config_.lr_at(step));
  }
}

void Optimizer::place_state(std::span<float> storage) {
  RESYNC_CHECK_ARG(storage.size() >= state_.size(),
                   fmt::format("optimizer: state storage of {} floats for {} buffer(s) of {}",
                               storage.size(), n_buffers(), n_params_));
  storage = storage.first(state_.size());
  // memmove: placing again into storage that overlaps the current one is allowed.
  if (!storage.empty() && storage.data() != state_.data()) {
    std::memmove(storage.data(), state_.data(), state_.size_bytes());
  }
  state_ = storage;
  owned_.clear();
  owned_.shrink_to_fit();
}

}  // namespace resync::runtime
