// The CPU reference model's ops, forward and backward, written by hand and templated on Real
// (double for gradient checks, float for speed).  Every op is a free function over raw row-major
// arrays; shapes are in the comments.  N = B*T is the number of token rows.
//
// Conventions shared by every op here:
//  - Parameter gradients (dW, db, dwte, ...) are always ADDED to (the caller zeroes them once).
//  - Activation gradients are written over unless the comment says "adds".
//  - The big matmuls go through core/blas.h from serial code; the hand-written loops are OpenMP
//    parallel over rows / (batch, head) / column blocks.  No BLAS call sits inside a parallel
//    region (docs/CONVENTIONS.md).
//  - Reductions over rows (bias and LayerNorm gains) sum each column in row order, so results
//    do not depend on the thread count.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include <omp.h>

#include "core/blas.h"
#include "core/rng.h"

namespace blm {
namespace ops {

constexpr double kLayerNormEps = 1e-5;  // as torch.nn.LayerNorm's default

// Loops over less work than this (in multiply-adds, roughly) run on one thread: waking the team
// costs more than the work, and on a loaded machine a parallel region may wait a whole time slice
// for a descheduled thread.  Results do not depend on it (every loop is deterministic).
constexpr size_t kParallelMin = size_t(1) << 15;
inline bool worth_parallel(size_t work) { return work >= kParallelMin; }

// ------------------------------------------------------------------ small vector helpers

template <class Real>
inline Real dot(const Real* a, const Real* b, int n) {
  Real s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += alpha * x, length n.
template <class Real>
inline void axpy(Real alpha, const Real* x, Real* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// out[c] += sum over rows n of a[n, c]; a: [N, C].  Each column is summed in row order by one
// thread (blocks of columns per thread), so the result is independent of the thread count.
template <class Real>
void add_column_sums(const Real* a, int N, int C, Real* out) {
  constexpr int kBlock = 32;
  const int nblocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(N) * C))
  for (int blk = 0; blk < nblocks; ++blk) {
    const int c0 = blk * kBlock, width = std::min(C, c0 + kBlock) - c0;
    Real acc[kBlock] = {};
    for (int n = 0; n < N; ++n) {
      const Real* row = a + static_cast<size_t>(n) * C + c0;
#pragma omp simd
      for (int c = 0; c < width; ++c) acc[c] += row[c];
    }
    for (int c = 0; c < width; ++c) out[c0 + c] += acc[c];
  }
}

// ------------------------------------------------------------------ embedding
// out[b,t,:] = wte[tokens[b,t], :] + wpe[t, :]  (+ noise_std * normal01(noise_seed, (b*T+t)*d+i))
//   tokens [B, T] (each in [0, V), checked by the caller), wte [V, d], wpe [>=T, d], out [B, T, d]
template <class Real>
void embedding_forward(const int32_t* tokens, int B, int T, int d, const Real* wte, const Real* wpe,
                       double noise_std, uint64_t noise_seed, Real* out) {
  const int N = B * T;
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(N) * d))
  for (int n = 0; n < N; ++n) {
    const int t = n % T;
    const Real* te = wte + static_cast<size_t>(tokens[n]) * d;
    const Real* pe = wpe + static_cast<size_t>(t) * d;
    Real* o = out + static_cast<size_t>(n) * d;
    for (int i = 0; i < d; ++i) o[i] = te[i] + pe[i];
    if (noise_std != 0.0) {
      const uint64_t base = static_cast<uint64_t>(n) * d;  // n = b*T + t
      for (int i = 0; i < d; ++i) o[i] += static_cast<Real>(noise_std * normal01(noise_seed, base + i));
    }
  }
}

// Adds dwte[tokens[n]] += dout[n], dwpe[t] += dout[b,t].   dout [B, T, d].
// Parallel over column blocks: each thread owns columns of dwte/dwpe, so there are no write
// conflicts between rows with the same token and the order of additions is fixed.
template <class Real>
void embedding_backward(const int32_t* tokens, int B, int T, int d, const Real* dout, Real* dwte,
                        Real* dwpe) {
  constexpr int kBlock = 16;
  const int nblocks = (d + kBlock - 1) / kBlock;
  const int N = B * T;
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(N) * d))
  for (int blk = 0; blk < nblocks; ++blk) {
    const int c0 = blk * kBlock, c1 = std::min(d, c0 + kBlock);
    for (int n = 0; n < N; ++n) {
      const Real* g = dout + static_cast<size_t>(n) * d;
      Real* te = dwte + static_cast<size_t>(tokens[n]) * d;
      Real* pe = dwpe + static_cast<size_t>(n % T) * d;
      for (int c = c0; c < c1; ++c) {
        te[c] += g[c];
        pe[c] += g[c];
      }
    }
  }
}

// ------------------------------------------------------------------ LayerNorm
// y = (x - mean) * rstd * w + b per row, biased variance, eps 1e-5 (as torch).
//   x, y [N, d]; w, b [d]; mean, rstd [N] saved for the backward.
template <class Real>
void layernorm_forward(const Real* x, const Real* w, const Real* b, int N, int d, Real* y,
                       Real* mean, Real* rstd) {
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(N) * d))
  for (int n = 0; n < N; ++n) {
    const Real* xr = x + static_cast<size_t>(n) * d;
    Real* yr = y + static_cast<size_t>(n) * d;
    Real mu = 0;
    for (int i = 0; i < d; ++i) mu += xr[i];
    mu /= d;
    Real var = 0;  // two passes: no cancellation when |mean| >> std
    for (int i = 0; i < d; ++i) var += (xr[i] - mu) * (xr[i] - mu);
    var /= d;
    const Real rs = Real(1) / std::sqrt(var + Real(kLayerNormEps));
    for (int i = 0; i < d; ++i) yr[i] = (xr[i] - mu) * rs * w[i] + b[i];
    mean[n] = mu;
    rstd[n] = rs;
  }
}

// Backward of layernorm_forward.  ADDS dx (the residual stream's gradient), dw, db.
//   dx_i = rstd * (g_i - mean_j g_j - xhat_i * mean_j g_j xhat_j),  g = dy * w,  xhat = (x-mean)*rstd
template <class Real>
void layernorm_backward(const Real* x, const Real* w, const Real* mean, const Real* rstd,
                        const Real* dy, int N, int d, Real* dx, Real* dw, Real* db) {
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(N) * d))
  for (int n = 0; n < N; ++n) {
    const Real* xr = x + static_cast<size_t>(n) * d;
    const Real* gr = dy + static_cast<size_t>(n) * d;
    Real* dxr = dx + static_cast<size_t>(n) * d;
    const Real mu = mean[n], rs = rstd[n];
    Real sum_g = 0, sum_gx = 0;
    for (int i = 0; i < d; ++i) {
      const Real g = gr[i] * w[i];
      sum_g += g;
      sum_gx += g * (xr[i] - mu) * rs;
    }
    const Real mean_g = sum_g / d, mean_gx = sum_gx / d;
    for (int i = 0; i < d; ++i) {
      const Real xhat = (xr[i] - mu) * rs;
      dxr[i] += rs * (gr[i] * w[i] - mean_g - xhat * mean_gx);
    }
  }
  // dw_i += sum_n dy[n,i] xhat[n,i];  db_i += sum_n dy[n,i]   (column blocks, row order)
  constexpr int kBlock = 32;
  const int nblocks = (d + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(N) * d))
  for (int blk = 0; blk < nblocks; ++blk) {
    const int c0 = blk * kBlock, width = std::min(d, c0 + kBlock) - c0;
    Real aw[kBlock] = {}, ab[kBlock] = {};
    for (int n = 0; n < N; ++n) {
      const Real* xr = x + static_cast<size_t>(n) * d + c0;
      const Real* gr = dy + static_cast<size_t>(n) * d + c0;
      const Real mu = mean[n], rs = rstd[n];
      for (int c = 0; c < width; ++c) {
        aw[c] += gr[c] * (xr[c] - mu) * rs;
        ab[c] += gr[c];
      }
    }
    for (int c = 0; c < width; ++c) {
      dw[c0 + c] += aw[c];
      db[c0 + c] += ab[c];
    }
  }
}

// ------------------------------------------------------------------ linear
// y = x W^T + bias.   x [N, in], W [out, in], bias [out] or null, y [N, out].
template <class Real>
void linear_forward(const Real* x, const Real* W, const Real* bias, int N, int in, int out, Real* y) {
  if (bias) {
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(N) * out))
    for (int n = 0; n < N; ++n) std::copy(bias, bias + out, y + static_cast<size_t>(n) * out);
  }
  gemm(false, true, N, out, in, Real(1), x, in, W, in, bias ? Real(1) : Real(0), y, out);
}

// Backward of linear_forward for dy [N, out]:
//   dx [N, in] = dy W      (written over, or added when accumulate_dx; skipped when dx is null)
//   dW [out, in] += dy^T x;   db [out] += column sums of dy (skipped when db is null)
template <class Real>
void linear_backward(const Real* x, const Real* W, const Real* dy, int N, int in, int out, Real* dx,
                     Real* dW, Real* db, bool accumulate_dx = false) {
  if (dx) gemm(false, false, N, in, out, Real(1), dy, out, W, in, accumulate_dx ? Real(1) : Real(0), dx, in);
  gemm(true, false, out, in, N, Real(1), dy, out, x, in, Real(1), dW, in);
  if (db) add_column_sums(dy, N, out, db);
}

// ------------------------------------------------------------------ causal attention
// qkv [B, T, 3d] (head j's q, k, v: columns [j*dh, (j+1)*dh) of the blocks [0,d), [d,2d), [2d,3d))
// att [B, H, T, T]: att[b,h,t,s] = softmax_{s<=t}(q_t . k_s / sqrt(dh)); only s <= t is written.
// out [B, T, d]: out[b,t, j*dh + i] = sum_{s<=t} att[b,j,t,s] v_s[i]   (heads concatenated)
struct AttentionShape {
  int B, T, H, dh;
  int d() const { return H * dh; }
};

template <class Real>
void attention_forward(const AttentionShape& sh, const Real* qkv, Real* att, Real* out) {
  const int T = sh.T, H = sh.H, dh = sh.dh, d = sh.d();
  const size_t row = 3 * static_cast<size_t>(d);
  const Real scale = Real(1) / std::sqrt(Real(dh));
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(sh.B) * H * T * T * dh))
  for (int bh = 0; bh < sh.B * H; ++bh) {
    const int b = bh / H, h = bh % H;
    const Real* base = qkv + static_cast<size_t>(b) * T * row + h * dh;  // q of (b, t=0, head h)
    for (int t = 0; t < T; ++t) {
      const Real* qt = base + t * row;
      Real* p = att + (static_cast<size_t>(bh) * T + t) * T;
      Real mx = -std::numeric_limits<Real>::infinity();
      for (int s = 0; s <= t; ++s) {
        p[s] = dot(qt, base + s * row + d, dh) * scale;
        mx = std::max(mx, p[s]);
      }
      Real sum = 0;
      for (int s = 0; s <= t; ++s) {
        p[s] = std::exp(p[s] - mx);
        sum += p[s];
      }
      const Real inv = Real(1) / sum;
      Real* o = out + (static_cast<size_t>(b) * T + t) * d + h * dh;
      std::fill(o, o + dh, Real(0));
      for (int s = 0; s <= t; ++s) {
        p[s] *= inv;
        axpy(p[s], base + s * row + 2 * d, o, dh);
      }
    }
  }
}

// Backward: dqkv [B, T, 3d] written over (all three blocks) from dout [B, T, d].
//   dv_s += sum_t P_ts dout_t;   dP_ts = dout_t . v_s;   dZ_ts = P_ts (dP_ts - sum_r P_tr dP_tr)
//   dq_t = scale sum_s dZ_ts k_s;   dk_s += scale sum_t dZ_ts q_t
// scratch: resized here to (threads x T); keep it between calls so nothing is allocated per step.
template <class Real>
void attention_backward(const AttentionShape& sh, const Real* qkv, const Real* att, const Real* dout,
                        Real* dqkv, std::vector<Real>& scratch) {
  const int T = sh.T, H = sh.H, dh = sh.dh, d = sh.d();
  const size_t row = 3 * static_cast<size_t>(d);
  const Real scale = Real(1) / std::sqrt(Real(dh));
  scratch.resize(static_cast<size_t>(omp_get_max_threads()) * T);
#pragma omp parallel if (worth_parallel(static_cast<size_t>(sh.B) * H * T * T * dh))
  {
    Real* dp = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * T;
#pragma omp for schedule(static)
    for (int bh = 0; bh < sh.B * H; ++bh) {
      const int b = bh / H, h = bh % H;
      const Real* base = qkv + static_cast<size_t>(b) * T * row + h * dh;
      Real* dbase = dqkv + static_cast<size_t>(b) * T * row + h * dh;
      for (int t = 0; t < T; ++t)
        for (int blk = 0; blk < 3; ++blk) std::fill_n(dbase + t * row + blk * d, dh, Real(0));
      for (int t = 0; t < T; ++t) {
        const Real* p = att + (static_cast<size_t>(bh) * T + t) * T;
        const Real* go = dout + (static_cast<size_t>(b) * T + t) * d + h * dh;
        const Real* qt = base + t * row;
        Real* dqt = dbase + t * row;
        Real rowdot = 0;
        for (int s = 0; s <= t; ++s) {
          dp[s] = dot(go, base + s * row + 2 * d, dh);
          rowdot += p[s] * dp[s];
        }
        for (int s = 0; s <= t; ++s) {
          const Real dz = p[s] * (dp[s] - rowdot) * scale;
          axpy(dz, base + s * row + d, dqt, dh);          // dq_t += dz k_s
          axpy(dz, qt, dbase + s * row + d, dh);          // dk_s += dz q_t
          axpy(p[s], go, dbase + s * row + 2 * d, dh);    // dv_s += P_ts dout_t
        }
      }
    }
  }
}

// ------------------------------------------------------------------ GELU (tanh approximation)
// gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)     (torch approximate="tanh")
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2/pi)
constexpr double kGeluA = 0.044715;

template <class Real>
void gelu_forward(const Real* x, size_t n, Real* y) {
  const Real c = Real(kGeluC), a = Real(kGeluA);
#pragma omp parallel for schedule(static) if (worth_parallel(8 * n))
  for (size_t i = 0; i < n; ++i) {
    const Real v = x[i];
    y[i] = Real(0.5) * v * (Real(1) + std::tanh(c * (v + a * v * v * v)));
  }
}

// dx = dy * gelu'(x);  dx may alias dy.
//   gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
template <class Real>
void gelu_backward(const Real* x, const Real* dy, size_t n, Real* dx) {
  const Real c = Real(kGeluC), a = Real(kGeluA);
#pragma omp parallel for schedule(static) if (worth_parallel(8 * n))
  for (size_t i = 0; i < n; ++i) {
    const Real v = x[i];
    const Real th = std::tanh(c * (v + a * v * v * v));
    const Real grad = Real(0.5) * (Real(1) + th) +
                      Real(0.5) * v * (Real(1) - th * th) * c * (Real(1) + Real(3) * a * v * v);
    dx[i] = dy[i] * grad;
  }
}

// ------------------------------------------------------------------ residual add
// out = a + b (n values); out may alias a.  Backward: the gradient passes to both unchanged.
template <class Real>
void residual_forward(const Real* a, const Real* b, size_t n, Real* out) {
#pragma omp parallel for schedule(static) if (worth_parallel(n))
  for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// ------------------------------------------------------------------ tied output projection
// logits [N, V] = x [N, d] wte^T   (wte [V, d], the token embedding)
template <class Real>
void logits_forward(const Real* x, const Real* wte, int N, int d, int V, Real* logits) {
  linear_forward<Real>(x, wte, nullptr, N, d, V, logits);
}
// dx [N, d] = dlogits wte (written over);  dwte += dlogits^T x
template <class Real>
void logits_backward(const Real* x, const Real* wte, const Real* dlogits, int N, int d, int V,
                     Real* dx, Real* dwte) {
  linear_backward<Real>(x, wte, dlogits, N, d, V, dx, dwte, nullptr);
}

// ------------------------------------------------------------------ softmax cross-entropy
// Per row n: lse[n] = log sum_v exp(logits[n,v]); row_loss[n] = lse[n] - logits[n, target[n]];
// returns the number of rows whose target is the argmax (the first maximum on ties).
//   logits [N, V], targets [N] (each in [0, V), checked by the caller), lse [N], row_loss [N]
template <class Real>
int64_t cross_entropy_forward(const Real* logits, const int32_t* targets, int N, int V, Real* lse,
                              double* row_loss) {
  int64_t correct = 0;
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(N) * V)) reduction(+ : correct)
  for (int n = 0; n < N; ++n) {
    const Real* z = logits + static_cast<size_t>(n) * V;
    int arg = 0;
    for (int v = 1; v < V; ++v)
      if (z[v] > z[arg]) arg = v;
    const Real mx = z[arg];
    Real sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(z[v] - mx);
    lse[n] = mx + std::log(sum);
    row_loss[n] = static_cast<double>(lse[n]) - static_cast<double>(z[targets[n]]);
    correct += (arg == targets[n]) ? 1 : 0;
  }
  return correct;
}

// dlogits [N, V] = scale * (softmax(logits) - onehot(target))   (written over)
template <class Real>
void cross_entropy_backward(const Real* logits, const Real* lse, const int32_t* targets, int N,
                            int V, Real scale, Real* dlogits) {
#pragma omp parallel for schedule(static) if (worth_parallel(static_cast<size_t>(N) * V))
  for (int n = 0; n < N; ++n) {
    const Real* z = logits + static_cast<size_t>(n) * V;
    Real* g = dlogits + static_cast<size_t>(n) * V;
    for (int v = 0; v < V; ++v) g[v] = scale * std::exp(z[v] - lse[n]);
    g[targets[n]] -= scale;
  }
}

}  // namespace ops
}  // namespace blm
