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
#include <cstring>
#include <vector>


#include "core/blas.h"
#include "core/rng.h"

namespace blm {
namespace ops {

constexpr double kLayerNormEps = 1e-5;  // as torch.nn.LayerNorm's default

// Loops over less work than this (in multiply-adds, roughly) run on one thread: waking the
// OpenMP team costs more than a small loop.  At the quickstart size this leaves the memory-bound
// loops (LayerNorm, residual, bias) serial and the compute-bound ones (GELU, large column sums)
// parallel.  Results never depend on it (every loop is deterministic).
constexpr size_t kParallelMin = size_t(1) << 20;

inline bool worth_parallel(size_t work) { return work >= kParallelMin && !blas_runs_own_pool(); }

// ------------------------------------------------------------------ small vector helpers

// Reductions with 8 independent partial results combined in a fixed order: deterministic, and
// GCC vectorises the lanes (a plain float sum would stay scalar without -ffast-math, and
// "omp simd reduction" did not vectorise reliably in an out-of-line template here).
template <class Real>
inline Real dot(const Real* a, const Real* b, int n) {
  Real acc[8] = {};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  Real s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class Real>
inline Real sum(const Real* x, int n) {
  Real acc[8] = {};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j];
  Real s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += x[i];
  return s;
}

// Largest of x[0..n), n >= 1 (NaN-blind; a NaN still reaches every exp through x - max).
template <class Real>
inline Real max_of(const Real* x, int n) {
  Real m = x[0];
  for (int i = 1; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// exp and tanh: the float versions are plain arithmetic (no libm call), so loops over them
// vectorise; the double versions are libm's (the gradient checks run in double).
//
// exp_fast(float): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then the degree-7 minimax
// polynomial of Cephes' expf for e^r and 2^n from the exponent bits.  Relative error < 3e-7
// (tested).  n is clamped to [-126, 127]: far below, the result is 2^-126 ~ 1e-38 instead of a
// denormal or 0 (no softmax or tanh here can tell), far above 2^127.  Non-finite x gives NaN, so
// a diverged run stays visible.  Written without float comparisons: GCC if-converts (and so
// vectorises) integer selects only, under the default -ftrapping-math.
inline float exp_fast(float x) {
  // round(x / ln2) by the 1.5 * 2^23 shift: the low mantissa bits of `shifted` hold it.  The bit
  // pattern is monotonic in x, so the integer clamp also catches huge |x|.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  int32_t sb;
  std::memcpy(&sb, &shifted, sizeof sb);
  constexpr int32_t kShift = 0x4B400000;  // the bits of 12582912.0f
  const int32_t cb = sb < kShift - 126 ? kShift - 126 : (sb > kShift + 127 ? kShift + 127 : sb);
  const int32_t n = cb - kShift;
  const float fn = static_cast<float>(n);
  float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;  // x - n ln2, ln2 in two parts
  int32_t rb;  // r = 0 where n was clamped: the result is then exactly 2^n
  std::memcpy(&rb, &r, sizeof rb);
  rb &= -static_cast<int32_t>(cb == sb);
  std::memcpy(&r, &rb, sizeof r);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale + (x - x);  // x - x: 0 for finite x, NaN for NaN and +-inf
}
inline double exp_fast(double x) { return std::exp(x); }

// tanh u = 1 - 2 / (e^{2u} + 1); absolute error < 3e-7 in float (tested), +-1 at large |u|.
inline float tanh_fast(float u) { return 1.0f - 2.0f / (exp_fast(2.0f * u) + 1.0f); }
inline double tanh_fast(double u) { return std::tanh(u); }

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
// att [B, H, T, T]: att[b,h,t,s] = softmax_{s<=t}(q_t . k_s / sqrt(dh)), zero for s > t.
// out [B, T, d]: out[b,t, j*dh + i] = sum_{s<=t} att[b,j,t,s] v_s[i]   (heads concatenated)
struct AttentionShape {
  int B, T, H, dh;
  int d() const { return H * dh; }
};

// Each (b, h) is a few GEMMs through BLAS; only the softmax is hand-written.  The GEMMs run over
// row blocks of kAttnBlock query rows, each only as wide as the causal triangle needs (block
// [r0, r1) uses keys [0, r1)), which skips most of the zero upper triangle of P while keeping the
// GEMMs large enough for BLAS's vector kernels.  The heads run one after another (BLAS threads
// itself).
constexpr int kAttnBlock = 32;

// Row-wise causal softmax in place: p[t, s] for s <= t, zeros above the diagonal.  p: [T, T].
template <class Real>
void causal_softmax_rows(Real* p, int T) {
  for (int t = 0; t < T; ++t) {
    Real* r = p + static_cast<size_t>(t) * T;
    const Real mx = max_of(r, t + 1);
    for (int s = 0; s <= t; ++s) r[s] = exp_fast(r[s] - mx);
    const Real inv = Real(1) / sum(r, t + 1);
    for (int s = 0; s <= t; ++s) r[s] *= inv;
    std::fill(r + t + 1, r + T, Real(0));
  }
}

template <class Real>
void attention_forward(const AttentionShape& sh, const Real* qkv, Real* att, Real* out) {
  const int T = sh.T, H = sh.H, dh = sh.dh, d = sh.d();
  const int row = 3 * d;
  const Real scale = Real(1) / std::sqrt(Real(dh));
  for (int bh = 0; bh < sh.B * H; ++bh) {
    const int b = bh / H, h = bh % H;
    const Real* q = qkv + static_cast<size_t>(b) * T * row + h * dh;  // [T, dh], row stride 3d
    const Real* k = q + d;
    const Real* v = q + 2 * d;
    Real* P = att + static_cast<size_t>(bh) * T * T;
    Real* o = out + static_cast<size_t>(b) * T * d + h * dh;          // [T, dh], row stride d
    for (int r0 = 0; r0 < T; r0 += kAttnBlock) {  // Z = q k^T / sqrt(dh), causal part
      const int r1 = std::min(T, r0 + kAttnBlock);
      gemm(false, true, r1 - r0, r1, dh, scale, q + r0 * row, row, k, row, Real(0), P + r0 * T, T);
    }
    causal_softmax_rows(P, T);
    for (int r0 = 0; r0 < T; r0 += kAttnBlock) {  // out = P v
      const int r1 = std::min(T, r0 + kAttnBlock);
      gemm(false, false, r1 - r0, dh, r1, Real(1), P + r0 * T, T, v, row, Real(0), o + r0 * d, d);
    }
  }
}

// Backward: dqkv [B, T, 3d] written over (all three blocks) from dout [B, T, d].  Per head:
//   dP = dout v^T;   dZ_ts = P_ts (dP_ts - sum_r P_tr dP_tr) / sqrt(dh)   (zero for s > t)
//   dq = dZ k;   dk = dZ^T q;   dv = P^T dout
// The transposed products for key rows [r0, r1) need query rows t >= r0 only.
// scratch: one [T, T] matrix, resized here (keep it between calls: nothing allocated per step).
template <class Real>
void attention_backward(const AttentionShape& sh, const Real* qkv, const Real* att, const Real* dout,
                        Real* dqkv, std::vector<Real>& scratch) {
  const int T = sh.T, H = sh.H, dh = sh.dh, d = sh.d();
  const int row = 3 * d;
  const Real scale = Real(1) / std::sqrt(Real(dh));
  scratch.resize(static_cast<size_t>(T) * T);
  Real* dZ = scratch.data();
  for (int bh = 0; bh < sh.B * H; ++bh) {
    const int b = bh / H, h = bh % H;
    const size_t off = static_cast<size_t>(b) * T * row + h * dh;
    const Real* q = qkv + off;
    const Real* k = q + d;
    const Real* v = q + 2 * d;
    const Real* go = dout + static_cast<size_t>(b) * T * d + h * dh;  // [T, dh], row stride d
    const Real* P = att + static_cast<size_t>(bh) * T * T;
    Real* dq = dqkv + off;
    Real* dk = dq + d;
    Real* dv = dq + 2 * d;
    for (int r0 = 0; r0 < T; r0 += kAttnBlock) {  // dP = dout v^T, causal part
      const int r1 = std::min(T, r0 + kAttnBlock);
      gemm(false, true, r1 - r0, r1, dh, Real(1), go + r0 * d, d, v, row, Real(0), dZ + r0 * T, T);
    }
    for (int t = 0; t < T; ++t) {
      const Real* pr = P + static_cast<size_t>(t) * T;
      Real* zr = dZ + static_cast<size_t>(t) * T;
      const Real rowdot = dot(pr, zr, t + 1);
      for (int s = 0; s <= t; ++s) zr[s] = pr[s] * (zr[s] - rowdot) * scale;
      std::fill(zr + t + 1, zr + T, Real(0));
    }
    for (int r0 = 0; r0 < T; r0 += kAttnBlock) {
      const int r1 = std::min(T, r0 + kAttnBlock), n = r1 - r0;
      gemm(false, false, n, dh, r1, Real(1), dZ + r0 * T, T, k, row, Real(0), dq + r0 * row, row);
      gemm(true, false, n, dh, T - r0, Real(1), dZ + r0 * T + r0, T, q + r0 * row, row, Real(0),
           dk + r0 * row, row);  // dk_s = sum_{t >= s} dZ_ts q_t
      gemm(true, false, n, dh, T - r0, Real(1), P + r0 * T + r0, T, go + r0 * d, d, Real(0),
           dv + r0 * row, row);  // dv_s = sum_{t >= s} P_ts dout_t
    }
  }
}

// ------------------------------------------------------------------ GELU (tanh approximation)
// gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)     (torch approximate="tanh")
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2/pi)
constexpr double kGeluA = 0.044715;
constexpr size_t kChunk = 4096;  // elements per thread task; the inner loop is vectorised

// The element loops over [i0, i1), always inlined into their callers below so that each caller's
// target options (the AVX2 build) apply to them.
template <class Real>
__attribute__((always_inline)) inline void gelu_forward_span(const Real* x, size_t i0, size_t i1,
                                                             Real* y) {
  const Real c = Real(kGeluC), a = Real(kGeluA);
#pragma omp simd
  for (size_t i = i0; i < i1; ++i) {
    const Real v = x[i];
    y[i] = Real(0.5) * v * (Real(1) + tanh_fast(c * (v + a * v * v * v)));
  }
}

//   gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
template <class Real>
__attribute__((always_inline)) inline void gelu_backward_span(const Real* x, const Real* dy,
                                                              size_t i0, size_t i1, Real* dx) {
  const Real c = Real(kGeluC), a = Real(kGeluA);
#pragma omp simd
  for (size_t i = i0; i < i1; ++i) {
    const Real v = x[i];
    const Real th = tanh_fast(c * (v + a * v * v * v));
    const Real grad = Real(0.5) * (Real(1) + th) +
                      Real(0.5) * v * (Real(1) - th * th) * c * (Real(1) + Real(3) * a * v * v);
    dx[i] = dy[i] * grad;
  }
}

// GELU is the largest hand-written cost of a CPU step, and the default x86-64 target (SSE2) runs
// its float loops 4 wide without FMA.  On x86-64 the float loops are also compiled for AVX2+FMA
// and chosen at run time (about 3x faster there, measured); elsewhere, or in double, the plain
// loops run.  Both compute the same formula; results differ by rounding only (tested).
#if defined(__x86_64__) && defined(__GNUC__)
#define BLM_GELU_AVX2 1
__attribute__((target("avx2,fma"))) inline void gelu_forward_span_avx2(const float* x, size_t i0,
                                                                       size_t i1, float* y) {
  gelu_forward_span(x, i0, i1, y);
}
__attribute__((target("avx2,fma"))) inline void gelu_backward_span_avx2(const float* x,
                                                                        const float* dy, size_t i0,
                                                                        size_t i1, float* dx) {
  gelu_backward_span(x, dy, i0, i1, dx);
}
inline bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

inline void gelu_forward_dispatch(const float* x, size_t i0, size_t i1, float* y) {
#if BLM_GELU_AVX2
  if (cpu_has_avx2_fma()) return gelu_forward_span_avx2(x, i0, i1, y);
#endif
  gelu_forward_span(x, i0, i1, y);
}
inline void gelu_forward_dispatch(const double* x, size_t i0, size_t i1, double* y) {
  gelu_forward_span(x, i0, i1, y);
}
inline void gelu_backward_dispatch(const float* x, const float* dy, size_t i0, size_t i1, float* dx) {
#if BLM_GELU_AVX2
  if (cpu_has_avx2_fma()) return gelu_backward_span_avx2(x, dy, i0, i1, dx);
#endif
  gelu_backward_span(x, dy, i0, i1, dx);
}
inline void gelu_backward_dispatch(const double* x, const double* dy, size_t i0, size_t i1,
                                   double* dx) {
  gelu_backward_span(x, dy, i0, i1, dx);
}

// y = gelu(x), n values.
template <class Real>
void gelu_forward(const Real* x, size_t n, Real* y) {
  const size_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (worth_parallel(8 * n))
  for (size_t ch = 0; ch < chunks; ++ch)
    gelu_forward_dispatch(x, ch * kChunk, std::min(n, (ch + 1) * kChunk), y);
}

// dx = dy * gelu'(x);  dx may alias dy.
template <class Real>
void gelu_backward(const Real* x, const Real* dy, size_t n, Real* dx) {
  const size_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (worth_parallel(8 * n))
  for (size_t ch = 0; ch < chunks; ++ch)
    gelu_backward_dispatch(x, dy, ch * kChunk, std::min(n, (ch + 1) * kChunk), dx);
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
    #pragma omp simd reduction(+ : sum)
    for (int v = 0; v < V; ++v) sum += exp_fast(z[v] - mx);
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
    #pragma omp simd
    for (int v = 0; v < V; ++v) g[v] = scale * exp_fast(z[v] - lse[n]);
    g[targets[n]] -= scale;
  }
}

}  // namespace ops
}  // namespace blm
