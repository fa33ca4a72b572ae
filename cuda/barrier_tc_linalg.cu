// The barrier's per-position linear algebra (interface and notation: cuda/barrier_tc_linalg.h):
// from S, Qb, Kb, J = I - c (S - Qb Kb^T) per compact row, then
//   det_kernel<D, PW>   LU with partial pivoting -> log det, phi           (evaluation)
//   forward_kernel<D>   Gauss-Jordan inverse with partial pivoting -> log det, phi and
//                       G = scale coef J^{-T} (over S), U, W, E, rowterm    (training forward)
// D = 32 or 64, fp32 elimination; the pivots' product is summed as log|pivot| in double at the
// end, so log det neither overflows nor underflows.
//
// Layout: one warp per matrix, 4 warps (matrices) per block, no block barriers.  Lane l owns the
// storage rows r = l + 32 m (m < R = D / 32), all columns, in registers: a[m][j].  Each step
// publishes the pivot row once through shared memory (the pivot's lane writes D floats as
// float4; every lane reads them back as broadcast float4 loads), so a step costs D / 4 shared
// loads for R D FMAs per lane, instead of one shuffle per column (the old warp kernels of
// barrier_tc.cu).  The pivot search of step k + 1 is issued right
// after column k + 1 is updated, before the rest of step k's FMAs, so its latency (a warp
// max-reduction and a shuffle) overlaps them.
//
// Pivoting never moves rows.  perm[k] (shared) is the storage row chosen at step k, pivs[k] its
// value; sign(det) = parity(perm) * prod sign(pivs), log|det| = sum log|pivs| (double).  The
// pivot is the largest |a| among the eligible rows, compared on (|a| bits with the low 7
// mantissa bits dropped) | (127 - r): within a factor 1 + 2^-16 of the largest, ties to the
// smaller row; a zero pivot means J is exactly singular (sign 0, log det -inf, G = 0).
//
// Columns rotate: the pivot column is always register column 0; each step writes column j into
// register column j - 1 and puts the finished column last, so the step loop is not unrolled
// (an unrolled 64-step loop makes ptxas spill) and still indexes registers by constants only.
//
// LU (det only).  The pivot row's multiplier is 1, so it becomes exactly 0 in every later
// column (x - 1 * x = 0): used rows then never win the pivot search again and need no flag.
// Only columns > k matter, so the window of register columns shrinks by PW every PW steps (the
// eliminated columns collect at the window's end and drop out when it shrinks): with PW = 4,
// 4352 FMAs per lane for D 64 instead of 8192 at full width.
//
// Gauss-Jordan (in place, rows scaled lazily).  Storing true row i as s_i b_i, a step with pivot
// row p (unused, so s_p = 1) and value P does: b_i -= (b_ik / P) b_p for i != p (the same update
// for used and unused rows), b_p unchanged with s_p = 1 / P, and the freed column k (last
// register column) gets -b_ik / P, or 1 for the pivot row.  So the pivot row needs no special
// FMAs (its multiplier is 0).  At the end, with pinv(r) the step at which row r was chosen,
//   J^{-1}[pinv(r)][perm[k]] = s_r b_r[k],  i.e.  G[perm[k]][pinv(r)] = scale coef s_r b_r[k].
// Rows are written to a shared tile [D][D+1] (row k = G row perm[k]), then to global memory
// coalesced; U, W, E and the diagonal come from the tile.
//
// rowterm = c (<G, S> - E) is evaluated as scale coef (tr J^{-1} - D): with
// S = (I - J) / c + Qb Kb^T, <G, S> = scale coef ((tr J^{-1} - D) / c + Kb^T J^{-1} Qb) and
// E = scale coef Kb^T J^{-1} Qb, so the Qb Kb^T part (which can be much larger than the
// covariance) cancels exactly instead of in fp32.
//
// Determinism: fixed-order sums (warp butterflies), no atomics.
//
// Registers / shared memory (nvcc 13, sm_90a, -Xptxas -v; 4 warps per block, 3 blocks per SM for
// D 64): det_kernel<64, 4> 168 registers, no spills; forward_kernel<64> 168 registers, 56 bytes
// spilled; D 32: 80 registers, no spills.  Shared memory 18,432 B per warp for D 64 (tile
// [64][65], two pivot-row buffers, qb, kb, perm, pivs, pinv), 73,728 B per block.
//
// Measured (H200, 2026-11-28, tests/gpu/test_barrier_warp_linalg.cu "[.bench][barrier-linalg]",
// ms per call, well-conditioned random J):
//                                  (b) 97,536 x D 64   (a) 12,288 x D 64   97,536 x D 32
//   barrier_linalg_det (PW 4)            1.84                0.25               0.38
//   barrier_linalg_forward (training)    3.43                0.47               0.68
// against the old det_warp_kernel 3.1 ms and grad_warp_kernel 4.4 ms per layer at (b) (figures
// of the lead's profile, not re-measured here; the training step ran both: 7.5 ms, now 3.4).  The forward runs at ~15 TFLOP/s (2 D^3 per
// matrix), a quarter of the fp32 peak; the targets (det 0.7 ms, forward 1.5 ms at (b)) are not
// met.  Also measured and dropped: the LU window shrinking every 8 steps (1.95 ms), and an 8 x 4
// lane-tile layout (lane: 8 rows x 16 columns; pivot row and multipliers through shared memory,
// 2.3x fewer shared-memory instructions per FMA): slower, det 2.71 ms and forward 4.77 ms (3
// blocks per SM, spilling) or 3.17 / 4.15 ms (2 blocks per SM, no spills), so shared-memory
// traffic is not what bounds these kernels.  Profiled (Nsight Compute, 2026-11-29, forward_kernel<64>
// at (b)): 11.8 warps per SM, issue slots 49% busy, DRAM 16%; a Gauss-Jordan step is ~215 warp
// instructions: 128 FFMA, 16 LDS.128 of the pivot row, 16 STS.128 issued for the pivot lane
// alone (11% of the stall samples: the other lanes wait at the branch), ~55 for the pivot search,
// the multipliers and the loop.  Stalls are spread (fixed-latency waits, short scoreboard, not
// selected, dispatch): the per-step chain at 3 warps per scheduler, as suspected.
#include "cuda/barrier_tc_linalg.h"

#include <cmath>
#include <string>

#include "cuda/barrier_phi.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr unsigned kAll = 0xffffffffu;
constexpr int kWarps = 4;  // matrices per block

// Blocks per SM the kernels are compiled for: D 64 -> 3 x 4 warps (168 registers, 3 x 74 KB of
// shared memory fill an H100/H200 SM); D 32 -> 6 blocks (85 registers).
template <int D>
constexpr int min_blocks() {
  return D == 64 ? 3 : 6;
}

// Per-warp shared memory, in floats (every offset a multiple of 4: float4 access).
template <int D>
struct Smem {
  static constexpr int kLd = D + 1;            // tile row stride: lanes' rows in distinct banks
  static constexpr int kTile = 0;              // [D][D+1]: S, later G rows in pivot order
  static constexpr int kRowBuf = D * kLd;      // [2][D]: the pivot row, double-buffered
  static constexpr int kQb = kRowBuf + 2 * D;  // [D] Qb_k
  static constexpr int kKb = kQb + D;          // [D] Kb_k
  static constexpr int kPerm = kKb + D;        // [D] int: storage row chosen at step k
  static constexpr int kPivs = kPerm + D;      // [D] float: the pivot of step k
  static constexpr int kPinv = kPivs + D;      // [D] int: the step at which row r was chosen
  static constexpr int kFloats = kPinv + D;
  static constexpr size_t kBytes = kFloats * sizeof(float);
  static_assert(kRowBuf % 4 == 0 && kFloats % 4 == 0, "float4 alignment");
};

// The position t of compact row rr (-1: padding) and its index bh * T + t in logdet / phi.
struct Slot {
  int t;
  int64_t full;
};
__device__ __forceinline__ Slot slot_of(const int32_t* rows, int64_t rr, int H, int K, int T) {
  const int64_t bh = rr / K;
  const int t = rows[(bh / H) * K + (rr - bh * K)];
  return Slot{t, bh * T + t};
}

// v[m_sel] for a warp-uniform runtime m_sel.
template <int R>
__device__ __forceinline__ float select_row(const float (&v)[R], int m_sel) {
  float out = v[0];
#pragma unroll
  for (int m = 1; m < R; ++m) out = m_sel == m ? v[m] : out;
  return out;
}

// 1 / x to within about an ulp: the hardware approximation and one Newton step (the multipliers
// need no correct rounding, and this avoids the division's slow-path branch in the step loop).
__device__ __forceinline__ float reciprocal(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return fmaf(r, fmaf(-x, r, 1.0f), r);
}

struct Pivot {
  int row;      // storage row (warp-uniform)
  float value;  // its entry in the pivot column
};

// The pivot among this warp's rows whose bit m of `used` is clear (see the file comment).
template <int R>
__device__ __forceinline__ Pivot find_pivot(const float (&col)[R], unsigned used) {
  const int lane = threadIdx.x & 31;
  unsigned key = 0;  // no eligible row: key 0, below every eligible row (whose key is >= 64)
#pragma unroll
  for (int m = 0; m < R; ++m) {
    const unsigned mine =
        (__float_as_uint(col[m]) & 0x7fffff80u) | static_cast<unsigned>(127 - (lane + 32 * m));
    key = ((used >> m) & 1u) ? key : max(key, mine);
  }
  key = __reduce_max_sync(kAll, key);
  const int p = 127 - static_cast<int>(key & 127u);
  return Pivot{p, __shfl_sync(kAll, select_row<R>(col, p >> 5), p & 31)};
}

// st.shared.v4 of a[m][4q .. 4q+3]; the PTX comment names m, so that the compiler cannot merge the
// stores of the rows m = 0, 1 into one store from a dynamically indexed a[mp][.] (LLVM does that
// with plain C++ stores, and the array then lives in local memory).
template <int M>
__device__ __forceinline__ void store_row_quad(float* p, float x, float y, float z, float w) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if constexpr (M == 0)
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4}; // row 0" ::"r"(addr), "f"(x), "f"(y),
                 "f"(z), "f"(w) : "memory");
  else
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4}; // row 1" ::"r"(addr), "f"(x), "f"(y),
                 "f"(z), "f"(w) : "memory");
}

template <int D, int W, int M>
__device__ __forceinline__ void store_row(const float (&a)[D / 32][D], float* buf) {
#pragma unroll
  for (int q = 0; q < W / 4; ++q)
    store_row_quad<M>(buf + 4 * q, a[M][4 * q], a[M][4 * q + 1], a[M][4 * q + 2], a[M][4 * q + 3]);
}

// The pivot's lane writes register columns [0, W) of its row to buf (W a multiple of 4).
template <int D, int W>
__device__ __forceinline__ void publish_row(const float (&a)[D / 32][D], Pivot pv, float* buf) {
  static_assert(D == 32 || D == 64, "one or two rows per lane");
  if ((threadIdx.x & 31) != (pv.row & 31)) return;
  if constexpr (D == 32) {
    store_row<D, W, 0>(a, buf);
  } else {
    if (pv.row < 32)
      store_row<D, W, 0>(a, buf);
    else
      store_row<D, W, 1>(a, buf);
  }
}

// Stages S_k through the tile (coalesced float4 loads) and Qb_k, Kb_k into shared memory, from
// where load_J (row layout) and load_J_frag (fragment layout) form J.
template <int D>
__device__ __forceinline__ void stage_J_inputs(const float* S_k, const float* Qb_k,
                                               const float* Kb_k, float* sm) {
  constexpr int R = D / 32, LD = Smem<D>::kLd;
  const int lane = threadIdx.x & 31;
  float* tile = sm + Smem<D>::kTile;
#pragma unroll
  for (int m = 0; m < R; ++m) {
    sm[Smem<D>::kQb + lane + 32 * m] = Qb_k[lane + 32 * m];
    sm[Smem<D>::kKb + lane + 32 * m] = Kb_k[lane + 32 * m];
  }
  const float4* S4 = reinterpret_cast<const float4*>(S_k);
#pragma unroll 8
  for (int it = 0; it < D * D / 128; ++it) {
    const int v = lane + 32 * it, i = (4 * v) / D, j = (4 * v) % D;
    const float4 s = S4[v];
    float* dst = tile + i * LD + j;
    dst[0] = s.x;
    dst[1] = s.y;
    dst[2] = s.z;
    dst[3] = s.w;
  }
  __syncwarp();
}

// J[r][j] = I - c (S - qb kb^T): one rounding for S - qb kb, one for I - c (.); both layouts
// form the same bits from the staged inputs.
__device__ __forceinline__ float J_entry(float s, float qb_r, float kb_j, float c, bool diagonal) {
  return fmaf(-c, fmaf(-qb_r, kb_j, s), diagonal ? 1.0f : 0.0f);
}

// Row layout: this lane's rows of J in registers.
template <int D>
__device__ __forceinline__ void load_J(const float* S_k, const float* Qb_k, const float* Kb_k,
                                       float c, float* sm, float (&a)[D / 32][D]) {
  constexpr int LD = Smem<D>::kLd;
  stage_J_inputs<D>(S_k, Qb_k, Kb_k, sm);
  const int lane = threadIdx.x & 31;
  const float* tile = sm + Smem<D>::kTile;
  const float4* kb4 = reinterpret_cast<const float4*>(sm + Smem<D>::kKb);
#pragma unroll
  for (int m = 0; m < D / 32; ++m) {
    const int r = lane + 32 * m;
    const float qr = sm[Smem<D>::kQb + r];
#pragma unroll
    for (int q = 0; q < D / 4; ++q) {
      const float4 k4 = kb4[q];
      const float kv[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = 4 * q + e;
        a[m][j] = J_entry(tile[r * LD + j], qr, kv[e], c, r == j);
      }
    }
  }
}

// Columns [1, W) of every row -= f * (the published pivot row), shifted one register column to
// the left; column 1 (the next pivot column) first, then the next pivot is searched, then the
// rest.  Returns the next pivot (rows with bit m of `used` set are not eligible).
template <int D, int W>
__device__ __forceinline__ Pivot eliminate_and_shift(float (&a)[D / 32][D], const float (&f)[D / 32],
                                                     const float* buf, unsigned used) {
  constexpr int R = D / 32;
  const float4* b4 = reinterpret_cast<const float4*>(buf);
  float4 v = b4[0];
  float next_col[R];
#pragma unroll
  for (int m = 0; m < R; ++m) next_col[m] = a[m][0] = fmaf(-f[m], v.y, a[m][1]);
  const Pivot next = find_pivot<R>(next_col, used);
#pragma unroll
  for (int m = 0; m < R; ++m) {
    a[m][1] = fmaf(-f[m], v.z, a[m][2]);
    a[m][2] = fmaf(-f[m], v.w, a[m][3]);
  }
#pragma unroll
  for (int q = 1; q < W / 4; ++q) {
    v = b4[q];
#pragma unroll
    for (int m = 0; m < R; ++m) {
      a[m][4 * q - 1] = fmaf(-f[m], v.x, a[m][4 * q]);
      a[m][4 * q] = fmaf(-f[m], v.y, a[m][4 * q + 1]);
      a[m][4 * q + 1] = fmaf(-f[m], v.z, a[m][4 * q + 2]);
      a[m][4 * q + 2] = fmaf(-f[m], v.w, a[m][4 * q + 3]);
    }
  }
  return next;
}

// Publishes step k's pivot row (window [0, W)) and records perm[k], pivs[k]; returns the row
// buffer to read after the __syncwarp it ends with.
template <int D, int W>
__device__ __forceinline__ const float* publish_step(const float (&a)[D / 32][D], Pivot pv, int k,
                                                     float* sm) {
  float* buf = sm + Smem<D>::kRowBuf + (k & 1) * D;  // double buffer: one __syncwarp per step
  publish_row<D, W>(a, pv, buf);
  if ((threadIdx.x & 31) == 0) {
    reinterpret_cast<int*>(sm + Smem<D>::kPerm)[k] = pv.row;
    sm[Smem<D>::kPivs + k] = pv.value;
  }
  __syncwarp();
  return buf;
}

// One LU step on the register window [0, W): returns the next pivot.
template <int D, int W>
__device__ __forceinline__ Pivot lu_step(float (&a)[D / 32][D], Pivot pv, int k, float* sm) {
  constexpr int R = D / 32;
  const int lane = threadIdx.x & 31;
  const float* buf = publish_step<D, W>(a, pv, k, sm);
  const float rinv = reciprocal(pv.value);
  float col[R], f[R];
#pragma unroll
  for (int m = 0; m < R; ++m) {
    col[m] = a[m][0];
    // The pivot row gets multiplier 1: exactly 0 from now on (see the file comment).
    f[m] = (lane + 32 * m == pv.row) ? 1.0f : col[m] * rinv;
  }
  const Pivot next = eliminate_and_shift<D, W>(a, f, buf, 0u);
#pragma unroll
  for (int m = 0; m < R; ++m) a[m][W - 1] = col[m];  // dead column, skipped once W shrinks
  return next;
}

// LU steps with windows W, W - PW, ..., PW (PW steps each); false when a pivot is exactly 0.
template <int D, int W, int PW>
__device__ __forceinline__ bool lu_windows(float (&a)[D / 32][D], Pivot& pv, int& k, float* sm) {
#pragma unroll 1
  for (int s = 0; s < PW; ++s, ++k) {
    if (pv.value == 0.0f) return false;  // warp-uniform
    pv = lu_step<D, W>(a, pv, k, sm);
  }
  if constexpr (W > PW)
    return lu_windows<D, W - PW, PW>(a, pv, k, sm);
  else
    return true;
}

// One Gauss-Jordan step (full width): returns the next pivot; sets the pivot row's bit in used.
template <int D>
__device__ __forceinline__ Pivot gj_step(float (&a)[D / 32][D], Pivot pv, int k, unsigned& used,
                                         float* sm) {
  constexpr int R = D / 32;
  const int lane = threadIdx.x & 31;
  const float* buf = publish_step<D, D>(a, pv, k, sm);
  const float rinv = reciprocal(pv.value);
  float f[R];
  bool is_piv[R];
#pragma unroll
  for (int m = 0; m < R; ++m) {
    is_piv[m] = lane + 32 * m == pv.row;
    used |= is_piv[m] ? (1u << m) : 0u;
    f[m] = is_piv[m] ? 0.0f : a[m][0] * rinv;
  }
  const Pivot next = eliminate_and_shift<D, D>(a, f, buf, used);
#pragma unroll
  for (int m = 0; m < R; ++m) a[m][D - 1] = is_piv[m] ? 1.0f : -f[m];
  return next;
}

// sign(det) and log|det| from perm and pivs (all D steps done; perm, pivs visible to the warp).
template <int D>
__device__ __forceinline__ void sign_and_logabs(const int* perm, const float* pivs, int* sign,
                                                double* logabs) {
  const int lane = threadIdx.x & 31;
  int odd = 0;  // inversions of perm plus negative pivots
  double la = 0.0;
#pragma unroll
  for (int m = 0; m < D / 32; ++m) {
    const int i = lane + 32 * m, pi = perm[i];
    for (int j = i + 1; j < D; ++j) odd += perm[j] < pi ? 1 : 0;
    odd += pivs[i] < 0.0f ? 1 : 0;
    la += log(fabs(static_cast<double>(pivs[i])));
  }
  odd = __reduce_add_sync(kAll, odd);
  *sign = (odd & 1) ? -1 : 1;
  *logabs = warp_sum(la);
}

__device__ __forceinline__ void write_logdet_phi(Slot slot, int sign, double logabs, double eps,
                                                 float* logdet, float* phi) {
  if ((threadIdx.x & 31) != 0) return;
  logdet[slot.full] = sign > 0 ? static_cast<float>(logabs) : -INFINITY;
  phi[slot.full] = static_cast<float>(phi_from_det(sign, logabs, eps));
}

template <int D, int PW>
__global__ void __launch_bounds__(32 * kWarps, min_blocks<D>()) det_kernel(
    const float* __restrict__ S, const float* __restrict__ Qb, const float* __restrict__ Kb,
    const int32_t* __restrict__ rows, int64_t nrows, int T, int H, int K, float c, double eps,
    float* __restrict__ logdet, float* __restrict__ phi) {
  extern __shared__ float4 smem_det[];
  const int warp = threadIdx.x / 32;
  const int64_t rr = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (rr >= nrows) return;  // warp-uniform; no block barriers
  const Slot slot = slot_of(rows, rr, H, K, T);
  if (slot.t < 0) return;
  float* sm = reinterpret_cast<float*>(smem_det) + warp * Smem<D>::kFloats;
  float a[D / 32][D];
  load_J<D>(S + rr * D * D, Qb + rr * D, Kb + rr * D, c, sm, a);
  float col0[D / 32];
#pragma unroll
  for (int m = 0; m < D / 32; ++m) col0[m] = a[m][0];
  Pivot pv = find_pivot<D / 32>(col0, 0u);
  int k = 0;
  int sign = 0;
  double logabs = -INFINITY;
  if (lu_windows<D, D, PW>(a, pv, k, sm))
    sign_and_logabs<D>(reinterpret_cast<const int*>(sm + Smem<D>::kPerm), sm + Smem<D>::kPivs,
                       &sign, &logabs);
  write_logdet_phi(slot, sign, logabs, eps, logdet, phi);
}

// G over S_k, U, W, E, rowterm from the tile (row k = G row perm[k], filled by the caller):
// G rows written coalesced; U[c] = sum_i G[i][c] qb[i] = sum_k tile[k][c] qb[perm k];
// W[perm k] = sum_j tile[k][j] kb[j]; E = U . kb; rowterm = sum_i (G[i][i] - gcoef)
// = scale coef (tr J^{-1} - D), G[i][i] = tile[pinv i][i].  qb_perm[k] = qb[perm k].
template <int D>
__device__ __forceinline__ void gradient_from_tile(const float* tile, const int* perm,
                                                   const int* pinv, const float* qb_perm,
                                                   const float* kb, float gcoef, float* G_k,
                                                   float* U_k, float* W_k, float* E_k,
                                                   float* rowterm_k) {
  constexpr int R = D / 32, LD = D + 1;
  const int lane = threadIdx.x & 31;
  for (int k = 0; k < D; ++k) {
    const int p = perm[k];
#pragma unroll
    for (int m = 0; m < R; ++m) G_k[p * D + lane + 32 * m] = tile[k * LD + lane + 32 * m];
  }
  float e = 0.0f, diag = 0.0f;
#pragma unroll
  for (int m = 0; m < R; ++m) {
    const int col = lane + 32 * m;
    float u = 0.0f;
#pragma unroll 8
    for (int k = 0; k < D; ++k) u = fmaf(tile[k * LD + col], qb_perm[k], u);
    U_k[col] = u;
    e = fmaf(u, kb[col], e);
    float w = 0.0f;  // tile row col = G row perm[col]
#pragma unroll 8
    for (int j = 0; j < D; ++j) w = fmaf(tile[col * LD + j], kb[j], w);
    W_k[perm[col]] = w;
    diag += tile[pinv[col] * LD + col] - gcoef;
  }
  e = warp_sum(e);
  diag = warp_sum(diag);
  if (lane == 0) {
    *E_k = e;
    *rowterm_k = diag;
  }
}

// After the elimination (perm complete): pinv[perm[k]] = k and qb_perm[k] = qb[perm[k]], the
// latter over the pivot-row buffers (free now).  Ends with __syncwarp.
template <int D>
__device__ __forceinline__ void finish_permutation(float* sm) {
  const int lane = threadIdx.x & 31;
  const int* perm = reinterpret_cast<const int*>(sm + Smem<D>::kPerm);
  int* pinv = reinterpret_cast<int*>(sm + Smem<D>::kPinv);
#pragma unroll
  for (int m = 0; m < D / 32; ++m) {
    const int k = lane + 32 * m;
    pinv[perm[k]] = k;
    sm[Smem<D>::kRowBuf + k] = sm[Smem<D>::kQb + perm[k]];
  }
  __syncwarp();
}

// gradient_from_tile on the tile the caller filled; gcoef = scale * coef.
template <int D>
__device__ __forceinline__ void gradient_from_filled_tile(float gcoef, float* sm, float* G_k,
                                                          float* U_k, float* W_k, float* E_k,
                                                          float* rowterm_k) {
  __syncwarp();
  gradient_from_tile<D>(sm + Smem<D>::kTile, reinterpret_cast<const int*>(sm + Smem<D>::kPerm),
                        reinterpret_cast<const int*>(sm + Smem<D>::kPinv), sm + Smem<D>::kRowBuf,
                        sm + Smem<D>::kKb, gcoef, G_k, U_k, W_k, E_k, rowterm_k);
}

// Row layout: fills the tile from the finished Gauss-Jordan registers (see the file comment),
// then gradient_from_tile; gcoef = scale * coef.
template <int D>
__device__ __forceinline__ void write_gradient(const float (&a)[D / 32][D], float gcoef, float* sm,
                                               float* G_k, float* U_k, float* W_k, float* E_k,
                                               float* rowterm_k) {
  constexpr int R = D / 32, LD = Smem<D>::kLd;
  const int lane = threadIdx.x & 31;
  float* tile = sm + Smem<D>::kTile;
  const float* pivs = sm + Smem<D>::kPivs;
  const int* pinv = reinterpret_cast<const int*>(sm + Smem<D>::kPinv);
  finish_permutation<D>(sm);
  // tile[k][pinv(r)] = G[perm k][pinv r] = gcoef s_r b_r[k], s_r = 1 / (row r's pivot).
#pragma unroll
  for (int m = 0; m < R; ++m) {
    const int pr = pinv[lane + 32 * m];
    const float g = gcoef / pivs[pr];
#pragma unroll
    for (int k = 0; k < D; ++k) tile[k * LD + pr] = g * a[m][k];
  }
  gradient_from_filled_tile<D>(gcoef, sm, G_k, U_k, W_k, E_k, rowterm_k);
}

template <int D>
__device__ __forceinline__ void write_zero_gradient(float* G_k, float* U_k, float* W_k, float* E_k,
                                                    float* rowterm_k) {
  const int lane = threadIdx.x & 31;
  float4* G4 = reinterpret_cast<float4*>(G_k);
  for (int i = lane; i < D * D / 4; i += 32) G4[i] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int m = 0; m < D / 32; ++m) U_k[lane + 32 * m] = W_k[lane + 32 * m] = 0.0f;
  if (lane == 0) *E_k = *rowterm_k = 0.0f;
}

template <int D>
__global__ void __launch_bounds__(32 * kWarps, min_blocks<D>()) forward_kernel(
    float* __restrict__ S, const float* __restrict__ Qb, const float* __restrict__ Kb,
    const int32_t* __restrict__ rows, int64_t nrows, int T, int H, int K, float c, double eps,
    float scale, float* __restrict__ logdet, float* __restrict__ phi, float* __restrict__ U,
    float* __restrict__ W, float* __restrict__ E, float* __restrict__ rowterm) {
  extern __shared__ float4 smem_fwd[];
  const int warp = threadIdx.x / 32;
  const int64_t rr = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (rr >= nrows) return;
  const Slot slot = slot_of(rows, rr, H, K, T);
  float* sm = reinterpret_cast<float*>(smem_fwd) + warp * Smem<D>::kFloats;
  float* G_k = S + rr * D * D;  // read as S first, written as G last (same warp)
  float a[D / 32][D];
  int sign = 0;
  double logabs = -INFINITY;
  if (slot.t >= 0) {
    load_J<D>(G_k, Qb + rr * D, Kb + rr * D, c, sm, a);
    float col0[D / 32];
#pragma unroll
    for (int m = 0; m < D / 32; ++m) col0[m] = a[m][0];
    Pivot pv = find_pivot<D / 32>(col0, 0u);
    unsigned used = 0;
    bool regular = true;
#pragma unroll 1
    for (int k = 0; k < D; ++k) {
      if (pv.value == 0.0f) {  // warp-uniform
        regular = false;
        break;
      }
      pv = gj_step<D>(a, pv, k, used, sm);
    }
    if (regular)
      sign_and_logabs<D>(reinterpret_cast<const int*>(sm + Smem<D>::kPerm), sm + Smem<D>::kPivs,
                         &sign, &logabs);
    write_logdet_phi(slot, sign, logabs, eps, logdet, phi);
  }
  if (sign == 0) {  // padding slot or exactly singular J
    write_zero_gradient<D>(G_k, U + rr * D, W + rr * D, E + rr, rowterm + rr);
    return;
  }
  const float gcoef =
      static_cast<float>(static_cast<double>(scale) * grad_coefficient(sign, logabs, eps));
  write_gradient<D>(a, gcoef, sm, G_k, U + rr * D, W + rr * D, E + rr, rowterm + rr);
}

// ---- Blocked Gauss-Jordan on tensor cores (D = 64; the training forward's default) ----------
//
// The same in-place elimination as forward_kernel (pivot column k at step k, partial pivoting,
// rows never move, the pivot row kept unscaled), so the same perm, pivs and final storage, in
// exact arithmetic; only the order of the updates differs.  Columns go in panels of 8.  Within
// a panel, 8 scalar steps update only the panel's columns.  Those steps compose to
// a_j <- a_j + Wp a_j[piv] for every column j outside the panel (a_j[piv]: the panel's 8 pivot
// rows, before the panel), and the finished panel column of step s is e_{piv s} + Wp e_s: so
// Wp = panel - E (E: ones at (piv s, s)), and the other 56 columns take one rank-8 update
//   A_rest += Wp [64 x 8] . A_rest[piv rows] [8 x 56]
// on mma.sync m16n8k8 with 3xTF32 operands (hi + lo splits, the lo.lo term dropped: about fp32's
// rounding), instead of 8 x 56 scalar FMAs per row.
//
// Layout (one warp per matrix, as forward_kernel): the matrix lives in C fragments,
// acc[mt][nt][.] = rows 16 mt + g (+ 8), columns 8 nt + 2c (+ 1) (lane = 4 g + c): lane g owns
// rows g, g + 8, ..., g + 56.  The register n tiles rotate: during panel p, register tile j holds
// column tile (p + j) mod 8, so the panel is always tile 0 and every index is a constant; the
// update writes tile n's result into register tile n - 1 (the mma's D and C differ: no moves)
// and the finished panel goes last.  The scalar steps run in the row layout (lane l: rows l,
// l + 32 of the panel, 8 columns each, as forward_kernel's rows), reached through a shared
// [64][12] panel buffer; the pivot rows' other columns go to a shared [8][72] buffer (B).
// Both live in the tile, which is free between loading J and writing G.
namespace blocked {

constexpr int kPanel = 8;               // columns per panel (one n8 tile)
constexpr int kPanLd = 12;              // panel buffer row stride: row-layout float4 reads and
                                        // A-fragment reads without bank conflicts
constexpr int kBLd = 72;                // B buffer row stride: b0 / b1 reads 8c + g, distinct
constexpr int kPan = Smem<64>::kTile;   // [64][kPanLd]
constexpr int kB = kPan + 64 * kPanLd;  // [8][kBLd]
static_assert(kB + kPanel * kBLd <= Smem<64>::kRowBuf, "panel and B buffers fit in the tile");
static_assert(kPan % 4 == 0 && kPanLd % 4 == 0 && kB % 4 == 0, "float4 / float2 alignment");

using Frag = float[4][8][4];  // [m tile][register n tile][C fragment]

// J in fragment layout.
__device__ __forceinline__ void load_J_frag(const float* S_k, const float* Qb_k, const float* Kb_k,
                                            float c, float* sm, Frag& acc) {
  stage_J_inputs<64>(S_k, Qb_k, Kb_k, sm);
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const float* tile = sm + Smem<64>::kTile;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * mt + 8 * h + g;
      const float qr = sm[Smem<64>::kQb + r];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = 8 * nt + 2 * q + e;
          acc[mt][nt][2 * h + e] =
              J_entry(tile[r * Smem<64>::kLd + j], qr, sm[Smem<64>::kKb + j], c, r == j);
        }
    }
  __syncwarp();  // the tile becomes the panel and B buffers
}

// One scalar step on the panel (row layout, column S): publishes the pivot row, records step k,
// eliminates; returns the pivot of column S + 1 (S < 7), searched as soon as that column is done.
template <int S>
__device__ __forceinline__ Pivot panel_step(float (&pr)[2][kPanel], Pivot pv, int k,
                                            unsigned& used, float* sm) {
  const int lane = threadIdx.x & 31;
  float* buf = sm + Smem<64>::kRowBuf + (S & 1) * kPanel;  // double buffer: one __syncwarp a step
  if (lane == (pv.row & 31)) {
    if (pv.row < 32) {
      store_row_quad<0>(buf, pr[0][0], pr[0][1], pr[0][2], pr[0][3]);
      store_row_quad<0>(buf + 4, pr[0][4], pr[0][5], pr[0][6], pr[0][7]);
    } else {
      store_row_quad<1>(buf, pr[1][0], pr[1][1], pr[1][2], pr[1][3]);
      store_row_quad<1>(buf + 4, pr[1][4], pr[1][5], pr[1][6], pr[1][7]);
    }
  }
  if (lane == 0) {
    reinterpret_cast<int*>(sm + Smem<64>::kPerm)[k] = pv.row;
    reinterpret_cast<int*>(sm + Smem<64>::kPinv)[pv.row] = k;
    sm[Smem<64>::kPivs + k] = pv.value;
  }
  __syncwarp();
  const float4 v0 = reinterpret_cast<const float4*>(buf)[0];
  const float4 v1 = reinterpret_cast<const float4*>(buf)[1];
  const float prow[kPanel] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
  const float rinv = reciprocal(pv.value);
  float f[2];
  bool is_piv[2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    is_piv[m] = lane + 32 * m == pv.row;
    used |= is_piv[m] ? (1u << m) : 0u;
    f[m] = is_piv[m] ? 0.0f : pr[m][S] * rinv;
  }
  Pivot next{0, 0.0f};
  if constexpr (S + 1 < kPanel) {
    float col[2];
#pragma unroll
    for (int m = 0; m < 2; ++m) col[m] = pr[m][S + 1] = fmaf(-f[m], prow[S + 1], pr[m][S + 1]);
    next = find_pivot<2>(col, used);
  }
#pragma unroll
  for (int m = 0; m < 2; ++m) {
#pragma unroll
    for (int j = S + 2; j < kPanel; ++j) pr[m][j] = fmaf(-f[m], prow[j], pr[m][j]);
#pragma unroll
    for (int j = 0; j < S; ++j) pr[m][j] = fmaf(-f[m], prow[j], pr[m][j]);
    pr[m][S] = is_piv[m] ? 1.0f : -f[m];
  }
  return next;
}

// The 8 scalar steps of panel p on its row-layout copy; false at an exactly zero pivot.
template <int S = 0>
__device__ __forceinline__ bool panel_steps(float (&pr)[2][kPanel], Pivot pv, int p,
                                            unsigned& used, float* sm) {
  if (pv.value == 0.0f) return false;  // warp-uniform
  const Pivot next = panel_step<S>(pr, pv, kPanel * p + S, used, sm);
  if constexpr (S + 1 < kPanel)
    return panel_steps<S + 1>(pr, next, p, used, sm);
  else
    return true;
}

__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  lo = to_tf32(x - __uint_as_float(hi));
}

// Panel p (see the namespace comment); false at an exactly zero pivot (warp-uniform).
template <int kMtGroup>
__device__ __forceinline__ bool gj_panel(Frag& acc, int p, unsigned& used, float* sm) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  float* pan = sm + kPan;
  float* bbuf = sm + kB;
  const int* perm = reinterpret_cast<const int*>(sm + Smem<64>::kPerm);
  const int* pinv = reinterpret_cast<const int*>(sm + Smem<64>::kPinv);
  // The panel (register tile 0) to the row layout.
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<float2*>(pan + (16 * mt + 8 * h + g) * kPanLd + 2 * q) =
          make_float2(acc[mt][0][2 * h], acc[mt][0][2 * h + 1]);
  __syncwarp();
  float pr[2][kPanel];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const float4* row = reinterpret_cast<const float4*>(pan + (lane + 32 * m) * kPanLd);
    const float4 x = row[0], y = row[1];
    pr[m][0] = x.x, pr[m][1] = x.y, pr[m][2] = x.z, pr[m][3] = x.w;
    pr[m][4] = y.x, pr[m][5] = y.y, pr[m][6] = y.z, pr[m][7] = y.w;
  }
  const float col0[2] = {pr[0][0], pr[1][0]};
  if (!panel_steps(pr, find_pivot<2>(col0, used), p, used, sm)) return false;
  // The finished panel back (each lane its own rows: no hazard with the reads above).
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    float4* row = reinterpret_cast<float4*>(pan + (lane + 32 * m) * kPanLd);
    row[0] = make_float4(pr[m][0], pr[m][1], pr[m][2], pr[m][3]);
    row[1] = make_float4(pr[m][4], pr[m][5], pr[m][6], pr[m][7]);
  }
  // B: the panel's pivot rows (step s -> B row s), register tiles 1 .. 7, as before the panel.
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const unsigned s = static_cast<unsigned>(pinv[16 * mt + 8 * h + g] - kPanel * p);
      if (s < kPanel) {
#pragma unroll
        for (int n = 1; n < 8; ++n)
          *reinterpret_cast<float2*>(bbuf + s * kBLd + 8 * (n - 1) + 2 * q) =
              make_float2(acc[mt][n][2 * h], acc[mt][n][2 * h + 1]);
      }
    }
  __syncwarp();
  // A: Wp = panel - E, split for 3xTF32 (a0 row g col q, a1 row g + 8, a2 / a3 col q + 4); the
  // m tiles in groups of kMtGroup (registers), each group sweeping the 7 register tiles.
  const int piv_q = perm[kPanel * p + q], piv_q4 = perm[kPanel * p + q + 4];
#pragma unroll
  for (int m0 = 0; m0 < 4; m0 += kMtGroup) {
    uint32_t ah[kMtGroup][4], al[kMtGroup][4];
#pragma unroll
    for (int i = 0; i < kMtGroup; ++i) {
      const int r0 = 16 * (m0 + i) + g, r1 = r0 + 8;
      split_tf32(pan[r0 * kPanLd + q] - (piv_q == r0 ? 1.0f : 0.0f), ah[i][0], al[i][0]);
      split_tf32(pan[r1 * kPanLd + q] - (piv_q == r1 ? 1.0f : 0.0f), ah[i][1], al[i][1]);
      split_tf32(pan[r0 * kPanLd + q + 4] - (piv_q4 == r0 ? 1.0f : 0.0f), ah[i][2], al[i][2]);
      split_tf32(pan[r1 * kPanLd + q + 4] - (piv_q4 == r1 ? 1.0f : 0.0f), ah[i][3], al[i][3]);
    }
    // The rank-8 update, register tile n into n - 1 (b0: B row q, column g; b1: row q + 4).
#pragma unroll
    for (int n = 1; n < 8; ++n) {
      uint32_t bh0, bl0, bh1, bl1;
      split_tf32(bbuf[q * kBLd + 8 * (n - 1) + g], bh0, bl0);
      split_tf32(bbuf[(q + 4) * kBLd + 8 * (n - 1) + g], bh1, bl1);
#pragma unroll
      for (int i = 0; i < kMtGroup; ++i) {
        const int mt = m0 + i;
        float t[4] = {acc[mt][n][0], acc[mt][n][1], acc[mt][n][2], acc[mt][n][3]};
        mma_tf32(t, al[i], bh0, bh1);
        mma_tf32(t, ah[i], bl0, bl1);
        mma_tf32(t, ah[i], bh0, bh1);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][n - 1][e] = t[e];
      }
    }
  }
  // The finished panel into register tile 7 (column tile p + 7 mod 8 = p - 1 of the next panel).
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 v = *reinterpret_cast<const float2*>(pan + (16 * mt + 8 * h + g) * kPanLd + 2 * q);
      acc[mt][7][2 * h] = v.x;
      acc[mt][7][2 * h + 1] = v.y;
    }
  __syncwarp();  // the buffers' reads are done before the next panel writes them
  return true;
}

// tile[k][pinv(r)] = gcoef s_r b_r[k] from the fragments (as write_gradient), then the rest.
__device__ __forceinline__ void write_gradient_frag(const Frag& acc, float gcoef, float* sm,
                                                    float* G_k, float* U_k, float* W_k, float* E_k,
                                                    float* rowterm_k) {
  constexpr int LD = Smem<64>::kLd;
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  float* tile = sm + Smem<64>::kTile;
  const float* pivs = sm + Smem<64>::kPivs;
  const int* pinv = reinterpret_cast<const int*>(sm + Smem<64>::kPinv);
  finish_permutation<64>(sm);
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int pr = pinv[16 * mt + 8 * h + g];
      const float s = gcoef / pivs[pr];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) tile[(8 * nt + 2 * q + e) * LD + pr] = s * acc[mt][nt][2 * h + e];
    }
  gradient_from_filled_tile<64>(gcoef, sm, G_k, U_k, W_k, E_k, rowterm_k);
}

// MinBlocks: blocks per SM the kernel is compiled for (registers: 65536 / (128 MinBlocks));
// MtGroup: m tiles whose A fragments are held at once (gj_panel).
template <int MinBlocks, int MtGroup>
__global__ void __launch_bounds__(32 * kWarps, MinBlocks) forward_kernel(
    float* __restrict__ S, const float* __restrict__ Qb, const float* __restrict__ Kb,
    const int32_t* __restrict__ rows, int64_t nrows, int T, int H, int K, float c, double eps,
    float scale, float* __restrict__ logdet, float* __restrict__ phi, float* __restrict__ U,
    float* __restrict__ W, float* __restrict__ E, float* __restrict__ rowterm) {
  constexpr int D = 64;
  extern __shared__ float4 smem_blocked[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t rr = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (rr >= nrows) return;
  const Slot slot = slot_of(rows, rr, H, K, T);
  float* sm = reinterpret_cast<float*>(smem_blocked) + warp * Smem<D>::kFloats;
  float* G_k = S + rr * D * D;  // read as S first, written as G last (same warp)
  Frag acc;
  int sign = 0;
  double logabs = -INFINITY;
  if (slot.t >= 0) {
    load_J_frag(G_k, Qb + rr * D, Kb + rr * D, c, sm, acc);
    int* pinv = reinterpret_cast<int*>(sm + Smem<D>::kPinv);
    pinv[lane] = pinv[lane + 32] = D;  // not chosen yet
    __syncwarp();
    unsigned used = 0;
    bool regular = true;
#pragma unroll 1
    for (int p = 0; p < D / kPanel; ++p)
      if (!gj_panel<MtGroup>(acc, p, used, sm)) {  // warp-uniform
        regular = false;
        break;
      }
    if (regular)
      sign_and_logabs<D>(reinterpret_cast<const int*>(sm + Smem<D>::kPerm), sm + Smem<D>::kPivs,
                         &sign, &logabs);
    write_logdet_phi(slot, sign, logabs, eps, logdet, phi);
  }
  if (sign == 0) {  // padding slot or exactly singular J
    write_zero_gradient<D>(G_k, U + rr * D, W + rr * D, E + rr, rowterm + rr);
    return;
  }
  const float gcoef =
      static_cast<float>(static_cast<double>(scale) * grad_coefficient(sign, logabs, eps));
  write_gradient_frag(acc, gcoef, sm, G_k, U + rr * D, W + rr * D, E + rr, rowterm + rr);
}

}  // namespace blocked

template <class F>
void allow_smem(F* kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
}

[[noreturn]] void refuse_head_size(int D) {
  throw DeviceError("barrier_linalg: head size " + std::to_string(D) +
                    " unsupported (32 or 64; 128 uses the block kernels of barrier_tc.cu)");
}

template <int D, int PW>
void launch_det(const float* S, const float* Qb, const float* Kb, const int32_t* rows,
                int64_t nrows, int H, int T, int K, float c, double eps, float* logdet, float* phi,
                cudaStream_t stream) {
  const size_t smem = kWarps * Smem<D>::kBytes;
  allow_smem(det_kernel<D, PW>, smem);
  det_kernel<D, PW><<<static_cast<unsigned>(ceil_div(nrows, kWarps)), 32 * kWarps, smem, stream>>>(
      S, Qb, Kb, rows, nrows, T, H, K, c, eps, logdet, phi);
  BLM_CHECK_LAUNCH("barrier_linalg det");
}

template <int D>
void launch_forward(float* S, const float* Qb, const float* Kb, const int32_t* rows, int64_t nrows,
                    int H, int T, int K, float c, double eps, float scale, float* logdet,
                    float* phi, float* U, float* W, float* E, float* rowterm, cudaStream_t stream) {
  const size_t smem = kWarps * Smem<D>::kBytes;
  // BLM_BARRIER_INVERSE: blocked (tensor cores, D 64) or rows (scalar, any D).
  const int choice = env_choice("BLM_BARRIER_INVERSE", {"blocked", "rows", "blocked3", "blocked3g1"}, 0);
  auto* kernel = forward_kernel<D>;
  if (D == 64 && choice != 1)
    kernel = choice == 0 ? blocked::forward_kernel<2, 4>
             : choice == 2 ? blocked::forward_kernel<3, 4> : blocked::forward_kernel<3, 1>;
  allow_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(ceil_div(nrows, kWarps)), 32 * kWarps, smem, stream>>>(
      S, Qb, Kb, rows, nrows, T, H, K, c, eps, scale, logdet, phi, U, W, E, rowterm);
  BLM_CHECK_LAUNCH("barrier_linalg forward");
}

// The LU's column window shrinks every 4 steps (measured at (b): 1.84 ms against 1.95 ms for 8).
constexpr int kWindowStep = 4;

}  // namespace

void barrier_linalg_det(const float* S, const float* Qb, const float* Kb, const int32_t* rows,
                        int BH, int H, int T, int K, int D, float c, double eps, float* logdet,
                        float* phi, cudaStream_t stream) {
  if (D != 32 && D != 64) refuse_head_size(D);
  const int64_t nrows = static_cast<int64_t>(BH) * K;
  if (nrows == 0) return;
  if (D == 32)
    launch_det<32, kWindowStep>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi, stream);
  else
    launch_det<64, kWindowStep>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi, stream);
}

void barrier_linalg_forward(float* S, const float* Qb, const float* Kb, const int32_t* rows,
                            int BH, int H, int T, int K, int D, float c, double eps, float scale,
                            bool training, float* logdet, float* phi, float* U, float* W, float* E,
                            float* rowterm, cudaStream_t stream) {
  if (!training) {
    barrier_linalg_det(S, Qb, Kb, rows, BH, H, T, K, D, c, eps, logdet, phi, stream);
    return;
  }
  if (D != 32 && D != 64) refuse_head_size(D);
  const int64_t nrows = static_cast<int64_t>(BH) * K;
  if (nrows == 0) return;
  if (D == 32)
    launch_forward<32>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, scale, logdet, phi, U, W, E,
                       rowterm, stream);
  else
    launch_forward<64>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, scale, logdet, phi, U, W, E,
                       rowterm, stream);
}

}  // namespace cuda
}  // namespace blm
