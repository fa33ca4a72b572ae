// The barrier's S product as one GEMM per 64 counted positions (BLM_BARRIER_S=gemm, head size
// 64; notation of cuda/barrier_fused_s.cuh).  The S kernels there form S_k one position at a
// time: M = i, N = j, K = s, with the A operand pi_ks Qc_s[i] rebuilt for every slot.  For a dense
// block of slots S is an attention whose values are outer products,
//   S[k, i D + j] = sum_s pi_ks (Qc_s[i] Kc_s[j])      [slots x s] x [s x D^2]
// so here M = 64 slots (one warpgroup), N = 256 columns of S (4 values of i, all 64 j: four
// m64n64k8 accumulators, 128 registers a thread), K = s in tiles of 16:
//   pi_kernel     Pi [BH, K, Tp] = tf32(exp(c z - m) / l) for s < t, else 0 (Tp = T rounded up to
//                 16), z = Qg . Kc in fp32 FMA, from the statistics kernel's m, l
//   panel_kernel  block (column chunk of 4 i, 64 slots, bh), 128 threads: per s tile, A = the
//                 Pi tile (registers, shared by the 4 accumulators), B = tf32(Qc_s[i] Kc_s[j])
//                 built in shared memory in the wgmma K-major layout (wgmma_b_offset)
// Same operand rounding as the other S kernels (two TF32 roundings per term: pi, and here the
// product Qc_s[i] Kc_s[j] instead of pi Qc_s[i] and Kc_s[j]), so the same test bound.
// Sketch and cost estimate: docs/PERFORMANCE.md ("S as one GEMM per 64 positions").
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
constexpr int kIv = 4;          // values of i per block: N = kIv * kD = 256 columns of S
constexpr int kTileS = 16;      // s per tile (two k-steps of 8)
constexpr int kThreads = 128;   // one warpgroup
constexpr int kKcLd = kD + 4;   // raw Kc rows: a warp's reads Kc[s][j], j = lane, hit 32 banks
constexpr int kPiLd = kTileS + 4;  // pi tile rows: A reads [16 w + g (+8)][c (+4)]: 32 banks

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

struct PanelSmem {
  alignas(128) uint32_t bt[2][kIv][kTileS * kD];  // B: tf32(Qc_s[i0 + ii] Kc_s[j]), K-major
  alignas(16) float kc[2][kTileS * kKcLd];        // Kc rows s0 .. s0 + 15 (cp.async)
  alignas(16) float qc[2][kTileS * kIv];          // Qc[s][i0 .. i0 + 3]
  alignas(16) float pi[2][kSlots * kPiLd];        // Pi[k0 + r][s0 .. s0 + 15] (TF32 bits)
  int t[kSlots];
};

// The copies of s tile s0 into buffer buf: Kc rows (zeros past T), Qc's 4 columns, Pi's 64 rows
// (zeros for slots >= K; Pi rows are Tp >= s0 + 16 long).
__device__ __forceinline__ void stage(PanelSmem& sm, int buf, const float* Kc_bh,
                                      const float* Qc_bh, const float* Pi_blk, int T, int Tp,
                                      int slots, int s0, int i0) {
  const int tid = threadIdx.x;
  for_each_strided<kTileS * kD / 4, kThreads>([&](int idx) {
    const int r = idx / (kD / 4), q = idx % (kD / 4), s = s0 + r;
    cp_async16(sm.kc[buf] + r * kKcLd + 4 * q, s < T ? Kc_bh + s * kD + 4 * q : Kc_bh, s < T);
  });
  if (tid < kTileS) {
    const int s = s0 + tid;
    cp_async16(sm.qc[buf] + tid * kIv, s < T ? Qc_bh + s * kD + i0 : Qc_bh, s < T);
  }
  for_each_strided<kSlots * kTileS / 4, kThreads>([&](int idx) {
    const int r = idx / (kTileS / 4), q = idx % (kTileS / 4);
    const bool ok = r < slots;
    cp_async16(sm.pi[buf] + r * kPiLd + 4 * q,
               ok ? Pi_blk + static_cast<int64_t>(r) * Tp + s0 + 4 * q : Pi_blk, ok);
  });
  cp_async_commit();
}

// B of tile buf: thread (quad q of 4 s, column j) x 2 forms Qc_s[i0 + ii] Kc_s[j] for its 4 s
// and the 4 ii, one 16-byte store per ii at wgmma_b_offset(4 q, j).
__device__ __forceinline__ void build_b(PanelSmem& sm, int buf) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int combo = threadIdx.x + kThreads * h, q = combo / kD, j = combo % kD;
    float kv[4];
    float4 qv[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      kv[e] = sm.kc[buf][(4 * q + e) * kKcLd + j];
      qv[e] = *reinterpret_cast<const float4*>(sm.qc[buf] + (4 * q + e) * kIv);
    }
    const float qe[4][4] = {{qv[0].x, qv[0].y, qv[0].z, qv[0].w},
                            {qv[1].x, qv[1].y, qv[1].z, qv[1].w},
                            {qv[2].x, qv[2].y, qv[2].z, qv[2].w},
                            {qv[3].x, qv[3].y, qv[3].z, qv[3].w}};
#pragma unroll
    for (int ii = 0; ii < kIv; ++ii)
      *reinterpret_cast<uint4*>(sm.bt[buf][ii] + wgmma_b_offset(4 * q, j)) =
          make_uint4(tf32_operand(qe[0][ii] * kv[0]), tf32_operand(qe[1][ii] * kv[1]),
                     tf32_operand(qe[2][ii] * kv[2]), tf32_operand(qe[3][ii] * kv[3]));
  }
}

// Block (column chunk: i in [4 chunk, 4 chunk + 4), 64 slots k0 .. k0 + 63, bh), two blocks per
// SM (at three, 168 registers, it spilled 48 bytes).  The wgmmas of a tile stay in flight while
// the next tile's B is built (bt is double-buffered); the warpgroup waits for them before it
// reloads the A registers they read.
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

  float acc[kIv][32];
#pragma unroll
  for (int ii = 0; ii < kIv; ++ii)
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[ii][e] = 0.0f;
  uint32_t a[kTileS / 8][4] = {};
  auto wait_for_wgmmas = [&] {
    wgmma_wait<0>();
#pragma unroll
    for (int ii = 0; ii < kIv; ++ii) tie(acc[ii]);
#pragma unroll
    for (int ks = 0; ks < kTileS / 8; ++ks) tie(a[ks]);
  };
  if (tmax > 0) stage(sm, 0, Kc_bh, Qc_bh, Pi_blk, T, Tp, slots, 0, i0);
  for (int s0 = 0, buf = 0; s0 < tmax; s0 += kTileS, buf ^= 1) {
    cp_async_wait<0>();
    // Tile s0 has landed; every thread is past the previous tile's B build and A loads.
    __syncthreads();
    if (s0 + kTileS < tmax) stage(sm, buf ^ 1, Kc_bh, Qc_bh, Pi_blk, T, Tp, slots, s0 + kTileS, i0);
    build_b(sm, buf);
    fence_proxy_async_shared();  // bt, written by ordinary stores, is read by wgmma next
    __syncthreads();
    wait_for_wgmmas();  // the previous tile's wgmmas read the A registers
    const float* pt = sm.pi[buf];
#pragma unroll
    for (int ks = 0; ks < kTileS / 8; ++ks) {
      const int ra = 16 * w + g, col = 8 * ks + c;
      a[ks][0] = __float_as_uint(pt[ra * kPiLd + col]);
      a[ks][1] = __float_as_uint(pt[(ra + 8) * kPiLd + col]);
      a[ks][2] = __float_as_uint(pt[ra * kPiLd + col + 4]);
      a[ks][3] = __float_as_uint(pt[(ra + 8) * kPiLd + col + 4]);
    }
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kTileS / 8; ++ks)
#pragma unroll
      for (int ii = 0; ii < kIv; ++ii)
        wgmma_tf32_m64n64k8(acc[ii], a[ks], wgmma_b_descriptor(sm.bt[buf][ii], ks), true);
    wgmma_commit();
  }
  wait_for_wgmmas();
  // acc[ii]: rows 16 w + g (+ 8) = slots, columns j = 8 jj + 2 c (+ 1) (cuda/wgmma.cuh's D).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = 16 * w + g + 8 * h;
    if (r >= slots) continue;
    float* out = S + (bh * K + k0 + r) * kD * kD;
#pragma unroll
    for (int ii = 0; ii < kIv; ++ii)
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
        *reinterpret_cast<float2*>(out + (i0 + ii) * kD + 8 * jj + 2 * c) =
            make_float2(acc[ii][4 * jj + 2 * h], acc[ii][4 * jj + 2 * h + 1]);
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
