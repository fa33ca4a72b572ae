// The flash-style barrier backward kernel of cuda/barrier_flash_bwd.cuh: dz [BH, K, T] and the
// direct terms dQs, dKs [BH, T, D] from G, U, W, E, rowterm, m, l, Qg, Qc, Kc, with pi_ks
// recomputed from z_ks = Qg_k . Kc_s (no [K, T] matrix in memory).
//
// Work split.  A block owns (bh, a tile of R = 16 WARPS attended rows s0 .. s0 + R - 1); warp w
// owns rows s0 + 16 w .. + 15 and all D columns.  The block walks the counted slots k with
// t_k > s0 (a contiguous range of slots, since rows[] increases) in descending k, so all tiles
// of one bh start at slot K - 1 (with the tiles-adjacent dispatch order below they then read
// the same G_k at about the same time, from L2).  Per slot k and warp:
//   z, U.Kc  fp32 dots (rows from shared memory, quad shuffles)  -> pi = exp(c z - m) / l
//   X = Kc_rows G_k^T   [16 x D] = [16 x D] [D x D]   TF32 mma.sync m16n8k8, fp32 accumulators
//   g = c (Qc . (X - W) - U.Kc + E),  dz = pi (g - rowterm),  dQs += pi (X - W)
//   Y = Qc_rows G_k     [16 x D]                      TF32 mma.sync
//   dKs += pi (Y - U) + dz Qg
// dQs, dKs stay in registers over all k (the fragments' C layout), so nothing is accumulated
// across blocks: no atomics, a fixed summation order, bit-identical runs.  A warp whose 16 rows
// all lie at or past t_k skips the products for that k (it writes its dz zeros).
//
// Products (FlashBwdProducts, cuda/barrier_flash_bwd.cuh).  The default, bf16: X and Y as bf16
// mma.sync m16n8k16 (product_bf16), A fragments by ldmatrix from bf16 copies of the block's Kc,
// Qc rows, B fragments by ldmatrix (X) and ldmatrix.trans (Y) from the row-major bf16 G_k that
// the linear algebra wrote (GFormat::bf16) and cp.async brought in.
// Against TF32 it halves the mma and operand-load instructions per slot; measured (H200,
// 2026-11-29, [.bench][barrier-flash-bwd], 128 rows, longest first): (b) 3.449 -> 2.966 ms,
// (a) 1.462 -> 1.260 ms; in the step (barrierlm bench, 2 alternating rounds) (b) exact 58.63 ->
// 56.16 ms, (a) K 64 65.85 -> 63.36 ms.  BLM_BARRIER_BWD=mma: the TF32 mma.sync products below;
// =wgmma (head size 64): X and Y on Hopper's warpgroup instruction (issue_products_wg; layouts
// in issue_slot and round_own_g), measured slower than both.
// Also measured against the bf16 default and dropped (H200, 2026-11-29;
// docs/PERFORMANCE-HISTORY.md, "Kept: longest-first slot tiles ..."): W and U folded into the
// products as one more k16 step (1.859 against 1.593 ms at (b), 0.875 against 0.765 at (a): the
// extra mma and ldmatrix cost more than the 64 FADD saved, so the tiles are bound by the
// tensor-core path, not the fp32 epilogue), and the products on bf16 wgmma (X = Kc G^T and Y^T =
// G^T Qc^T from one G tile per warpgroup: 1.94-2.16 ms at (b), 0.85-0.93 at (a) in three forms,
// against 1.59 and 0.76: a slot's epilogue waits for its wgmmas, and a second slot in flight does
// not fit the registers); the direct terms moved out of the tiles into products over the slots, M_s
// = sum_k pi_ks G_k on mma.sync or wgmma in a second kernel (2.34 / 2.53 ms at (b), 1.25 / 1.30 at
// (a): these tiles without the direct terms still take 80% of their time, and the second pass over
// G is L2-bound); and X, Y started from -W, -U instead of 0 (1.63 against 1.59 ms at (b), 0.78
// against 0.76 at (a): the first mma then waits for the loads).
//
// Pipeline: G_k, Qg_k, U_k, W_k are copied with cp.async into one of three shared buffers while
// slot k + 1's are used (the slot's scalars t, m, l, E, rowterm are loaded into registers one
// iteration ahead); the third buffer lets one block barrier per slot suffice (the barrier that
// closed each slot was 19% of the stall samples; removing it: 2.97 -> 2.83 ms at (b), 1.25 -> 1.23
// ms at (a), bf16, H200, 2026-11-29).  TF32: each thread rounds the G chunks it copied itself once
// they have landed, in place, so every G element is then read 2 WARPS times without a conversion;
// bf16: G arrives in bf16 (half the bytes from L2) and needs none.  TF32 variants keep the block's
// Kc rows twice (TF32 bits for the mma A operand, fp32 for the logits) and its Qc rows once as TF32
// (mma A operand of Y and the dot Qc . (X - W)); bf16 keeps Kc, Qc in fp32 and bf16.
//
// Block height and dispatch order (FlashBwdVariant; measured on an H200, 2026-11-28, D = 64,
// median of 20, [.bench][barrier-flash-bwd]):
//                              (b) B64 H6 T256 K254     (a) B16 H12 T1024 K64
//   64 rows, tiles adjacent        4.57 ms                  1.91 ms
//   64 rows, longest first         4.09                     1.80
//   128 rows, tiles adjacent       3.81                     1.56
//   128 rows, longest first        3.45 (59.5 TFLOP/s)      1.46 (70.6 TFLOP/s)   <- TF32
// Those were the TF32 products.  With the bf16 products, G in bf16 and three slot buffers
// (2026-11-29, 12:20 UTC, same bench, H200, the present kernel):
//   64 rows, longest first         1.741 ms (117.9)         0.815 ms (126.5)      <- bf16
//   128 rows, longest first        2.041 (100.6)            0.903 (114.2)
//   64 / 128 rows, tiles adjacent  1.977 / 2.252            0.875 / 0.963
// The bf16 block of 64 rows takes 85 KB of shared memory and 248 registers a thread, so two
// independent blocks (8 warps) share an SM where one 128-row block (140 KB) runs alone: a warp
// waiting at its block's slot barrier, or past t_k on the diagonal, no longer holds up half the
// SM's warps.
// Each block reads every G_k with t_k > s0: D^2 * 4 bytes per slot for R rows of work, so
// R = 128 halves the G traffic from L2 to the SMs (at (b) 4.0 -> 2.4 GB per call) at the price
// of more wasted rows on the diagonal (rows s >= t_k are skipped only per warp of 16).  With
// the tiles of one bh adjacent in the grid, HBM reads of G were measured (Nsight Compute) at
// 1.75 GB for 64 rows / 1.88 GB for 128 at (b), i.e. G (1.60 GB) about once; longest-first
// gives that up (G is read once per tile, 2.4 GB at (b): still ~12% of HBM bandwidth at that
// speed) for a better tail: every bh's first tile (the most slots) is dispatched before any
// second tile, and the short blocks fill the end.
// What limits it (Nsight Compute at (b)): latency.  About 241 registers allow one block of 8
// warps per SM (2 warps per scheduler).  TF32 products (2026-11-29, 00:00 UTC): issue slots 37%
// busy at 5.2 cycles per instruction per warp, about 1060 instructions per warp and slot, 128 of
// them mma.  bf16 products, one barrier per slot, B by 8-byte loads of permuted bf16 G and G^T
// copies (08:40 UTC): 0.33 instructions issued per scheduler cycle, stalls on shared-memory
// results 23%, the slot barrier 17%, fixed latency 17%; 39% of the shared-memory wavefronts were
// bank conflicts, nearly all from writing the G^T copy (16-way): now one row-major copy, read by
// ldmatrix and ldmatrix.trans: (b) 2.848 -> 2.428 ms (84.6 TFLOP/s counted), (a) 1.230 -> 1.070
// ms (96.4), H200, 2026-11-29.  G then arriving in bf16 from the inverse (no fp32 staging and
// conversion, half the bytes): 2.068 ms (99.3) and 0.929 ms (111.0).
//
// Output rows: fp32, or bf16 for the bf16 precision (FlashBwdRows::dq16; the fp32 value rounded
// to nearest even), chosen by a template parameter of the kernel so that each instantiation has
// one store path: registers as before (248 at D 64 with the bf16 products) where a run-time choice
// between two stores took them to 255.
//
// Shared-memory banks (word strides; lane = 4 g + q, g = lane / 4, q = lane % 4):
//   G [D][D + 4]: X's B operand G[8 nt + g][8 ks + q] hits bank 4 g + q; Y's B operand reads
//     G[i][8 nt + g] with the k index i = 8 ks + 2 q (+1) (the k order inside a k-step is ours
//     to choose, as long as A uses the same): bank 8 q + g (+4).  Both conflict-free.
//   Kc TF32 [R][D + 4]: X's A operand Kc[g][8 ks + q]: bank 4 g + q.
//   Qc TF32 and Kc fp32 [R][D + 8]: Y's A operand (a0, a2) = Qc[g][8 ks + 2 q], [.. + 1] as one
//     8-byte load, and the epilogue's 8-byte loads at column 8 nt + 2 q: per half warp bank
//     8 g + 2 q, conflict-free.
//
// Precision (the test's bound): each mma operand is rounded to TF32 (cvt.rna, relative error
// <= 2^-11), so every product G_ij Kc_j (G_ij Qc_i) is off by <= ~2^-10 of its size; Qc in the
// dot Qc . (X - W) is TF32 as well (another 2^-11); z, pi, the vector dots and all sums over k
// are fp32.
#include <string>

#include "core/error.h"
#include "cuda/barrier_flash_bwd.cuh"
#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/kernels.h"
#include "cuda/mma.cuh"
#include "cuda/vector_io.cuh"
#include "cuda/wgmma.cuh"

namespace blm {
namespace cuda {

namespace {

// Shared-memory layout (offsets in floats, all multiples of 4: 16-byte aligned) of a block of
// WARPS warps for head size D: the regions every variant uses, then the TF32 variants' tail or,
// over the same bytes, the bf16 variant's (never both), so that bytes(P) is what P uses.  At D 64
// the bf16 block takes 140.5 KB (128 rows) or 85 KB (64 rows: two fit on an SM); the TF32
// variants 179 KB or 125 KB.  (With TF32 products and two slot buffers, 64-row blocks lost to
// 128 rows: 3.94 against 2.99 ms at (b), 1.72 against 1.26 at (a), H200; with bf16 they win,
// see the file header.)
template <int D, int WARPS>
struct Layout {
  static constexpr int kRows = 16 * WARPS;
  static constexpr int kThreads = 32 * WARPS;
  static constexpr int kGLd = D + 4;    // G buffer row stride
  static constexpr int kKtLd = D + 4;   // Kc TF32 row stride
  static constexpr int kFLd = D + 8;    // Kc fp32 and Qc TF32 (bf16 variant: fp32) row stride
  // Slot buffers: G_k, Qg_k, U_k, W_k of three consecutive slots (the one being processed, the
  // one in flight, and the one some warps may still be processing: no barrier closes a slot).
  static constexpr int kSlotBufs = 3;
  static constexpr int kVec = 0;                            // [3][3][D]      Qg_k, U_k, W_k
  static constexpr int kKf = kVec + kSlotBufs * 3 * D;      // [kRows][kFLd]  Kc (fp32)
  // [kRows][kFLd]  Qc (TF32 bits; bf16: fp32)
  static constexpr int kQt = kKf + kRows * kFLd;
  static constexpr int kTail = kQt + kRows * kFLd;
  // TF32 variants:
  static constexpr int kG = kTail;                          // [3][D][kGLd]   G_k (TF32 bits)
  static constexpr int kKt = kG + kSlotBufs * D * kGLd;     // [kRows][kKtLd] Kc (TF32 bits)
  static constexpr int kGt = kKt + kRows * kKtLd;           // [D * D]  wgmma variant: G_k for Y
  static constexpr int kFloats = kGt + D * D;
  // bf16 variant (regions in 32-bit words, each holding two bf16).  Rows of D + 8 bf16 (16-byte
  // aligned, and the 8 rows an ldmatrix reads hit distinct banks: 4 r or 20 r mod 32 words):
  static constexpr int kAbLd = D / 2 + 4;                   // Kc, Qc, G rows
  static constexpr int kKb = kTail;                         // [kRows][kAbLd] Kc (bf16)
  static constexpr int kQb = kKb + kRows * kAbLd;           // [kRows][kAbLd] Qc (bf16)
  static constexpr int kGb = kQb + kRows * kAbLd;           // [3][D][kAbLd]  G_k (bf16, row-major)
  static constexpr int kFloatsBf16 = kGb + kSlotBufs * D * kAbLd;
  static constexpr size_t bytes(FlashBwdProducts p) {
    return static_cast<size_t>(p == FlashBwdProducts::bf16_mma ? kFloatsBf16 : kFloats) *
           sizeof(float);
  }
  static_assert(D * kGLd >= D * D && kG % 32 == 0 && kGt % 32 == 0,
                "room for the wgmma layouts, 128-byte aligned");
  static_assert(D % 16 == 0 && kVec % 4 == 0 && kKt % 4 == 0 && kKf % 4 == 0 && kQt % 4 == 0 &&
                    kKb % 4 == 0 && kQb % 4 == 0 && kGb % 4 == 0,
                "16-byte aligned regions");
};

__device__ __forceinline__ uint4 to_tf32x4(float4 v) {
  return make_uint4(to_tf32(v.x), to_tf32(v.y), to_tf32(v.z), to_tf32(v.w));
}

// Sum over the 4 lanes of a quad (lanes 4 g .. 4 g + 3); every lane gets the same bits.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// The slots a tile starting at row s0 needs: [k_lo, k_end) where k_end = the number of counted
// slots (rows[k] >= 0 is a prefix) and k_lo = the first slot with t_k > s0 (rows increase).
__device__ __forceinline__ void slot_range(const int32_t* __restrict__ rw, int K, int s0,
                                           int* k_lo, int* k_end) {
  int lo = 0, hi = K;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (rw[mid] >= 0) lo = mid + 1;
    else hi = mid;
  }
  *k_end = lo;
  hi = lo;
  lo = 0;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (rw[mid] > s0) hi = mid;
    else lo = mid + 1;
  }
  *k_lo = lo;
}

// Starts the copy of slot `slot` (= bh K + k): G_k into the G buffer `buf`, Qg_k, U_k, W_k into the
// vector buffer `buf`.  Chunk idx of G goes to thread idx % kThreads (round_own_g relies on
// it).  bf16: G_k is already bf16 (the first half of its slot, GFormat::bf16), copied straight into
// the bf16 buffer `buf` (8 bf16 a chunk), with nothing left to convert.  wgmma: G in the wgmma B
// layout of X's product (cuda/wgmma.cuh: K = j, N = i, so row i's 16-byte chunk q lands at
// wgmma_b_offset(4 q, i)), copied as 4 x 4 blocks (rows 4 rb .. + 3, columns 4 cb .. + 3 of G) so
// that round_own_g can also write their transpose.
template <int D, int WARPS, FlashBwdProducts P>
__device__ __forceinline__ void issue_slot(float* sm, int buf, const float* __restrict__ G,
                                           const float* __restrict__ Qg,
                                           const float* __restrict__ U,
                                           const float* __restrict__ W, int64_t slot) {
  using L = Layout<D, WARPS>;
  constexpr int kChunksRow = D / 4;
  float* sG = sm + L::kG + buf * D * L::kGLd;
  const float* src = G + slot * D * D;
  if constexpr (P == FlashBwdProducts::bf16_mma) {
    constexpr int kChunksRow16 = D / 8;
    const __nv_bfloat16* src16 = reinterpret_cast<const __nv_bfloat16*>(src);
    float* gb = sm + L::kGb + buf * D * L::kAbLd;
    for_each_strided<D * kChunksRow16, L::kThreads>([&](int idx) {
      const int i = idx / kChunksRow16, q = idx % kChunksRow16;
      cp_async16(gb + i * L::kAbLd + 4 * q, src16 + i * D + 8 * q);
    });
  } else if constexpr (P == FlashBwdProducts::tf32_wgmma) {
    for_each_strided<kChunksRow * kChunksRow, L::kThreads>([&](int idx) {
      const int rb = idx / kChunksRow, cb = idx % kChunksRow;
#pragma unroll
      for (int e = 0; e < 4; ++e)
        cp_async16(sG + wgmma_b_offset(4 * cb, 4 * rb + e), src + (4 * rb + e) * D + 4 * cb);
    });
  } else {
    for_each_strided<D * kChunksRow, L::kThreads>([&](int idx) {
      const int i = idx / kChunksRow, q = idx % kChunksRow;
      cp_async16(sG + i * L::kGLd + 4 * q, src + i * D + 4 * q);
    });
  }
  float* sV = sm + L::kVec + buf * 3 * D;
  for_each_strided<3 * kChunksRow, L::kThreads>([&](int idx) {
    const int v = idx / kChunksRow, q = idx % kChunksRow;
    const float* base = v == 0 ? Qg : (v == 1 ? U : W);
    cp_async16(sV + v * D + 4 * q, base + slot * D + 4 * q);
  });
}

// Rounds to TF32, in place, the G chunks of buffer `buf` this thread copied (issue_slot's
// mapping); after cp.async.wait_group a thread sees its own copies.  wgmma: also writes each 4 x 4
// block into the G^T region in the wgmma B layout of Y's product (K = i, N = j: the block's 4
// rows i of column j are one 16-byte chunk at wgmma_b_offset(4 rb, j)), and fences the stores
// for the wgmmas (the G^T region has one buffer: the last slot's wgmmas were waited for before
// the loop's closing barrier).
template <int D, int WARPS, FlashBwdProducts P>
__device__ __forceinline__ void round_own_g(float* sm, int buf) {
  using L = Layout<D, WARPS>;
  constexpr int kChunksRow = D / 4;
  float* sG = sm + L::kG + buf * D * L::kGLd;
  if constexpr (P == FlashBwdProducts::bf16_mma) {
    return;  // G_k arrived in bf16, as the products read it
  } else if constexpr (P == FlashBwdProducts::tf32_wgmma) {
    uint32_t* sGt = reinterpret_cast<uint32_t*>(sm + L::kGt);
    for (int idx = threadIdx.x; idx < kChunksRow * kChunksRow; idx += L::kThreads) {
      const int rb = idx / kChunksRow, cb = idx % kChunksRow;
      uint4 t[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float* p = sG + wgmma_b_offset(4 * cb, 4 * rb + e);
        t[e] = to_tf32x4(*reinterpret_cast<const float4*>(p));
        *reinterpret_cast<uint4*>(p) = t[e];
      }
      *reinterpret_cast<uint4*>(sGt + wgmma_b_offset(4 * rb, 4 * cb + 0)) =
          make_uint4(t[0].x, t[1].x, t[2].x, t[3].x);
      *reinterpret_cast<uint4*>(sGt + wgmma_b_offset(4 * rb, 4 * cb + 1)) =
          make_uint4(t[0].y, t[1].y, t[2].y, t[3].y);
      *reinterpret_cast<uint4*>(sGt + wgmma_b_offset(4 * rb, 4 * cb + 2)) =
          make_uint4(t[0].z, t[1].z, t[2].z, t[3].z);
      *reinterpret_cast<uint4*>(sGt + wgmma_b_offset(4 * rb, 4 * cb + 3)) =
          make_uint4(t[0].w, t[1].w, t[2].w, t[3].w);
    }
    fence_proxy_async_shared();
  } else {
    for (int idx = threadIdx.x; idx < D * kChunksRow; idx += L::kThreads) {
      const int i = idx / kChunksRow, q = idx % kChunksRow;
      float* p = sG + i * L::kGLd + 4 * q;
      *reinterpret_cast<uint4*>(p) = to_tf32x4(*reinterpret_cast<const float4*>(p));
    }
  }
}

// The block's rows s0 .. s0 + kRows - 1 of Kc (TF32 and fp32) and Qc (TF32); zeros past T.
// bf16 variant: Kc fp32, Qc fp32 (in the TF32 region: the dot Qc . (X - W) reads it unrounded)
// and both as bf16 for the products' A operands.
template <int D, int WARPS, FlashBwdProducts P>
__device__ __forceinline__ void stage_rows(float* sm, const float* __restrict__ Qc,
                                           const float* __restrict__ Kc, int64_t bh, int T,
                                           int s0) {
  using L = Layout<D, WARPS>;
  constexpr int kChunksRow = D / 4;
  // A plain loop (once per block): for_each_strided here made ptxas spill 16 bytes in
  // flash_bwd_kernel<32, 8, bf16> (nvcc 13, 2026-11-29).
  for (int idx = threadIdx.x; idx < L::kRows * kChunksRow; idx += L::kThreads) {
    const int r = idx / kChunksRow, q = idx % kChunksRow, s = s0 + r;
    float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), qv = kv;
    if (s < T) {
      kv = *reinterpret_cast<const float4*>(Kc + (bh * T + s) * D + 4 * q);
      qv = *reinterpret_cast<const float4*>(Qc + (bh * T + s) * D + 4 * q);
    }
    *reinterpret_cast<float4*>(sm + L::kKf + r * L::kFLd + 4 * q) = kv;
    if constexpr (P == FlashBwdProducts::bf16_mma) {
      *reinterpret_cast<float4*>(sm + L::kQt + r * L::kFLd + 4 * q) = qv;
      *reinterpret_cast<uint2*>(sm + L::kKb + r * L::kAbLd + 2 * q) =
          make_uint2(pack_bf16x2(kv.x, kv.y), pack_bf16x2(kv.z, kv.w));
      *reinterpret_cast<uint2*>(sm + L::kQb + r * L::kAbLd + 2 * q) =
          make_uint2(pack_bf16x2(qv.x, qv.y), pack_bf16x2(qv.z, qv.w));
    } else {
      *reinterpret_cast<uint4*>(sm + L::kKt + r * L::kKtLd + 4 * q) = to_tf32x4(kv);
      *reinterpret_cast<uint4*>(sm + L::kQt + r * L::kFLd + 4 * q) = to_tf32x4(qv);
    }
  }
}

// dz[k, s] = 0 for the block's s and every slot it does not visit (t_k <= s0, padding).
template <int WARPS>
__device__ __forceinline__ void zero_unvisited_dz(float* __restrict__ dz, int64_t bh, int K,
                                                  int T, int s0, int k_lo, int k_end) {
  constexpr int kRows = 16 * WARPS;
  for (int idx = threadIdx.x; idx < K * kRows; idx += 32 * WARPS) {
    const int k = idx / kRows, r = idx % kRows;
    if ((k < k_lo || k >= k_end) && s0 + r < T) dz[(bh * K + k) * T + s0 + r] = 0.0f;
  }
}

struct SlotScalars {
  int t;          // position of the slot
  float m, inv_l;  // row max of c z and 1 / normaliser
  float E, rowterm;
};

__device__ __forceinline__ SlotScalars load_scalars(const int32_t* __restrict__ rw,
                                                    const float* __restrict__ m,
                                                    const float* __restrict__ l,
                                                    const float* __restrict__ E,
                                                    const float* __restrict__ rowterm,
                                                    int64_t slot, int k) {
  SlotScalars sc;
  sc.t = rw[k];
  sc.m = m[slot];
  sc.inv_l = 1.0f / l[slot];
  sc.E = E[slot];
  sc.rowterm = rowterm[slot];
  return sc;
}

// The fp32 per-row dots of slot k for this thread's rows ra = r0 + g, rb = ra + 8 (quad sums,
// so every lane of a quad holds the row's value): z = Qg . Kc, uk = U . Kc.
template <int D, int WARPS>
__device__ __forceinline__ void row_dots(const float* sm, const float* vQg, const float* vU,
                                         int ra, int q4, float (&z)[2], float (&uk)[2]) {
  using L = Layout<D, WARPS>;
  const float* kf = sm + L::kKf;
  z[0] = z[1] = uk[0] = uk[1] = 0.0f;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    const int col = 8 * nt + 2 * q4;
    const float2 qg = *reinterpret_cast<const float2*>(vQg + col);
    const float2 u = *reinterpret_cast<const float2*>(vU + col);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 kv = *reinterpret_cast<const float2*>(kf + (ra + 8 * h) * L::kFLd + col);
      z[h] = fmaf(kv.y, qg.y, fmaf(kv.x, qg.x, z[h]));
      uk[h] = fmaf(kv.y, u.y, fmaf(kv.x, u.x, uk[h]));
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) z[h] = quad_sum(z[h]), uk[h] = quad_sum(uk[h]);
}

// The m16n8k8 (and per-warp wgmma) TF32 A fragment of rows ra, ra + 8 and columns col, col + 4
// of a shared tile of TF32 words with row stride ld.
__device__ __forceinline__ void a_fragment(const uint32_t* tile, int ld, int ra, int col,
                                           uint32_t (&a)[4]) {
  const uint32_t* p = tile + ra * ld + col;
  a[0] = p[0];
  a[1] = p[8 * ld];
  a[2] = p[4];
  a[3] = p[8 * ld + 4];
}

// acc = Kc_rows G^T for the warp's 16 rows (r0 ..): X[s][i] = sum_j G[i][j] Kc[s][j].
template <int D, int WARPS>
__device__ __forceinline__ void product_kc_gt(const float* sm, const uint32_t* sG, int r0, int g,
                                              int q4, float (&acc)[D / 8][4]) {
  using L = Layout<D, WARPS>;
  const uint32_t* kt = reinterpret_cast<const uint32_t*>(sm + L::kKt);
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < D / 8; ++ks) {
    uint32_t a[4];
    a_fragment(kt, L::kKtLd, r0 + g, 8 * ks + q4, a);
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const uint32_t* gr = sG + (8 * nt + g) * L::kGLd + 8 * ks + q4;  // B(j, i) = G[i][j]
      mma_tf32(acc[nt], a, gr[0], gr[4]);
    }
  }
}

// acc = Qc_rows G for the warp's 16 rows: Y[s][j] = sum_i Qc[s][i] G[i][j].  The k-step's k
// index order is i = 8 ks + 2 q (slot q), 8 ks + 2 q + 1 (slot q + 4), in A and B alike.
template <int D, int WARPS>
__device__ __forceinline__ void product_qc_g(const float* sm, const uint32_t* sG, int r0, int g,
                                             int q4, float (&acc)[D / 8][4]) {
  using L = Layout<D, WARPS>;
  const uint32_t* qt = reinterpret_cast<const uint32_t*>(sm + L::kQt);
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < D / 8; ++ks) {
    const uint2 pa = *reinterpret_cast<const uint2*>(qt + (r0 + g) * L::kFLd + 8 * ks + 2 * q4);
    const uint2 pb = *reinterpret_cast<const uint2*>(qt + (r0 + g + 8) * L::kFLd + 8 * ks + 2 * q4);
    const uint32_t a[4] = {pa.x, pb.x, pa.y, pb.y};
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const uint32_t* gc = sG + (8 * ks + 2 * q4) * L::kGLd + 8 * nt + g;  // B(i, j) = G[i][j]
      mma_tf32(acc[nt], a, gc[0], gc[L::kGLd]);
    }
  }
}

// bf16 variant: acc = A_rows B for the warp's 16 rows, A the bf16 rows at `rows` (Kc for X,
// Qc for Y; ldmatrix A fragments) and B from the row-major bf16 G_k at `gb`:
//   X (kTransB false): B(j, i) = G[i][j]: b0 of n-tile nt, k16 step ks = (row i = 8 nt + g,
//     columns j = 16 ks + 2 q, + 1) of G: ldmatrix of the 8 x 8 block (rows 8 nt .., columns
//     16 ks ..); b1 the block 8 columns on;
//   Y (kTransB true): B(i, j) = G[i][j]: b0 = (rows i = 16 ks + 2 q, + 1, column j = 8 nt + g):
//     ldmatrix.trans of the block (rows 16 ks .., columns 8 nt ..); b1 the block 8 rows down.
// One x4 load gives b0, b1 of two n-tiles: lane l addresses row l % 8 of matrix l / 8, matrices
// (b0, b1) of n-tile nt then of nt + 1.
template <int D, int WARPS, bool kTransB>
__device__ __forceinline__ void product_bf16(const float* rows, const float* gb, int r0, int lane,
                                             float (&acc)[D / 8][4]) {
  using L = Layout<D, WARPS>;
  constexpr int kRowBytes = 4 * L::kAbLd;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
  // ldmatrix x4: lanes 0-15 give rows r0 + 0..15 at the k step's first 8 columns (a0, a1),
  // lanes 16-31 the same rows 8 columns on (a2, a3).
  const uint32_t row_address = static_cast<uint32_t>(
      __cvta_generic_to_shared(rows + (r0 + (lane & 15)) * L::kAbLd + 4 * (lane >> 4)));
  // Lane l's row of G and its column (bf16 elements) in the first n-tile pair and k16 step.
  const int m_half = (lane >> 3) & 1, n_next = lane >> 4, r8 = lane & 7;
  const int g_row = kTransB ? 8 * m_half + r8 : 8 * n_next + r8;
  const int g_col = kTransB ? 8 * n_next : 8 * m_half;
  const uint32_t g_address = static_cast<uint32_t>(__cvta_generic_to_shared(gb)) +
                             g_row * kRowBytes + 2 * g_col;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    ldsm_x4<0>(a, row_address + 32 * ks);  // 16 bf16 = 32 bytes per k step
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {  // n-tiles 2 np, 2 np + 1
      uint32_t b[4];
      if constexpr (kTransB)
        ldsm_x4_trans<0>(b, g_address + 16 * ks * kRowBytes + 2 * 16 * np);
      else
        ldsm_x4<0>(b, g_address + 16 * np * kRowBytes + 2 * 16 * ks);
      mma16816(acc[2 * np], a, b[0], b[1]);
      mma16816(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// After a wgmma wait: the m64n64 D fragment d (cuda/wgmma.cuh) as the mma.sync C fragments of
// the warp's 16 rows, acc[nt][e] = d[4 nt + e] (the same layout: register renames only).
template <int D>
__device__ __forceinline__ void take_d_fragment(float (&d)[32], float (&acc)[D / 8][4]) {
  tie(d);
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = d[4 * nt + e];
}

// wgmma variant: X = Kc_rows G^T and Y = Qc_rows G of the warpgroup's 64 rows on wgmma
// (cuda/wgmma.cuh), as two commit groups left in flight; A fragments from the TF32 rows in shared
// memory (per warp its 16 rows r0 .., the wgmma A fragment), kept in ax, ay until the caller has
// waited.
template <int D, int WARPS>
__device__ __forceinline__ void issue_products_wg(const float* sm, int buf, int r0, int g, int q4,
                                                  uint32_t (&ax)[D / 8][4],
                                                  uint32_t (&ay)[D / 8][4], float (&x)[32],
                                                  float (&y)[32]) {
  using L = Layout<D, WARPS>;
  const uint32_t* kt = reinterpret_cast<const uint32_t*>(sm + L::kKt);
  const uint32_t* qt = reinterpret_cast<const uint32_t*>(sm + L::kQt);
  const uint32_t* sG = reinterpret_cast<const uint32_t*>(sm + L::kG + buf * D * L::kGLd);
  const uint32_t* sGt = reinterpret_cast<const uint32_t*>(sm + L::kGt);
#pragma unroll
  for (int ks = 0; ks < D / 8; ++ks) {
    a_fragment(kt, L::kKtLd, r0 + g, 8 * ks + q4, ax[ks]);
    a_fragment(qt, L::kFLd, r0 + g, 8 * ks + q4, ay[ks]);
  }
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 8; ++ks)
    wgmma_tf32_m64n64k8(x, ax[ks], wgmma_b_descriptor(sG, ks), ks > 0);
  wgmma_commit();
#pragma unroll
  for (int ks = 0; ks < D / 8; ++ks)
    wgmma_tf32_m64n64k8(y, ay[ks], wgmma_b_descriptor(sGt, ks), ks > 0);
  wgmma_commit();
}

// One slot k for one warp: the dz of its 16 rows, and dQs, dKs accumulated into dq, dk (C
// fragment layout: [nt][0..1] row r0 + g, columns 8 nt + 2 q, + 1; [nt][2..3] row r0 + g + 8).
// wgmma variant: the products on wgmma (issue_products_wg; xw, yw hold their results) instead of
// mma.sync; a warp then skips a slot only with its whole warpgroup (every warp of it issues the
// wgmmas), and a warp whose own rows are all past t_k runs the slot with pi = 0 (adding exact
// zeros).
template <int D, int WARPS, FlashBwdProducts P>
__device__ __forceinline__ void process_slot(const float* sm, int buf, int r0, int s0, int T,
                                             const SlotScalars& sc, float c,
                                             float* __restrict__ dz_row, float (&dq)[D / 8][4],
                                             float (&dk)[D / 8][4], float (&xw)[32],
                                             float (&yw)[32]) {
  using L = Layout<D, WARPS>;
  constexpr bool kWg = P == FlashBwdProducts::tf32_wgmma;
  constexpr bool kBf16 = P == FlashBwdProducts::bf16_mma;
  const int lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
  const int first_row = kWg ? 64 * (r0 / 64) : r0;  // the warpgroup's or the warp's first row
  if (s0 + first_row >= sc.t) {  // all those rows at or past t_k: pi = 0, dz = 0, nothing to add
    if (lane < 16 && s0 + r0 + lane < T) dz_row[s0 + r0 + lane] = 0.0f;
    return;
  }
  const float* vQg = sm + L::kVec + buf * 3 * D;
  const float* vU = vQg + D;
  const float* vW = vU + D;
  const uint32_t* sG = reinterpret_cast<const uint32_t*>(sm + L::kG + buf * D * L::kGLd);
  const uint32_t* qt = reinterpret_cast<const uint32_t*>(sm + L::kQt);
  const int ra = r0 + g;

  uint32_t ax[D / 8][4], ay[D / 8][4];
  if constexpr (kWg) issue_products_wg<D, WARPS>(sm, buf, r0, g, q4, ax, ay, xw, yw);
  float z[2], uk[2], pi[2];
  row_dots<D, WARPS>(sm, vQg, vU, ra, q4, z, uk);
#pragma unroll
  for (int h = 0; h < 2; ++h)
    pi[h] = (s0 + ra + 8 * h < sc.t) ? expf(fmaf(c, z[h], -sc.m)) * sc.inv_l : 0.0f;

  float acc[D / 8][4];
  if constexpr (kWg) {
    wgmma_wait<1>();  // X
    take_d_fragment<D>(xw, acc);
  } else if constexpr (kBf16) {
    product_bf16<D, WARPS, false>(sm + L::kKb, sm + L::kGb + buf * D * L::kAbLd, r0, lane, acc);
  } else {
    product_kc_gt<D, WARPS>(sm, sG, r0, g, q4, acc);
  }
  float gq[2] = {0.0f, 0.0f};  // Qc . (X - W), this thread's columns
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    const int col = 8 * nt + 2 * q4;
    const float2 w = *reinterpret_cast<const float2*>(vW + col);
    const uint2 qa = *reinterpret_cast<const uint2*>(qt + ra * L::kFLd + col);
    const uint2 qb = *reinterpret_cast<const uint2*>(qt + (ra + 8) * L::kFLd + col);
    const float x0 = acc[nt][0] - w.x, x1 = acc[nt][1] - w.y;
    const float x2 = acc[nt][2] - w.x, x3 = acc[nt][3] - w.y;
    gq[0] = fmaf(__uint_as_float(qa.y), x1, fmaf(__uint_as_float(qa.x), x0, gq[0]));
    gq[1] = fmaf(__uint_as_float(qb.y), x3, fmaf(__uint_as_float(qb.x), x2, gq[1]));
    dq[nt][0] = fmaf(pi[0], x0, dq[nt][0]);
    dq[nt][1] = fmaf(pi[0], x1, dq[nt][1]);
    dq[nt][2] = fmaf(pi[1], x2, dq[nt][2]);
    dq[nt][3] = fmaf(pi[1], x3, dq[nt][3]);
  }
  float dzv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float gks = c * (quad_sum(gq[h]) - uk[h] + sc.E);
    dzv[h] = pi[h] * (gks - sc.rowterm);  // exactly 0 where pi = 0 (s >= t_k)
    const int s = s0 + ra + 8 * h;
    if (q4 == 0 && s < T) dz_row[s] = dzv[h];
  }

  if constexpr (kWg) {
    wgmma_wait<0>();  // Y; the A fragments are free again
#pragma unroll
    for (int ks = 0; ks < D / 8; ++ks) {
      tie(ax[ks]);
      tie(ay[ks]);
    }
    take_d_fragment<D>(yw, acc);
  } else if constexpr (kBf16) {
    product_bf16<D, WARPS, true>(sm + L::kQb, sm + L::kGb + buf * D * L::kAbLd, r0, lane, acc);
  } else {
    product_qc_g<D, WARPS>(sm, sG, r0, g, q4, acc);
  }
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    const int col = 8 * nt + 2 * q4;
    const float2 u = *reinterpret_cast<const float2*>(vU + col);
    const float2 qg = *reinterpret_cast<const float2*>(vQg + col);
    dk[nt][0] = fmaf(dzv[0], qg.x, fmaf(pi[0], acc[nt][0] - u.x, dk[nt][0]));
    dk[nt][1] = fmaf(dzv[0], qg.y, fmaf(pi[0], acc[nt][1] - u.y, dk[nt][1]));
    dk[nt][2] = fmaf(dzv[1], qg.x, fmaf(pi[1], acc[nt][2] - u.x, dk[nt][2]));
    dk[nt][3] = fmaf(dzv[1], qg.y, fmaf(pi[1], acc[nt][3] - u.y, dk[nt][3]));
  }
}

// The two adjacent elements p[0], p[1] = x, y: one 8-byte store, or 4 bytes of bf16 (rounded to
// nearest even, as __float2bfloat16_rn).
__device__ __forceinline__ void store_pair(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}

// out's rows of element type Elem: dq, dk (fp32) or dq16, dk16 (bf16).
__device__ __forceinline__ void row_pointers(const FlashBwdRows& out, float*& dq, float*& dk) {
  dq = out.dq, dk = out.dk;
}
__device__ __forceinline__ void row_pointers(const FlashBwdRows& out, __nv_bfloat16*& dq,
                                             __nv_bfloat16*& dk) {
  dq = out.dq16, dk = out.dk16;
}

// Writes the warp's rows of dQs, dKs from the C fragments where `out` says (row (b, h, s) at
// b stride_b + h stride_h + s stride_s), times out.scale, as Elem (fp32, or bf16 rounded to
// nearest even from the same fp32 products).
template <int D, class Elem>
__device__ __forceinline__ void store_rows(const FlashBwdRows& out, int64_t bh, int H, int T,
                                           int s_first, const float (&dq)[D / 8][4],
                                           const float (&dk)[D / 8][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
  const int64_t b = bh / H, row_bh = b * out.stride_b + (bh - b * H) * out.stride_h;
  const float a = out.scale;
  Elem *dq_out, *dk_out;
  row_pointers(out, dq_out, dk_out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int s = s_first + g + 8 * h;
    if (s >= T) continue;
    Elem* qrow = dq_out + row_bh + s * out.stride_s;
    Elem* krow = dk_out + row_bh + s * out.stride_s;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const int col = 8 * nt + 2 * q4;
      store_pair(qrow + col, a * dq[nt][2 * h], a * dq[nt][2 * h + 1]);
      store_pair(krow + col, a * dk[nt][2 * h], a * dk[nt][2 * h + 1]);
    }
  }
}

// Grid: (ceil(T / kRows), BH) (x = the tile of attended rows, y = bh: the tiles of one bh are
// neighbours and share G_k through L2) or, longest_first, (BH, ceil(T / kRows)) (every bh's
// first tile, the one with the most slots, is dispatched before any second tile: shorter blocks
// fill the tail).  Elem: the type of out's rows (float; __nv_bfloat16 for the bf16 precision).
template <int D, int WARPS, FlashBwdProducts P, class Elem>
__global__ void __launch_bounds__(32 * WARPS) flash_bwd_kernel(
    const float* __restrict__ Qg, const float* __restrict__ Qc, const float* __restrict__ Kc,
    const int32_t* __restrict__ rows, const float* __restrict__ m, const float* __restrict__ l,
    const float* __restrict__ G, const float* __restrict__ U, const float* __restrict__ W,
    const float* __restrict__ E, const float* __restrict__ rowterm, int H, int T, int K,
    float c, int longest_first, float* __restrict__ dz, const FlashBwdRows out) {
  using L = Layout<D, WARPS>;
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  const int s0 = (longest_first ? blockIdx.y : blockIdx.x) * L::kRows;
  const int64_t bh = longest_first ? blockIdx.x : blockIdx.y;
  const int32_t* rw = rows + (bh / H) * K;
  const int r0 = 16 * (threadIdx.x / 32);

  int k_lo, k_end;
  slot_range(rw, K, s0, &k_lo, &k_end);
  const int n_iter = k_end - k_lo;
  SlotScalars next{};  // the scalars of the next slot, loaded one iteration ahead
  if (n_iter > 0) {
    issue_slot<D, WARPS, P>(sm, 0, G, Qg, U, W, bh * K + k_end - 1);
    next = load_scalars(rw, m, l, E, rowterm, bh * K + k_end - 1, k_end - 1);
  }
  cp_async_commit();
  stage_rows<D, WARPS, P>(sm, Qc, Kc, bh, T, s0);
  zero_unvisited_dz<WARPS>(dz, bh, K, T, s0, k_lo, k_end);

  float dq[D / 8][4], dk[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nt][e] = dk[nt][e] = 0.0f;
  float xw[32], yw[32];  // wgmma variant: the wgmma results of a slot (unused otherwise)
#pragma unroll
  for (int e = 0; e < 32; ++e) xw[e] = yw[e] = 0.0f;

  // One block barrier per slot.  Iteration it uses slot buffer it % 3; what it writes before its
  // barrier (the prefetch into (it + 1) % 3, TF32 rounding in place) was last read in iteration
  // it - 2, which every warp finished before the barrier of it - 1.  The wgmma variant keeps a
  // closing barrier: its one G^T region is rewritten every slot.
  for (int it = 0; it < n_iter; ++it) {
    const int k = k_end - 1 - it, buf = it % L::kSlotBufs;
    const int64_t slot = bh * K + k;
    const SlotScalars sc = next;
    if (it + 1 < n_iter) {
      issue_slot<D, WARPS, P>(sm, (it + 1) % L::kSlotBufs, G, Qg, U, W, slot - 1);
      next = load_scalars(rw, m, l, E, rowterm, slot - 1, k - 1);
    }
    cp_async_commit();  // possibly empty: keeps "all but one" meaning "slot k has landed"
    cp_async_wait<1>();
    round_own_g<D, WARPS, P>(sm, buf);
    __syncthreads();  // slot k's buffers (and, the first time, the rows) visible to all
    process_slot<D, WARPS, P>(sm, buf, r0, s0, T, sc, c, dz + slot * T, dq, dk, xw, yw);
    if constexpr (P == FlashBwdProducts::tf32_wgmma) __syncthreads();
  }
  store_rows<D, Elem>(out, bh, H, T, s0 + r0, dq, dk);
}

template <int D, int WARPS, FlashBwdProducts P>
void launch(const float* Qg, const float* Qc, const float* Kc, const int32_t* rows,
            const float* m, const float* l, const float* G, const float* U, const float* W,
            const float* E, const float* rowterm, int64_t BH, int H, int T, int K, float c,
            bool longest_first, float* dz, const FlashBwdRows& out, cudaStream_t stream) {
  using L = Layout<D, WARPS>;
  auto kernel = out.dq16 != nullptr ? flash_bwd_kernel<D, WARPS, P, __nv_bfloat16>
                                    : flash_bwd_kernel<D, WARPS, P, float>;
  // The attribute is per device: set at every launch (cheap) rather than once per process.
  constexpr size_t kBytes = L::bytes(P);
  static_assert(kBytes <= 227 * 1024, "one block's shared memory must fit a Hopper SM (227 KB)");
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(kBytes)));
  const unsigned tiles = static_cast<unsigned>(ceil_div(T, L::kRows));
  const dim3 grid = longest_first ? dim3(static_cast<unsigned>(BH), tiles)
                                  : dim3(tiles, static_cast<unsigned>(BH));
  kernel<<<grid, L::kThreads, kBytes, stream>>>(Qg, Qc, Kc, rows, m, l, G, U, W, E, rowterm,
                                                   H, T, K, c, longest_first ? 1 : 0, dz, out);
  BLM_CHECK_LAUNCH("barrier_flash_backward");
}

}  // namespace

bool barrier_flash_backward_supported(int D, int64_t BH) {
  return (D == 32 || D == 64) && BH <= 65535;
}

void barrier_flash_backward_into(const float* Qg, const float* Qc, const float* Kc,
                                 const int32_t* rows, const float* m, const float* l,
                                 const float* G, const float* U, const float* W, const float* E,
                                 const float* rowterm, int B, int H, int T, int K, int D, float c,
                                 float* dz, const FlashBwdRows& out, FlashBwdVariant variant,
                                 cudaStream_t stream) {
  const int64_t BH = static_cast<int64_t>(B) * H;
  if (!barrier_flash_backward_supported(D, BH))
    throw DeviceError("barrier_flash_backward: head size " + std::to_string(D) + " or " +
                      std::to_string(BH) + " sequence-heads unsupported (dh 32, 64; <= 65535)");
  const int rpb = variant.rows_per_block;
  if (rpb != 64 && rpb != 128)
    throw DeviceError("barrier_flash_backward: rows per block " + std::to_string(rpb) +
                      " unsupported (64, 128)");
  if (BH == 0 || T <= 0) return;
  if (!aligned16(Qg) || !aligned16(Qc) || !aligned16(Kc) || !aligned16(G) || !aligned16(U) ||
      !aligned16(W))
    throw DeviceError("barrier_flash_backward: Qg, Qc, Kc, G, U, W must be 16-byte aligned");
  const bool lf = variant.longest_first;
  // Head size 32 has no wgmma form: it runs the TF32 mma.sync products instead.
  using Pr = FlashBwdProducts;
  const Pr pr = D == 32 && variant.products == Pr::tf32_wgmma ? Pr::tf32_mma : variant.products;
#define BLM_FLASH_BWD_LAUNCH(DD, WW, PP)                                                        \
  launch<DD, WW, PP>(Qg, Qc, Kc, rows, m, l, G, U, W, E, rowterm, BH, H, T, K, c, lf, dz, out, \
                     stream)
#define BLM_FLASH_BWD_ROWS(DD, PP)              \
  if (rpb == 128) BLM_FLASH_BWD_LAUNCH(DD, 8, PP); \
  else BLM_FLASH_BWD_LAUNCH(DD, 4, PP)
  if (D == 32 && pr == Pr::bf16_mma) { BLM_FLASH_BWD_ROWS(32, Pr::bf16_mma); }
  else if (D == 32) { BLM_FLASH_BWD_ROWS(32, Pr::tf32_mma); }
  else if (pr == Pr::bf16_mma) { BLM_FLASH_BWD_ROWS(64, Pr::bf16_mma); }
  else if (pr == Pr::tf32_wgmma) { BLM_FLASH_BWD_ROWS(64, Pr::tf32_wgmma); }
  else { BLM_FLASH_BWD_ROWS(64, Pr::tf32_mma); }
#undef BLM_FLASH_BWD_ROWS
#undef BLM_FLASH_BWD_LAUNCH
}

void barrier_flash_backward(const float* Qg, const float* Qc, const float* Kc,
                            const int32_t* rows, const float* m, const float* l, const float* G,
                            const float* U, const float* W, const float* E,
                            const float* rowterm, int B, int H, int T, int K, int D, float c,
                            float* dz, float* dQs, float* dKs, cudaStream_t stream) {
  barrier_flash_backward_into(Qg, Qc, Kc, rows, m, l, G, U, W, E, rowterm, B, H, T, K, D, c, dz,
                              FlashBwdRows::bhtd(dQs, dKs, H, T, D),
                              barrier_flash_backward_variant_from_env(), stream);
}

FlashBwdVariant barrier_flash_backward_variant_from_env() {
  FlashBwdVariant variant;
  constexpr FlashBwdProducts kChoices[] = {FlashBwdProducts::bf16_mma, FlashBwdProducts::tf32_mma,
                                           FlashBwdProducts::tf32_wgmma};
  variant.products = kChoices[env_choice("BLM_BARRIER_BWD", {"bf16", "mma", "wgmma"}, 0)];
  // Block height: 64 rows for the bf16 products (two 85 KB blocks per SM), 128 for TF32 (one
  // block of 8 warps); measured in the file header.  BLM_BARRIER_BWD_ROWS forces one.
  const int rows = env_choice("BLM_BARRIER_BWD_ROWS", {"auto", "64", "128"}, 0);
  const bool bf16 = variant.products == FlashBwdProducts::bf16_mma;
  variant.rows_per_block = rows == 1 ? 64 : rows == 2 ? 128 : bf16 ? 64 : 128;
  return variant;
}

// ------------------------------------------------------------------ dQa and its slot rows
//
// dQa [BH, K, D] = dz Kc on one cuBLAS strided-batched TF32 product, then add_slot_rows_kernel
// adds each counted slot's row into dq.
//
// Measured and dropped (H200, 2026-11-29, B 16, H 12, T 1024, D 64, per call, fp32 rows; bf16
// rows the same within 1 us): a fused fp32-FMA kernel (block per bh, 16 columns and up to 16
// slots; fixed-order sums added into the rows directly, no dQa) against this GEMM plus pass took
// 25.3 / 27.9 us at K 4, 41.2 / 29.3 at K 8, 93.5 / 30.8 at K 16, 148.9 / 34.1 at K 32 and
// 245.0 / 48.4 at K 64: it won only at K 4, by 2.6 us.  Any separate dQa must read all of Kc
// (50 MB a call here, ~19 us at 2.7 TB/s effective), so the GEMM path is already near its floor
// (1.5x at K 4, 1.8x at K 32) and no other separate kernel can gain much; a new attempt needs an
// idea that avoids that read, e.g. dQa computed inside the backward tiles, which already hold the
// Kc rows.

namespace {

// p[0 .. 4) += alpha a in fp32 (fmaf: one rounding per element; bf16: widened, added, rounded
// once to nearest even at the store).
template <class Elem>
__device__ __forceinline__ void add_scaled_quad(Elem* p, float alpha, const float (&a)[4]) {
  float v[4];
  load_vec<4>(p, v);
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = fmaf(alpha, a[j], v[j]);
  store_vec<4>(p, v);
}

// dq row t_k += out.scale dQa[bh, k] for every counted slot k (t_k = rows[b, k] >= 0).
// One thread per 4 columns of a slot row.  (This replaced a pass over all B T rows that read dQs,
// dKs [BH, T, D] and wrote dqk: the backward kernel now writes its rows there itself.  At GPT-2
// small with 64 positions that pass took 48 us a layer.)
constexpr int kSlotThreads = 256;
__global__ void __launch_bounds__(kSlotThreads)
    add_slot_rows_kernel(const float* __restrict__ dQa, const int32_t* __restrict__ rows,
                         int64_t nslots, int H, int D, int K, const FlashBwdRows out) {
  const int quads = D / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kSlotThreads + threadIdx.x;
  const int64_t r = idx / quads;  // bh K + k
  if (r >= nslots) return;
  const int i = 4 * static_cast<int>(idx - r * quads);
  const int64_t bh = r / K;
  const int64_t b = bh / H;
  const int h = static_cast<int>(bh - b * H), k = static_cast<int>(r - bh * K);
  const int t = rows[b * K + k];
  if (t < 0) return;
  float qa[4];
  load_vec<4>(dQa + r * D + i, qa);
  const int64_t at = b * out.stride_b + h * out.stride_h + t * out.stride_s + i;  // dq row t
  if (out.dq16 != nullptr) add_scaled_quad(out.dq16 + at, out.scale, qa);
  else add_scaled_quad(out.dq + at, out.scale, qa);
}

}  // namespace

void barrier_flash_slot_rows(const float* dz, const float* Kc, const int32_t* rows, int B, int H,
                             int T, int K, int D, const FlashBwdRows& out, float* dQa,
                             cublasHandle_t blas, cudaStream_t stream) {
  if (D != 32 && D != 64)
    throw DeviceError("barrier_flash_slot_rows: head size " + std::to_string(D) +
                      " unsupported (32, 64)");
  const int64_t BH = static_cast<int64_t>(B) * H;
  if (BH == 0 || T <= 0 || K <= 0) return;
  if (!aligned16(Kc)) throw DeviceError("barrier_flash_slot_rows: Kc must be 16-byte aligned");
  // dQa = dz Kc: [K, T] x [T, D] per bh, on TF32 tensor cores like the tiles' products (in
  // fp32 FFMA it took 65 us a layer at GPT-2 small with 64 positions).
  const long long kt = static_cast<long long>(K) * T, sd = static_cast<long long>(T) * D;
  const long long kd = static_cast<long long>(K) * D;
  gemm_strided_batched(blas, false, false, K, D, T, 1.0f, dz, T, kt, Kc, D, sd, 0.0f, dQa, D, kd,
                       static_cast<int>(BH), true);
  const int64_t nslots = BH * K;
  const unsigned blocks = static_cast<unsigned>(ceil_div(nslots * (D / 4), kSlotThreads));
  add_slot_rows_kernel<<<blocks, kSlotThreads, 0, stream>>>(dQa, rows, nslots, H, D, K, out);
  BLM_CHECK_LAUNCH("barrier_flash slot rows");
}

}  // namespace cuda
}  // namespace blm
