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
// barrier_tc.cu were bound by those shuffles).  The pivot search of step k + 1 is issued right
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
// Only columns > k matter, so the window of register columns shrinks by PW every PW steps
// (8 windows for D 64, PW 8: the eliminated columns at the window's end are dead and skipped
// once the window shrinks): 4608 FMAs per lane instead of 8192 for the full width.
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
#include "cuda/barrier_tc_linalg.h"

#include <cmath>
#include <string>
#include <type_traits>

#include "cuda/barrier_phi.cuh"
#include "cuda/common.cuh"

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

// Stages S_k through the tile (coalesced float4 loads) and forms this lane's rows of
// J = I - c (S - qb kb^T) in registers: one rounding for S - qb kb, one for I - c (.).
template <int D>
__device__ __forceinline__ void load_J(const float* S_k, const float* Qb_k, const float* Kb_k,
                                       float c, float* sm, float (&a)[D / 32][D]) {
  constexpr int R = D / 32, LD = Smem<D>::kLd;
  const int lane = threadIdx.x & 31;
  float* tile = sm + Smem<D>::kTile;
  float* qb = sm + Smem<D>::kQb;
  float* kb = sm + Smem<D>::kKb;
#pragma unroll
  for (int m = 0; m < R; ++m) {
    qb[lane + 32 * m] = Qb_k[lane + 32 * m];
    kb[lane + 32 * m] = Kb_k[lane + 32 * m];
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
  const float4* kb4 = reinterpret_cast<const float4*>(kb);
#pragma unroll
  for (int m = 0; m < R; ++m) {
    const int r = lane + 32 * m;
    const float qr = qb[r];
#pragma unroll
    for (int q = 0; q < D / 4; ++q) {
      const float4 k4 = kb4[q];
      const float kv[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = 4 * q + e;
        const float x = fmaf(-qr, kv[e], tile[r * LD + j]);
        a[m][j] = fmaf(-c, x, r == j ? 1.0f : 0.0f);
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

// Row layout: fills the tile from the finished Gauss-Jordan registers (see the file comment),
// then gradient_from_tile; gcoef = scale * coef.
template <int D>
__device__ __forceinline__ void write_gradient(const float (&a)[D / 32][D], float gcoef, float* sm,
                                               float* G_k, float* U_k, float* W_k, float* E_k,
                                               float* rowterm_k) {
  constexpr int R = D / 32, LD = Smem<D>::kLd;
  const int lane = threadIdx.x & 31;
  float* tile = sm + Smem<D>::kTile;
  const float* qb = sm + Smem<D>::kQb;
  const int* perm = reinterpret_cast<const int*>(sm + Smem<D>::kPerm);
  const float* pivs = sm + Smem<D>::kPivs;
  int* pinv = reinterpret_cast<int*>(sm + Smem<D>::kPinv);
  float* qb_perm = sm + Smem<D>::kRowBuf;  // the row buffers are free now
#pragma unroll
  for (int m = 0; m < R; ++m) {
    const int k = lane + 32 * m;
    pinv[perm[k]] = k;
    qb_perm[k] = qb[perm[k]];
  }
  __syncwarp();
  // tile[k][pinv(r)] = G[perm k][pinv r] = gcoef s_r b_r[k], s_r = 1 / (row r's pivot).
#pragma unroll
  for (int m = 0; m < R; ++m) {
    const int pr = pinv[lane + 32 * m];
    const float g = gcoef / pivs[pr];
#pragma unroll
    for (int k = 0; k < D; ++k) tile[k * LD + pr] = g * a[m][k];
  }
  __syncwarp();
  gradient_from_tile<D>(tile, perm, pinv, qb_perm, sm + Smem<D>::kKb, gcoef, G_k, U_k, W_k, E_k,
                        rowterm_k);
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

// ---- Tile layout: lane = rg * NC + cg owns rows rg * RL + i (i < RL), columns cg + NC * j ---------
//
// 8 row groups x 4 column groups; D 64: 8 rows x 16 columns per lane (D 32: 4 x 8).  A step
// needs the pivot row's CL values of this lane's columns and the RL multipliers of its rows: both
// come through shared memory (CL / 4 + RL / 4 float4 loads per RL * CL FMAs, against D / 4 per
// R * D in the row layout; each load request has 4 or 8 distinct 16-byte addresses in distinct
// banks).  The pivot row is written by the NC lanes of its row group (CL values each), the
// multipliers by the NR lanes owning column k (the "owners", cg == k mod NC, RL values each).
//
// Columns are cyclic over the column groups, so step k's pivot column is register column 0 of
// the owners of group k mod NC; after NC steps every lane's register columns rotate by one (the
// finished columns go last), so the step loop runs NC steps per (rolled) iteration and indexes
// registers by constants only.  At the end register column j holds logical column cg + NC j.
// The LU variant shrinks the window of register columns by 4 every 4 iterations (16 steps).
template <int D>
struct Tiles {
  static constexpr int NR = 8, NC = 4, RL = D / NR, CL = D / NC;
  static_assert(RL % 4 == 0 && CL % 4 == 0, "float4 access");
};

// Per-warp shared memory of the tile layout, in floats.
template <int D>
struct Smem2 {
  static constexpr int kLd = D + 1;
  static constexpr int kTile = 0;              // [D][D+1]: S, later G rows in pivot order
  static constexpr int kRowBuf = D * kLd;      // [2][D]: the pivot row (group cg at cg * CL);
                                               //         after the loop: qb[perm k]
  static constexpr int kFBuf = kRowBuf + 2 * D;  // [2][D]: multipliers (group rg at rg * RL);
                                                 //         after the loop: pinv
  static constexpr int kQb = kFBuf + 2 * D;
  static constexpr int kKb = kQb + D;
  static constexpr int kPerm = kKb + D;  // int
  static constexpr int kPivs = kPerm + D;
  static constexpr int kFloats = kPivs + D;
  static constexpr size_t kBytes = kFloats * sizeof(float);
  static_assert(kRowBuf % 4 == 0 && kFloats % 4 == 0, "float4 alignment");
};

template <int D>
using TileRegs = float[Tiles<D>::RL][Tiles<D>::CL];

// Stages S_k through the tile and forms this lane's block of J = I - c (S - qb kb^T).
template <int D>
__device__ __forceinline__ void load_J_tiles(const float* S_k, const float* Qb_k, const float* Kb_k,
                                             float c, float* sm, TileRegs<D>& a) {
  using L = Tiles<D>;
  constexpr int LD = Smem2<D>::kLd;
  const int lane = threadIdx.x & 31, rg = lane / L::NC, cg = lane % L::NC;
  float* tile = sm + Smem2<D>::kTile;
  float* qb = sm + Smem2<D>::kQb;
  float* kb = sm + Smem2<D>::kKb;
#pragma unroll
  for (int m = 0; m < D / 32; ++m) {
    qb[lane + 32 * m] = Qb_k[lane + 32 * m];
    kb[lane + 32 * m] = Kb_k[lane + 32 * m];
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
#pragma unroll
  for (int i = 0; i < L::RL; ++i) {
    const int r = rg * L::RL + i;
    const float qr = qb[r];
#pragma unroll
    for (int j = 0; j < L::CL; ++j) {
      const int col = cg + L::NC * j;
      const float x = fmaf(-qr, kb[col], tile[r * LD + col]);
      a[i][j] = fmaf(-c, x, r == col ? 1.0f : 0.0f);
    }
  }
}

// The pivot of the next step: among the rows of the owner lanes (cg == owner) with bit i of used
// clear, the largest |col| (keys as in the row layout); the value comes from the owner lane.
template <int D>
__device__ __forceinline__ Pivot find_pivot_tiles(const float (&col)[Tiles<D>::RL], unsigned used,
                                                  int owner) {
  using L = Tiles<D>;
  const int lane = threadIdx.x & 31, rg = lane / L::NC, cg = lane % L::NC;
  unsigned key = 0;
#pragma unroll
  for (int i = 0; i < L::RL; ++i) {
    const unsigned mine =
        (__float_as_uint(col[i]) & 0x7fffff80u) | static_cast<unsigned>(127 - (rg * L::RL + i));
    key = ((used >> i) & 1u) ? key : max(key, mine);
  }
  key = __reduce_max_sync(kAll, cg == owner ? key : 0u);
  const int p = 127 - static_cast<int>(key & 127u);
  const float v = select_row<L::RL>(col, p % L::RL);
  return Pivot{p, __shfl_sync(kAll, v, (p / L::RL) * L::NC + owner)};
}

// Register columns [0, W) of register row I to dst; the PTX comment carries I so that the stores
// of different rows cannot be merged into one from a dynamically indexed row (see store_row_quad).
template <int D, int W, int I>
__device__ __forceinline__ void store_tile_row(const TileRegs<D>& a, float* dst) {
#pragma unroll
  for (int q = 0; q < W / 4; ++q) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst + 4 * q));
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4}; // row %5" ::"r"(addr),
                 "f"(a[I][4 * q]), "f"(a[I][4 * q + 1]), "f"(a[I][4 * q + 2]), "f"(a[I][4 * q + 3]),
                 "n"(I)
                 : "memory");
  }
}
template <int D, int W, int I = 0>
__device__ __forceinline__ void publish_tile_row(const TileRegs<D>& a, int row, float* dst) {
  if (row == I) {
    store_tile_row<D, W, I>(a, dst);
    return;
  }
  if constexpr (I + 1 < Tiles<D>::RL) publish_tile_row<D, W, I + 1>(a, row, dst);
}

// One elimination step in the tile layout; C = k mod NC (the owners' column group), W the window
// of register columns, kShift on the last step of an iteration (C == NC - 1), kLU: multiplier 1
// for the pivot row and no inverse column (else Gauss-Jordan: multiplier 0, the owners' column 0
// becomes the inverse column, used rows are excluded from the search).  Returns the next pivot.
template <int D, int W, int C, bool kLU>
__device__ __forceinline__ Pivot step_tiles(TileRegs<D>& a, Pivot pv, int k, unsigned& used,
                                            float* sm) {
  using L = Tiles<D>;
  constexpr int RL = L::RL, NC = L::NC;
  constexpr bool kShift = C == NC - 1;
  constexpr int kNextOwner = (C + 1) % NC;
  const int lane = threadIdx.x & 31, rg = lane / NC, cg = lane % NC;
  const int prg = pv.row / RL, pi = pv.row % RL;
  float* rowbuf = sm + Smem2<D>::kRowBuf + (k & 1) * D;
  float* fbuf = sm + Smem2<D>::kFBuf + (k & 1) * D;
  if (rg == prg) publish_tile_row<D, W>(a, pi, rowbuf + cg * L::CL);
  const float rinv = reciprocal(pv.value);
  if (cg == C) {  // owners: the multipliers of their rows
    float f[RL];
#pragma unroll
    for (int i = 0; i < RL; ++i)
      f[i] = rg * RL + i == pv.row ? (kLU ? 1.0f : 0.0f) : a[i][0] * rinv;
    float4* f4 = reinterpret_cast<float4*>(fbuf + rg * RL);
#pragma unroll
    for (int q = 0; q < RL / 4; ++q) f4[q] = make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
  }
  if (lane == 0) {
    reinterpret_cast<int*>(sm + Smem2<D>::kPerm)[k] = pv.row;
    sm[Smem2<D>::kPivs + k] = pv.value;
  }
  if (!kLU && rg == prg) used |= 1u << pi;
  __syncwarp();
  float f[RL];
  const float4* f4 = reinterpret_cast<const float4*>(fbuf + rg * RL);
#pragma unroll
  for (int q = 0; q < RL / 4; ++q) {
    const float4 v = f4[q];
    f[4 * q] = v.x;
    f[4 * q + 1] = v.y;
    f[4 * q + 2] = v.z;
    f[4 * q + 3] = v.w;
  }
  const float4* p4 = reinterpret_cast<const float4*>(rowbuf + cg * L::CL);
  float4 pq = p4[0];
  // Register column 0: the owners' pivot column (LU: dead; Gauss-Jordan: the inverse column
  // -f, 1 for the pivot row), a regular column elsewhere.
  float col0[RL];
#pragma unroll
  for (int i = 0; i < RL; ++i) {
    const float owner_value = kLU ? a[i][0] : (rg * RL + i == pv.row ? 1.0f : -f[i]);
    col0[i] = cg == C ? owner_value : fmaf(-f[i], pq.x, a[i][0]);
  }
  Pivot next;
  if constexpr (!kShift) {
#pragma unroll
    for (int i = 0; i < RL; ++i) a[i][0] = col0[i];
    float nc[RL];
#pragma unroll
    for (int i = 0; i < RL; ++i) nc[i] = a[i][0];
    next = find_pivot_tiles<D>(nc, used, kNextOwner);
#pragma unroll
    for (int i = 0; i < RL; ++i) {
      a[i][1] = fmaf(-f[i], pq.y, a[i][1]);
      a[i][2] = fmaf(-f[i], pq.z, a[i][2]);
      a[i][3] = fmaf(-f[i], pq.w, a[i][3]);
    }
#pragma unroll
    for (int q = 1; q < W / 4; ++q) {
      pq = p4[q];
#pragma unroll
      for (int i = 0; i < RL; ++i) {
        a[i][4 * q] = fmaf(-f[i], pq.x, a[i][4 * q]);
        a[i][4 * q + 1] = fmaf(-f[i], pq.y, a[i][4 * q + 1]);
        a[i][4 * q + 2] = fmaf(-f[i], pq.z, a[i][4 * q + 2]);
        a[i][4 * q + 3] = fmaf(-f[i], pq.w, a[i][4 * q + 3]);
      }
    }
  } else {
    // Register column 1 becomes column 0 and holds the next pivot column (owners: group 0).
    float nc[RL];
#pragma unroll
    for (int i = 0; i < RL; ++i) nc[i] = a[i][0] = fmaf(-f[i], pq.y, a[i][1]);
    next = find_pivot_tiles<D>(nc, used, kNextOwner);
#pragma unroll
    for (int i = 0; i < RL; ++i) {
      a[i][1] = fmaf(-f[i], pq.z, a[i][2]);
      a[i][2] = fmaf(-f[i], pq.w, a[i][3]);
    }
#pragma unroll
    for (int q = 1; q < W / 4; ++q) {
      pq = p4[q];
#pragma unroll
      for (int i = 0; i < RL; ++i) {
        a[i][4 * q - 1] = fmaf(-f[i], pq.x, a[i][4 * q]);
        a[i][4 * q] = fmaf(-f[i], pq.y, a[i][4 * q + 1]);
        a[i][4 * q + 1] = fmaf(-f[i], pq.z, a[i][4 * q + 2]);
        a[i][4 * q + 2] = fmaf(-f[i], pq.w, a[i][4 * q + 3]);
      }
    }
#pragma unroll
    for (int i = 0; i < RL; ++i) a[i][W - 1] = col0[i];
  }
  return next;
}

// NC steps (one per column group, the last one rotating); false when a pivot is exactly 0.
template <int D, int W, bool kLU, int C = 0>
__device__ __forceinline__ bool iteration_tiles(TileRegs<D>& a, Pivot& pv, int& k, unsigned& used,
                                                float* sm) {
  if (pv.value == 0.0f) return false;  // warp-uniform
  pv = step_tiles<D, W, C, kLU>(a, pv, k, used, sm);
  ++k;
  if constexpr (C + 1 < Tiles<D>::NC)
    return iteration_tiles<D, W, kLU, C + 1>(a, pv, k, used, sm);
  else
    return true;
}

// LU: windows of W, W - 4, ..., 4 register columns, 4 iterations (4 NC steps) each.
template <int D, int W>
__device__ __forceinline__ bool lu_tiles(TileRegs<D>& a, Pivot& pv, int& k, float* sm) {
  unsigned used = 0;  // the LU needs no flags (used rows are exactly 0)
#pragma unroll 1
  for (int it = 0; it < 4; ++it)
    if (!iteration_tiles<D, W, true>(a, pv, k, used, sm)) return false;
  if constexpr (W > 4)
    return lu_tiles<D, W - 4>(a, pv, k, sm);
  else
    return true;
}

template <int D>
__device__ __forceinline__ Pivot first_pivot_tiles(const TileRegs<D>& a) {
  float col[Tiles<D>::RL];
#pragma unroll
  for (int i = 0; i < Tiles<D>::RL; ++i) col[i] = a[i][0];
  return find_pivot_tiles<D>(col, 0u, 0);
}

template <int D, int MB>
__global__ void __launch_bounds__(32 * kWarps, MB) det_tiles_kernel(
    const float* __restrict__ S, const float* __restrict__ Qb, const float* __restrict__ Kb,
    const int32_t* __restrict__ rows, int64_t nrows, int T, int H, int K, float c, double eps,
    float* __restrict__ logdet, float* __restrict__ phi) {
  extern __shared__ float4 smem_det2[];
  const int warp = threadIdx.x / 32;
  const int64_t rr = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (rr >= nrows) return;
  const Slot slot = slot_of(rows, rr, H, K, T);
  if (slot.t < 0) return;
  float* sm = reinterpret_cast<float*>(smem_det2) + warp * Smem2<D>::kFloats;
  TileRegs<D> a;
  load_J_tiles<D>(S + rr * D * D, Qb + rr * D, Kb + rr * D, c, sm, a);
  Pivot pv = first_pivot_tiles<D>(a);
  int k = 0, sign = 0;
  double logabs = -INFINITY;
  if (lu_tiles<D, Tiles<D>::CL>(a, pv, k, sm))
    sign_and_logabs<D>(reinterpret_cast<const int*>(sm + Smem2<D>::kPerm), sm + Smem2<D>::kPivs,
                       &sign, &logabs);
  write_logdet_phi(slot, sign, logabs, eps, logdet, phi);
}

template <int D, int MB>
__global__ void __launch_bounds__(32 * kWarps, MB) forward_tiles_kernel(
    float* __restrict__ S, const float* __restrict__ Qb, const float* __restrict__ Kb,
    const int32_t* __restrict__ rows, int64_t nrows, int T, int H, int K, float c, double eps,
    float scale, float* __restrict__ logdet, float* __restrict__ phi, float* __restrict__ U,
    float* __restrict__ W, float* __restrict__ E, float* __restrict__ rowterm) {
  using L = Tiles<D>;
  extern __shared__ float4 smem_fwd2[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t rr = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (rr >= nrows) return;
  const Slot slot = slot_of(rows, rr, H, K, T);
  float* sm = reinterpret_cast<float*>(smem_fwd2) + warp * Smem2<D>::kFloats;
  const int* perm = reinterpret_cast<const int*>(sm + Smem2<D>::kPerm);
  const float* pivs = sm + Smem2<D>::kPivs;
  float* G_k = S + rr * D * D;
  TileRegs<D> a;
  int sign = 0;
  double logabs = -INFINITY;
  if (slot.t >= 0) {
    load_J_tiles<D>(G_k, Qb + rr * D, Kb + rr * D, c, sm, a);
    Pivot pv = first_pivot_tiles<D>(a);
    unsigned used = 0;
    int k = 0;
    bool regular = true;
#pragma unroll 1
    for (int it = 0; it < L::CL && regular; ++it)
      regular = iteration_tiles<D, L::CL, false>(a, pv, k, used, sm);
    if (regular) sign_and_logabs<D>(perm, pivs, &sign, &logabs);
    write_logdet_phi(slot, sign, logabs, eps, logdet, phi);
  }
  if (sign == 0) {
    write_zero_gradient<D>(G_k, U + rr * D, W + rr * D, E + rr, rowterm + rr);
    return;
  }
  const float gcoef =
      static_cast<float>(static_cast<double>(scale) * grad_coefficient(sign, logabs, eps));
  // tile[col][pinv(r)] = G[perm col][pinv r] = gcoef s_r b_r[col], col = cg + NC j.
  constexpr int LD = Smem2<D>::kLd;
  float* tile = sm + Smem2<D>::kTile;
  int* pinv = reinterpret_cast<int*>(sm + Smem2<D>::kFBuf);  // free after the loop
  float* qb_perm = sm + Smem2<D>::kRowBuf;
  const float* qb = sm + Smem2<D>::kQb;
#pragma unroll
  for (int m = 0; m < D / 32; ++m) {
    const int k = lane + 32 * m;
    pinv[perm[k]] = k;
    qb_perm[k] = qb[perm[k]];
  }
  __syncwarp();
  const int rg = lane / L::NC, cg = lane % L::NC;
#pragma unroll
  for (int i = 0; i < L::RL; ++i) {
    const int pr = pinv[rg * L::RL + i];
    const float g = gcoef / pivs[pr];
#pragma unroll
    for (int j = 0; j < L::CL; ++j) tile[(cg + L::NC * j) * LD + pr] = g * a[i][j];
  }
  __syncwarp();
  gradient_from_tile<D>(tile, perm, pinv, qb_perm, sm + Smem2<D>::kKb, gcoef, G_k, U + rr * D,
                        W + rr * D, E + rr, rowterm + rr);
}

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
  const unsigned grid = static_cast<unsigned>(ceil_div(nrows, kWarps));
  if constexpr (PW <= 0) {  // tile layout, -PW blocks per SM (0: min_blocks)
    constexpr int MB = PW == 0 ? min_blocks<D>() : -PW;
    const size_t smem = kWarps * Smem2<D>::kBytes;
    allow_smem(det_tiles_kernel<D, MB>, smem);
    det_tiles_kernel<D, MB><<<grid, 32 * kWarps, smem, stream>>>(S, Qb, Kb, rows, nrows, T, H, K,
                                                                 c, eps, logdet, phi);
  } else {
    const size_t smem = kWarps * Smem<D>::kBytes;
    allow_smem(det_kernel<D, PW>, smem);
    det_kernel<D, PW><<<grid, 32 * kWarps, smem, stream>>>(S, Qb, Kb, rows, nrows, T, H, K, c, eps,
                                                           logdet, phi);
  }
  BLM_CHECK_LAUNCH("barrier_linalg det");
}

template <int D, int kTiles>  // 0: rows; 1: tiles at min_blocks; 2: tiles at 2 blocks per SM
void launch_forward(float* S, const float* Qb, const float* Kb, const int32_t* rows, int64_t nrows,
                    int H, int T, int K, float c, double eps, float scale, float* logdet,
                    float* phi, float* U, float* W, float* E, float* rowterm, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div(nrows, kWarps));
  if constexpr (kTiles != 0) {
    constexpr int MB = kTiles == 1 ? min_blocks<D>() : 2;
    const size_t smem = kWarps * Smem2<D>::kBytes;
    allow_smem(forward_tiles_kernel<D, MB>, smem);
    forward_tiles_kernel<D, MB><<<grid, 32 * kWarps, smem, stream>>>(
        S, Qb, Kb, rows, nrows, T, H, K, c, eps, scale, logdet, phi, U, W, E, rowterm);
  } else {
    const size_t smem = kWarps * Smem<D>::kBytes;
    allow_smem(forward_kernel<D>, smem);
    forward_kernel<D><<<grid, 32 * kWarps, smem, stream>>>(S, Qb, Kb, rows, nrows, T, H, K, c, eps,
                                                           scale, logdet, phi, U, W, E, rowterm);
  }
  BLM_CHECK_LAUNCH("barrier_linalg forward");
}

// The launchers' variants (detail::kDet*, kForward*): chosen from the [.bench] measurements.
constexpr int kDefaultDet = detail::kDetTiles;
constexpr int kDefaultForward = detail::kForwardTiles;

template <int D>
void det_variant(int variant, const float* S, const float* Qb, const float* Kb,
                 const int32_t* rows, int64_t nrows, int H, int T, int K, float c, double eps,
                 float* logdet, float* phi, cudaStream_t stream) {
  switch (variant) {
    case detail::kDetRows8:
      return launch_det<D, 8>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi, stream);
    case detail::kDetRows4:
      return launch_det<D, 4>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi, stream);
    case detail::kDetTiles:
      return launch_det<D, 0>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi, stream);
    default:
      return launch_det<D, -2>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi, stream);
  }
}

}  // namespace

namespace detail {
void barrier_linalg_det_variant(int variant, const float* S, const float* Qb, const float* Kb,
                                const int32_t* rows, int BH, int H, int T, int K, int D, float c,
                                double eps, float* logdet, float* phi, cudaStream_t stream) {
  if (D != 32 && D != 64) refuse_head_size(D);
  if (variant < kDetRows8 || variant > kDetTiles2)
    throw DeviceError("barrier_linalg: det variant " + std::to_string(variant) + " unknown");
  const int64_t nrows = static_cast<int64_t>(BH) * K;
  if (nrows == 0) return;
  if (D == 32)
    det_variant<32>(variant, S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi, stream);
  else
    det_variant<64>(variant, S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi, stream);
}

void barrier_linalg_forward_variant(int variant, float* S, const float* Qb, const float* Kb,
                                    const int32_t* rows, int BH, int H, int T, int K, int D,
                                    float c, double eps, float scale, float* logdet, float* phi,
                                    float* U, float* W, float* E, float* rowterm,
                                    cudaStream_t stream) {
  if (D != 32 && D != 64) refuse_head_size(D);
  if (variant < kForwardRows || variant > kForwardTiles2)
    throw DeviceError("barrier_linalg: forward variant " + std::to_string(variant) + " unknown");
  const int64_t nrows = static_cast<int64_t>(BH) * K;
  if (nrows == 0) return;
  auto run = [&](auto d_tag, auto v_tag) {
    launch_forward<decltype(d_tag)::value, decltype(v_tag)::value>(
        S, Qb, Kb, rows, nrows, H, T, K, c, eps, scale, logdet, phi, U, W, E, rowterm, stream);
  };
  using D32 = std::integral_constant<int, 32>;
  using D64 = std::integral_constant<int, 64>;
  using V0 = std::integral_constant<int, 0>;
  using V1 = std::integral_constant<int, 1>;
  using V2 = std::integral_constant<int, 2>;
  if (D == 32) {
    if (variant == kForwardRows) run(D32{}, V0{});
    if (variant == kForwardTiles) run(D32{}, V1{});
    if (variant == kForwardTiles2) run(D32{}, V2{});
  } else {
    if (variant == kForwardRows) run(D64{}, V0{});
    if (variant == kForwardTiles) run(D64{}, V1{});
    if (variant == kForwardTiles2) run(D64{}, V2{});
  }
}
}  // namespace detail

void barrier_linalg_det(const float* S, const float* Qb, const float* Kb, const int32_t* rows,
                        int BH, int H, int T, int K, int D, float c, double eps, float* logdet,
                        float* phi, cudaStream_t stream) {
  detail::barrier_linalg_det_variant(kDefaultDet, S, Qb, Kb, rows, BH, H, T, K, D, c, eps, logdet,
                                     phi, stream);
}

void barrier_linalg_forward(float* S, const float* Qb, const float* Kb, const int32_t* rows,
                            int BH, int H, int T, int K, int D, float c, double eps, float scale,
                            bool training, float* logdet, float* phi, float* U, float* W, float* E,
                            float* rowterm, cudaStream_t stream) {
  if (!training) {
    barrier_linalg_det(S, Qb, Kb, rows, BH, H, T, K, D, c, eps, logdet, phi, stream);
    return;
  }
  detail::barrier_linalg_forward_variant(kDefaultForward, S, Qb, Kb, rows, BH, H, T, K, D, c, eps,
                                         scale, logdet, phi, U, W, E, rowterm, stream);
}

}  // namespace cuda
}  // namespace blm
