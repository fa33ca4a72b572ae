// The barrier of docs/barrier-spec.md (sections 2-4) on the GPU, fp32 with fp64 where it
// matters, for every (sequence b, head h, position t) of one layer.  The CPU reference is
// core/barrier.cpp; the math, per (b, h, t), with z_ts = q_t . k_s / sqrt(dh):
//
//   pi_ts  = softmax_{s<t}(z_ts)                                      strict causal
//   qbar_t = sum_s pi_ts q_s,   kbar_t = sum_s pi_ts k_s
//   C_t    = (1/sqrt dh) sum_s pi_ts (q_s - qbar_t)(k_s - kbar_t)^T       [dh, dh]
//   J_t    = I - C_t,   delta_t = det J_t,   phi(delta_t)
//   G_t    = scale * (-phi'(delta_t) delta_t) J_t^{-T}                  (= scale J^{-T} on the log branch)
//   g_ts   = (1/sqrt dh) (q_s - qbar_t)^T G_t (k_s - kbar_t),   gbar_t = sum_s pi_ts g_ts
//   dz_ts  = pi_ts (g_ts - gbar_t)
//   dq_t  += (1/sqrt dh) sum_s dz_ts k_s  = (1/sqrt dh) sum_s pi_ts g_ts (k_s - kbar_t)
//   dk_s  += (1/sqrt dh) sum_t dz_ts q_t
//   dq_s  += (1/sqrt dh) sum_t pi_ts G_t   (k_s - kbar_t)          (direct terms)
//   dk_s  += (1/sqrt dh) sum_t pi_ts G_t^T (q_s - qbar_t)
//
// Kernels (grids put (b, h) on y; 256 threads; dh in {32, 64, 128} as a template parameter):
//   barrier_forward_kernel        one block per (b, h, t): logdet and phi          [B, H, T]
//   barrier_jacobian_kernel       one block per (b, h, t): J_t                     [B, H, T, dh, dh]
//   barrier_backward_rows_kernel  one block per counted (b, h, t): recomputes J_t, inverts it,
//                                 stores G_t, qbar_t, kbar_t, (m_t, l_t, gbar_t) in the workspace,
//                                 adds the dq_t term (the only one indexed by t)
//   barrier_backward_cols_kernel  one block per (b, h, 32 positions s): loops over the counted
//                                 t > s and adds dk_s (through the softmax) and both direct terms
// No atomics anywhere and every sum has a fixed order: results are bit-identical run to run.
//
// Numerical choices:
//  - The strict-causal statistics (max m_t and normaliser l_t over s < t) are computed here from
//    q and k rather than from the attention's lse: recovering them as l_t - exp(z_tt - m_t)
//    cancels catastrophically in fp32 when the diagonal term dominates the row.
//  - C_t is accumulated in the centred form sum_s pi_ts (q_s - qbar_t)(k_s - kbar_t)^T (a second
//    pass over s once qbar_t, kbar_t are known), not as S_t - qbar_t kbar_t^T: when q and k share
//    a large common component (biases, LayerNorm offsets) the uncentred products are much larger
//    than the covariance and the difference loses most of its fp32 digits.  The extra pass costs
//    O(t dh) against the O(t dh^2) accumulation.
//  - The forward's LU runs in double on J_t = I - C_t formed in double: J_t's diagonal is 1 - c_ii
//    and rounding it to fp32 alone perturbs log det J_t by ~sqrt(dh) * 6e-8 absolute, which is a
//    large relative error for the small log-determinants of a well-conditioned head.  The
//    backward's inverse stays in fp32 (its relative error is ~1e-7 of ||J^{-1}||).
#include <cmath>

#include "cuda/attn_common.cuh"
#include "cuda/barrier_linalg.cuh"
#include "cuda/barrier_phi.cuh"

namespace blm {
namespace cuda {
namespace {

// Threads of every block.  __launch_bounds__(256, 2) caps registers at 128: no spills (with the
// default bounds ptxas spills a few bytes), and two blocks fit an SM where shared memory allows.
constexpr int kThreads = 256;
constexpr int kChunk = 32;  // positions s per chunk; row-group layout: 8 threads per position

template <int DH>
struct Tile {
  static constexpr int LD = DH + 1;      // shared leading dimension (bank-conflict padding)
  static constexpr int RM = DH / 16;     // C_t micro-tile per thread: RM x RM, 16 x 16 threads
  static constexpr int CPT = DH / 8;     // columns per thread in the row-group layout
  static_assert(2 * DH <= kThreads, "pass 1 gives one thread to each coordinate of qbar and kbar");
  static_assert(kThreads / 8 == kChunk, "row groups of 8 threads cover one chunk");
};

// ------------------------------------------------------------------ small device helpers

__device__ __forceinline__ float strict_prob(float z, float m, float l) { return expf(z - m) / l; }

// Row-group layout: thread tid works on chunk row tid/8 and on columns part + 8j, part = tid%8.
// Sum over the 8 threads of a row group (lanes 8g..8g+7, one warp); fixed butterfly, so every
// lane gets the same bits.  All 32 lanes must call it.
__device__ __forceinline__ float row8_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  return v;
}

// a . b over dh in the row-group layout.  The same function (same order) computes z_ts in every
// kernel, so the probabilities of the backward's second kernel are bit-identical to the first's.
template <int DH>
__device__ __forceinline__ float row8_dot(const float* a, const float* b, int part) {
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < DH / 8; ++j) acc = fmaf(a[part + 8 * j], b[part + 8 * j], acc);
  return row8_sum(acc);
}

// Copies q_s, k_s of positions s in [s0, s0 + 32) with s < s_end into Qc, Kc [32][dh+1]; other
// rows become zeros.  base: q of (b, 0, h) in qkv; rs = 3d; the k block is at +d.
template <int DH>
__device__ void load_qk_chunk(float* Qc, float* Kc, const float* base, size_t rs, int d, int s0,
                              int s_end) {
  constexpr int LD = Tile<DH>::LD;
  for (int idx = threadIdx.x; idx < kChunk * DH; idx += kThreads) {
    const int r = idx / DH, c = idx % DH, s = s0 + r;
    const bool in = s < s_end;
    const float* src = base + static_cast<size_t>(s) * rs + c;
    Qc[r * LD + c] = in ? src[0] : 0.f;
    Kc[r * LD + c] = in ? src[d] : 0.f;
  }
}

// zs[r] = z_{t, s0+r} for s0 + r < t, else -inf.  Needs Kc loaded; the caller syncs after.
template <int DH>
__device__ void chunk_logits(const float* qt, const float* Kc, int s0, int t, float* zs) {
  constexpr int LD = Tile<DH>::LD;
  const int row = threadIdx.x >> 3, part = threadIdx.x & 7;
  const float isd = 1.f / sqrtf(static_cast<float>(DH));
  const float z = row8_dot<DH>(qt, Kc + row * LD, part) * isd;
  if (part == 0) zs[row] = s0 + row < t ? z : -INFINITY;
}

// Shared memory every per-position kernel starts with.
template <int DH>
struct PositionShared {
  float qt[DH], qbar[DH], kbar[DH], fcol[DH];
  float zs[kChunk], red[kChunk];
  int perm[DH];
  int slot;
  float stats[4];
};

// Offset (bytes) of the big regions after PositionShared, 16-byte aligned so doubles fit.
template <int DH>
constexpr size_t position_header_bytes() {
  return (sizeof(PositionShared<DH>) + 15) / 16 * 16;
}

// Pass 1 over s < t, chunk by chunk with an online softmax: m_t, l_t (returned in every thread)
// and qbar_t, kbar_t (into sh.qbar, sh.kbar).  Thread tid < dh accumulates qbar's coordinate
// tid, dh <= tid < 2dh kbar's coordinate tid - dh.  sh.qt must hold q_t.  Ends with a barrier.
template <int DH>
__device__ void strict_softmax_stats(PositionShared<DH>& sh, float* Qc, float* Kc,
                                     const float* base, size_t rs, int d, int t, float* m_out,
                                     float* l_out) {
  constexpr int LD = Tile<DH>::LD;
  const int tid = threadIdx.x;
  const float* col = tid < DH ? Qc + tid : (tid < 2 * DH ? Kc + (tid - DH) : nullptr);
  float m = -INFINITY, l = 0.f, acc = 0.f;
  for (int s0 = 0; s0 < t; s0 += kChunk) {
    __syncthreads();  // the previous chunk is no longer read
    load_qk_chunk<DH>(Qc, Kc, base, rs, d, s0, t);
    __syncthreads();
    chunk_logits<DH>(sh.qt, Kc, s0, t, sh.zs);
    __syncthreads();
    const int nr = min(kChunk, t - s0);  // rows s0 .. s0+nr-1 are s < t
    float cmax = -INFINITY;
    for (int r = 0; r < nr; ++r) cmax = fmaxf(cmax, sh.zs[r]);
    const float m_new = fmaxf(m, cmax);   // finite: the chunk holds at least s0 < t
    const float alpha = expf(m - m_new);  // 0 on the first chunk (m = -inf)
    float csum = 0.f, cacc = 0.f;
    for (int r = 0; r < nr; ++r) {
      const float p = expf(sh.zs[r] - m_new);
      csum += p;
      if (col) cacc = fmaf(p, col[r * LD], cacc);
    }
    l = l * alpha + csum;
    acc = acc * alpha + cacc;
    m = m_new;
  }
  if (tid < DH) sh.qbar[tid] = acc / l;
  else if (tid < 2 * DH) sh.kbar[tid - DH] = acc / l;
  *m_out = m;
  *l_out = l;
  __syncthreads();
}

// Pass 2: C[a][b] (this thread's micro-tile, rows ty + 16a, columns tx + 16b of the unscaled
// sum_s pi_ts (q_s - qbar)(k_s - kbar)^T; multiply by 1/sqrt(dh) for C_t).  Each chunk is
// centred and weighted in shared memory (Qc <- pi (q - qbar), Kc <- k - kbar), then every thread
// adds its RM x RM outer-product block.  Does not end with a barrier.
template <int DH>
__device__ void accumulate_centred_cov(PositionShared<DH>& sh, float* Qc, float* Kc,
                                       const float* base, size_t rs, int d, int t, float m, float l,
                                       float (&C)[Tile<DH>::RM][Tile<DH>::RM]) {
  constexpr int LD = Tile<DH>::LD, RM = Tile<DH>::RM;
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
  for (int a = 0; a < RM; ++a)
#pragma unroll
    for (int b = 0; b < RM; ++b) C[a][b] = 0.f;
  for (int s0 = 0; s0 < t; s0 += kChunk) {
    __syncthreads();
    load_qk_chunk<DH>(Qc, Kc, base, rs, d, s0, t);
    __syncthreads();
    chunk_logits<DH>(sh.qt, Kc, s0, t, sh.zs);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kChunk * DH; idx += kThreads) {
      const int r = idx / DH, c = idx % DH;
      const float pi = s0 + r < t ? strict_prob(sh.zs[r], m, l) : 0.f;
      Qc[r * LD + c] = pi * (Qc[r * LD + c] - sh.qbar[c]);
      Kc[r * LD + c] -= sh.kbar[c];
    }
    __syncthreads();
    const int nr = min(kChunk, t - s0);
    for (int r = 0; r < nr; ++r) {
      float qa[RM], kb[RM];
#pragma unroll
      for (int a = 0; a < RM; ++a) qa[a] = Qc[r * LD + ty + 16 * a];
#pragma unroll
      for (int b = 0; b < RM; ++b) kb[b] = Kc[r * LD + tx + 16 * b];
#pragma unroll
      for (int a = 0; a < RM; ++a)
#pragma unroll
        for (int b = 0; b < RM; ++b) C[a][b] = fmaf(qa[a], kb[b], C[a][b]);
    }
  }
}

// Everything a per-position kernel does before it needs J_t: load q_t, pass 1, pass 2.
struct PositionIndex {
  int b, h, t, bh;
  const float* base;  // q of (b, 0, h)
  size_t rs;          // 3d
  int d;
};

__device__ __forceinline__ PositionIndex position_index(int T, int H, int dh) {
  PositionIndex p;
  p.t = T - 1 - static_cast<int>(blockIdx.x);  // long rows first: better tail of the grid
  p.bh = blockIdx.y;
  p.b = p.bh / H;
  p.h = p.bh % H;
  p.d = H * dh;
  p.rs = 3 * static_cast<size_t>(p.d);
  return p;
}

template <int DH>
__device__ void position_covariance(PositionShared<DH>& sh, float* Qc, float* Kc,
                                    const PositionIndex& p, const float* qkv, int T, int H,
                                    float* m, float* l, float (&C)[Tile<DH>::RM][Tile<DH>::RM]) {
  const float* base = qkv + qkv_head_base(p.b, p.h, T, H, DH);
  if (threadIdx.x < DH) sh.qt[threadIdx.x] = base[static_cast<size_t>(p.t) * p.rs + threadIdx.x];
  strict_softmax_stats<DH>(sh, Qc, Kc, base, p.rs, p.d, p.t, m, l);
  accumulate_centred_cov<DH>(sh, Qc, Kc, base, p.rs, p.d, p.t, *m, *l, C);
}

// ------------------------------------------------------------------ forward
// Grid (T, B*H).  Shared: PositionShared, then one region used first for the chunks
// (2 x [32][dh+1] floats) and then for J_t in double ([dh][dh+1]).
template <int DH>
size_t forward_smem_bytes() {
  constexpr int LD = Tile<DH>::LD;
  const size_t chunks = 2 * kChunk * LD * sizeof(float);
  const size_t jd = static_cast<size_t>(DH) * LD * sizeof(double);
  return position_header_bytes<DH>() + (chunks > jd ? chunks : jd);
}

template <int DH>
__global__ void __launch_bounds__(kThreads, 2)
    barrier_forward_kernel(const float* __restrict__ qkv, const uint8_t* __restrict__ mask,
                           double eps, float* __restrict__ logdet, float* __restrict__ phi, int T,
                           int H) {
  constexpr int LD = Tile<DH>::LD, RM = Tile<DH>::RM;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PositionShared<DH>& sh = *reinterpret_cast<PositionShared<DH>*>(smem_raw);
  unsigned char* region = smem_raw + position_header_bytes<DH>();
  float* Qc = reinterpret_cast<float*>(region);
  float* Kc = Qc + kChunk * LD;
  double* Jd = reinterpret_cast<double*>(region);  // aliases the chunks after pass 2

  const PositionIndex p = position_index(T, H, DH);
  const size_t o = static_cast<size_t>(p.bh) * T + p.t;
  if (!position_counted(p.t, p.b, T, mask)) {  // uniform over the block
    if (threadIdx.x == 0) logdet[o] = 0.f, phi[o] = 0.f;
    return;
  }
  float m, l, C[RM][RM];
  position_covariance<DH>(sh, Qc, Kc, p, qkv, T, H, &m, &l, C);
  __syncthreads();  // the chunks are dead: J_t overwrites them

  const double isd = 1.0 / sqrt(static_cast<double>(DH));
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
  for (int a = 0; a < RM; ++a)
#pragma unroll
    for (int b = 0; b < RM; ++b) {
      const int i = ty + 16 * a, j = tx + 16 * b;
      Jd[i * LD + j] = (i == j ? 1.0 : 0.0) - static_cast<double>(C[a][b]) * isd;
    }
  __syncthreads();
  int sign;
  double logabs;
  block_lu_logdet<DH, kThreads>(Jd, &sh.slot, &sign, &logabs);
  if (threadIdx.x == 0) {
    logdet[o] = sign > 0 ? static_cast<float>(logabs) : -INFINITY;
    phi[o] = static_cast<float>(phi_from_det(sign, logabs, eps));
  }
}

// ------------------------------------------------------------------ Jacobians (margins)
// Grid (T, B*H); J_t in fp32 into jac [B, H, T, dh, dh] (identity for t < 2).
template <int DH>
size_t jacobian_smem_bytes() {
  return position_header_bytes<DH>() + 2 * kChunk * Tile<DH>::LD * sizeof(float);
}

template <int DH>
__global__ void __launch_bounds__(kThreads, 2)
    barrier_jacobian_kernel(const float* __restrict__ qkv, float* __restrict__ jac, int T, int H) {
  constexpr int LD = Tile<DH>::LD, RM = Tile<DH>::RM;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PositionShared<DH>& sh = *reinterpret_cast<PositionShared<DH>*>(smem_raw);
  float* Qc = reinterpret_cast<float*>(smem_raw + position_header_bytes<DH>());
  float* Kc = Qc + kChunk * LD;

  const PositionIndex p = position_index(T, H, DH);
  float* J = jac + (static_cast<size_t>(p.bh) * T + p.t) * DH * DH;
  if (p.t < 2) {
    for (int idx = threadIdx.x; idx < DH * DH; idx += kThreads)
      J[idx] = (idx / DH == idx % DH) ? 1.f : 0.f;
    return;
  }
  float m, l, C[RM][RM];
  position_covariance<DH>(sh, Qc, Kc, p, qkv, T, H, &m, &l, C);
  const float isd = 1.f / sqrtf(static_cast<float>(DH));
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
  for (int a = 0; a < RM; ++a)
#pragma unroll
    for (int b = 0; b < RM; ++b) {
      const int i = ty + 16 * a, j = tx + 16 * b;
      J[i * DH + j] = (i == j ? 1.f : 0.f) - C[a][b] * isd;
    }
}

// ------------------------------------------------------------------ backward
// Workspace, per (b, h, t) with t counted (other slots are never read):
//   G     [B*H*T, dh, dh]   G_t (the scale is included)
//   means [B*H*T, 2, dh]    qbar_t, kbar_t
//   stats [B*H*T, 4]        m_t, l_t, gbar_t, unused
struct BarrierWorkspace {
  float* G;
  float* means;
  float* stats;
};

BarrierWorkspace carve_workspace(const AttentionShape& s, void* workspace) {
  const size_t n = static_cast<size_t>(s.B) * s.H * s.T;
  BarrierWorkspace w;
  w.G = static_cast<float*>(workspace);
  w.means = w.G + n * s.dh * s.dh;
  w.stats = w.means + n * 2 * s.dh;
  return w;
}

// First backward kernel.  Grid (T, B*H).  Shared: PositionShared, chunks (2 x [32][dh+1]),
// J_t / its inverse / G_t^T ([dh][dh+1] floats).
template <int DH>
size_t backward_rows_smem_bytes() {
  constexpr int LD = Tile<DH>::LD;
  return position_header_bytes<DH>() + (2 * kChunk * LD + DH * LD) * sizeof(float);
}

template <int DH>
__global__ void __launch_bounds__(kThreads, 2)
    barrier_backward_rows_kernel(const float* __restrict__ qkv, const uint8_t* __restrict__ mask,
                                 double eps, float scale, float* __restrict__ dqkv,
                                 BarrierWorkspace ws, int T, int H) {
  constexpr int LD = Tile<DH>::LD, RM = Tile<DH>::RM, CPT = Tile<DH>::CPT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PositionShared<DH>& sh = *reinterpret_cast<PositionShared<DH>*>(smem_raw);
  float* Qc = reinterpret_cast<float*>(smem_raw + position_header_bytes<DH>());
  float* Kc = Qc + kChunk * LD;
  float* Js = Kc + kChunk * LD;  // [dh][LD]

  const PositionIndex p = position_index(T, H, DH);
  if (!position_counted(p.t, p.b, T, mask)) return;
  const size_t slot = static_cast<size_t>(p.bh) * T + p.t;
  const float isd = 1.f / sqrtf(static_cast<float>(DH));

  float m, l;
  {
    float C[RM][RM];
    position_covariance<DH>(sh, Qc, Kc, p, qkv, T, H, &m, &l, C);
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
    for (int a = 0; a < RM; ++a)
#pragma unroll
      for (int b = 0; b < RM; ++b) {
        const int i = ty + 16 * a, j = tx + 16 * b;
        Js[i * LD + j] = (i == j ? 1.f : 0.f) - C[a][b] * isd;
      }
  }
  __syncthreads();
  int sign;
  double logabs;
  block_gj_inverse<DH, kThreads>(Js, sh.fcol, sh.perm, &sh.slot, &sign, &logabs);
  __syncthreads();  // a singular J leaves the loop early, before its last barrier

  // Js <- coef * J^{-1}, so that G_t[c][i] = Js[i][c].  An exactly singular J has delta = 0 and
  // -phi'(0) * 0 = 0: G_t = 0, as in core/barrier.cpp.
  const float coef =
      sign == 0 ? 0.f : static_cast<float>(static_cast<double>(scale) * grad_coefficient(sign, logabs, eps));
  for (int idx = threadIdx.x; idx < DH * DH; idx += kThreads) {
    const int i = idx / DH, c = idx % DH;
    Js[i * LD + c] = sign == 0 ? 0.f : Js[i * LD + c] * coef;
  }
  __syncthreads();
  float* G = ws.G + slot * DH * DH;
  for (int idx = threadIdx.x; idx < DH * DH; idx += kThreads) {
    const int c = idx / DH, i = idx % DH;
    G[idx] = Js[i * LD + c];
  }
  if (threadIdx.x < DH) {
    ws.means[slot * 2 * DH + threadIdx.x] = sh.qbar[threadIdx.x];
    ws.means[slot * 2 * DH + DH + threadIdx.x] = sh.kbar[threadIdx.x];
  }

  // Pass 3 over s < t: g_ts (row-group layout), gbar_t = sum pi g, a = sum pi g (k_s - kbar).
  const float* base = qkv + qkv_head_base(p.b, p.h, T, H, DH);
  const int row = threadIdx.x >> 3, part = threadIdx.x & 7;
  float gbar = 0.f, a = 0.f;
  for (int s0 = 0; s0 < p.t; s0 += kChunk) {
    __syncthreads();
    load_qk_chunk<DH>(Qc, Kc, base, p.rs, p.d, s0, p.t);
    __syncthreads();
    chunk_logits<DH>(sh.qt, Kc, s0, p.t, sh.zs);
    __syncthreads();
    const bool live = s0 + row < p.t;
    // u = G_t (k_s - kbar_t), columns part + 8j; then g = (1/sqrt dh) (q_s - qbar_t) . u.
    float u[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) u[j] = 0.f;
    for (int i = 0; i < DH; ++i) {
      const float kc = Kc[row * LD + i] - sh.kbar[i];
#pragma unroll
      for (int j = 0; j < CPT; ++j) u[j] = fmaf(Js[i * LD + part + 8 * j], kc, u[j]);
    }
    float gpart = 0.f;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int c = part + 8 * j;
      gpart = fmaf(Qc[row * LD + c] - sh.qbar[c], u[j], gpart);
    }
    const float g = row8_sum(gpart) * isd;
    if (part == 0) sh.red[row] = live ? strict_prob(sh.zs[row], m, l) * g : 0.f;
    __syncthreads();
    const int nr = min(kChunk, p.t - s0);
    for (int r = 0; r < nr; ++r) gbar += sh.red[r];
    if (threadIdx.x < DH)
      for (int r = 0; r < nr; ++r)
        a = fmaf(sh.red[r], Kc[r * LD + threadIdx.x] - sh.kbar[threadIdx.x], a);
  }
  if (threadIdx.x < DH) dqkv[(static_cast<size_t>(p.b) * T + p.t) * p.rs + static_cast<size_t>(p.h) * DH + threadIdx.x] +=
        isd * a;
  if (threadIdx.x == 0) {
    ws.stats[slot * 4 + 0] = m;
    ws.stats[slot * 4 + 1] = l;
    ws.stats[slot * 4 + 2] = gbar;
    ws.stats[slot * 4 + 3] = 0.f;
  }
}

// Second backward kernel.  Grid (ceil(T/32), B*H).  Block = positions s in [s0, s0 + 32) of one
// (b, h), row-group layout (thread: row s0 + tid/8, columns part + 8j).  Loops over the counted
// t > s0, reading G_t, qbar_t, kbar_t, m_t, l_t, gbar_t from the workspace.
// Shared: Q, K of the block's positions [32][dh+1], G_t [dh][dh+1], q_t, qbar_t, kbar_t [dh].
template <int DH>
size_t backward_cols_smem_bytes() {
  constexpr int LD = Tile<DH>::LD;
  return (2 * kChunk * LD + DH * LD + 3 * DH + 4) * sizeof(float);
}

template <int DH>
__global__ void __launch_bounds__(kThreads, 2)
    barrier_backward_cols_kernel(const float* __restrict__ qkv, const uint8_t* __restrict__ mask,
                                 float* __restrict__ dqkv, BarrierWorkspace ws, int T, int H) {
  constexpr int LD = Tile<DH>::LD, CPT = Tile<DH>::CPT;
  extern __shared__ __align__(16) float smem_f[];
  float* Qs = smem_f;               // [32][LD]
  float* Ks = Qs + kChunk * LD;     // [32][LD]
  float* Gs = Ks + kChunk * LD;     // [dh][LD]
  float* qt = Gs + DH * LD;         // [dh]
  float* qbar = qt + DH;            // [dh]
  float* kbar = qbar + DH;          // [dh]
  float* stats = kbar + DH;         // m, l, gbar

  const int s0 = static_cast<int>(blockIdx.x) * kChunk;  // early positions have the most t
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int d = H * DH;
  const size_t rs = 3 * static_cast<size_t>(d);
  const float* base = qkv + qkv_head_base(b, h, T, H, DH);
  const float isd = 1.f / sqrtf(static_cast<float>(DH));
  const int row = threadIdx.x >> 3, part = threadIdx.x & 7;
  const int s = s0 + row;

  load_qk_chunk<DH>(Qs, Ks, base, rs, d, s0, T);
  float dq[CPT], dk[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) dq[j] = dk[j] = 0.f;

  for (int t = max(s0 + 1, 2); t < T; ++t) {
    if (!position_counted(t, b, T, mask)) continue;  // uniform over the block
    const size_t slot = static_cast<size_t>(bh) * T + t;
    __syncthreads();  // the previous t's G_t and vectors are no longer read
    const float* G = ws.G + slot * DH * DH;
    for (int idx = threadIdx.x; idx < DH * DH; idx += kThreads) Gs[(idx / DH) * LD + idx % DH] = G[idx];
    if (threadIdx.x < DH) {
      qt[threadIdx.x] = base[static_cast<size_t>(t) * rs + threadIdx.x];
      qbar[threadIdx.x] = ws.means[slot * 2 * DH + threadIdx.x];
      kbar[threadIdx.x] = ws.means[slot * 2 * DH + DH + threadIdx.x];
    }
    if (threadIdx.x < 3) stats[threadIdx.x] = ws.stats[slot * 4 + threadIdx.x];
    __syncthreads();

    const bool live = s < t;  // s < t < T
    const float z = row8_dot<DH>(qt, Ks + row * LD, part) * isd;
    // u = G_t (k_s - kbar_t), w = G_t^T (q_s - qbar_t), columns c = part + 8j.
    float u[CPT], w[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) u[j] = w[j] = 0.f;
    for (int i = 0; i < DH; ++i) {
      const float kc = Ks[row * LD + i] - kbar[i];
      const float qc = Qs[row * LD + i] - qbar[i];
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = part + 8 * j;
        u[j] = fmaf(Gs[c * LD + i], kc, u[j]);
        w[j] = fmaf(Gs[i * LD + c], qc, w[j]);
      }
    }
    float gpart = 0.f;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int c = part + 8 * j;
      gpart = fmaf(Qs[row * LD + c] - qbar[c], u[j], gpart);
    }
    const float g = row8_sum(gpart) * isd;
    if (live) {
      const float pi = strict_prob(z, stats[0], stats[1]);
      const float dz = pi * (g - stats[2]);
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int c = part + 8 * j;
        dq[j] = fmaf(isd * pi, u[j], dq[j]);
        dk[j] = fmaf(isd, fmaf(dz, qt[c], pi * w[j]), dk[j]);
      }
    }
  }

  if (s < T) {
    float* dqs = dqkv + (static_cast<size_t>(b) * T + s) * rs + static_cast<size_t>(h) * DH;
    float* dks = dqs + d;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      dqs[part + 8 * j] += dq[j];
      dks[part + 8 * j] += dk[j];
    }
  }
}

// ------------------------------------------------------------------ launchers

template <int DH>
void launch_forward(const AttentionShape& s, const float* qkv, const uint8_t* mask, double eps,
                    float* logdet, float* phi, cudaStream_t stream) {
  const size_t smem = forward_smem_bytes<DH>();
  allow_dynamic_smem(barrier_forward_kernel<DH>, smem);
  const dim3 grid(static_cast<unsigned>(s.T), static_cast<unsigned>(s.B * s.H));
  barrier_forward_kernel<DH><<<grid, kThreads, smem, stream>>>(qkv, mask, eps, logdet, phi, s.T, s.H);
  BLM_CHECK_LAUNCH("barrier_forward_kernel");
}

template <int DH>
void launch_backward(const AttentionShape& s, const float* qkv, const uint8_t* mask, double eps,
                     float scale, float* dqkv, void* workspace, cudaStream_t stream) {
  const BarrierWorkspace ws = carve_workspace(s, workspace);
  const size_t smem_rows = backward_rows_smem_bytes<DH>();
  allow_dynamic_smem(barrier_backward_rows_kernel<DH>, smem_rows);
  const dim3 grid_rows(static_cast<unsigned>(s.T), static_cast<unsigned>(s.B * s.H));
  barrier_backward_rows_kernel<DH>
      <<<grid_rows, kThreads, smem_rows, stream>>>(qkv, mask, eps, scale, dqkv, ws, s.T, s.H);
  BLM_CHECK_LAUNCH("barrier_backward_rows_kernel");

  const size_t smem_cols = backward_cols_smem_bytes<DH>();
  allow_dynamic_smem(barrier_backward_cols_kernel<DH>, smem_cols);
  const dim3 grid_cols(static_cast<unsigned>(ceil_div(s.T, kChunk)), static_cast<unsigned>(s.B * s.H));
  barrier_backward_cols_kernel<DH>
      <<<grid_cols, kThreads, smem_cols, stream>>>(qkv, mask, dqkv, ws, s.T, s.H);
  BLM_CHECK_LAUNCH("barrier_backward_cols_kernel");
}

template <int DH>
void launch_jacobians(const AttentionShape& s, const float* qkv, float* jac, cudaStream_t stream) {
  const size_t smem = jacobian_smem_bytes<DH>();
  allow_dynamic_smem(barrier_jacobian_kernel<DH>, smem);
  const dim3 grid(static_cast<unsigned>(s.T), static_cast<unsigned>(s.B * s.H));
  barrier_jacobian_kernel<DH><<<grid, kThreads, smem, stream>>>(qkv, jac, s.T, s.H);
  BLM_CHECK_LAUNCH("barrier_jacobian_kernel");
}

}  // namespace

void barrier_forward(const AttentionShape& s, const float* qkv, const uint8_t* mask, double eps,
                     float* logdet, float* phi, void* workspace, cudaStream_t stream) {
  (void)workspace;  // the forward needs none
  check_attention_shape(s, "barrier_forward");
  if (s.B == 0 || s.T == 0) return;
  switch (s.dh) {
    case 32: launch_forward<32>(s, qkv, mask, eps, logdet, phi, stream); break;
    case 64: launch_forward<64>(s, qkv, mask, eps, logdet, phi, stream); break;
    default: launch_forward<128>(s, qkv, mask, eps, logdet, phi, stream); break;
  }
}

void barrier_backward(const AttentionShape& s, const float* qkv, const uint8_t* mask, double eps,
                      float scale, float* dqkv, void* workspace, cudaStream_t stream) {
  check_attention_shape(s, "barrier_backward");
  if (s.B == 0 || s.T < 3) return;  // positions t < 2 are never counted
  switch (s.dh) {
    case 32: launch_backward<32>(s, qkv, mask, eps, scale, dqkv, workspace, stream); break;
    case 64: launch_backward<64>(s, qkv, mask, eps, scale, dqkv, workspace, stream); break;
    default: launch_backward<128>(s, qkv, mask, eps, scale, dqkv, workspace, stream); break;
  }
}

// G_t, qbar_t, kbar_t and (m_t, l_t, gbar_t) for every (b, h, t).
size_t barrier_workspace_bytes(const AttentionShape& s) {
  return sizeof(float) * static_cast<size_t>(s.B) * s.H * s.T *
         (static_cast<size_t>(s.dh) * s.dh + 2 * static_cast<size_t>(s.dh) + 4);
}

void barrier_jacobians(const AttentionShape& s, const float* qkv, float* jac, cudaStream_t stream) {
  check_attention_shape(s, "barrier_jacobians");
  if (s.B == 0 || s.T == 0) return;
  switch (s.dh) {
    case 32: launch_jacobians<32>(s, qkv, jac, stream); break;
    case 64: launch_jacobians<64>(s, qkv, jac, stream); break;
    default: launch_jacobians<128>(s, qkv, jac, stream); break;
  }
}

void barrier_zero_outputs(const AttentionShape& s, float* logdet, float* phi, cudaStream_t stream) {
  const size_t BHT = static_cast<size_t>(s.B) * s.H * s.T;
  CUDA_CHECK(cudaMemsetAsync(logdet, 0, BHT * sizeof(float), stream));
  CUDA_CHECK(cudaMemsetAsync(phi, 0, BHT * sizeof(float), stream));
}

}  // namespace cuda
}  // namespace blm
