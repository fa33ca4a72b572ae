// The barrier's S product as one GEMM per 64 counted positions (BLM_BARRIER_S=gemm, head size
// 64; notation of cuda/barrier_fused_s.cuh).  The S kernels there form S_k one position at a
// time: M = i, N = j, K = s, with the A operand pi_ks Qc_s[i] rebuilt for every slot.  For a dense
// block of slots S is an attention whose values are outer products,
//   S[k, i D + j] = sum_s pi_ks (Qc_s[i] Kc_s[j])      [slots x s] x [s x D^2]
// computed here transposed, S^T = (Qc (x) Kc)^T Pi^T: M = 64 values of j for one i (a chunk;
// four chunks a block, 128 accumulator registers a thread), N = 64 slots, K = s in tiles of 32:
//   pi_kernel     Pi [BH, K, Tp] = tf32(exp(c z - m) / l) for s < t, else 0 (Tp = T rounded up to
//                 32), z = Qg . Kc in fp32 FMA, from the statistics kernel's m, l
//   panel_kernel  block (4 values of i, 64 slots, bh), 128 threads: per k-step of 8 s, A =
//                 tf32(Qc_s[i] Kc_s[j]) formed in registers, B = the Pi tile as copied
// Same operand rounding as the other S kernels (two TF32 roundings per term: pi, and here the
// product Qc_s[i] Kc_s[j] instead of pi Qc_s[i] and Kc_s[j]), so the same test bound.
// Sketch and measurements: docs/PERFORMANCE.md ("S as one GEMM per 64 positions").
#include <algorithm>
#include <string>

#include "core/error.h"
#include "cuda/barrier_fused_s.cuh"
#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/mma.cuh"
#include "cuda/wgmma.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr int kD = 64;          // head size
constexpr int kSlots = 64;      // positions per block (the wgmma's M)
constexpr int kIv = 4;          // values of i per block (chunks): 256 rows (i, j) of S^T
constexpr int kTileS = 32;      // s per tile (four k-steps of 8)
constexpr int kThreads = 128;   // one warpgroup
constexpr int kKcLd = kD + 8;   // Kc rows: A reads [s = 8 ks + c (+4)][j = 16 w + g (+8)]
constexpr int kOutLd = kD + 4;  // out rows [n][j]: stores at n = 8 jj + 2 c (+1), j = 16 w + g

// The largest position among a block's kSlots slot positions t (shared memory; -1 for padding),
// 0 if none: the s range [0, tmax) its tiles sweep (pi_ks = 0 for s >= t_k).
__device__ __forceinline__ int max_position(const int* t) {
  int tmax = 0;
  for (int r = 0; r < kSlots; ++r) tmax = max(tmax, t[r]);
  return tmax;
}

// ---- pi ----------------------------------------------------------------------------------------

constexpr int kPiThreads = 256;
constexpr int kPiS = 64;        // s per tile of the pi kernel
constexpr int kQgLd = kD + 4;   // float4 rows

// Block (64 slots, bh): every element of the block's Pi rows [0, Tp) written.  Thread tid takes
// s = s0 + tid % 64 and 16 slots 16 (tid / 64) + 0 .. 15 (a warp shares its slots: Qg reads are
// broadcasts; its lanes' Kc rows are 272 bytes apart: conflict-free 16-byte loads).
__global__ void __launch_bounds__(kPiThreads)
    pi_kernel(const float* __restrict__ Qg, const float* __restrict__ Kc,
              const int32_t* __restrict__ rows, const float* __restrict__ m_in,
              const float* __restrict__ l_in, int H, int T, int Tp, int K, float cscale,
              float* __restrict__ Pi) {
  __shared__ __align__(16) float qg[kSlots * kQgLd];
  __shared__ __align__(16) float kc[kPiS * kQgLd];
  __shared__ int t_of[kSlots];
  __shared__ float m_of[kSlots], l_of[kSlots];
  const int k0 = blockIdx.x * kSlots;
  const int64_t bh = blockIdx.y;
  const int tid = threadIdx.x;
  if (tid < kSlots) {
    const int k = k0 + tid;
    const int t = k < K ? rows[(bh / H) * K + k] : -1;
    t_of[tid] = t;
    m_of[tid] = k < K ? m_in[bh * K + k] : 0.0f;
    l_of[tid] = k < K ? l_in[bh * K + k] : 1.0f;
  }
  for (int idx = tid; idx < kSlots * kD; idx += kPiThreads) {
    const int r = idx / kD, d = idx % kD, k = k0 + r;
    qg[r * kQgLd + d] = k < K ? Qg[(bh * K + k) * kD + d] : 0.0f;
  }
  __syncthreads();
  const int tmax = max_position(t_of);
  const int s_local = tid % kPiS, r0 = 16 * (tid / kPiS);
  const float* Kc_bh = Kc + bh * T * kD;
  for (int s0 = 0; s0 < Tp; s0 += kPiS) {
    const int s = s0 + s_local;
    float z[16] = {};
    if (s0 < tmax) {  // block-uniform
      __syncthreads();  // the previous tile's kc reads are done
      for (int idx = tid; idx < kPiS * kD / 4; idx += kPiThreads) {
        const int r = idx / (kD / 4), q = idx % (kD / 4), ss = s0 + r;
        const float4 v = ss < T ? reinterpret_cast<const float4*>(Kc_bh + ss * kD)[q]
                                : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        *reinterpret_cast<float4*>(kc + r * kQgLd + 4 * q) = v;
      }
      __syncthreads();
      const float4* kr = reinterpret_cast<const float4*>(kc + s_local * kQgLd);
#pragma unroll 4
      for (int q = 0; q < kD / 4; ++q) {
        const float4 y = kr[q];
#pragma unroll
        for (int e = 0; e < 16; ++e) {
          const float4 x = reinterpret_cast<const float4*>(qg + (r0 + e) * kQgLd)[q];
          z[e] = fmaf(x.w, y.w, fmaf(x.z, y.z, fmaf(x.y, y.y, fmaf(x.x, y.x, z[e]))));
        }
      }
    }
    if (s >= Tp) continue;
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      const int r = r0 + e, k = k0 + r;
      if (k >= K) break;
      const float p = s < t_of[r] ? expf(cscale * z[e] - m_of[r]) / l_of[r] : 0.0f;
      Pi[(bh * K + k) * static_cast<int64_t>(Tp) + s] = __uint_as_float(to_tf32(p));
    }
  }
}

// ---- S -----------------------------------------------------------------------------------------

// The S tile kernel computes S^T for its slots: rows (i, j) of S_k, columns k.
//   S^T[(i, j), k] = sum_s (Qc_s[i] Kc_s[j]) pi_ks
// M = the 64 values of j of one i (a chunk), N = 64 slots, K = s: A = tf32(Qc_s[i] Kc_s[j]) is
// formed in registers straight from the staged Qc and Kc rows (a thread's fragment needs 4 Kc and
// 2 Qc values a chunk and k-step), and B = the Pi tile, copied from global memory into the wgmma
// K-major layout as it is (Pi rows are s-contiguous per slot, which is that layout).  Nothing is
// built in shared memory: per k-step a warpgroup issues kIv wgmmas (131 k multiply-adds) for
// about 40 instructions a thread.  (The first form of this kernel built the outer products in
// shared memory as B and took pi as A: bound by the 16 KB of shared stores a tile.)
struct PanelSmem {
  // Ring of 4: tile n + 2 is copied into the stage of tile n - 2 while tile n is multiplied (the
  // wgmmas of tile n - 1 may still read theirs).
  static constexpr int kStages = 4;
  struct Stage {
    alignas(128) uint32_t pi[kTileS * kSlots];  // Pi[k0 + n][s0 + k], wgmma_b_offset(k, n)
    alignas(16) float kc[kTileS * kKcLd];       // Kc rows s0 .. s0 + kTileS - 1
    alignas(16) float qc[kTileS * kIv];         // Qc[s][i0 .. i0 + kIv - 1]
  };
  union {
    Stage stage[kStages];
    float out[kSlots * kOutLd];  // one chunk's S rows [n][j], after the sweep
  };
  int t[kSlots];
};

// Issues the copies of s tile s0 into stage st (zeros past T and for slots >= `slots`; Pi rows
// are Tp >= s0 + kTileS long) and closes the group.  Past the sweep (s0 >= tmax) the group is
// empty: every thread commits one group per tile, so cp_async_wait<1> always means "this tile".
__device__ __forceinline__ void stage_tile(PanelSmem& sm, int st, const float* Kc_bh,
                                           const float* Qc_bh, const float* Pi_blk, int T,
                                           int Tp, int slots, int s0, int tmax, int i0) {
  if (s0 < tmax) {
    PanelSmem::Stage& dst = sm.stage[st];
    for_each_strided<kTileS * kD / 4, kThreads>([&](int idx) {
      const int r = idx / (kD / 4), q = idx % (kD / 4), s = s0 + r;
      cp_async16(dst.kc + r * kKcLd + 4 * q, s < T ? Kc_bh + s * kD + 4 * q : Kc_bh, s < T);
    });
    if (threadIdx.x < kTileS) {
      const int s = s0 + threadIdx.x;
      cp_async16(dst.qc + threadIdx.x * kIv, s < T ? Qc_bh + s * kD + i0 : Qc_bh, s < T);
    }
    for_each_strided<kSlots * kTileS / 4, kThreads>([&](int idx) {
      const int n = idx / (kTileS / 4), q = idx % (kTileS / 4);
      const bool ok = n < slots;
      cp_async16(dst.pi + wgmma_b_offset(4 * q, n),
                 ok ? Pi_blk + static_cast<int64_t>(n) * Tp + s0 + 4 * q : Pi_blk, ok);
    });
  }
  cp_async_commit();
}

// Block (chunk: i in [kIv x, kIv x + kIv), 64 slots k0 .. k0 + 63, bh), one warpgroup, two
// blocks an SM.  One commit group of kIv wgmmas per k-step, the A registers in two sets used by
// turns (a set is rebuilt after the group two back, its last reader, is done).
__global__ void __launch_bounds__(kThreads, 2)
    panel_kernel(const float* __restrict__ Qc, const float* __restrict__ Kc,
                 const float* __restrict__ Pi, const int32_t* __restrict__ rows, int H, int T,
                 int Tp, int K, float* __restrict__ S) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  PanelSmem& sm = *reinterpret_cast<PanelSmem*>(smem_raw);
  const int i0 = blockIdx.x * kIv, k0 = blockIdx.y * kSlots;
  const int64_t bh = blockIdx.z;
  const int tid = threadIdx.x, w = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int slots = min(kSlots, K - k0);
  if (tid < kSlots) sm.t[tid] = tid < slots ? rows[(bh / H) * K + k0 + tid] : -1;
  __syncthreads();
  const int tmax = max_position(sm.t);
  const float* Kc_bh = Kc + bh * T * kD;
  const float* Qc_bh = Qc + bh * T * kD;
  const float* Pi_blk = Pi + (bh * K + k0) * static_cast<int64_t>(Tp);
  float* S_blk = S + (bh * K + k0) * kD * kD;
  if (tmax == 0) {  // no slot has an earlier position: zeros.  (Out here, the sweep below runs
                    // at least once, so no path joins it with accumulators that no wgmma
                    // wrote: ptxas would serialise the wgmmas for that, C7515.)
    for_each_strided<kSlots * kIv * kD / 4, kThreads>([&](int idx) {
      const int n = idx / (kIv * kD / 4), r = idx % (kIv * kD / 4);
      if (n < slots)
        reinterpret_cast<float4*>(S_blk + n * kD * kD + i0 * kD)[r] = make_float4(0, 0, 0, 0);
    });
    return;
  }
  auto stage = [&](int st, int s0) {
    stage_tile(sm, st, Kc_bh, Qc_bh, Pi_blk, T, Tp, slots, s0, tmax, i0);
  };

  float acc[kIv][32];
#pragma unroll
  for (int ii = 0; ii < kIv; ++ii)
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[ii][e] = 0.0f;
  uint32_t a[2][kIv][4] = {};
  // A of k-step ks of stage st for every chunk into `set`: rows j = 16 w + g (+ 8), columns
  // s = 8 ks + c (+ 4) (cuda/wgmma.cuh's A fragment).  The Kc rows' stride of 72 floats puts the
  // 32 lanes' (c, g) reads in 32 banks; the Qc reads are 4 broadcast float4s.
  auto build_a = [&](const PanelSmem::Stage& st, int ks, uint32_t (&set)[kIv][4]) {
    const int sa = 8 * ks + c, sb = sa + 4, j = 16 * w + g;
    const float ka0 = st.kc[sa * kKcLd + j], ka1 = st.kc[sa * kKcLd + j + 8];
    const float kb0 = st.kc[sb * kKcLd + j], kb1 = st.kc[sb * kKcLd + j + 8];
    const float4 qa = *reinterpret_cast<const float4*>(st.qc + sa * kIv);
    const float4 qb = *reinterpret_cast<const float4*>(st.qc + sb * kIv);
    const float qav[4] = {qa.x, qa.y, qa.z, qa.w}, qbv[4] = {qb.x, qb.y, qb.z, qb.w};
#pragma unroll
    for (int ii = 0; ii < kIv; ++ii) {
      set[ii][0] = tf32_operand(qav[ii] * ka0);
      set[ii][1] = tf32_operand(qav[ii] * ka1);
      set[ii][2] = tf32_operand(qbv[ii] * kb0);
      set[ii][3] = tf32_operand(qbv[ii] * kb1);
    }
  };

  stage(0, 0);
  stage(1, kTileS);
  int s0 = 0, st = 0;
  do {  // tmax > 0: at least one tile
    cp_async_wait<1>();         // this thread's copies of tile s0 (the next tile's may run on)
    fence_proxy_async_shared();  // Pi, written by cp.async, is read by wgmma
    // Everyone's copies of tile s0 have landed, and every warp is past its A building of tile
    // s0 - 2 and has waited for that tile's wgmmas (at the previous tile's k-step 1): its
    // stage is free for tile s0 + 2.
    __syncthreads();
    stage((st + 2) % PanelSmem::kStages, s0 + 2 * kTileS);
    const PanelSmem::Stage& cur = sm.stage[st];
#pragma unroll
    for (int ks = 0; ks < kTileS / 8; ++ks) {
      uint32_t (&set)[kIv][4] = a[ks & 1];
      wgmma_wait<1>();  // the group two back, set's last reader, is done
#pragma unroll
      for (int ii = 0; ii < kIv; ++ii) tie(set[ii]);
      build_a(cur, ks, set);
      wgmma_fence();
      const uint64_t desc = wgmma_b_descriptor(cur.pi, ks);
#pragma unroll
      for (int ii = 0; ii < kIv; ++ii) wgmma_tf32_m64n64k8(acc[ii], set[ii], desc, true);
      wgmma_commit();
    }
    st = (st + 1) % PanelSmem::kStages;
    s0 += kTileS;
  } while (s0 < tmax);
  wgmma_wait<0>();
#pragma unroll
  for (int ii = 0; ii < kIv; ++ii) tie(acc[ii]);
#pragma unroll
  for (int set = 0; set < 2; ++set)
#pragma unroll
    for (int ii = 0; ii < kIv; ++ii) tie(a[set][ii]);
  cp_async_wait<0>();  // the copies in flight (empty groups past the sweep, or tiles never used)
  __syncthreads();     // every warp is past its last read of the stages: out may overwrite them

  // acc[ii]: rows j = 16 w + g (+ 8), columns n = 8 jj + 2 c (+ 1) (cuda/wgmma.cuh's D).  Out
  // through shared memory, a chunk at a time, as S[k0 + n][i0 + ii][0 .. 63] in 16-byte stores.
  // The out stride of 68 floats puts a store's (c, g) lanes in 32 banks.
#pragma unroll
  for (int ii = 0; ii < kIv; ++ii) {
    if (ii > 0) __syncthreads();  // the previous chunk has been read out
#pragma unroll
    for (int jj = 0; jj < 8; ++jj)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = 16 * w + g + 8 * (e / 2), n = 8 * jj + 2 * c + e % 2;
        sm.out[n * kOutLd + j] = acc[ii][4 * jj + e];
      }
    __syncthreads();
    for_each_strided<kSlots * kD / 4, kThreads>([&](int idx) {
      const int n = idx / (kD / 4), q = idx % (kD / 4);
      if (n < slots)
        *reinterpret_cast<float4*>(S_blk + n * kD * kD + (i0 + ii) * kD + 4 * q) =
            *reinterpret_cast<const float4*>(sm.out + n * kOutLd + 4 * q);
    });
  }
}

}  // namespace

int barrier_s_panel_row_stride(int T) { return static_cast<int>(ceil_div(T, kTileS)) * kTileS; }

void barrier_s_panel(const float* Qg, const float* Qc, const float* Kc, const int32_t* rows,
                     const float* m, const float* l, int64_t BH, int H, int T, int K, float c,
                     float* Pi, float* S, cudaStream_t stream) {
  if (BH == 0 || K <= 0 || T <= 0) return;
  if (Pi == nullptr)
    throw DeviceError("barrier_s_panel: no pi buffer (BLM_BARRIER_S=gemm needs the workspace "
                      "sized for it: barrier_s_on_gemm)");
  const int Tp = barrier_s_panel_row_stride(T);
  const unsigned slot_tiles = static_cast<unsigned>(ceil_div(K, kSlots));
  pi_kernel<<<dim3(slot_tiles, static_cast<unsigned>(BH)), kPiThreads, 0, stream>>>(
      Qg, Kc, rows, m, l, H, T, Tp, K, c, Pi);
  BLM_CHECK_LAUNCH("barrier_flash_forward (pi for the S GEMM)");
  const size_t smem = sizeof(PanelSmem);
  CUDA_CHECK(cudaFuncSetAttribute(panel_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  panel_kernel<<<dim3(kD / kIv, slot_tiles, static_cast<unsigned>(BH)), kThreads, smem, stream>>>(
      Qc, Kc, Pi, rows, H, T, Tp, K, S);
  BLM_CHECK_LAUNCH("barrier_flash_forward (S as a GEMM)");
}

}  // namespace cuda
}  // namespace blm
