// AdamW, gradient clipping and the learning-rate schedule (see core/optim.h for the formulas).
#include "core/optim.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/ops_cpu.h"

namespace blm {

void validate_schedule(const TrainConfig& tc) {
  if (tc.schedule != "cosine" && tc.schedule != "linear" && tc.schedule != "constant")
    throw ConfigError("train.schedule: '" + tc.schedule + "' is not one of cosine, linear, constant");
}

double lr_at(int64_t step, const TrainConfig& tc) {
  validate_schedule(tc);
  if (step < tc.warmup) return tc.lr * static_cast<double>(step + 1) / tc.warmup;
  if (tc.schedule == "constant") return tc.lr;
  const double lr_min = tc.lr * tc.min_lr_ratio;
  const int64_t span = static_cast<int64_t>(tc.steps) - 1 - tc.warmup;
  // span <= 0: the warmup covers every step but the last (or all): decay is already complete.
  const double p =
      span > 0 ? std::min(1.0, std::max(0.0, static_cast<double>(step - tc.warmup) / span)) : 1.0;
  if (tc.schedule == "cosine") return lr_min + (tc.lr - lr_min) * 0.5 * (1.0 + std::cos(M_PI * p));
  return tc.lr - (tc.lr - lr_min) * p;  // linear
}

double clip_scale(double grad_norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  return std::min(1.0, max_norm / (grad_norm + 1e-6));
}

AdamWScalars adamw_scalars(const AdamWHyper& h, double lr, int64_t t, double clip) {
  AdamWScalars s;
  s.decay_factor = 1.0 - lr * h.weight_decay;
  s.step_size = lr / (1.0 - std::pow(h.beta1, static_cast<double>(t)));
  s.bc2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(t)));
  s.beta1 = h.beta1;
  s.beta2 = h.beta2;
  s.eps = h.eps;
  s.grad_scale = clip;
  return s;
}

template <class Real>
void adamw_update(Real* p, const Real* g, Real* m, Real* v, size_t n, bool decay,
                  const AdamWScalars& s) {
  const Real b1 = Real(s.beta1), b2 = Real(s.beta2), one = Real(1);
  const Real gs = Real(s.grad_scale), df = decay ? Real(s.decay_factor) : one;
  const Real step = Real(s.step_size), bc2 = Real(s.bc2_sqrt), eps = Real(s.eps);
#pragma omp parallel for schedule(static) if (ops::worth_parallel(n))
  for (size_t i = 0; i < n; ++i) {
    const Real gi = g[i] * gs;
    Real pi = p[i] * df;
    const Real mi = b1 * m[i] + (one - b1) * gi;
    const Real vi = b2 * v[i] + (one - b2) * gi * gi;
    pi -= step * mi / (std::sqrt(vi) / bc2 + eps);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

template <class Real>
void adamw_step(const ParamLayout& layout, Real* params, const Real* grads, Real* m, Real* v,
                int64_t& t, const AdamWHyper& h, double lr, double clip) {
  ++t;
  const AdamWScalars s = adamw_scalars(h, lr, t, clip);
  for (const TensorSpec& ts : layout.tensors())
    adamw_update(params + ts.offset, grads + ts.offset, m + ts.offset, v + ts.offset, ts.size,
                 ts.decay, s);
}

template <class Real>
double global_norm(const Real* g, size_t n) {
  // A fixed number of chunks (set by n alone) summed in parallel, then the partial sums in chunk
  // order: the same result for any number of threads, and nothing allocated.
  constexpr size_t kChunks = 64;
  const size_t len = (n + kChunks - 1) / kChunks;
  double partial[kChunks] = {};
#pragma omp parallel for schedule(static) if (ops::worth_parallel(n))
  for (size_t c = 0; c < kChunks; ++c) {
    double s = 0;
    const size_t end = std::min(n, (c + 1) * len);
    for (size_t i = c * len; i < end; ++i) s += static_cast<double>(g[i]) * g[i];
    partial[c] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

template void adamw_update<float>(float*, const float*, float*, float*, size_t, bool, const AdamWScalars&);
template void adamw_update<double>(double*, const double*, double*, double*, size_t, bool, const AdamWScalars&);
template void adamw_step<float>(const ParamLayout&, float*, const float*, float*, float*, int64_t&,
                                const AdamWHyper&, double, double);
template void adamw_step<double>(const ParamLayout&, double*, const double*, double*, double*,
                                 int64_t&, const AdamWHyper&, double, double);
template double global_norm<float>(const float*, size_t);
template double global_norm<double>(const double*, size_t);

}  // namespace blm
