// The barrier's per-position linear algebra (interface and notation: cuda/barrier_tc_linalg.h):
// from S, Qb, Kb, J = I - c (S - Qb Kb^T) per compact row, then
//   det_kernel<D, PW>   LU with partial pivoting -> log det, phi           (evaluation); for D 64
//                       first on the diagonal without the pivot search, two steps per sweep,
//                       checked, and again with the search where the check fails ("LU on the
//                       diagonal" below)
//   forward_kernel<D>   Gauss-Jordan inverse with partial pivoting -> log det, phi and
//                       G = scale coef J^{-T} (over S, fp32 or bf16), U, W, E, rowterm
//                       (training forward); for D 64 first on the diagonal without the pivot
//                       search, two steps per sweep, checked, and again with the search where
//                       the check fails ("Gauss-Jordan on the diagonal" below)
// D = 32 or 64, fp32 elimination; the pivots' product is summed as log|pivot| in double at the
// end, so log det neither overflows nor underflows.
//
// Layout: one warp per matrix, 4 warps (matrices) per block, no block barriers.  Lane l owns the
// storage rows r = l + 32 m (m < R = D / 32), all columns, in registers: a[m][j].  The pivot
// row goes through shared memory (the pivot's lane writes D floats as float4; every lane reads
// them back as broadcast float4 loads), so a step costs D / 4 shared loads for R D FMAs per
// lane, instead of one shuffle per column (the old warp kernels of barrier_tc.cu).  The pivot
// search of step k + 1 is issued right after column k + 1 is updated, before the rest of step
// k's FMAs, so its latency (a warp max-reduction and a shuffle) overlaps them; and the row of
// that pivot is written during step k's sweep, each quad a few quads after the FMAs finish it
// (predicated stores, double-buffered rows, one __syncwarp per step), so the next step starts
// on a published row instead of waiting for the pivot's lane to write it.
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
// D 64): det_kernel<64, 16> and forward_kernel<64> 168 registers, 28 bytes of spill stores each
// (forward_kernel<64> since the diagonal path: none inside the step loops, at the joins between
// the loops and on the shuffles' divergence paths, SASS of 2026-11-29; with two diagonal steps
// per sweep 44 bytes, and 28 again since the choice of path is one function, eliminate; where in
// the SASS not re-checked; det_kernel<64> since its diagonal path, 2026-11-30, see
// kLuDiagonalWindow); D 32: 78 and 80 registers, no spills.  Shared memory 18,432 B per warp for
// D 64 (tile [64][65], two pivot-row buffers, qb, kb, perm, pivs, pinv), 73,728 B per block.
//
// Measured (H200, 2026-11-28, tests/gpu/test_barrier_warp_linalg.cu "[.bench][barrier-linalg]",
// ms per call, well-conditioned random J):
//                                  (b) 97,536 x D 64   (a) 12,288 x D 64   97,536 x D 32
//   barrier_linalg_det (PW 4)            1.84                0.25               0.38
//   barrier_linalg_forward (training)    3.43                0.47               0.68
// against the old det_warp_kernel 3.1 ms and grad_warp_kernel 4.4 ms per layer at (b) (figures
// of the lead's profile, not re-measured here; the training step ran both: 7.5 ms, now 3.4).
// The forward runs at ~15 TFLOP/s (2 D^3 per matrix), a quarter of the fp32 peak; the targets
// (det 0.7 ms, forward 1.5 ms at (b)) are not met.  Also measured and dropped: the LU window
// shrinking every 8 steps (1.95 ms), and an 8 x 4 lane-tile layout (lane: 8 rows x 16 columns;
// pivot row and multipliers through shared memory, 2.3x fewer shared-memory instructions per
// FMA): slower, det 2.71 ms and forward 4.77 ms (3 blocks per SM, spilling) or 3.17 / 4.15 ms
// (2 blocks per SM, no spills), so shared-memory traffic is not what bounds these kernels.
// Profiled (Nsight Compute, 2026-11-29, forward_kernel<64> at (b)): 11.8 warps per SM, issue
// slots 49% busy, DRAM 16%; a Gauss-Jordan step was ~215 warp instructions: 128 FFMA, 16
// LDS.128 of the pivot row, 16 STS.128 issued for the pivot lane alone (11% of the stall
// samples: the other lanes waited at the branch), ~55 for the pivot search, the multipliers and
// the loop.  Stalls are spread (fixed-latency waits, short scoreboard, not selected, dispatch):
// the per-step chain at 3 warps per scheduler, as suspected.
//
// Since then the pivot row is written during the previous step's sweep (predicated stores, two
// per quad for D 64, overlapping the FMAs).  Same bench, 2026-11-29, the old code built and run
// alongside in the same call: det 1.69 / 0.24 / 0.38 ms, forward 3.02 / 0.42 / 0.63 ms (lag 2,
// and 3 for D 32);
// the (b) lambda 0.03 training step 50.2 -> 48.3 ms with a lag of 4.  A first attempt, one copy
// of the sweep per register row of the next pivot, spilled 224 bytes at the copies' join and
// made the forward slower (4.18 ms); taking 1 / pivot where the pivot is found (mid-sweep)
// instead of at the next step's start measured slower too (3.07 against 3.02 ms).  Warp state
// after the change (Nsight Compute, forward_kernel<64> at (b), profiled on that mid-sweep
// reciprocal variant, 2% slower than this code): 0.62 warps issued per scheduler and cycle (was
// 0.49), 4.75 cycles per issued instruction: fixed-latency waits 0.98, not selected 0.92, short
// scoreboard 0.73, dispatch 0.63.  The schedulers are mostly busy now, so the next gain needs
// fewer instructions per step, not more overlap.  Measured and dropped on that ground (H200,
// 2026-11-29, same bench, both builds in one call): a persistent forward_kernel (3 blocks per SM,
// each warp looping over rows with a bulk L2 prefetch of the next row's S; 168 registers, 28
// bytes spilled) took 3.40 against 3.02 ms at (b), 0.49 against 0.42 at (a), same bits.
// Occupancy matters: with 2 blocks per SM (8 warps; a probe build with 40 KB of unused shared
// memory a block) forward_kernel<64> took 3.31 against 2.67 ms at (b), 0.437 against 0.386 at
// (a) (H200, 2026-11-29), which is what running the inverse inside the S kernel's two 4-warp
// blocks would cost (docs/PERFORMANCE.md, floors section).
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

// The next pivot's lane stores register quad q (a constant once unrolled) of its row into buf:
// one predicated st.shared per register row (mine[m]: this lane holds the next pivot row in
// register row m; at most one lane and row of the warp), so that no lane branches and the sweep
// stays one code path (two paths, one per register row, made ptxas spill at the join).
template <int D>
__device__ __forceinline__ void store_quad_if(const float (&a)[D / 32][D],
                                              const bool (&mine)[D / 32], int q, float* buf) {
  if (mine[0])
    store_row_quad<0>(buf + 4 * q, a[0][4 * q], a[0][4 * q + 1], a[0][4 * q + 2], a[0][4 * q + 3]);
  if constexpr (D / 32 > 1) {
    if (mine[1])
      store_row_quad<1>(buf + 4 * q, a[1][4 * q], a[1][4 * q + 1], a[1][4 * q + 2],
                        a[1][4 * q + 3]);
  }
}

// How many quads the publishing store trails the sweep by.  Quad Q of the new registers is final
// once quad Q + 1 is updated, but the first store also waits for the next pivot's search (a warp
// reduction and a shuffle), and the warp issues in order, while the quads left after the loop
// delay the step's end.  Measured at (b) (H200, 2026-11-29): Gauss-Jordan 3.40 / 3.02 / 3.10 /
// 3.14 ms with a lag of 1 / 2 / 3 / 4 for D 64, 0.65 / 0.64 / 0.63 ms with 1 / 2 / 3 for D 32;
// the LU 1.72 / 1.72 / 1.69 ms with 2 / 3 / 4.
template <int D>
constexpr int kGjPublishLag = D == 64 ? 2 : 3;
constexpr int kLuPublishLag = 4;

// Columns [2, W) of every row -= f * (the pivot row at b4), shifted one register column to the
// left (column 1 -> 0 was done by the caller, before the next pivot search; v = b4[0]), while the
// next pivot's lane (mine) stores each finished quad of its new row into `out`, Lag quads
// behind.  Quads [W / 4 - Lag, W / 4) are left to the caller (the last one takes the freed
// column first).
template <int D, int W, int Lag>
__device__ __forceinline__ void sweep_and_publish(float (&a)[D / 32][D], const float (&f)[D / 32],
                                                  const float4* b4, float4 v,
                                                  const bool (&mine)[D / 32], float* out) {
  constexpr int R = D / 32;
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
    // q is a constant in each unrolled copy
    if (q >= Lag) store_quad_if<D>(a, mine, q - Lag, out);
  }
}

// What the last register column takes after a step's shift.
// Gauss-Jordan: the freed column, -f, or 1 for the pivot row (computed after the sweep, so that
// it holds one register, the pivot row, through it instead of R).
struct FreedColumn {
  int pivot_row;
  template <int R>
  __device__ __forceinline__ float value(int m, const float (&f)[R]) const {
    return (threadIdx.x & 31) + 32 * m == pivot_row ? 1.0f : -f[m];
  }
};
// LU: the dead column keeps the old column 0 (it drops out when the window shrinks).
template <int R>
struct DeadColumn {
  const float (&col)[R];
  __device__ __forceinline__ float value(int m, const float (&)[R]) const { return col[m]; }
};

// mine[m]: this lane holds the next pivot row in register row m.
template <int R>
__device__ __forceinline__ void holds_row(int row, bool (&mine)[R]) {
#pragma unroll
  for (int m = 0; m < R; ++m) mine[m] = (threadIdx.x & 31) + 32 * m == row;
}

// The sweep, then the last column, then the trailing quads of the published row.
template <int D, int W, int Lag, class Last>
__device__ __forceinline__ void sweep_publish_tail(float (&a)[D / 32][D], const float (&f)[D / 32],
                                                   const float4* b4, float4 v,
                                                   const bool (&mine)[D / 32], Last last,
                                                   float* out) {
  constexpr int R = D / 32, Q1 = W / 4, Q0 = Q1 > Lag ? Q1 - Lag : 0;
  sweep_and_publish<D, W, Lag>(a, f, b4, v, mine, out);
#pragma unroll
  for (int m = 0; m < R; ++m) a[m][W - 1] = last.value(m, f);
#pragma unroll
  for (int q = Q0; q < Q1; ++q) store_quad_if<D>(a, mine, q, out);
}

// The row buffer step k reads (double-buffered: step k's sweep writes step k + 1's row).
template <int D>
__device__ __forceinline__ float* row_buffer(float* sm, int k) {
  return sm + Smem<D>::kRowBuf + (k & 1) * D;
}

// Records perm[k], pivs[k] (read only after the last step).
template <int D>
__device__ __forceinline__ void record_pivot(Pivot pv, int k, float* sm) {
  if ((threadIdx.x & 31) == 0) {
    reinterpret_cast<int*>(sm + Smem<D>::kPerm)[k] = pv.row;
    sm[Smem<D>::kPivs + k] = pv.value;
  }
}

// Column 0 of this lane's rows: the first step's pivot column.
template <int D>
__device__ __forceinline__ void first_column(const float (&a)[D / 32][D], float (&col)[D / 32]) {
#pragma unroll
  for (int m = 0; m < D / 32; ++m) col[m] = a[m][0];
}

// Before the first step: the first pivot row, published the plain way.
template <int D>
__device__ __forceinline__ void publish_first_row(const float (&a)[D / 32][D], Pivot pv,
                                                  float* sm) {
  publish_row<D, D>(a, pv, row_buffer<D>(sm, 0));
  __syncwarp();
}

// Before a searching elimination's first step: its pivot (the search over column 0), with the
// pivot row published.
template <int D>
__device__ __forceinline__ Pivot start_pivoting(const float (&a)[D / 32][D], float* sm) {
  float col0[D / 32];
  first_column<D>(a, col0);
  const Pivot pv = find_pivot<D / 32>(col0, 0u);
  publish_first_row<D>(a, pv, sm);
  return pv;
}

// One LU step on the register window [0, W), its pivot row already in row_buffer(k): returns the
// next pivot, whose row it has published into row_buffer(k + 1).
template <int D, int W>
__device__ __forceinline__ Pivot lu_step(float (&a)[D / 32][D], Pivot pv, int k, float* sm) {
  constexpr int R = D / 32;
  const int lane = threadIdx.x & 31;
  record_pivot<D>(pv, k, sm);
  const float4* b4 = reinterpret_cast<const float4*>(row_buffer<D>(sm, k));
  const float rinv = reciprocal(pv.value);
  float col[R], f[R], next_col[R];
  const float4 v = b4[0];
#pragma unroll
  for (int m = 0; m < R; ++m) {
    col[m] = a[m][0];
    // The pivot row gets multiplier 1: exactly 0 from now on (see the file comment).
    f[m] = (lane + 32 * m == pv.row) ? 1.0f : col[m] * rinv;
    next_col[m] = a[m][0] = fmaf(-f[m], v.y, a[m][1]);
  }
  const Pivot next = find_pivot<R>(next_col, 0u);
  bool mine[R];
  holds_row<R>(next.row, mine);
  sweep_publish_tail<D, W, kLuPublishLag>(a, f, b4, v, mine, DeadColumn<R>{col},
                                          row_buffer<D>(sm, k + 1));
  __syncwarp();
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

// One Gauss-Jordan step (full width), its pivot row already in row_buffer(k): returns the next
// pivot, whose row it has published into row_buffer(k + 1); sets the pivot row's bit in used.
template <int D>
__device__ __forceinline__ Pivot gj_step(float (&a)[D / 32][D], Pivot pv, int k, unsigned& used,
                                         float* sm) {
  constexpr int R = D / 32;
  const int lane = threadIdx.x & 31;
  record_pivot<D>(pv, k, sm);
  const float4* b4 = reinterpret_cast<const float4*>(row_buffer<D>(sm, k));
  const float rinv = reciprocal(pv.value);
  float f[R], next_col[R];
  const float4 v = b4[0];
#pragma unroll
  for (int m = 0; m < R; ++m) {
    const bool is_piv = lane + 32 * m == pv.row;
    used |= is_piv ? (1u << m) : 0u;
    f[m] = is_piv ? 0.0f : a[m][0] * rinv;
    next_col[m] = a[m][0] = fmaf(-f[m], v.y, a[m][1]);
  }
  const Pivot next = find_pivot<R>(next_col, used);
  bool mine[R];
  holds_row<R>(next.row, mine);
  sweep_publish_tail<D, D, kGjPublishLag<D>>(a, f, b4, v, mine, FreedColumn{pv.row},
                                             row_buffer<D>(sm, k + 1));
  __syncwarp();
  return next;
}

// Gauss-Jordan with partial pivoting from the first step (a = J, nothing published yet):
// false when a pivot is exactly 0 (J singular).
template <int D>
__device__ __forceinline__ bool gauss_jordan_pivoting(float (&a)[D / 32][D], float* sm) {
  Pivot pv = start_pivoting<D>(a, sm);
  unsigned used = 0;
#pragma unroll 1
  for (int k = 0; k < D; ++k) {
    if (pv.value == 0.0f) return false;  // warp-uniform
    pv = gj_step<D>(a, pv, k, used, sm);
  }
  return true;
}

// ---- Gauss-Jordan on the diagonal, checked ------------------------------------------------------
//
// Partial pivoting chooses the diagonal at every step for most barrier matrices (about 99% of
// those of trained models, below; also of models whose barrier has driven log det J to 10 and
// more).  Then the search is wasted: this path takes row k as step k's pivot, skips
// the search and publishes the next row from a register row known at compile time (one
// predicated store per quad, not one per register row), and checks instead that partial
// pivoting would have made the same choice: |a_rk| <= |a_kk| for every row r > k.  (The search
// compares |a| with the low 7 mantissa bits dropped, ties to the smaller row, so it then picks
// row k as well.)  The steps run two per sweep (below), so an accepted result is the pivoting
// kernel's up to rounding (the same pivot rows; the entries through a rank-2 update instead of
// two rank-1 updates).  When the check fails anywhere, the caller starts again from J with
// pivoting.
//
// How often it holds: on the CPU reference's J of trained models (fp32 elimination on the host,
// 8 validation sequences each), 99.3% of the matrices of a d_head 64 model (lambda 0.03, 600
// steps on Brown), 98.8% and 100% for two d_head 32 quickstart models (lambda 0 and 0.03).
// Measured (H200, 2026-11-29, "[.bench][barrier-linalg]", both builds in one call): (b)'s count
// 3.010 -> 2.680 ms, (a)'s 0.415 -> 0.388 ms; SASS: a diagonal step is 208-213 instructions, a
// searching step 247, both with the same 128 FFMA.  The (b) exact step 40.50 / 40.59 ->
// 38.13 / 38.28 ms, with identical losses.  Two steps per sweep (2026-11-29, same bench, both
// in one build and call): (b) 2.734 -> 2.489 ms, (a) 0.392 -> 0.360 ms; the (b) exact step
// 38.83 / 38.91 -> 37.51 / 37.52 ms, (a) K 64 53.15 / 53.28 -> 52.54 / 52.68.

enum class Diagonal { accepted, singular, rejected };

// D 64 only.  With one row per lane (D 32) there is no store to save, only the search, and the
// path measured slower (0.669 against 0.635 ms at (b)'s count; it spills 76 bytes at 80
// registers).  D 64: 2.81 against 3.02 ms (H200, 2026-11-29, "[.bench][barrier-linalg]").
template <int D>
constexpr bool kDiagonalFirst = D == 64;

// Is |col[m]| > |pivot| for some row r = lane + 32 m > k (rows below the diagonal only)?
template <int R>
__device__ __forceinline__ bool exceeds_pivot_below(const float (&col)[R], float pivot, int k) {
  const int lane = threadIdx.x & 31;
  bool above = false;
#pragma unroll
  for (int m = 0; m < R; ++m) above |= lane + 32 * m > k && fabsf(col[m]) > fabsf(pivot);
  return above;
}

// ---- Gauss-Jordan on the diagonal, two steps per sweep ------------------------------------------
//
// The diagonal path's steps k, k + 1 (k even) as one sweep: a rank-2 update.  With b the pivot
// row k and b2 the row k + 1, both as they stand before step k (published together by the
// previous sweep), the two steps give every row i
//   f1 = a_i0 / b_0 (0 for row k),  a'_i1 = a_i1 - f1 b_1,  f2 = a'_i1 / P2 (0 for row k + 1),
//   a_ij -= g1 b_j + g2 b2_j  (j >= 2),  g1 = f1 - f2 fp2,  g2 = f2
// where fp2 = b2_0 / b_0 is row k + 1's multiplier at step k and P2 = b2_1 - fp2 b_1 its pivot at
// step k + 1; the two freed columns take -g1 (row k: 1 + f2 fp2) and -f2 (row k + 1: 1).  The
// multipliers, pivots, freed columns and checks take the operations two single steps would on
// the pair's input; the other columns take two fused multiply-adds as before, with g1 in place
// of f1 and b2 in place of step k's updated row k + 1: the same arithmetic up to rounding.  So
// the next pairs' inputs, and an accepted result, are the pivoting kernel's up to rounding, no
// longer bit for bit (nor is log det the LU's of barrier_linalg_det: about D u apart).
// What it saves (a step was ~210 instructions of which 128 FFMA): one sweep's bookkeeping per
// two steps (the loop trip, the next pivot's shuffle and check, the __syncwarp) and half the
// predicated stores that publish the next rows (both rows in one store per quad); the pivot rows'
// loads and the FFMA stay.  The rows k, k + 1 go through the tile (free during the elimination:
// load_J has read it, write_gradient refills it), double-buffered by pair.

// The two rows of pair k (k even): row k at [0, D), row k + 1 at [D, 2 D).
template <int D>
__device__ __forceinline__ float* pair_rows(float* sm, int k) {
  return sm + Smem<D>::kTile + ((k >> 1) & 1) * 2 * D;
}

struct PairResult {
  float next;    // the next pair's first pivot (row k + 2's entry in its column)
  bool regular;  // false when step k + 1's pivot is exactly 0
};

// Which elimination a diagonal pair belongs to.  Gauss-Jordan keeps the pivot rows (their
// multipliers are 0; rows are scaled lazily, see the file comment) and fills the freed columns;
// the LU zeroes the pivot rows (multipliers 1, as the searching LU's pivot row) and drops the
// columns left of the window ("LU on the diagonal" below).
enum class Elimination { gauss_jordan, lu };

// Pair k with pivot value `pivot` (row k's entry, nonzero), its rows in pair_rows(k), on the
// register window [0, W) (Gauss-Jordan: W = D); PM = (k + 2) / 32, the register row of the next
// pair's rows (-1 for the last pair).  Sets bad when a row below a pivot is larger.
template <int D, int W, int PM, Elimination E>
__device__ __forceinline__ PairResult diagonal_pair(float (&a)[D / 32][D], float pivot, int k,
                                                    bool& bad, float* sm) {
  constexpr int R = D / 32, Lag = kGjPublishLag<D>, Q = W / 4;
  static_assert(W % 4 == 0 && W >= 4 && (E == Elimination::lu || W == D), "whole quads");
  // A pivot row's own multiplier: it keeps its row (Gauss-Jordan) or zeroes it (LU).
  constexpr float kOwn = E == Elimination::lu ? 1.0f : 0.0f;
  const int lane = threadIdx.x & 31;
  const float* rows = pair_rows<D>(sm, k);
  const float4* b4 = reinterpret_cast<const float4*>(rows);
  const float4* c4 = reinterpret_cast<const float4*>(rows + D);
  float4 v = b4[0], w = c4[0];
  const float rinv1 = reciprocal(pivot);
  const float fp2 = w.x * rinv1;
  const float pivot2 = fmaf(-fp2, v.y, w.y);
  const float rinv2 = reciprocal(pivot2);
  record_pivot<D>(Pivot{k, pivot}, k, sm);
  record_pivot<D>(Pivot{k + 1, pivot2}, k + 1, sm);
  float g1[R], f2[R];
#pragma unroll
  for (int m = 0; m < R; ++m) {
    const int i = lane + 32 * m;
    const float f1 = i == k ? kOwn : a[m][0] * rinv1;
    const float a1 = fmaf(-f1, v.y, a[m][1]);
    bad |= i > k + 1 && fabsf(a1) > fabsf(pivot2);
    f2[m] = i == k + 1 ? kOwn : a1 * rinv2;
    g1[m] = fmaf(-f2[m], fp2, f1);
  }
  bool mine[R];
#pragma unroll
  for (int m = 0; m < R; ++m)
    mine[m] = m == PM && (lane == ((k + 2) & 31) || lane == ((k + 3) & 31));
  float* out = pair_rows<D>(sm, k + 2) + (lane == ((k + 3) & 31) ? D : 0);
  // Columns shift two to the left: register column j takes column j + 2.
#pragma unroll
  for (int m = 0; m < R; ++m) {
    a[m][0] = fmaf(-f2[m], w.z, fmaf(-g1[m], v.z, a[m][2]));
    a[m][1] = fmaf(-f2[m], w.w, fmaf(-g1[m], v.w, a[m][3]));
  }
#pragma unroll
  for (int q = 1; q < Q; ++q) {
    v = b4[q];
    w = c4[q];
#pragma unroll
    for (int m = 0; m < R; ++m) {
      a[m][4 * q - 2] = fmaf(-f2[m], w.x, fmaf(-g1[m], v.x, a[m][4 * q]));
      a[m][4 * q - 1] = fmaf(-f2[m], w.y, fmaf(-g1[m], v.y, a[m][4 * q + 1]));
      a[m][4 * q] = fmaf(-f2[m], w.z, fmaf(-g1[m], v.z, a[m][4 * q + 2]));
      a[m][4 * q + 1] = fmaf(-f2[m], w.w, fmaf(-g1[m], v.w, a[m][4 * q + 3]));
    }
    // new quad q - 1 is final now; the next pair's lanes publish it Lag quads later
    if (q - 1 >= Lag) store_quad_if<D>(a, mine, q - 1 - Lag, out);
  }
  if constexpr (E == Elimination::gauss_jordan) {
#pragma unroll
    for (int m = 0; m < R; ++m) {
      const int i = lane + 32 * m;
      a[m][D - 2] = i == k ? fmaf(f2[m], fp2, 1.0f) : -g1[m];
      a[m][D - 1] = i == k + 1 ? 1.0f : -f2[m];
    }
  }
  constexpr int Q0 = Q - 1 > Lag ? Q - 1 - Lag : 0;
#pragma unroll
  for (int q = Q0; q < Q; ++q) store_quad_if<D>(a, mine, q, out);
  __syncwarp();
  if constexpr (PM < 0) {
    return PairResult{0.0f, pivot2 != 0.0f};
  } else {
    float next_col[R];
#pragma unroll
    for (int m = 0; m < R; ++m) next_col[m] = a[m][0];
    const float next = __shfl_sync(kAll, next_col[PM], (k + 2) & 31);
    bad |= exceeds_pivot_below<R>(next_col, next, k + 2);
    return PairResult{next, pivot2 != 0.0f};
  }
}

// Pairs k = k_begin, k_begin + 2, ... < k_end on the window [0, W), all with the next pair's rows
// in register row PM (not unrolled: one copy of the sweep per window and PM); false when a pivot
// is exactly 0.
template <int D, int W, int PM, Elimination E>
__device__ __forceinline__ bool diagonal_pairs(float (&a)[D / 32][D], float& pivot, int k_begin,
                                               int k_end, bool& bad, float* sm) {
#pragma unroll 1
  for (int k = k_begin; k < k_end; k += 2) {
    if (pivot == 0.0f) return false;  // warp-uniform
    const PairResult r = diagonal_pair<D, W, PM, E>(a, pivot, k, bad, sm);
    if (!r.regular) return false;
    pivot = r.next;
  }
  return true;
}

// ---- LU on the diagonal, two steps per sweep (det_kernel, D 64) --------------------------------
//
// The det kernel's counterpart of the Gauss-Jordan pairs: rows k and k + 1 are the pivots of
// steps k and k + 1 (no search), checked as there (a rejected J goes to the searching LU from the
// start), two steps per sweep (diagonal_pair with Elimination::lu), in a register window like
// lu_windows' (only columns > k matter: the window shrinks by kLuDiagonalWindow columns every
// kLuDiagonalWindow steps, and the columns that drop out are never read again).  As in the
// searching LU every row takes the same update, and rows k and k + 1 take the multipliers that
// zero them: row k g1 = 1, g2 = 0; row k + 1 f1 = fp2 (from the same published value, so the same
// bits) and f2 = 1, so g1 = fp2 - fp2 = 0 exactly.  Used rows then hold zeros, take multipliers 0
// and never change again.  perm is the identity; log|det| = sum log|pivot| (sign_and_logabs).

// Columns the diagonal LU's window drops every kLuDiagonalWindow steps.  Every 4 steps, as the
// searching LU, spilled 324 bytes at 168 registers (ptxas, sm_90a, nvcc 13: one loop per window
// and register row of the next pair's rows), every 8 steps 80 bytes, every 16 steps 28 bytes
// (as forward_kernel<64>), for 5120 instead of 4352 multiply-adds a lane.
constexpr int kLuDiagonalWindow = 16;
// Measured (H200, 2026-11-30, "[.bench][barrier-linalg]", the bench's well-conditioned J, which
// keep the diagonal; the tree before, 4e549bb, built and run alternately in the same call): det
// 1.571 / 1.569 ms at (b)'s count against 1.692 / 1.686 before (the searching LU, window 4), and
// 0.222 / 0.222 at (a)'s against 0.237 / 0.238; the search at every step with the new window
// 1.87 and 0.26; the training forward 2.50-2.52 and 0.36 in both trees.  The LU by pairs is then
// 62% of the Gauss-Jordan forward's time for 62% of its multiply-adds (5120 against 8192 a
// lane): the bookkeeping per step is what both pay.

// Steps [D - W, D - W + Window) by pairs on the window [0, W) (split where the next pair's rows
// move from register row 0 to 1, and before the last pair), then the next window of W - Window
// columns; false when a pivot is exactly 0.  Gauss-Jordan: one window, Window = W = D.
template <int D, int W, int Window, Elimination E>
__device__ __forceinline__ bool diagonal_windows(float (&a)[D / 32][D], float& pivot, bool& bad,
                                                 float* sm) {
  static_assert(D == 64 && W % Window == 0, "whole windows of pairs, two rows per lane");
  constexpr int K0 = D - W, KE = K0 + Window;
  constexpr int K1 = KE < 30 ? KE : (K0 < 30 ? 30 : K0);  // pairs k < K1: next rows k + 2 < 32
  constexpr int K2 = KE < 62 ? KE : (K0 < 62 ? 62 : K0);  // pairs k < K2: a next pair
  if (!diagonal_pairs<D, W, 0, E>(a, pivot, K0, K1, bad, sm)) return false;
  if (!diagonal_pairs<D, W, 1, E>(a, pivot, K1, K2, bad, sm)) return false;
  if (!diagonal_pairs<D, W, -1, E>(a, pivot, K2, KE, bad, sm)) return false;
  if constexpr (W > Window)
    return diagonal_windows<D, W - Window, Window, E>(a, pivot, bad, sm);
  else
    return true;
}

// Gauss-Jordan or the LU on the diagonal, checked, by pairs of steps (D 64).
template <int D, Elimination E>
__device__ __forceinline__ Diagonal eliminate_on_diagonal(float (&a)[D / 32][D], float* sm) {
  static_assert(D == 64, "pairs of steps for two rows per lane");
  constexpr int kWindow = E == Elimination::lu ? kLuDiagonalWindow : D;
  const int lane = threadIdx.x & 31;
  __syncwarp();  // every lane has read the tile (load_J): the pair rows go there
  float col0[D / 32];
  first_column<D>(a, col0);
  float pivot = __shfl_sync(kAll, col0[0], 0);
  bool bad = exceeds_pivot_below<D / 32>(col0, pivot, 0);
  if (lane < 2) store_row<D, D, 0>(a, pair_rows<D>(sm, 0) + lane * D);  // rows 0 and 1
  __syncwarp();
  const bool regular = diagonal_windows<D, D, kWindow, E>(a, pivot, bad, sm);
  // A zero pivot with a nonzero entry below it is a rejection, not a singular J.
  if (__any_sync(kAll, bad)) return Diagonal::rejected;
  return regular ? Diagonal::accepted : Diagonal::singular;
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

// Gauss-Jordan or the LU (PW: the searching LU's window step) on a = J: on the diagonal first
// where D has that path and `pivots` asks for it, and with the pivot search from the start,
// after reload() has put J back into a, where the diagonal path rejects J.  false when J is
// exactly singular.
template <int D, Elimination E, int PW = 0, class Reload>
__device__ __forceinline__ bool eliminate(float (&a)[D / 32][D], float* sm, Pivots pivots,
                                          Reload reload) {
  if constexpr (kDiagonalFirst<D>) {
    if (pivots == Pivots::diagonal_first) {
      const Diagonal diagonal = eliminate_on_diagonal<D, E>(a, sm);
      if (diagonal != Diagonal::rejected) return diagonal == Diagonal::accepted;  // warp-uniform
      reload();
    }
  }
  if constexpr (E == Elimination::gauss_jordan) {
    return gauss_jordan_pivoting<D>(a, sm);
  } else {
    Pivot pv = start_pivoting<D>(a, sm);
    int k = 0;
    return lu_windows<D, D, PW>(a, pv, k, sm);
  }
}

template <int D, int PW>
__global__ void __launch_bounds__(32 * kWarps, min_blocks<D>()) det_kernel(
    const float* __restrict__ S, const float* __restrict__ Qb, const float* __restrict__ Kb,
    const int32_t* __restrict__ rows, int64_t nrows, int T, int H, int K, float c, double eps,
    float* __restrict__ logdet, float* __restrict__ phi, Pivots pivots) {
  extern __shared__ float4 smem_det[];
  const int warp = threadIdx.x / 32;
  const int64_t rr = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (rr >= nrows) return;  // warp-uniform; no block barriers
  const Slot slot = slot_of(rows, rr, H, K, T);
  if (slot.t < 0) return;
  float* sm = reinterpret_cast<float*>(smem_det) + warp * Smem<D>::kFloats;
  float a[D / 32][D];
  auto load = [&] { load_J<D>(S + rr * D * D, Qb + rr * D, Kb + rr * D, c, sm, a); };
  load();
  int sign = 0;
  double logabs = -INFINITY;
  if (eliminate<D, Elimination::lu, PW>(a, sm, pivots, load))
    sign_and_logabs<D>(reinterpret_cast<const int*>(sm + Smem<D>::kPerm), sm + Smem<D>::kPivs,
                       &sign, &logabs);
  write_logdet_phi(slot, sign, logabs, eps, logdet, phi);
}

// G over S_k, U, W, E, rowterm from the tile (row k = G row perm[k], filled by the caller):
// G rows written coalesced (g_bf16: as bf16 pairs, lane l columns 2 l, 2 l + 1);
// U[c] = sum_i G[i][c] qb[i] = sum_k tile[k][c] qb[perm k]; W[perm k] = sum_j tile[k][j] kb[j];
// E = U . kb; rowterm = sum_i (G[i][i] - gcoef) = scale coef (tr J^{-1} - D),
// G[i][i] = tile[pinv i][i].  qb_perm[k] = qb[perm k].
template <int D>
__device__ __forceinline__ void gradient_from_tile(const float* tile, const int* perm,
                                                   const int* pinv, const float* qb_perm,
                                                   const float* kb, float gcoef, float* G_k,
                                                   bool g_bf16, float* U_k, float* W_k,
                                                   float* E_k, float* rowterm_k) {
  constexpr int R = D / 32, LD = D + 1;
  const int lane = threadIdx.x & 31;
  if (g_bf16) {  // warp-uniform
    uint32_t* Gb = reinterpret_cast<uint32_t*>(G_k);
    if (2 * lane < D)
      for (int k = 0; k < D; ++k)
        Gb[perm[k] * (D / 2) + lane] =
            pack_bf16x2(tile[k * LD + 2 * lane], tile[k * LD + 2 * lane + 1]);
  } else {
    for (int k = 0; k < D; ++k) {
      const int p = perm[k];
#pragma unroll
      for (int m = 0; m < R; ++m) G_k[p * D + lane + 32 * m] = tile[k * LD + lane + 32 * m];
    }
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
                                               float* G_k, bool g_bf16, float* U_k, float* W_k,
                                               float* E_k, float* rowterm_k) {
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
  gradient_from_tile<D>(tile, perm, pinv, qb_perm, sm + Smem<D>::kKb, gcoef, G_k, g_bf16, U_k,
                        W_k, E_k, rowterm_k);
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
    float* __restrict__ W, float* __restrict__ E, float* __restrict__ rowterm, bool g_bf16,
    Pivots pivots) {
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
    auto load = [&] { load_J<D>(G_k, Qb + rr * D, Kb + rr * D, c, sm, a); };
    load();
    if (eliminate<D, Elimination::gauss_jordan>(a, sm, pivots, load))
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
  write_gradient<D>(a, gcoef, sm, G_k, g_bf16, U + rr * D, W + rr * D, E + rr, rowterm + rr);
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
                Pivots pivots, cudaStream_t stream) {
  const size_t smem = kWarps * Smem<D>::kBytes;
  allow_smem(det_kernel<D, PW>, smem);
  det_kernel<D, PW><<<static_cast<unsigned>(ceil_div(nrows, kWarps)), 32 * kWarps, smem, stream>>>(
      S, Qb, Kb, rows, nrows, T, H, K, c, eps, logdet, phi, pivots);
  BLM_CHECK_LAUNCH("barrier_linalg det");
}

template <int D>
void launch_forward(float* S, const float* Qb, const float* Kb, const int32_t* rows, int64_t nrows,
                    int H, int T, int K, float c, double eps, float scale, float* logdet,
                    float* phi, float* U, float* W, float* E, float* rowterm, bool g_bf16,
                    Pivots pivots, cudaStream_t stream) {
  const size_t smem = kWarps * Smem<D>::kBytes;
  allow_smem(forward_kernel<D>, smem);
  forward_kernel<D><<<static_cast<unsigned>(ceil_div(nrows, kWarps)), 32 * kWarps, smem, stream>>>(
      S, Qb, Kb, rows, nrows, T, H, K, c, eps, scale, logdet, phi, U, W, E, rowterm, g_bf16,
      pivots);
  BLM_CHECK_LAUNCH("barrier_linalg forward");
}

// The searching LU's column window shrinks every 4 steps (measured at (b): 1.84 ms against
// 1.95 ms for 8).  D 64, where it is the diagonal LU's fallback (about 1% of the matrices of
// trained models), it shrinks every kLuDiagonalWindow steps: with 4 the kernel spilled 180
// bytes (the two eliminations' register peaks in one function), with 16 it spills 28.
template <int D>
constexpr int kWindowStep = D == 64 ? kLuDiagonalWindow : 4;

}  // namespace

void barrier_linalg_det(const float* S, const float* Qb, const float* Kb, const int32_t* rows,
                        int BH, int H, int T, int K, int D, float c, double eps, float* logdet,
                        float* phi, cudaStream_t stream, Pivots pivots) {
  if (D != 32 && D != 64) refuse_head_size(D);
  const int64_t nrows = static_cast<int64_t>(BH) * K;
  if (nrows == 0) return;
  if (D == 32)
    launch_det<32, kWindowStep<32>>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi,
                                    pivots, stream);
  else
    launch_det<64, kWindowStep<64>>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, logdet, phi,
                                    pivots, stream);
}

void barrier_linalg_forward(float* S, const float* Qb, const float* Kb, const int32_t* rows,
                            int BH, int H, int T, int K, int D, float c, double eps, float scale,
                            bool training, float* logdet, float* phi, float* U, float* W, float* E,
                            float* rowterm, cudaStream_t stream, GFormat g_format,
                            Pivots pivots) {
  if (!training) {
    barrier_linalg_det(S, Qb, Kb, rows, BH, H, T, K, D, c, eps, logdet, phi, stream, pivots);
    return;
  }
  if (D != 32 && D != 64) refuse_head_size(D);
  const int64_t nrows = static_cast<int64_t>(BH) * K;
  if (nrows == 0) return;
  const bool g_bf16 = g_format == GFormat::bf16;
  if (D == 32)
    launch_forward<32>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, scale, logdet, phi, U, W, E,
                       rowterm, g_bf16, pivots, stream);
  else
    launch_forward<64>(S, Qb, Kb, rows, nrows, H, T, K, c, eps, scale, logdet, phi, U, W, E,
                       rowterm, g_bf16, pivots, stream);
}

}  // namespace cuda
}  // namespace blm
