// ReferenceModel: the CPU reference GPT with the barrier objective (core/reference.h,
// ../shared/docs/barrier-spec.md).  The forward keeps every activation the backward needs; the
// backward runs the ops of core/ops_cpu.h in reverse.  The barrier (core/barrier.h) is evaluated
// per (layer, sequence, head) on that head's q, k after the forward, and its gradient is added to
// dq, dk of the head before the attention's gradient flows on into the qkv projection.
//
// Shapes: N = B*T rows; d = d_model, H heads of dh = d/H; V = vocab_size.
// All buffers keep their capacity between calls: a steady-state training step allocates nothing.
#include "core/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/barrier.h"
#include "core/barrier_fused.h"
#include "core/error.h"
#include "core/ops_cpu.h"

namespace blm {

// The state of one forward (activations, a copy of the batch) and the backward's buffers, with
// the per-block passes as methods.  P is the parameter buffer, G the gradient buffer.
template <class Real>
struct ReferenceModel<Real>::Activations {
  struct Layer {
    std::vector<Real> ln1, ln1_mean, ln1_rstd;  // [N, d], [N], [N]  LN1 output and statistics
    std::vector<Real> qkv;                      // [N, 3d]  q, k, v with bias
    std::vector<Real> att;                      // [B, H, T, T]  causal softmax (zero for s > t)
    std::vector<Real> atty;                     // [N, d]  attention output, heads concatenated
    std::vector<Real> ln2, ln2_mean, ln2_rstd;  // [N, d], [N], [N]
    std::vector<Real> fc;                       // [N, 4d]  before GELU
    std::vector<Real> fca;                      // [N, 4d]  after GELU
  };

  // Own copies, so that nothing here refers into the model object.
  Activations(const ModelConfig& m, const BarrierConfig& b) : model(m), barrier(b), layout(m) {}
  const ModelConfig model;
  const BarrierConfig barrier;
  const ParamLayout layout;

  int B = 0, T = 0, N = 0;
  bool ready = false;        // a forward ran
  bool kept = true;          // ... keeping every layer's activations (else evaluate: no backward)
  bool has_targets = false;  // ... with targets: backward allowed
  std::vector<int32_t> inputs, targets;  // [N] copies: the backward runs after the caller's batch
  std::vector<uint8_t> mask;             // [N] copy of opts.barrier_mask, empty when null
  Real grad_scale = 1;
  bool accumulate = false;
  double barrier_grad_scale = 0;  // lambda / N_R: nonzero when the barrier adds a gradient
  bool barrier_in_forward = false;  // forward_backward: the barrier's gradient from the forward
  std::vector<Real> barrier_dqk;    // ... [L, N, 2d]: layer l's dq (columns [0, d)), dk ([d, 2d))

  std::vector<Real> res;  // [2L+1, N, d]  residual stream: res[0] = embedding, res[2l+1] after
                          // layer l's attention, res[2l+2] after its MLP
  std::vector<Layer> layers;
  std::vector<Real> lnf, lnf_mean, lnf_rstd;  // [N, d], [N], [N]
  std::vector<Real> logits, lse;              // [N, V], [N]
  std::vector<double> row_loss;               // [N]
  std::vector<Real> proj;                     // [N, d]  a block's output before the residual add

  // Backward buffers.
  std::vector<Real> dres, dln, datty;  // [N, d]
  std::vector<Real> dqkv;              // [N, 3d]
  std::vector<Real> dfc;               // [N, 4d]
  std::vector<Real> dlogits;           // [N, V]
  std::vector<Real> attn_scratch;      // [T, T]

  // One head's q, k gathered contiguous for the barrier, their gradients, per-position outputs.
  std::vector<Real> qh, kh, dqh, dkh, logdet_h, margin_h;  // [T, dh] x 4, [T] x 2

  int d() const { return model.d_model; }
  int dh() const { return model.head_dim(); }
  size_t Nd() const { return static_cast<size_t>(N) * d(); }
  Real* res_at(int i) { return res.data() + static_cast<size_t>(i) * Nd(); }
  ops::AttentionShape attention_shape() const { return {B, T, model.n_head, dh()}; }
  const uint8_t* sequence_mask(int b) const {
    return mask.empty() ? nullptr : mask.data() + static_cast<size_t>(b) * T;
  }

  // Sizes every forward buffer for a [B, T] batch.  resize() keeps the capacity, so repeated
  // batches of one shape allocate nothing.  keep_all false (evaluate): every layer runs in layer
  // 0's buffers but for its q, k, v, which the barrier and the margins read after the network;
  // at GPT-2 small that is 11 of 12 layers' [B, H, T, T] attention and [N, 4d] MLP activations
  // not held.  Buffers a training step sized stay allocated (and unused) for the next step.
  void prepare(int B_, int T_, bool keep_all) {
    B = B_;
    T = T_;
    N = B * T;
    kept = keep_all;
    const size_t n = N, dd = d(), dhh = dh();
    res.resize((2 * model.n_layer + 1) * n * dd);
    layers.resize(model.n_layer);
    for (size_t l = 0; l < layers.size(); ++l) {
      Layer& L = layers[l];
      L.qkv.resize(n * 3 * dd);
      if (!keep_all && l > 0) continue;
      for (auto* v : {&L.ln1, &L.atty, &L.ln2}) v->resize(n * dd);
      for (auto* v : {&L.ln1_mean, &L.ln1_rstd, &L.ln2_mean, &L.ln2_rstd}) v->resize(n);
      L.att.resize(static_cast<size_t>(B) * model.n_head * T * T);
      L.fc.resize(n * 4 * dd);
      L.fca.resize(n * 4 * dd);
    }
    lnf.resize(n * dd);
    lnf_mean.resize(n);
    lnf_rstd.resize(n);
    logits.resize(n * model.vocab_size);
    lse.resize(n);
    row_loss.resize(n);
    proj.resize(n * dd);
    for (auto* v : {&qh, &kh, &dqh, &dkh}) v->resize(static_cast<size_t>(T) * dhh);
    logdet_h.resize(T);
    margin_h.resize(T);
  }

  // Keeps what the backward needs from the batch and the options.
  void remember(const Batch& batch, const ForwardOptions& opts) {
    inputs.assign(batch.inputs, batch.inputs + N);
    has_targets = batch.targets != nullptr;
    if (has_targets) targets.assign(batch.targets, batch.targets + N);
    if (opts.barrier_mask) mask.assign(opts.barrier_mask, opts.barrier_mask + N);
    else mask.clear();
    grad_scale = static_cast<Real>(opts.grad_scale);
    accumulate = opts.accumulate;
    barrier_grad_scale = 0;
    barrier_in_forward = false;
  }

  // ---------------------------------------------------------------- forward passes

  // Layer l:  mid = x + proj(attn(qkv(LN1(x))));  out = mid + fcproj(gelu(fc(LN2(mid))))
  void forward_layer(int l, const Real* P) {
    const LayerOffsets& o = layout.layer(l);
    Layer& L = kept ? layers[l] : layers[0];  // the layer's activations (shared when !kept)
    std::vector<Real>& qkv = layers[l].qkv;   // always the layer's own
    const int dd = d();
    const Real* x = res_at(2 * l);
    Real* mid = res_at(2 * l + 1);
    Real* out = res_at(2 * l + 2);
    ops::layernorm_forward(x, P + o.ln1_w, P + o.ln1_b, N, dd, L.ln1.data(), L.ln1_mean.data(),
                           L.ln1_rstd.data());
    ops::linear_forward(L.ln1.data(), P + o.qkv_w, P + o.qkv_b, N, dd, 3 * dd, qkv.data());
    ops::attention_forward(attention_shape(), qkv.data(), L.att.data(), L.atty.data());
    ops::linear_forward(L.atty.data(), P + o.proj_w, P + o.proj_b, N, dd, dd, proj.data());
    ops::residual_forward(x, proj.data(), Nd(), mid);
    ops::layernorm_forward(mid, P + o.ln2_w, P + o.ln2_b, N, dd, L.ln2.data(), L.ln2_mean.data(),
                           L.ln2_rstd.data());
    ops::linear_forward(L.ln2.data(), P + o.fc_w, P + o.fc_b, N, dd, 4 * dd, L.fc.data());
    ops::gelu_forward(L.fc.data(), L.fc.size(), L.fca.data());
    ops::linear_forward(L.fca.data(), P + o.fcproj_w, P + o.fcproj_b, N, 4 * dd, dd, proj.data());
    ops::residual_forward(mid, proj.data(), Nd(), out);
  }

  // Embedding, every layer, final LayerNorm, logits.
  void forward_network(const Real* P, const ForwardOptions& opts) {
    ops::embedding_forward(inputs.data(), B, T, d(), P + layout.wte(), P + layout.wpe(),
                           opts.noise_std, opts.noise_seed, res_at(0));
    for (int l = 0; l < model.n_layer; ++l) forward_layer(l, P);
    ops::layernorm_forward(res_at(2 * model.n_layer), P + layout.lnf_w(), P + layout.lnf_b(), N,
                           d(), lnf.data(), lnf_mean.data(), lnf_rstd.data());
    ops::logits_forward(lnf.data(), P + layout.wte(), N, d(), model.vocab_size, logits.data());
  }

  // Mean cross-entropy and top-1 counts into terms.
  void cross_entropy(LossTerms& terms) {
    terms.correct = ops::cross_entropy_forward(logits.data(), targets.data(), N, model.vocab_size,
                                               lse.data(), row_loss.data());
    double sum = 0;  // in row order: deterministic
    for (double r : row_loss) sum += r;
    terms.tokens = N;
    terms.ce = sum / N;
  }

  // Copies head h of sequence b out of qkv [N, 3d] into qh, kh [T, dh].
  void gather_head(const std::vector<Real>& qkv, int b, int h) {
    const int dd = d(), dhh = dh();
    for (int t = 0; t < T; ++t) {
      const Real* row = qkv.data() + (static_cast<size_t>(b) * T + t) * 3 * dd + h * dhh;
      std::copy(row, row + dhh, qh.data() + static_cast<size_t>(t) * dhh);
      std::copy(row + dd, row + dd + dhh, kh.data() + static_cast<size_t>(t) * dhh);
    }
  }

  // The terms R averages: per barrier layer, sequence and head, the counted positions (t >= 2,
  // in the mask when there is one); what the barrier's calls count, known before they run.
  int64_t barrier_term_count() const {
    int64_t per_layer = 0;
    for (int b = 0; b < B; ++b) {
      const uint8_t* m = sequence_mask(b);
      for (int t = 2; t < T; ++t) per_layer += (m == nullptr || m[t]) ? 1 : 0;
    }
    int64_t layers_on = 0;
    for (int l = 0; l < model.n_layer; ++l) layers_on += barrier.applies_to(l) ? 1 : 0;
    return per_layer * model.n_head * layers_on;
  }

  // R = (sum of phi over the counted terms) / N_R over every barrier layer, sequence and head.
  // With barrier_in_forward (and a weighted barrier) the same calls also give the gradient, kept
  // in barrier_dqk for the backward: the scale lambda / N_R must then be known first.
  void barrier_forward(LossTerms& terms) {
    const bool with_grad = barrier_in_forward && barrier.enabled() && has_targets;
    const int64_t expected = with_grad ? barrier_term_count() : 0;
    Real scale = 0;
    if (with_grad) {
      if (expected > 0) barrier_grad_scale = barrier.lambda / static_cast<double>(expected);
      scale = static_cast<Real>(barrier_grad_scale * static_cast<double>(grad_scale));
      // Each barrier layer's block is written whole below (no zeroing needed).
      barrier_dqk.resize(static_cast<size_t>(model.n_layer) * Nd() * 2);
    }
    double sum_phi = 0, min_logdet = std::numeric_limits<double>::infinity();
    int64_t count = 0;
    for (int l = 0; l < model.n_layer; ++l) {
      if (!barrier.applies_to(l)) continue;
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < model.n_head; ++h) {
          gather_head(layers[l].qkv, b, h);
          BarrierHeadOutput<Real> r;
          if (with_grad) {
            std::fill(dqh.begin(), dqh.end(), Real(0));
            std::fill(dkh.begin(), dkh.end(), Real(0));
            r = barrier_head_forward_backward<Real>(qh.data(), kh.data(), T, dh(), barrier.eps,
                                                    sequence_mask(b), scale, dqh.data(),
                                                    dkh.data(), nullptr, nullptr);
            scatter_head(dqh, dkh, b, h, 2 * d(), false, barrier_dqk.data() + l * Nd() * 2);
          } else {
            r = barrier_head_forward<Real>(qh.data(), kh.data(), T, dh(), barrier.eps,
                                           sequence_mask(b), nullptr, nullptr);
          }
          sum_phi += static_cast<double>(r.sum_phi);
          count += r.count;
          if (r.count > 0) min_logdet = std::min(min_logdet, static_cast<double>(r.min_logdet));
        }
    }
    if (with_grad && count != expected)
      throw Error("ReferenceModel: the barrier counted " + std::to_string(count) +
                  " terms, not the " + std::to_string(expected) + " expected");
    terms.barrier_terms = count;
    terms.barrier = count > 0 ? sum_phi / static_cast<double>(count) : 0.0;
    terms.min_logdet = count > 0 ? min_logdet : 0.0;
    if (barrier.enabled() && count > 0) barrier_grad_scale = barrier.lambda / static_cast<double>(count);
  }

  // ---------------------------------------------------------------- backward passes

  void prepare_backward(Real* G) {
    const size_t n = Nd();
    dres.assign(n, Real(0));
    dln.resize(n);
    datty.resize(n);
    dqkv.resize(n * 3);
    dfc.resize(n * 4);
    dlogits.resize(static_cast<size_t>(N) * model.vocab_size);
    if (!accumulate) std::fill(G, G + layout.total(), Real(0));
  }

  // Loss -> logits -> final LayerNorm: dres = d loss / d res[2L].
  void backward_head(const Real* P, Real* G) {
    const int V = model.vocab_size;
    ops::cross_entropy_backward(logits.data(), lse.data(), targets.data(), N, V,
                                grad_scale / static_cast<Real>(N), dlogits.data());
    ops::logits_backward(lnf.data(), P + layout.wte(), dlogits.data(), N, d(), V, dln.data(),
                         G + layout.wte());
    ops::layernorm_backward(res_at(2 * model.n_layer), P + layout.lnf_w(), lnf_mean.data(),
                            lnf_rstd.data(), dln.data(), N, d(), dres.data(), G + layout.lnf_w(),
                            G + layout.lnf_b());
  }

  // Layer l in reverse: dres holds d loss / d out on entry, d loss / d x on return (the residual
  // adds pass it through unchanged; the LayerNorm backwards add their part to it).
  void backward_layer(int l, const Real* P, Real* G) {
    const LayerOffsets& o = layout.layer(l);
    Layer& L = layers[l];
    const int dd = d();
    ops::linear_backward(L.fca.data(), P + o.fcproj_w, dres.data(), N, 4 * dd, dd, dfc.data(),
                         G + o.fcproj_w, G + o.fcproj_b);
    ops::gelu_backward(L.fc.data(), dfc.data(), dfc.size(), dfc.data());
    ops::linear_backward(L.ln2.data(), P + o.fc_w, dfc.data(), N, dd, 4 * dd, dln.data(),
                         G + o.fc_w, G + o.fc_b);
    ops::layernorm_backward(res_at(2 * l + 1), P + o.ln2_w, L.ln2_mean.data(), L.ln2_rstd.data(),
                            dln.data(), N, dd, dres.data(), G + o.ln2_w, G + o.ln2_b);
    ops::linear_backward(L.atty.data(), P + o.proj_w, dres.data(), N, dd, dd, datty.data(),
                         G + o.proj_w, G + o.proj_b);
    ops::attention_backward(attention_shape(), L.qkv.data(), L.att.data(), datty.data(),
                            dqkv.data(), attn_scratch);
    if (barrier_grad_scale != 0 && barrier.applies_to(l)) add_barrier_gradient(l);
    ops::linear_backward(L.ln1.data(), P + o.qkv_w, dqkv.data(), N, dd, 3 * dd, dln.data(),
                         G + o.qkv_w, G + o.qkv_b);
    ops::layernorm_backward(res_at(2 * l), P + o.ln1_w, L.ln1_mean.data(), L.ln1_rstd.data(),
                            dln.data(), N, dd, dres.data(), G + o.ln1_w, G + o.ln1_b);
  }

  // Adds (add) or copies head h of sequence b's dq, dk [T, dh] into rows of `stride` values: dq
  // at column h dh, dk at d + h dh (dqkv: stride 3d; barrier_dqk: 2d).
  void scatter_head(const std::vector<Real>& gq_h, const std::vector<Real>& gk_h, int b, int h,
                    int stride, bool add, Real* out) const {
    const int dd = d(), dhh = dh();
    for (int t = 0; t < T; ++t) {
      Real* row = out + (static_cast<size_t>(b) * T + t) * stride + h * dhh;
      const Real* gq = gq_h.data() + static_cast<size_t>(t) * dhh;
      const Real* gk = gk_h.data() + static_cast<size_t>(t) * dhh;
      for (int i = 0; i < dhh; ++i) {
        row[i] = add ? row[i] + gq[i] : gq[i];
        row[dd + i] = add ? row[dd + i] + gk[i] : gk[i];
      }
    }
  }

  // Adds lambda / N_R * grad_scale * d(sum of counted phi)/d(q, k) of every head of layer l into
  // dqkv [N, 3d] (the attention's gradient is already there: the two add before the qkv backward):
  // from barrier_dqk when the forward computed it, else by the barrier's backward calls.
  void add_barrier_gradient(int l) {
    const int dd = d();
    if (barrier_in_forward) {
      const Real* g = barrier_dqk.data() + l * Nd() * 2;
      for (int n = 0; n < N; ++n) {
        Real* row = dqkv.data() + static_cast<size_t>(n) * 3 * dd;
        const Real* src = g + static_cast<size_t>(n) * 2 * dd;
        for (int i = 0; i < 2 * dd; ++i) row[i] += src[i];
      }
      return;
    }
    const Real scale = static_cast<Real>(barrier_grad_scale * static_cast<double>(grad_scale));
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < model.n_head; ++h) {
        gather_head(layers[l].qkv, b, h);
        std::fill(dqh.begin(), dqh.end(), Real(0));
        std::fill(dkh.begin(), dkh.end(), Real(0));
        barrier_head_backward<Real>(qh.data(), kh.data(), T, dh(), barrier.eps, sequence_mask(b),
                                    scale, dqh.data(), dkh.data());
        scatter_head(dqh, dkh, b, h, 3 * dd, true, dqkv.data());
      }
  }

  // ---------------------------------------------------------------- margins

  // logdet and sigma_min of every (sequence, layer, head, position) of the last forward.
  Margins margins() {
    Margins M;
    M.B = B;
    M.L = model.n_layer;
    M.H = model.n_head;
    M.T = T;
    const size_t total = static_cast<size_t>(M.B) * M.L * M.H * M.T;
    M.sigma_min.resize(total);
    M.logdet.resize(total);
    for (int l = 0; l < M.L; ++l)
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < M.H; ++h) {
          gather_head(layers[l].qkv, b, h);
          barrier_head_forward<Real>(qh.data(), kh.data(), T, dh(), barrier.eps, nullptr,
                                     logdet_h.data(), margin_h.data());
          for (int t = 0; t < T; ++t) {
            M.at(M.logdet, b, l, h, t) = static_cast<float>(logdet_h[t]);
            M.at(M.sigma_min, b, l, h, t) = static_cast<float>(margin_h[t]);
          }
        }
    return M;
  }
};

// Throws blm::Error naming the problem when a batch does not fit the model.
void check_batch(const Batch& batch, const ModelConfig& m) {
  if (batch.B <= 0 || batch.T <= 0 || !batch.inputs)
    throw Error("batch: empty (B = " + std::to_string(batch.B) + ", T = " + std::to_string(batch.T) + ")");
  if (batch.T > m.seq_len)
    throw Error("batch: sequence length " + std::to_string(batch.T) + " exceeds model.seq_len " +
                std::to_string(m.seq_len));
  const size_t N = static_cast<size_t>(batch.B) * batch.T;
  auto check_ids = [&](const int32_t* ids, const char* what) {
    for (size_t i = 0; i < N; ++i)
      if (ids[i] < 0 || ids[i] >= m.vocab_size)
        throw Error(std::string("batch: ") + what + " token " + std::to_string(ids[i]) + " at row " +
                    std::to_string(i / batch.T) + ", position " + std::to_string(i % batch.T) +
                    " is outside the vocabulary [0, " + std::to_string(m.vocab_size) + ")");
  };
  check_ids(batch.inputs, "input");
  if (batch.targets) check_ids(batch.targets, "target");
}

template <class Real>
ReferenceModel<Real>::ReferenceModel(const ModelConfig& model, const BarrierConfig& barrier)
    : model_(model), barrier_(barrier), layout_(model) {
  validate(model_);
  acts_ = std::make_shared<Activations>(model_, barrier_);
}

template <class Real>
LossTerms ReferenceModel<Real>::forward(const Real* P, const Batch& batch, const ForwardOptions& opts) {
  return run_forward(P, batch, opts, false, true);
}

template <class Real>
LossTerms ReferenceModel<Real>::evaluate(const Real* P, const Batch& batch,
                                         const ForwardOptions& opts) {
  return run_forward(P, batch, opts, false, false);
}

template <class Real>
LossTerms ReferenceModel<Real>::run_forward(const Real* P, const Batch& batch,
                                            const ForwardOptions& opts, bool barrier_gradient,
                                            bool keep_all) {
  check_batch(batch, model_);
  Activations& a = *acts_;
  a.prepare(batch.B, batch.T, keep_all);
  a.remember(batch, opts);
  a.barrier_in_forward = barrier_gradient;
  a.forward_network(P, opts);
  LossTerms terms;
  if (a.has_targets) a.cross_entropy(terms);
  // The barrier costs nothing unless it is weighted or reported.  Without targets (sampling,
  // margins) there is no loss, so it runs only when asked to report.
  if (opts.report_barrier || (barrier_.enabled() && a.has_targets)) a.barrier_forward(terms);
  terms.loss = terms.ce + barrier_.lambda * terms.barrier;
  a.ready = true;
  return terms;
}

template <class Real>
const std::vector<Real>& ReferenceModel<Real>::logits() const {
  return acts_->logits;
}

template <class Real>
void ReferenceModel<Real>::backward(const Real* P, Real* G) {
  Activations& a = *acts_;
  if (!a.ready || !a.has_targets)
    throw Error("ReferenceModel::backward: the last forward had no targets (no loss to differentiate)");
  if (!a.kept)
    throw Error("ReferenceModel::backward: the last forward was evaluate(), which keeps no "
                "activations for a backward");
  a.prepare_backward(G);
  a.backward_head(P, G);
  for (int l = model_.n_layer - 1; l >= 0; --l) a.backward_layer(l, P, G);
  ops::embedding_backward(a.inputs.data(), a.B, a.T, a.d(), a.dres.data(), G + layout_.wte(),
                          G + layout_.wpe());
}

template <class Real>
LossTerms ReferenceModel<Real>::forward_backward(const Real* P, const Batch& batch,
                                                 const ForwardOptions& opts, Real* G) {
  if (!batch.targets)
    throw Error("ReferenceModel::forward_backward: the batch has no targets (no loss to differentiate)");
  const LossTerms terms = run_forward(P, batch, opts, true, true);
  backward(P, G);
  return terms;
}

template <class Real>
Margins ReferenceModel<Real>::margins(const Real* P, const Batch& batch) {
  Batch plain = batch;
  plain.targets = nullptr;  // no loss, no barrier term: only every layer's q, k are needed
  evaluate(P, plain, ForwardOptions());
  return acts_->margins();
}

template class ReferenceModel<float>;
template class ReferenceModel<double>;

}  // namespace blm
