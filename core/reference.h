// The CPU reference transformer: GPT-2 (pre-LN, learned positions, tied embeddings, GELU-tanh)
// with the barrier objective, forward and backward written by hand for every op.  Templated on
// Real: double for gradient checks, float for speed.  See ../shared/docs/barrier-spec.md.
//
// One forward:   e = wte[x] + wpe[t] (+ noise)
//                for each layer: h += attn(LN1(h)); h += mlp(LN2(h))
//                logits = LNf(h) wte^T;   CE = mean -log softmax(logits)[target]
//                R = mean phi(det J_t) over batch x barrier layers x heads x counted positions
//                L = CE + lambda R
// The backward runs the same sequence in reverse; the barrier's gradient enters through q and k.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/config.h"
#include "core/params.h"

namespace blm {

template <class Real>
class ReferenceModel {
 public:
  ReferenceModel(const ModelConfig& model, const BarrierConfig& barrier);

  const ParamLayout& layout() const { return layout_; }

  // Runs the forward pass and keeps the activations the backward needs.
  // params: layout().total() values.  batch.targets may be null (then ce = 0, no loss).
  LossTerms forward(const Real* params, const Batch& batch, const ForwardOptions& opts);
  // The same forward, bit for bit, keeping only what the loss, the logits, the barrier and the
  // margins need: every layer's activations but q, k, v share one layer's buffers, so no backward
  // can follow (evaluation, sampling, margins).
  LossTerms evaluate(const Real* params, const Batch& batch, const ForwardOptions& opts);
  // Gradient of the last forward's loss, times opts.grad_scale, into grads (layout().total()),
  // written over or added to per opts.accumulate.  Needs the forward to have had targets.
  void backward(const Real* params, Real* grads);
  // forward then backward, the same results bit for bit, with the barrier's gradient computed
  // in the forward by the same call that computes the barrier (barrier_head_forward_backward):
  // the barrier's products and LUs are built once a step instead of twice.
  LossTerms forward_backward(const Real* params, const Batch& batch, const ForwardOptions& opts,
                             Real* grads);
  // Logits of the last forward: [B, T, V].
  const std::vector<Real>& logits() const;
  // Margins of the last forward (every layer and head).
  Margins margins(const Real* params, const Batch& batch);

 private:
  struct Activations;
  // forward's work; barrier_gradient (forward_backward): the barrier's calls also compute its
  // gradient, kept for the backward.
  // keep_all false: evaluate's buffers.
  LossTerms run_forward(const Real* params, const Batch& batch, const ForwardOptions& opts,
                        bool barrier_gradient, bool keep_all);
  ModelConfig model_;
  BarrierConfig barrier_;
  ParamLayout layout_;
  std::shared_ptr<Activations> acts_;
};

// Throws blm::Error naming the problem (row, position, token) when a batch does not fit the
// model: empty, longer than seq_len, or a token outside [0, vocab_size).
void check_batch(const Batch& batch, const ModelConfig& m);

// Gradient-check helper: loss of one forward, in Real, for finite differences.
template <class Real>
double reference_loss(ReferenceModel<Real>& m, const std::vector<Real>& params, const Batch& batch,
                      const ForwardOptions& opts) {
  return m.forward(params.data(), batch, opts).loss;
}

}  // namespace blm
