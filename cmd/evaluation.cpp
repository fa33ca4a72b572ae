// Validation passes of evaluation.h: token-weighted CE and accuracy over fixed batches, and the
// smallest stability margin of one batch.
#include "cmd/evaluation.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/rng.h"

namespace blm {

EvalPlan plan_eval(const TokenStream& stream, int T, int preferred_B, int max_batches,
                   const std::string& what) {
  const int windows = eval_batch_count(stream, T, 1);
  if (windows < 1)
    throw DataError(what + " holds " + std::to_string(stream.size()) +
                    " tokens, fewer than one sequence of seq_len + 1 = " + std::to_string(T + 1));
  EvalPlan p;
  p.T = T;
  p.B = std::max(1, std::min(preferred_B, windows));
  p.batches = std::max(1, std::min(max_batches, eval_batch_count(stream, T, p.B)));
  return p;
}

EvalPlan plan_validation(const TokenStream& stream, int T, const TrainConfig& train, int world,
                         const std::string& what, int max_batches) {
  const int micro_rows = train.batch_size / (train.grad_accum * world);
  // In 64 bits: --batches may be near INT_MAX before it is multiplied.
  const int64_t micro_batches = static_cast<int64_t>(max_batches > 0 ? max_batches
                                                                    : train.eval_batches) *
                                train.grad_accum * world;
  return plan_eval(stream, T, micro_rows,
                   static_cast<int>(std::min<int64_t>(micro_batches, INT_MAX)), what);
}

EvalResult evaluate(Backend& backend, const TokenStream& stream, const EvalPlan& plan,
                    double noise_std, uint64_t noise_seed,
                    const std::function<void()>& after_batch) {
  std::vector<int32_t> inputs, targets;
  double ce_sum = 0;
  int64_t correct = 0, tokens = 0;
  for (int i = 0; i < plan.batches; ++i) {
    if (!eval_batch(stream, plan.T, plan.B, i, inputs, targets)) break;
    Batch batch{plan.B, plan.T, inputs.data(), targets.data()};
    ForwardOptions opts;
    opts.noise_std = noise_std;
    opts.noise_seed = hash2(noise_seed, static_cast<uint64_t>(i));
    const LossTerms t = backend.forward(batch, opts);
    ce_sum += t.ce * static_cast<double>(t.tokens);  // token-weighted mean over batches
    correct += t.correct;
    tokens += t.tokens;
    if (after_batch) after_batch();
  }
  EvalResult r;
  r.tokens = tokens;
  r.ce = tokens ? ce_sum / static_cast<double>(tokens) : NAN;
  r.accuracy = tokens ? static_cast<double>(correct) / static_cast<double>(tokens) : NAN;
  return r;
}

double tokens_per_byte(const TokenStream& stream, const EvalPlan& plan, const Tokenizer& tok) {
  if (tok.is_bytes()) return 1.0;
  if (!tok.decodes_to_text()) return NAN;
  std::vector<int32_t> inputs, targets;
  int64_t tokens = 0, bytes = 0;
  for (int i = 0; i < plan.batches && eval_batch(stream, plan.T, plan.B, i, inputs, targets); ++i)
    for (int32_t t : targets) {
      ++tokens;
      bytes += static_cast<int64_t>(tok.decode_token(t).size());
    }
  return bytes > 0 ? static_cast<double>(tokens) / static_cast<double>(bytes) : NAN;
}

double smallest_margin(const Margins& m, const BarrierConfig& barrier) {
  double best = INFINITY;
  for (int b = 0; b < m.B; ++b)
    for (int l = 0; l < m.L; ++l) {
      if (!barrier.applies_to(l)) continue;
      for (int h = 0; h < m.H; ++h)
        for (int t = 2; t < m.T; ++t) best = std::min(best, double(m.at(m.sigma_min, b, l, h, t)));
    }
  return std::isfinite(best) ? best : NAN;
}

Margins first_batch_margins(Backend& backend, const TokenStream& stream, const EvalPlan& plan) {
  std::vector<int32_t> inputs, targets;
  if (!eval_batch(stream, plan.T, plan.B, 0, inputs, targets))
    throw DataError("no evaluation batch of " + std::to_string(plan.B) + " sequences");
  Batch batch{plan.B, plan.T, inputs.data(), targets.data()};
  return backend.margins(batch);
}

}  // namespace blm
