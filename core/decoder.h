// Incremental decoding on the CPU (for `barrierlm sample`): the model's forward for new tokens
// appended to a sequence, with every layer's keys and values of the earlier tokens kept, so a
// token costs O(n d + d^2) instead of a whole forward of the n tokens before it.
//
// append(tokens, m, logits) runs the m new tokens at positions n .. n + m - 1 (n = length()):
//   x = wte[token] + wpe[position]                                   [m, d]
//   per layer: qkv = LN1(x) W_qkv^T + b;  K, V caches += k, v rows      [m, 3d] -> cache [n+m, d]
//              x += proj(softmax_{s <= t}(q_t . k_s / sqrt(dh)) v)      per head, causal over
//                                                                       the cache
//              x += W_2 gelu(W_1 LN2(x) + b_1) + b_2
//   logits = LN_f(x_last) wte^T                                       [V], the last new token
// which is ReferenceModel's forward restricted to the new rows: the same values up to the
// summation order of the products (tests/test_model.cpp holds them to the full forward's).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/ops_cpu.h"
#include "core/params.h"

namespace blm {

template <class Real>
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const ParamLayout& layout) : layout_(layout) {}

  int length() const { return n_; }
  void reset() { n_ = 0; }

  // Appends tokens[0, m) (m >= 1, length() + m <= seq_len) and writes the logits [V] of the last.
  void append(const Real* params, const int32_t* tokens, int m, std::vector<float>& logits) {
    const ModelConfig& c = layout_.config();
    const int d = c.d_model, T = c.seq_len, L = c.n_layer;
    if (m < 1 || n_ + m > T) throw Error("incremental decoding past seq_len");
    if (keys_.empty()) {
      keys_.assign(L, std::vector<Real>(static_cast<size_t>(T) * d));
      values_ = keys_;
    }
    resize(m);
    for (int r = 0; r < m; ++r) {  // embedding
      const Real* te = params + layout_.wte() + static_cast<size_t>(tokens[r]) * d;
      const Real* pe = params + layout_.wpe() + static_cast<size_t>(n_ + r) * d;
      for (int i = 0; i < d; ++i) x_[static_cast<size_t>(r) * d + i] = te[i] + pe[i];
    }
    for (int l = 0; l < L; ++l) block(params, l, m);
    n_ += m;

    const Real* last = x_.data() + static_cast<size_t>(m - 1) * d;
    Real mean, rstd;
    ops::layernorm_forward(last, params + layout_.lnf_w(), params + layout_.lnf_b(), 1, d,
                           y_.data(), &mean, &rstd);
    std::vector<Real> out(c.vocab_size);
    ops::logits_forward(y_.data(), params + layout_.wte(), 1, d, c.vocab_size, out.data());
    logits.assign(out.begin(), out.end());
  }

 private:
  void resize(int m) {
    const ModelConfig& c = layout_.config();
    const size_t d = c.d_model;
    x_.resize(m * d);
    y_.resize(m * d);
    qkv_.resize(m * 3 * d);
    att_.resize(m * d);
    hidden_.resize(m * 4 * d);
    mean_.resize(m);
    rstd_.resize(m);
    scores_.resize(c.seq_len);
  }

  // One transformer block on the m new rows of x_ (positions n_ .. n_ + m - 1).
  void block(const Real* p, int l, int m) {
    const ModelConfig& c = layout_.config();
    const int d = c.d_model, H = c.n_head, dh = d / H;
    const LayerOffsets& o = layout_.layer(l);
    ops::layernorm_forward(x_.data(), p + o.ln1_w, p + o.ln1_b, m, d, y_.data(), mean_.data(),
                           rstd_.data());
    ops::linear_forward(y_.data(), p + o.qkv_w, p + o.qkv_b, m, d, 3 * d, qkv_.data());
    Real* K = keys_[l].data();
    Real* V = values_[l].data();
    for (int r = 0; r < m; ++r) {
      const Real* row = qkv_.data() + static_cast<size_t>(r) * 3 * d;
      std::copy(row + d, row + 2 * d, K + static_cast<size_t>(n_ + r) * d);
      std::copy(row + 2 * d, row + 3 * d, V + static_cast<size_t>(n_ + r) * d);
    }
    const Real scale = Real(1) / std::sqrt(Real(dh));
    for (int r = 0; r < m; ++r) {
      const int t = n_ + r;  // attends to s = 0 .. t
      for (int h = 0; h < H; ++h) {
        const Real* q = qkv_.data() + static_cast<size_t>(r) * 3 * d + h * dh;
        for (int s = 0; s <= t; ++s)
          scores_[s] = scale * ops::dot(q, K + static_cast<size_t>(s) * d + h * dh, dh);
        const Real mx = ops::max_of(scores_.data(), t + 1);
        Real z = 0;
        for (int s = 0; s <= t; ++s) z += scores_[s] = std::exp(scores_[s] - mx);
        Real* out = att_.data() + static_cast<size_t>(r) * d + h * dh;
        std::fill(out, out + dh, Real(0));
        for (int s = 0; s <= t; ++s) {
          const Real a = scores_[s] / z;
          const Real* v = V + static_cast<size_t>(s) * d + h * dh;
          for (int i = 0; i < dh; ++i) out[i] += a * v[i];
        }
      }
    }
    ops::linear_forward(att_.data(), p + o.proj_w, p + o.proj_b, m, d, d, y_.data());
    ops::residual_forward(x_.data(), y_.data(), static_cast<size_t>(m) * d, x_.data());
    ops::layernorm_forward(x_.data(), p + o.ln2_w, p + o.ln2_b, m, d, y_.data(), mean_.data(),
                           rstd_.data());
    ops::linear_forward(y_.data(), p + o.fc_w, p + o.fc_b, m, d, 4 * d, hidden_.data());
    ops::gelu_forward(hidden_.data(), hidden_.size(), hidden_.data());
    ops::linear_forward(hidden_.data(), p + o.fcproj_w, p + o.fcproj_b, m, 4 * d, d, y_.data());
    ops::residual_forward(x_.data(), y_.data(), static_cast<size_t>(m) * d, x_.data());
  }

  const ParamLayout& layout_;
  int n_ = 0;                                    // tokens decoded so far
  std::vector<std::vector<Real>> keys_, values_;  // per layer [seq_len, d], rows [0, n_) valid
  std::vector<Real> x_, y_, qkv_, att_, hidden_, mean_, rstd_, scores_;
};

}  // namespace blm
