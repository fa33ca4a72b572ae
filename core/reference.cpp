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
#include "core/error.h"
#include "core/ops_cpu.h"

namespace blm {

template <class Real>
struct ReferenceModel<Real>::Activations {
  struct Layer {
    std::vector<Real> ln1, ln1_mean, ln1_rstd;  // [N, d], [N], [N]  LN1 output and statistics
    std::vector<Real> qkv;                      // [N, 3d]  q, k, v with bias
    std::vector<Real> att;                      // [B, H, T, T]  causal softmax (s <= t)
    std::vector<Real> atty;                     // [N, d]  attention output, heads concatenated
    std::vector<Real> ln2, ln2_mean, ln2_rstd;  // [N, d], [N], [N]
    std::vector<Real> fc;                       // [N, 4d]  before GELU
    std::vector<Real> fca;                      // [N, 4d]  after GELU
  };

  int B = 0, T = 0;
  bool ready = false;        // a forward ran
  bool has_targets = false;  // ... with targets: backward allowed
  std::vector<int32_t> inputs, targets;  // [N] copies: the backward runs after the caller's batch
  std::vector<uint8_t> mask;             // [N] copy of opts.barrier_mask, empty when null
  Real grad_scale = 1;
  bool accumulate = false;
  double barrier_grad_scale = 0;  // lambda / N_R: nonzero when the barrier adds a gradient

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
  std::vector<Real> attn_scratch;      // threads x T

  // One head's q, k gathered contiguous for the barrier, their gradients, per-position outputs.
  std::vector<Real> qh, kh, dqh, dkh, logdet_h, margin_h;  // [T, dh] x 4, [T] x 2

  Real* res_at(int i, size_t Nd) { return res.data() + static_cast<size_t>(i) * Nd; }

  // Sizes every forward buffer for a [B, T] batch.  resize() keeps the capacity, so repeated
  // batches of one shape allocate nothing.
  void prepare(const ModelConfig& m, int B_, int T_) {
    B = B_;
    T = T_;
    const size_t N = static_cast<size_t>(B) * T, d = m.d_model, dh = m.head_dim();
    res.resize((2 * m.n_layer + 1) * N * d);
    layers.resize(m.n_layer);
    for (Layer& L : layers) {
      L.ln1.resize(N * d);
      L.ln1_mean.resize(N);
      L.ln1_rstd.resize(N);
      L.qkv.resize(N * 3 * d);
      L.att.resize(static_cast<size_t>(B) * m.n_head * T * T);
      L.atty.resize(N * d);
      L.ln2.resize(N * d);
      L.ln2_mean.resize(N);
      L.ln2_rstd.resize(N);
      L.fc.resize(N * 4 * d);
      L.fca.resize(N * 4 * d);
    }
    lnf.resize(N * d);
    lnf_mean.resize(N);
    lnf_rstd.resize(N);
    logits.resize(N * m.vocab_size);
    lse.resize(N);
    row_loss.resize(N);
    proj.resize(N * d);
    qh.resize(T * dh);
    kh.resize(T * dh);
    dqh.resize(T * dh);
    dkh.resize(T * dh);
    logdet_h.resize(T);
    margin_h.resize(T);
  }

  // Copies head h of sequence b out of qkv [N, 3d] into qh, kh [T, dh].
  void gather_head(const std::vector<Real>& qkv, int b, int h, int d, int dh) {
    for (int t = 0; t < T; ++t) {
      const Real* row = qkv.data() + (static_cast<size_t>(b) * T + t) * 3 * d + h * dh;
      std::copy(row, row + dh, qh.data() + static_cast<size_t>(t) * dh);
      std::copy(row + d, row + d + dh, kh.data() + static_cast<size_t>(t) * dh);
    }
  }

  // Adds lambda / N_R * grad_scale * d(sum of counted phi)/d(q, k) of every head of layer l into
  // dqkv [N, 3d] (the attention's gradient is already there: the two add before the qkv backward).
  void add_barrier_gradient(int l, const ModelConfig& m, double eps) {
    const int d = m.d_model, dh = m.head_dim();
    const Real scale = static_cast<Real>(barrier_grad_scale * static_cast<double>(grad_scale));
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < m.n_head; ++h) {
        gather_head(layers[l].qkv, b, h, d, dh);
        std::fill(dqh.begin(), dqh.end(), Real(0));
        std::fill(dkh.begin(), dkh.end(), Real(0));
        const uint8_t* seq_mask = mask.empty() ? nullptr : mask.data() + static_cast<size_t>(b) * T;
        barrier_head_backward<Real>(qh.data(), kh.data(), T, dh, eps, seq_mask, scale, dqh.data(),
                                    dkh.data());
        for (int t = 0; t < T; ++t) {
          Real* row = dqkv.data() + (static_cast<size_t>(b) * T + t) * 3 * d + h * dh;
          const Real* gq = dqh.data() + static_cast<size_t>(t) * dh;
          const Real* gk = dkh.data() + static_cast<size_t>(t) * dh;
          for (int i = 0; i < dh; ++i) {
            row[i] += gq[i];
            row[d + i] += gk[i];
          }
        }
      }
  }
};

namespace {

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

}  // namespace

template <class Real>
ReferenceModel<Real>::ReferenceModel(const ModelConfig& model, const BarrierConfig& barrier)
    : model_(model), barrier_(barrier), layout_(model), acts_(std::make_shared<Activations>()) {
  validate(model);
}

// ------------------------------------------------------------------ forward

template <class Real>
LossTerms ReferenceModel<Real>::forward(const Real* P, const Batch& batch, const ForwardOptions& opts) {
  check_batch(batch, model_);
  Activations& a = *acts_;
  const ModelConfig& m = model_;
  a.prepare(m, batch.B, batch.T);
  const int B = batch.B, T = batch.T, N = B * T, d = m.d_model, H = m.n_head, dh = m.head_dim();
  const int V = m.vocab_size;
  const size_t Nd = static_cast<size_t>(N) * d;

  a.inputs.assign(batch.inputs, batch.inputs + N);
  a.has_targets = batch.targets != nullptr;
  if (a.has_targets) a.targets.assign(batch.targets, batch.targets + N);
  if (opts.barrier_mask) a.mask.assign(opts.barrier_mask, opts.barrier_mask + N);
  else a.mask.clear();
  a.grad_scale = static_cast<Real>(opts.grad_scale);
  a.accumulate = opts.accumulate;
  a.barrier_grad_scale = 0;

  ops::embedding_forward(a.inputs.data(), B, T, d, P + layout_.wte(), P + layout_.wpe(),
                         opts.noise_std, opts.noise_seed, a.res_at(0, Nd));
  const ops::AttentionShape sh{B, T, H, dh};
  for (int l = 0; l < m.n_layer; ++l) {
    const LayerOffsets& o = layout_.layer(l);
    typename Activations::Layer& L = a.layers[l];
    const Real* x = a.res_at(2 * l, Nd);
    Real* mid = a.res_at(2 * l + 1, Nd);
    Real* out = a.res_at(2 * l + 2, Nd);
    // Attention block: mid = x + proj(attn(qkv(LN1(x))))
    ops::layernorm_forward(x, P + o.ln1_w, P + o.ln1_b, N, d, L.ln1.data(), L.ln1_mean.data(), L.ln1_rstd.data());
    ops::linear_forward(L.ln1.data(), P + o.qkv_w, P + o.qkv_b, N, d, 3 * d, L.qkv.data());
    ops::attention_forward(sh, L.qkv.data(), L.att.data(), L.atty.data());
    ops::linear_forward(L.atty.data(), P + o.proj_w, P + o.proj_b, N, d, d, a.proj.data());
    ops::residual_forward(x, a.proj.data(), Nd, mid);
    // MLP block: out = mid + fcproj(gelu(fc(LN2(mid))))
    ops::layernorm_forward(mid, P + o.ln2_w, P + o.ln2_b, N, d, L.ln2.data(), L.ln2_mean.data(), L.ln2_rstd.data());
    ops::linear_forward(L.ln2.data(), P + o.fc_w, P + o.fc_b, N, d, 4 * d, L.fc.data());
    ops::gelu_forward(L.fc.data(), L.fc.size(), L.fca.data());
    ops::linear_forward(L.fca.data(), P + o.fcproj_w, P + o.fcproj_b, N, 4 * d, d, a.proj.data());
    ops::residual_forward(mid, a.proj.data(), Nd, out);
  }
  ops::layernorm_forward(a.res_at(2 * m.n_layer, Nd), P + layout_.lnf_w(), P + layout_.lnf_b(), N, d,
                         a.lnf.data(), a.lnf_mean.data(), a.lnf_rstd.data());
  ops::logits_forward(a.lnf.data(), P + layout_.wte(), N, d, V, a.logits.data());

  LossTerms terms;
  if (a.has_targets) {
    terms.correct = ops::cross_entropy_forward(a.logits.data(), a.targets.data(), N, V, a.lse.data(),
                                               a.row_loss.data());
    double sum = 0;  // in row order: deterministic
    for (double r : a.row_loss) sum += r;
    terms.tokens = N;
    terms.ce = sum / N;
  }

  // The barrier costs nothing unless it is weighted or reported.  Without targets (sampling,
  // margins) there is no loss, so it runs only when asked to report.
  const bool want_barrier = opts.report_barrier || (barrier_.enabled() && a.has_targets);
  if (want_barrier) {
    double sum_phi = 0, min_logdet = std::numeric_limits<double>::infinity();
    int64_t count = 0;
    for (int l = 0; l < m.n_layer; ++l) {
      if (!barrier_.applies_to(l)) continue;
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
          a.gather_head(a.layers[l].qkv, b, h, d, dh);
          const uint8_t* mask = a.mask.empty() ? nullptr : a.mask.data() + static_cast<size_t>(b) * T;
          const BarrierHeadOutput<Real> r = barrier_head_forward<Real>(
              a.qh.data(), a.kh.data(), T, dh, barrier_.eps, mask, nullptr, nullptr);
          sum_phi += static_cast<double>(r.sum_phi);
          count += r.count;
          if (r.count > 0) min_logdet = std::min(min_logdet, static_cast<double>(r.min_logdet));
        }
    }
    terms.barrier_terms = count;
    terms.barrier = count > 0 ? sum_phi / static_cast<double>(count) : 0.0;
    terms.min_logdet = count > 0 ? min_logdet : 0.0;
    if (barrier_.enabled() && count > 0) a.barrier_grad_scale = barrier_.lambda / static_cast<double>(count);
  }
  terms.loss = terms.ce + barrier_.lambda * terms.barrier;
  a.ready = true;
  return terms;
}

template <class Real>
const std::vector<Real>& ReferenceModel<Real>::logits() const {
  return acts_->logits;
}

// ------------------------------------------------------------------ backward

template <class Real>
void ReferenceModel<Real>::backward(const Real* P, Real* G) {
  Activations& a = *acts_;
  if (!a.ready || !a.has_targets)
    throw Error("ReferenceModel::backward: the last forward had no targets (no loss to differentiate)");
  const ModelConfig& m = model_;
  const int B = a.B, T = a.T, N = B * T, d = m.d_model, H = m.n_head, dh = m.head_dim();
  const int V = m.vocab_size;
  const size_t Nd = static_cast<size_t>(N) * d;
  a.dres.assign(Nd, Real(0));
  a.dln.resize(Nd);
  a.datty.resize(Nd);
  a.dqkv.resize(Nd * 3);
  a.dfc.resize(Nd * 4);
  a.dlogits.resize(static_cast<size_t>(N) * V);
  if (!a.accumulate) std::fill(G, G + layout_.total(), Real(0));

  // Loss -> logits -> final LayerNorm -> residual stream.
  ops::cross_entropy_backward(a.logits.data(), a.lse.data(), a.targets.data(), N, V,
                              a.grad_scale / static_cast<Real>(N), a.dlogits.data());
  ops::logits_backward(a.lnf.data(), P + layout_.wte(), a.dlogits.data(), N, d, V, a.dln.data(),
                       G + layout_.wte());
  ops::layernorm_backward(a.res_at(2 * m.n_layer, Nd), P + layout_.lnf_w(), a.lnf_mean.data(),
                          a.lnf_rstd.data(), a.dln.data(), N, d, a.dres.data(), G + layout_.lnf_w(),
                          G + layout_.lnf_b());

  const ops::AttentionShape sh{B, T, H, dh};
  for (int l = m.n_layer - 1; l >= 0; --l) {
    const LayerOffsets& o = layout_.layer(l);
    typename Activations::Layer& L = a.layers[l];
    // MLP block: dres carries d loss / d out; the residual passes it to mid unchanged.
    ops::linear_backward(L.fca.data(), P + o.fcproj_w, a.dres.data(), N, 4 * d, d, a.dfc.data(),
                         G + o.fcproj_w, G + o.fcproj_b);
    ops::gelu_backward(L.fc.data(), a.dfc.data(), a.dfc.size(), a.dfc.data());
    ops::linear_backward(L.ln2.data(), P + o.fc_w, a.dfc.data(), N, d, 4 * d, a.dln.data(),
                         G + o.fc_w, G + o.fc_b);
    ops::layernorm_backward(a.res_at(2 * l + 1, Nd), P + o.ln2_w, L.ln2_mean.data(), L.ln2_rstd.data(),
                            a.dln.data(), N, d, a.dres.data(), G + o.ln2_w, G + o.ln2_b);
    // Attention block.
    ops::linear_backward(L.atty.data(), P + o.proj_w, a.dres.data(), N, d, d, a.datty.data(),
                         G + o.proj_w, G + o.proj_b);
    ops::attention_backward(sh, L.qkv.data(), L.att.data(), a.datty.data(), a.dqkv.data(), a.attn_scratch);
    if (a.barrier_grad_scale != 0 && barrier_.applies_to(l)) a.add_barrier_gradient(l, m, barrier_.eps);
    ops::linear_backward(L.ln1.data(), P + o.qkv_w, a.dqkv.data(), N, d, 3 * d, a.dln.data(),
                         G + o.qkv_w, G + o.qkv_b);
    ops::layernorm_backward(a.res_at(2 * l, Nd), P + o.ln1_w, L.ln1_mean.data(), L.ln1_rstd.data(),
                            a.dln.data(), N, d, a.dres.data(), G + o.ln1_w, G + o.ln1_b);
  }
  ops::embedding_backward(a.inputs.data(), B, T, d, a.dres.data(), G + layout_.wte(), G + layout_.wpe());
}

// ------------------------------------------------------------------ margins

template <class Real>
Margins ReferenceModel<Real>::margins(const Real* P, const Batch& batch) {
  Batch plain = batch;
  plain.targets = nullptr;  // no loss, no barrier term: only the activations are needed
  forward(P, plain, ForwardOptions());
  Activations& a = *acts_;
  const ModelConfig& m = model_;
  const int dh = m.head_dim();
  Margins M;
  M.B = batch.B;
  M.L = m.n_layer;
  M.H = m.n_head;
  M.T = batch.T;
  const size_t total = static_cast<size_t>(M.B) * M.L * M.H * M.T;
  M.sigma_min.resize(total);
  M.logdet.resize(total);
  for (int l = 0; l < m.n_layer; ++l)
    for (int b = 0; b < M.B; ++b)
      for (int h = 0; h < m.n_head; ++h) {
        a.gather_head(a.layers[l].qkv, b, h, m.d_model, dh);
        barrier_head_forward<Real>(a.qh.data(), a.kh.data(), M.T, dh, barrier_.eps, nullptr,
                                   a.logdet_h.data(), a.margin_h.data());
        for (int t = 0; t < M.T; ++t) {
          M.at(M.logdet, b, l, h, t) = static_cast<float>(a.logdet_h[t]);
          M.at(M.sigma_min, b, l, h, t) = static_cast<float>(a.margin_h[t]);
        }
      }
  return M;
}

template class ReferenceModel<float>;
template class ReferenceModel<double>;

}  // namespace blm
