// The optimizer pieces every backend shares: the learning-rate schedule, global-norm gradient
// clipping and AdamW, each exactly as PyTorch computes it (torch.optim.AdamW with decoupled weight
// decay, torch.nn.utils.clip_grad_norm_).  The CUDA backend's host side uses lr_at, clip_scale
// and adamw_scalars so both backends apply the same numbers; the element update is the CPU one.
//
// One optimizer step t (1-based, counted after the increment) for each parameter p, gradient g:
//     g  <- g * clip_scale
//     p  <- p * (1 - lr * wd)                 (only tensors whose TensorSpec::decay is set)
//     m  <- beta1 m + (1 - beta1) g
//     v  <- beta2 v + (1 - beta2) g^2
//     p  <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/backend.h"
#include "core/config.h"
#include "core/params.h"

namespace blm {

// Learning rate of optimizer step `step` (0-based):
//   step < warmup:  lr * (step + 1) / warmup
//   then "cosine":  lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2
//        "linear":  lr - (lr - lr_min) * p
//        "constant": lr
// with lr_min = lr * min_lr_ratio and p = (step - warmup) / (steps - 1 - warmup) clamped to
// [0, 1], so the decay starts at lr right after the warmup and reaches lr_min at the last step
// (steps - 1); later steps (a run extended past its schedule) stay at lr_min.
// Throws ConfigError for an unknown schedule.
double lr_at(int64_t step, const TrainConfig& tc);

// Throws ConfigError unless tc.schedule is cosine, linear or constant.
void validate_schedule(const TrainConfig& tc);

// Gradient multiplier of global-norm clipping: min(1, max_norm / (norm + 1e-6)); 1 when
// max_norm <= 0 (clipping disabled).
double clip_scale(double grad_norm, double max_norm);

// The per-step scalars of AdamW step t (t >= 1, counted after the increment).
struct AdamWScalars {
  double decay_factor;   // 1 - lr * weight_decay (applied to decay tensors only)
  double step_size;      // lr / (1 - beta1^t)
  double bc2_sqrt;       // sqrt(1 - beta2^t)
  double beta1, beta2, eps;
  double grad_scale;     // clip_scale
};
AdamWScalars adamw_scalars(const AdamWHyper& h, double lr, int64_t t, double clip_scale);

// The element update over n values of one tensor (decay: whether p *= decay_factor first).
// Deterministic, OpenMP-parallel over elements.
template <class Real>
void adamw_update(Real* p, const Real* g, Real* m, Real* v, size_t n, bool decay,
                  const AdamWScalars& s);

// One AdamW step over a whole parameter buffer in the layout of core/params.h: increments t,
// then updates every tensor with its own decay flag.
template <class Real>
void adamw_step(const ParamLayout& layout, Real* params, const Real* grads, Real* m, Real* v,
                int64_t& t, const AdamWHyper& h, double lr, double clip_scale);

// Global L2 norm sqrt(sum g^2), accumulated in double in a fixed order (deterministic).
template <class Real>
double global_norm(const Real* g, size_t n);

}  // namespace blm
