// The flash-style barrier forward of cuda/barrier_fused_s.cuh: m, l, Qb, Kb and S from Qg, Qc,
// Kc without z, pi or the outer products in device memory; and S from a materialised pi.
//
// Tiles.  A block (256 threads, 8 warps) owns 32 slots k0 .. k0 + 31 of one bh (the statistics
// kernel: 16 or 32, barrier_stats_rows) and sweeps the s tiles of 32 below t_max, the largest t
// of its slots (pi_ks = 0 for s >= t: later tiles add nothing).  Per s tile (sweep_tiles): the Kc
// (and Qc) tile arrives by cp.async into one of two buffers while the previous tile is used;
// "produce" fills a 32 x 32 shared tile (each warp one 16 x 8 logit tile z = Qg Kc^T, turned
// into pi, or into c z for the statistics; with 16 slots, two halves of d summed by the
// softmax); "consume" runs the tensor-core products on it.
//
//   flash_stats_kernel (R = 16 or 32 slots, bh, split z; grid ceil(K / R) x BH x splits, or
//     BH x ceil(K / R) x splits longest first: slot_tile_grid):  one
//     sweep over the split's s tiles, [z split_s, (z + 1) split_s) below t_max (split_s a
//     multiple of 32; one split: all of them): m, l by an online max / rescaled sum over the
//     tiles (scalars per slot), and [Qb | Kb] += exp(c z - m) [Qc | Kc], rescaled as m grows.
//     One split: divided by l and written.  Several: the split's raw m_p, l_p, [Qb | Kb]_p per
//     slot, a record of 2 D + 2 floats, into the not yet written S ([BH, K, D^2]: records of
//     split z at z (2 D + 2) of each slot's D^2 floats), then
//   stats_combine_kernel (one warp per slot bh K + k, 8 a block):  M = max_p m_p,
//     L = sum_p l_p exp(m_p - M), [Qb | Kb] = sum_p exp(m_p - M) [Qb | Kb]_p / L, over
//     p = 0, 1, ... in this order (no atomics: deterministic).
//   flash_s_kernel (bh, 32 slots, chunk of 1024 columns of S = CI values of i): reads m, l,
//     recomputes z once per tile, S[:, i D + j] += sum_s (pi_ks Qc_s[i]) Kc_s[j].
//
// Why two passes (statistics first) and not flash attention's online rescaling: the S
// accumulator is 128 fp32 registers per thread; rescaling it whenever a row maximum grows costs
// 128 multiplies per tile per thread in the hot loop, and pi would be known only up to the final
// division.  Computing m, l once per (bh, slot tile) in a small kernel costs one extra z pass
// (1/8 of the S tensor work for D = 64, shared by the 4 chunks) and gives every S block the
// exact normalised pi = exp(c z - m) / l - the same expression the backward recomputes from the
// saved m, l, and the same pi as the cuBLAS path up to rounding.
//
// Why the split of s for the statistics (flash decoding): with few slots the statistics grid is
// small and each block's sweep long - B 16 H 12 T 1024 K 8: 192 blocks of ~32 serial tiles,
// ~80 us a call on the H200 whatever K, latency bound.  barrier_stats_splits cuts the sweep into
// ranges of at least 128 s until the grid has ~4 blocks per SM; big grids ((b): 3072 blocks)
// keep one split and the one-kernel path, bit for bit.
//
// Why the split of i over blocks: the S tile of 32 slots is 32 x D^2 (256 KiB for D = 64); a
// block holds 32 x 1024 of it (128 registers per thread) and recomputes z, whose work is
// D / 1024 of the block's S work (1/16 per z pass for D = 64; D = 32 needs one chunk).
//
// Precision.  z on three TF32 products (3xTF32: x = hi + lo, z = hi.hi + hi.lo + lo.hi, the
// lo.lo term below 2^-22 |x y|): plain TF32 logits would be off by ~2^-11 sum_d |q_d k_d|, i.e.
// a relative error of pi of ~1e-3 at N(0, 1) inputs and of several percent at peaked softmaxes;
// 3xTF32 gives fp32-like logits (the cuBLAS path computes z in fp32).  S, Qb, Kb: one TF32 mma
// per term (A = tf32(pi q_i) or tf32(pi), B = tf32(k_j) or tf32(q), tf32(k)), <= 2^-10 relative
// error per term, fp32 accumulation: as the cuBLAS TF32 product.
//
// Measured (H200, commit 2896a93, tests/gpu/test_barrier_fused_s.cpp [.bench]): (b) B64 H6 T256
// D64 K254 exact: 2.08 ms (49 TFLOP/s on the causal S count 2 sum_k t_k D^2 = 1.03e11), of which
// the S kernel alone (pi from memory) 1.62 ms (63 TFLOP/s); (a) B16 H12 T1024 D64 K64: 1.01 ms
// (52 TFLOP/s), S alone 0.77 ms.  The cuBLAS TF32 S product alone (full T, Pm stored) takes
// 0.88 / 0.81 ms; the whole barrier_forward_tc forward 4.85 / 2.41 ms.  The S loop is latency
// bound (8 warps per SM at ~200 registers, two block barriers per 32-s tile); see the report of
// that commit for the next steps (wgmma with A from registers, one barrier per tile).
//
// mma.sync m16n8k8 fragment layouts (cuda/mma.cuh), lane = 4 g + c:
//   A (16 x 8) a0 = A[g][c], a1 = A[g + 8][c], a2 = A[g][c + 4], a3 = A[g + 8][c + 4]
//   B (8 x 8)  b0 = B[c][g], b1 = B[c + 4][g];  C (16 x 8) d0, d1 = C[g][2c, 2c + 1],
//   d2, d3 = C[g + 8][2c, 2c + 1]
// Shared strides (banks of a warp's reads): Qg tile D + 4 (A reads 4 g + c: distinct), Kc/Qc
// tiles D + 8 (S/Qb/Kb B reads 8 c + g: distinct; z's B reads 8 g + c: 2-way, the small z
// phase), pi tile 36 (A reads 4 g + c).
#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "cuda/barrier_fused_s.cuh"
#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/mma.cuh"
#include "cuda/wgmma.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr int kRows = 32;     // slots per block (flash_s_kernel; flash_stats_kernel: 16 or 32)
constexpr int kStep = 32;     // s per tile
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kPiLd = kStep + 4;

// Grid order of the kernels whose blocks own a tile of `tile` consecutive slots of one bh and
// sweep s up to their last slot's t (the statistics and the wgmma S kernel).  Slots ascend in t,
// so a bh's last tile is its longest.
//   tiles adjacent (x = tile, y = bh): the blocks of one bh run together and share its Kc, Qc
//     rows in L2;
//   longest first (x = bh, y = the tiles from the last one down): every bh's longest block is
//     dispatched before any shorter one, and the short blocks fill the tail.
// Measured (H200, 2026-11-29, [.bench][barrier-flash-fwd], statistics + wgmma S, both orders
// built and run in one call): (b) exact 1.330 ms adjacent against 1.462 longest first (93 waves
// of blocks: locality wins); (a) K 64 0.561 against 0.537, statistics alone at (a) K 16 0.205
// against 0.180 (few waves of long blocks: the tail wins).  So the sampled estimator's slots
// (K < T - 2) go longest first, the exact barrier's tiles adjacent.
bool slots_longest_first(int K, int T) { return K < T - 2; }
dim3 slot_tile_grid(int64_t BH, int K, int tile, int splits, bool longest_first) {
  const unsigned tiles = static_cast<unsigned>(ceil_div(K, tile));
  return longest_first ? dim3(static_cast<unsigned>(BH), tiles, static_cast<unsigned>(splits))
                       : dim3(tiles, static_cast<unsigned>(BH), static_cast<unsigned>(splits));
}
struct SlotTile {
  int k0;      // the block's first slot
  int64_t bh;
};
__device__ __forceinline__ SlotTile slot_tile(int tile, int longest_first) {
  if (longest_first)
    return SlotTile{static_cast<int>(gridDim.y - 1 - blockIdx.y) * tile, blockIdx.x};
  return SlotTile{static_cast<int>(blockIdx.x) * tile, blockIdx.y};
}

// The logit tile of an s tile is kRows x kStep: one 16 x 8 fragment per warp.  A block of
// Rows = 16 slots fills it with kDParts = 2 partial sums over halves of d (tile row 16 p + r:
// part p of slot r), which the softmax adds, so that all 8 warps share the 3xTF32 work; with
// 32 slots, one part (the whole d range).
template <int Rows>
constexpr int kDParts = kRows / Rows;

// The softmax threads of a statistics block of Rows slots: kSlotThreads per slot (8 for 32
// slots, 16 for 16), slot r = tid / kSlotThreads, each holding kStep / kSlotThreads values.
template <int Rows>
constexpr int kSlotThreads = kThreads / Rows;

// The S block's columns: warp w holds i = chunk CI + w NIw + 0 .. NIw - 1 and all D values of j
// for both 16-slot halves: 2 x NIw x D / 8 accumulator tiles = 128 registers for D = 32 and 64.
template <int D>
struct SCols {
  static constexpr int NIw = 128 / D;         // values of i per warp
  static constexpr int CI = kWarps * NIw;     // values of i per block (16 for D 64, 32 for 32)
  static constexpr int kChunks = D / CI;      // blocks along i (4, 1)
  static constexpr int JG = D / 8;            // 8-column tiles of j
};

// Shared memory of one block of Rows slots (16 or 32; 16 only for flash_stats_kernel).  QC:
// columns of Qc staged per tile (D for Qb, CI for S).
template <int D, int QC, int Rows = kRows>
struct Smem {
  static_assert(Rows == 16 || Rows == 32, "one or two 16-row m-tiles");
  static constexpr int kQgLd = D + 4;
  static constexpr int kKLd = D + 8;
  static constexpr int kQLd = QC + 8;
  alignas(16) float k[2][kStep * kKLd];       // Kc[s0 + r][j], two buffers (cp.async)
  alignas(16) float q[2][kStep * kQLd];       // Qc[s0 + r][q0 + i]
  // pi[slot][s - s0], or the statistics' c z: the logit tile, kDParts<Rows> parts of Rows rows
  alignas(16) float pi[kRows * kPiLd];
  uint32_t qg_hi[Rows * kQgLd];               // TF32 split of Qg[k0 + r][d]: hi + lo
  uint32_t qg_lo[Rows * kQgLd];
  int t[Rows];                                // position of each slot (-1: padding)
  float m[Rows], l[Rows];
  float rescale[Rows];                        // flash_stats_kernel: this tile's factor per slot
  int tmax;
};

// ---- cp.async tiles (cuda/cp_async.cuh) ---------------------------------------------------------

// Issues the copies of rows s0 .. s0 + kStep - 1, columns c0 .. c0 + W - 1, of a [T, D] tensor
// into dst (row stride ld floats); rows past T are zero-filled.  All kThreads threads take part.
template <int W, int D, int kThr = kThreads>
__device__ __forceinline__ void copy_rows_async(float* dst, int ld, const float* __restrict__ src,
                                                int T, int s0, int c0) {
  constexpr int kPieces = W / 4;  // 16-byte pieces of a row
  // A plain loop, not for_each_strided (cuda/cp_async.cuh): with that, ptxas gave
  // flash_stats_kernel<64, 32> 64 registers and 12 bytes of spills (74 and none with the loop),
  // and the steps were slower: (a) K 64 54.83 / 54.83 against 54.10 / 53.83 ms, (b) 44.26 /
  // 44.32 against 43.79 / 43.91 (H200, 2026-11-29, one call).
  for (int idx = threadIdx.x; idx < kStep * kPieces; idx += kThr) {
    const int r = idx / kPieces, v = idx % kPieces, s = s0 + r;
    const bool ok = s < T;
    cp_async16(dst + r * ld + 4 * v, src + (ok ? static_cast<int64_t>(s) * D + c0 + 4 * v : 0), ok);
  }
}

// Issues the loads of s tile s0 into buffer buf: Kc rows and Qc columns q0 .. q0 + QC - 1.
template <int D, int QC, int Rows>
__device__ __forceinline__ void stage_tile_async(Smem<D, QC, Rows>& sm, int buf,
                                                 const float* __restrict__ Kc_bh,
                                                 const float* __restrict__ Qc_bh, int T, int s0,
                                                 int q0) {
  copy_rows_async<D, D>(sm.k[buf], Smem<D, QC, Rows>::kKLd, Kc_bh, T, s0, 0);
  copy_rows_async<QC, D>(sm.q[buf], Smem<D, QC, Rows>::kQLd, Qc_bh, T, s0, q0);
  cp_async_commit();
}

// The s tiles s0 = s_begin, s_begin + kStep, ... below s_end (s_begin a multiple of kStep; the
// last tile may reach past s_end: the produce masks s >= t): produce(s0, buf) by every warp,
// then consume(buf) after a barrier.  The next tile's loads are in flight during both.  q0: the
// first of the QC staged Qc columns.
template <int D, int QC, int Rows, class Produce, class Consume>
__device__ __forceinline__ void sweep_tiles(Smem<D, QC, Rows>& sm, const float* Kc_bh,
                                            const float* Qc_bh, int T, int q0, int s_begin,
                                            int s_end, Produce&& produce, Consume&& consume) {
  if (s_begin >= s_end) return;  // block-uniform
  stage_tile_async<D, QC>(sm, 0, Kc_bh, Qc_bh, T, s_begin, q0);
  int buf = 0;
  for (int s0 = s_begin; s0 < s_end; s0 += kStep, buf ^= 1) {
    cp_async_wait<0>();
    // Tile s0 has landed for every thread; the previous consume is done, so its buffer and the
    // shared pi tile may be overwritten.
    __syncthreads();
    if (s0 + kStep < s_end) stage_tile_async<D, QC>(sm, buf ^ 1, Kc_bh, Qc_bh, T, s0 + kStep, q0);
    produce(s0, buf);
    __syncthreads();
    consume(buf);
  }
}

// ---- per-block set-up -------------------------------------------------------------------------

// sm.t (positions, -1 for padding and slots >= K; t <= 0 counts as padding: no s < t) and
// sm.tmax, by warp 0 (one slot per lane; lanes >= Rows take part in the max with t = -1).
template <int D, int QC, int Rows>
__device__ __forceinline__ void load_slots(Smem<D, QC, Rows>& sm,
                                           const int32_t* __restrict__ rows, int64_t b, int K,
                                           int k0) {
  if (threadIdx.x >= 32) return;
  const int lane = static_cast<int>(threadIdx.x), k = k0 + lane;
  int t = lane < Rows && k < K ? rows[b * K + k] : -1;
  if (t <= 0) t = -1;
  if (lane < Rows) sm.t[lane] = t;
  int tmax = t;
  for (int o = 16; o > 0; o >>= 1) tmax = max(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
  if (threadIdx.x == 0) sm.tmax = tmax;
}

// Qg rows k0 .. k0 + Rows - 1 split into TF32 hi + lo (zeros past K).
template <int D, int QC, int Rows>
__device__ __forceinline__ void load_qg(Smem<D, QC, Rows>& sm, const float* __restrict__ Qg,
                                        int64_t bh, int K, int k0) {
  constexpr int QgLd = Smem<D, QC, Rows>::kQgLd;
  for (int idx = threadIdx.x; idx < Rows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D, k = k0 + r;
    const float x = k < K ? Qg[(bh * K + k) * D + d] : 0.0f;
    const uint32_t hi = to_tf32(x);
    sm.qg_hi[r * QgLd + d] = hi;
    sm.qg_lo[r * QgLd + d] = to_tf32(x - __uint_as_float(hi));
  }
}

// ---- logits -----------------------------------------------------------------------------------

// Warp w's fragment of the logit tile (rows 16 (w / 4) + g (+ 8), s = s0 + 8 (w % 4) + 2c (+ 1),
// in the C fragment order): with 32 slots, z of slot 16 (w / 4) + g (+ 8); with 16, part
// p = w / 4 of z of slot g (+ 8), the sum over d in [p D / 2, (p + 1) D / 2) (kDParts).
// 3xTF32; two accumulator pairs (even / odd d steps) so that consecutive mma do not wait on
// each other.
template <int D, int QC, int Rows>
__device__ __forceinline__ void logit_fragment(const Smem<D, QC, Rows>& sm, int buf, int warp,
                                               int g, int c, float (&z)[4]) {
  constexpr int QgLd = Smem<D, QC, Rows>::kQgLd, KLd = Smem<D, QC, Rows>::kKLd;
  constexpr int kParts = kDParts<Rows>, kSteps = D / 8 / kParts;  // d steps of 8 per part
  static_assert(kSteps * 8 * kParts == D, "whole d steps per part");
  const int tile = warp >> 2;  // the warp's 16 rows of the logit tile
  const int r0 = 16 * (tile / kParts), d0 = 8 * kSteps * (tile % kParts), n0 = 8 * (warp & 3);
  const float* k = sm.k[buf];
  float big[2][4] = {}, small[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    const int d = d0 + 8 * kk + c;
    const int ia = (r0 + g) * QgLd + d, ib = ia + 8 * QgLd;
    const uint32_t ah[4] = {sm.qg_hi[ia], sm.qg_hi[ib], sm.qg_hi[ia + 4], sm.qg_hi[ib + 4]};
    const uint32_t al[4] = {sm.qg_lo[ia], sm.qg_lo[ib], sm.qg_lo[ia + 4], sm.qg_lo[ib + 4]};
    const float x0 = k[(n0 + g) * KLd + d], x1 = k[(n0 + g) * KLd + d + 4];
    const uint32_t h0 = to_tf32(x0), h1 = to_tf32(x1);
    const uint32_t l0 = to_tf32(x0 - __uint_as_float(h0)), l1 = to_tf32(x1 - __uint_as_float(h1));
    mma_tf32(small[kk & 1], al, h0, h1);
    mma_tf32(small[kk & 1], ah, l0, l1);
    mma_tf32(big[kk & 1], ah, h0, h1);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) z[e] = (big[0][e] + big[1][e]) + (small[0][e] + small[1][e]);
}

// Writes value(r, s, z) for the warp's fragment into the shared pi tile: r the tile row (slot r
// with 32 slots; part r / 16 of slot r % 16 with 16, as logit_fragment).
template <int D, int QC, int Rows, class Value>
__device__ __forceinline__ void store_fragment(Smem<D, QC, Rows>& sm, int s0, int warp, int g,
                                               int c, const float (&z)[4], Value&& value) {
  const int r0 = 16 * (warp >> 2), n0 = 8 * (warp & 3);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + g + 8 * h;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = n0 + 2 * c + e;
      sm.pi[r * kPiLd + col] = value(r, s0 + col, z[2 * h + e]);
    }
  }
}

// pi tile of s0 from the logits: exp(c z - m) / l for s < t, else 0.
template <int D, int QC>
__device__ __forceinline__ void produce_pi(Smem<D, QC>& sm, int s0, int buf, float cscale) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  float z[4];
  logit_fragment(sm, buf, warp, g, c, z);
  store_fragment(sm, s0, warp, g, c, z, [&](int r, int s, float zz) {
    return s < sm.t[r] ? expf(cscale * zz - sm.m[r]) / sm.l[r] : 0.0f;
  });
}

// ---- S = sum_s (pi_ks Qc_s[i]) Kc_s[j] ----------------------------------------------------------

template <int D>
using SAcc = float[2][SCols<D>::NIw][SCols<D>::JG][4];

// One s tile into the warp's accumulators: A = tf32(pi_ks q_s[i]) per slot half and i,
// B = tf32(k_s[j]).
template <int D>
__device__ __forceinline__ void accumulate_s(const Smem<D, SCols<D>::CI>& sm, int buf, int warp,
                                             int g, int c, SAcc<D>& acc) {
  using C = SCols<D>;
  constexpr int KLd = Smem<D, C::CI>::kKLd, QLd = Smem<D, C::CI>::kQLd;
  const float* q = sm.q[buf];
  const float* k = sm.k[buf];
  const int wi = warp * C::NIw;
#pragma unroll
  for (int ks = 0; ks < kStep; ks += 8) {
    const int sa = ks + c, sb = ks + c + 4;
    uint32_t a[2][C::NIw][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int ra = 16 * mt + g, rb = ra + 8;
      const float p0 = sm.pi[ra * kPiLd + sa], p1 = sm.pi[rb * kPiLd + sa];
      const float p2 = sm.pi[ra * kPiLd + sb], p3 = sm.pi[rb * kPiLd + sb];
#pragma unroll
      for (int il = 0; il < C::NIw; ++il) {
        const float qa = q[sa * QLd + wi + il], qb = q[sb * QLd + wi + il];
        a[mt][il][0] = tf32_operand(p0 * qa);
        a[mt][il][1] = tf32_operand(p1 * qa);
        a[mt][il][2] = tf32_operand(p2 * qb);
        a[mt][il][3] = tf32_operand(p3 * qb);
      }
    }
#pragma unroll
    for (int jg = 0; jg < C::JG; ++jg) {
      const uint32_t b0 = tf32_operand(k[sa * KLd + 8 * jg + g]);
      const uint32_t b1 = tf32_operand(k[sb * KLd + 8 * jg + g]);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int il = 0; il < C::NIw; ++il) mma_tf32(acc[mt][il][jg], a[mt][il], b0, b1);
    }
  }
}

// Calls row(mt, h, r, k) for the slot rows a thread holds in the C fragments of a tile of Rows
// slots (Rows / 16 m-tiles): r = 16 mt + g + 8 h (slot k = k0 + r), skipping slots k >= K.
template <int Rows = kRows, class Row>
__device__ __forceinline__ void for_each_fragment_slot(int k0, int g, int K, Row&& row) {
#pragma unroll
  for (int mt = 0; mt < Rows / 16; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * mt + g + 8 * h, k = k0 + r;
      if (k < K) row(mt, h, r, k);
    }
}

// Stores the block's S: slot k0 + 16 mt + g (+ 8) of the warp's accumulators, rows
// i = chunk CI + warp NIw + il, columns 8 jg + 2 c (+ 1).  Through shared memory, 8 slots at a
// time (one (mt, h): slot k0 + 16 mt + 8 h + g): a block's rows of one slot's S_k are CI D = 1024
// contiguous floats, so every warp store is then 512 contiguous bytes (four whole lines), where
// the fragment stores wrote 8 slots x 32 bytes: 1.903 -> 1.849 ms at (b), 0.893 -> 0.886 at (a)
// (H200, 2026-11-29; the wgmma S kernel, with one block per 4 slots, gained 1.80 -> 1.33 ms).
// The staging reuses the tile buffers, dead after the sweep (k through qg_lo: one region of the
// struct); slot stride 1032 = 8 mod 32, so that a fragment store meets each bank twice at most.
// This kernel and wg::s_kernel each keep their own copy-out loop: one helper for both (a generic
// rows-from-shared copy) measured 6% slower here (1.96 against 1.85 ms at (b)) and made ptxas
// serialise wg::s_kernel's wgmmas (C7515; nvcc 13.0).
template <int D>
__device__ __forceinline__ void store_s(const SAcc<D>& acc, Smem<D, SCols<D>::CI>& sm,
                                        float* __restrict__ S, int64_t bh, int K, int k0,
                                        int chunk, int warp, int g, int c) {
  using C = SCols<D>;
  using Sm = Smem<D, C::CI>;
  constexpr int64_t DD = static_cast<int64_t>(D) * D;
  constexpr int kSlotFloats = C::CI * D, kLd = kSlotFloats + 8;
  static_assert(offsetof(Sm, t) - offsetof(Sm, k) >= 8 * kLd * sizeof(float),
                "8 slots of S fit in the tile buffers");
  float* stage = &sm.k[0][0];
  cp_async_wait<0>();  // nothing is in flight after the sweep; this makes it explicit
  __syncthreads();     // every warp is past its last read of the tile buffers
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (mt + h > 0) __syncthreads();  // the previous 8 slots have been read out
#pragma unroll
      for (int il = 0; il < C::NIw; ++il)
#pragma unroll
        for (int jg = 0; jg < C::JG; ++jg)
          *reinterpret_cast<float2*>(stage + g * kLd + (warp * C::NIw + il) * D + 8 * jg + 2 * c) =
              make_float2(acc[mt][il][jg][2 * h], acc[mt][il][jg][2 * h + 1]);
      __syncthreads();
      for_each_strided<8 * kSlotFloats / 4, kThreads>([&](int idx) {
        const int r = idx / (kSlotFloats / 4), q = idx % (kSlotFloats / 4);
        const int k = k0 + 16 * mt + 8 * h + r;
        if (k < K)
          *reinterpret_cast<float4*>(S + (bh * K + k) * DD + chunk * kSlotFloats + 4 * q) =
              *reinterpret_cast<const float4*>(stage + r * kLd + 4 * q);
      });
    }
}

// S block (chunk, slot tile, bh).  kPiFromMemory: pi read from Pi [BH, K, T] (barrier_fused_s);
// otherwise recomputed from Qg, Kc and the saved m, l (barrier_flash_forward).
template <int D, bool kPiFromMemory>
__global__ void __launch_bounds__(kThreads, 1)
    flash_s_kernel(const float* __restrict__ Qg, const float* __restrict__ Qc,
                   const float* __restrict__ Kc, const int32_t* __restrict__ rows,
                   const float* __restrict__ Pi, const float* __restrict__ m_in,
                   const float* __restrict__ l_in, int H, int T, int K, float cscale,
                   float* __restrict__ S) {
  using C = SCols<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<Smem<D, C::CI>*>(smem_raw);
  const int chunk = blockIdx.x, k0 = blockIdx.y * kRows;
  const int64_t bh = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  load_slots(sm, rows, bh / H, K, k0);
  if (!kPiFromMemory) {
    load_qg(sm, Qg, bh, K, k0);
    if (threadIdx.x < kRows) {
      const int k = k0 + threadIdx.x;
      sm.m[threadIdx.x] = k < K ? m_in[bh * K + k] : 0.0f;
      sm.l[threadIdx.x] = k < K ? l_in[bh * K + k] : 1.0f;
    }
  }
  __syncthreads();
  SAcc<D> acc;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int il = 0; il < C::NIw; ++il)
#pragma unroll
      for (int jg = 0; jg < C::JG; ++jg)
        acc[mt][il][jg][0] = acc[mt][il][jg][1] = acc[mt][il][jg][2] = acc[mt][il][jg][3] = 0.0f;
  const float* Kc_bh = Kc + bh * T * D;
  const float* Qc_bh = Qc + bh * T * D;
  auto produce = [&](int s0, int buf) {
    if (kPiFromMemory) {
      for (int idx = threadIdx.x; idx < kRows * kStep; idx += kThreads) {
        const int r = idx / kStep, sc = idx % kStep, k = k0 + r, s = s0 + sc;
        sm.pi[r * kPiLd + sc] = (k < K && s < T) ? Pi[(bh * K + k) * T + s] : 0.0f;
      }
    } else {
      produce_pi(sm, s0, buf, cscale);
    }
  };
  auto consume = [&](int buf) { accumulate_s<D>(sm, buf, warp, g, c, acc); };
  sweep_tiles<D, C::CI>(sm, Kc_bh, Qc_bh, T, chunk * C::CI, 0, sm.tmax, produce, consume);
  store_s<D>(acc, sm, S, bh, K, k0, chunk, warp, g, c);
}

// ---- S on wgmma (D = 64; the default for long sequences, barrier_s_on_wgmma) -----------------
//
// The same S as flash_s_kernel, computed per position instead of per column chunk:
//   S_k = (pi_k o Qc)^T Kc   [64 i x 64 j] = sum over s of (pi_ks Qc_s[i]) Kc_s[j]
// as TF32 wgmma m64n64k8 steps (cuda/wgmma.cuh): M = i, N = j, K = s.  A block (one warpgroup,
// 128 threads; two blocks per SM) owns 4 slots and accumulates the full 64 x 64 S of each (4 x 32
// registers per thread).  Per s tile of 32 (raw Kc, Qc rows by cp.async, double-buffered):
//   B: the Kc tile rounded to TF32 into the wgmma K-major layout (shared by the 4 slots;
//      double-buffered, so the previous tile's wgmmas may still read the other buffer)
//   pi: thread (slot r = tid / 32, s = tid % 32) computes z = Qg_r . Kc_s in fp32 FMAs and
//      pi = exp(c z - m) / l for s < t, else 0, from the statistics kernel's m, l
//   A: per k-step and slot, tf32(pi_ks Qc_s[i]) built in registers (mma.m16n8k8's A per warp),
//      after waiting for the previous tile's wgmmas (they read the same registers)
//   then 16 wgmmas per warpgroup (4 k-steps x 4 slots) and one commit, left in flight.
// Same TF32 operand rounding of the S products as flash_s_kernel, so the same bound; the
// logits are plain fp32 (flash_s_kernel: 3xTF32), both well inside it.
// Why 4 slots a block, not 8 (two warpgroups, one block per SM, until 2026-11-29): a block sweeps
// to the largest t of its slots, and with few sampled positions per sequence its slots spread
// over the whole row (K = 8 of T = 1024: all 8 in one block, each swept to the last one's t).
// Half the slots per block halve that waste, and two independent blocks per SM hide each
// other's tile barriers.  The Kc tile is then staged and rounded once per 4 slots, not 8.
// Slots a block (barrier_s_wgmma_slots): 3 positions a block hold 96 accumulators a thread,
// and with A built per k-step into two register sets of 12 (one set read by the wgmmas in
// flight, the other being built) the kernel fits 168 registers, so three blocks (12 warps)
// share an SM instead of two.  Each position's S takes the same operands in the same order:
// the same bits as 4 slots a block.  Measured (H200, 2026-11-29, [.bench][barrier-flash-fwd],
// the whole forward, one process): (b) exact 1.278 against 1.340 ms; (a) K 64 0.547 against
// 0.538 (the Kc tile staged and rounded, and the logits' fourth warp idle, for 3 positions
// instead of 4).  So 3 for the exact barrier, 4 for sampled positions.
namespace wg {
constexpr int kD = 64, kThreads = 128, kRawLd = kD + 4;

// Row stride of S in shared memory on its way out: with 72 = 8 mod 32, the 8 rows x 4 column
// pairs of one fragment store fall on every bank twice (the fewest for 256 bytes).
constexpr int kOutLd = kD + 8;

template <int kSlots>
struct Smem {
  union {
    struct {
      alignas(128) uint32_t bt[2][kStep * kD];  // Kc tile, TF32, wgmma_b_offset(s, j)
      alignas(16) float kc[2][kStep * kRawLd];  // Kc[s0 + r][j] (cp.async)
      alignas(16) float qc[2][kStep * kRawLd];  // Qc[s0 + r][i] (cp.async)
    } sweep;                                    // the s tiles, during the sweep
    alignas(16) float out[2][kD * kOutLd];      // after it: S of two slots, S[i][j] at i kOutLd + j
  };
  float qg[kSlots * kD];                    // Qg of the block's slots
  float pi[kSlots * kStep];                 // pi[slot][s - s0]
  int t[kSlots];                            // positions (-1: padding)
  float m[kSlots], l[kSlots];
};

template <class Smem>
__device__ __forceinline__ void stage(Smem& sm, int buf, const float* __restrict__ Kc_bh,
                                      const float* __restrict__ Qc_bh, int T, int s0) {
  copy_rows_async<kD, kD, kThreads>(sm.sweep.kc[buf], kRawLd, Kc_bh, T, s0, 0);
  copy_rows_async<kD, kD, kThreads>(sm.sweep.qc[buf], kRawLd, Qc_bh, T, s0, 0);
  cp_async_commit();
}

// S of the block's slots p < nslots (acc[p]: the D fragments of cuda/wgmma.cuh, S_p[i][j] at
// i = 16 w + g (+ 8), j = 8 jj + 2 c (+ 1)) to S_k0[p][i][j], through shared memory two slots
// at a time: each warp's global store is then 512 contiguous bytes (four whole 128-byte lines)
// instead of 8 rows x 32 bytes.  (The direct fragment stores kept the L2 crossbar 72% busy at
// (b) with one sector per request; Nsight Compute, 2026-11-29.)  The caller has made the tile
// buffers free.
template <int kSlots>
__device__ __forceinline__ void store_s_coalesced(const float (&acc)[kSlots][32],
                                                  Smem<kSlots>& sm, float* S_k0, int nslots) {
  const int w = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
  constexpr int kQuads = kD * kD / 4;  // float4 pieces of one slot's S
#pragma unroll
  for (int p0 = 0; p0 < kSlots; p0 += 2) {
    if (p0 > 0) __syncthreads();  // the previous pair has been read out
#pragma unroll
    for (int pp = 0; pp < 2; ++pp) {
      if (p0 + pp >= kSlots) continue;  // an odd count's last pair
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        float* row = sm.out[pp] + (16 * w + g) * kOutLd + 8 * jj + 2 * c;
        const float* f = acc[p0 + pp] + 4 * jj;
        *reinterpret_cast<float2*>(row) = make_float2(f[0], f[1]);
        *reinterpret_cast<float2*>(row + 8 * kOutLd) = make_float2(f[2], f[3]);
      }
    }
    __syncthreads();
    for_each_strided<2 * kQuads, kThreads>([&](int idx) {
      const int pp = idx / kQuads, i = (idx % kQuads) / (kD / 4), q = idx % (kD / 4);
      if (p0 + pp < nslots && p0 + pp < kSlots)
        *reinterpret_cast<float4*>(S_k0 + (p0 + pp) * kD * kD + i * kD + 4 * q) =
            *reinterpret_cast<const float4*>(sm.out[pp] + i * kOutLd + 4 * q);
    });
  }
}

template <int kSlots>
__global__ void __launch_bounds__(kThreads, kSlots == 3 ? 3 : 2)
    s_kernel(const float* __restrict__ Qg, const float* __restrict__ Qc,
             const float* __restrict__ Kc, const int32_t* __restrict__ rows,
             const float* __restrict__ m_in, const float* __restrict__ l_in, int H, int T, int K,
             float cscale, int longest_first, float* __restrict__ S) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem<kSlots>& sm = *reinterpret_cast<Smem<kSlots>*>(smem_raw);
  const SlotTile tile = slot_tile(kSlots, longest_first);
  const int k0 = tile.k0;
  const int64_t bh = tile.bh;
  const int tid = threadIdx.x, w = tid / 32, lane = tid % 32;
  const int g = lane / 4, c = lane % 4;
  const float* Kc_bh = Kc + bh * T * kD;
  const float* Qc_bh = Qc + bh * T * kD;
  // The first tile's copies go out before the slots are known (every block with a counted
  // slot sweeps it), so that their latency overlaps the loads of t, m, l and Qg.
  stage(sm, 0, Kc_bh, Qc_bh, T, 0);
  if (tid < kSlots) {
    const int k = k0 + tid;
    int t = k < K ? rows[(bh / H) * K + k] : -1;
    sm.t[tid] = t <= 0 ? -1 : t;
    sm.m[tid] = k < K ? m_in[bh * K + k] : 0.0f;
    sm.l[tid] = k < K ? l_in[bh * K + k] : 1.0f;
  }
  for (int idx = tid; idx < kSlots * kD; idx += kThreads) {
    const int k = k0 + idx / kD;
    sm.qg[idx] = k < K ? Qg[(bh * K + k) * kD + idx % kD] : 0.0f;
  }
  __syncthreads();
  int tmax = -1;
#pragma unroll
  for (int r = 0; r < kSlots; ++r) tmax = max(tmax, sm.t[r]);

  float acc[kSlots][32];
#pragma unroll
  for (int p = 0; p < kSlots; ++p)
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[p][e] = 0.0f;
  // The wgmmas of tile s0 stay in flight while the next tile is staged, converted and its pi
  // computed: they read bt[buf] and the A registers, so bt is double-buffered and each
  // warpgroup waits for them only before it rebuilds the A registers.
  // A: all 4 k-steps' registers of a tile (4 slots), or two sets used by turns (3 slots).
  constexpr int kSets = kSlots == 3 ? 2 : kStep / 8;
  uint32_t a[kSets][kSlots][4] = {};
  // Waits for this warpgroup's wgmmas in flight; their accumulators and A registers are then
  // the program's again (tie: no access moves across the wait, and no register is reused early).
  auto wait_for_wgmmas = [&] {
    cuda::wgmma_wait<0>();
#pragma unroll
    for (int p = 0; p < kSlots; ++p) cuda::tie(acc[p]);
#pragma unroll
    for (int set = 0; set < kSets; ++set)
#pragma unroll
      for (int p = 0; p < kSlots; ++p) cuda::tie(a[set][p]);
  };
  // A of k-step ks for every slot into `set`, from the Qc tile and pi.
  auto build_a = [&](const float* qc, int ks, uint32_t (&set)[kSlots][4]) {
    const int sa = 8 * ks + c, sb = sa + 4, i0 = 16 * w + g;
    const float qa0 = qc[sa * kRawLd + i0], qa1 = qc[sa * kRawLd + i0 + 8];
    const float qb0 = qc[sb * kRawLd + i0], qb1 = qc[sb * kRawLd + i0 + 8];
#pragma unroll
    for (int p = 0; p < kSlots; ++p) {
      const float pa = sm.pi[p * kStep + sa], pb = sm.pi[p * kStep + sb];
      set[p][0] = tf32_operand(pa * qa0);
      set[p][1] = tf32_operand(pa * qa1);
      set[p][2] = tf32_operand(pb * qb0);
      set[p][3] = tf32_operand(pb * qb1);
    }
  };
  for (int s0 = 0, buf = 0; s0 < tmax; s0 += kStep, buf ^= 1) {
    cp_async_wait<0>();
    // Tile s0 has landed.  Every thread is past the previous tile's A building (its raw tiles
    // and pi are free) and has waited for the wgmmas of the tile before (bt[buf] is free).
    __syncthreads();
    if (s0 + kStep < tmax) stage(sm, buf ^ 1, Kc_bh, Qc_bh, T, s0 + kStep);
    for_each_strided<(kStep / 4) * kD, kThreads>([&](int idx) {
      const int q = idx / kD, j = idx % kD;
      const float* src = sm.sweep.kc[buf] + 4 * q * kRawLd + j;
      *reinterpret_cast<uint4*>(sm.sweep.bt[buf] + cuda::wgmma_b_offset(4 * q, j)) =
          make_uint4(tf32_operand(src[0]), tf32_operand(src[kRawLd]),
                     tf32_operand(src[2 * kRawLd]), tf32_operand(src[3 * kRawLd]));
    });
    {
      // z = Qg_r . Kc_s by 16-byte loads: the Kc rows' stride of 17 quads puts the 8 lanes of
      // a load phase in distinct bank groups; Qg_r is the same for the whole warp.
      // (With 3 slots the fourth warp has no slot: it skips the logits.  With 4 the test is
      // left out at compile time, so that kernel's code is what it was before the 3.)
      const int r = tid / 32, s = tid % 32;
      if (kSlots == kThreads / 32 || r < kSlots) {
        const float4* kr = reinterpret_cast<const float4*>(sm.sweep.kc[buf] + s * kRawLd);
        const float4* qr = reinterpret_cast<const float4*>(sm.qg + r * kD);
        float z = 0.0f;
#pragma unroll
        for (int d = 0; d < kD / 4; ++d) {
          const float4 x = qr[d], y = kr[d];
          z = fmaf(x.w, y.w, fmaf(x.z, y.z, fmaf(x.y, y.y, fmaf(x.x, y.x, z))));
        }
        sm.pi[r * kStep + s] = s0 + s < sm.t[r] ? expf(cscale * z - sm.m[r]) / sm.l[r] : 0.0f;
      }
    }
    cuda::fence_proxy_async_shared();  // bt, written by ordinary stores, is read by wgmma next
    __syncthreads();

    const float* qc = sm.sweep.qc[buf];
    if constexpr (kSets == kStep / 8) {
      wait_for_wgmmas();  // this warpgroup's wgmmas of the previous tile
#pragma unroll
      for (int ks = 0; ks < kStep / 8; ++ks) build_a(qc, ks, a[ks]);
      cuda::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kStep / 8; ++ks) {
        const uint64_t desc = cuda::wgmma_b_descriptor(sm.sweep.bt[buf], ks);
#pragma unroll
        for (int p = 0; p < kSlots; ++p)
          cuda::wgmma_tf32_m64n64k8(acc[p], a[ks][p], desc, true);
      }
      cuda::wgmma_commit();
    } else {
      // One commit group per k-step; a set is rebuilt once the group two back (its last
      // reader) is done.  The previous tile's last group may still run while this tile's
      // first A is built; by the second k-step every group of the previous tile is done, so
      // by the next tile's barrier its B buffer is free, as with one group a tile.  (The wait
      // comes before every rebuild, unconditionally: ptxas serialises the wgmmas otherwise.)
#pragma unroll
      for (int ks = 0; ks < kStep / 8; ++ks) {
        uint32_t (&set)[kSlots][4] = a[ks & 1];
        cuda::wgmma_wait<1>();
#pragma unroll
        for (int p = 0; p < kSlots; ++p) cuda::tie(set[p]);
        build_a(qc, ks, set);
        cuda::wgmma_fence();
        const uint64_t desc = cuda::wgmma_b_descriptor(sm.sweep.bt[buf], ks);
#pragma unroll
        for (int p = 0; p < kSlots; ++p) cuda::wgmma_tf32_m64n64k8(acc[p], set[p], desc, true);
        cuda::wgmma_commit();
      }
    }
  }
  wait_for_wgmmas();
  cp_async_wait<0>();  // the first tile's copies, when the block swept nothing
  __syncthreads();     // every warp is past its last read of the tile buffers
  store_s_coalesced(acc, sm, S + (bh * K + k0) * kD * kD, K - k0);
}
}  // namespace wg

// ---- m, l, Qb, Kb -------------------------------------------------------------------------------

// V floats at a 4 V-byte aligned address: one vector access of shared memory.
template <int V>
struct alignas(4 * V) FloatVec {
  float v[V];
};

// op over v[0 .. V - 1] pairwise: (v0 op v1) op (v2 op v3) for V = 4 (V a power of 2).
template <int V, class Op>
__device__ __forceinline__ float pairwise(FloatVec<V> v, Op&& op) {
#pragma unroll
  for (int w = 1; w < V; w <<= 1)
#pragma unroll
    for (int e = 0; e < V; e += 2 * w) v.v[e] = op(v.v[e], v.v[e + w]);
  return v.v[0];
}

// op over the kSlotThreads<Rows> threads of a slot (xor shuffles: every lane takes part, each
// ends with the same value).
template <int Rows, class Op>
__device__ __forceinline__ float slot_reduce(float x, Op&& op) {
#pragma unroll
  for (int o = 1; o < kSlotThreads<Rows>; o <<= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// The online softmax step of one tile for slot r = tid / kSlotThreads (V = kStep / kSlotThreads
// values each: 8 threads of 4 values for 32 slots, 16 of 2 for 16): the tile holds c z (-inf for
// s >= t) in kDParts parts (added here, in the order of the parts); the running max m_run and
// sum l_run (all the slot's threads end with the same values) take in the tile, the tile's
// values in row r become p = exp(c z - m_new), and the return value is the factor
// exp(m_old - m_new) by which sums over the earlier tiles, taken against m_old, are rescaled
// (1 while no s < t has been seen).  Each thread reads and writes only its own cells.
template <int Rows>
__device__ __forceinline__ float online_softmax_tile(float* pi_tile, float& m_run, float& l_run) {
  constexpr int V = kStep / kSlotThreads<Rows>;
  using Vec = FloatVec<V>;
  const int r = threadIdx.x / kSlotThreads<Rows>, col = V * (threadIdx.x % kSlotThreads<Rows>);
  Vec* cell = reinterpret_cast<Vec*>(pi_tile + r * kPiLd + col);
  Vec v = *cell;
#pragma unroll
  for (int p = 1; p < kDParts<Rows>; ++p) {  // -inf + -inf = -inf past t
    const Vec part = *reinterpret_cast<const Vec*>(pi_tile + (p * Rows + r) * kPiLd + col);
#pragma unroll
    for (int e = 0; e < V; ++e) v.v[e] += part.v[e];
  }
  const auto max_op = [](float a, float b) { return fmaxf(a, b); };
  const auto sum_op = [](float a, float b) { return a + b; };
  const float m_new = fmaxf(m_run, slot_reduce<Rows>(pairwise(v, max_op), max_op));
  const bool any = m_new != -INFINITY;  // some s < t seen (uniform over the slot's threads)
  if (any) {
#pragma unroll
    for (int e = 0; e < V; ++e) v.v[e] = expf(v.v[e] - m_new);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) v.v[e] = 0.0f;
  }
  *cell = v;
  const float e = slot_reduce<Rows>(pairwise(v, sum_op), sum_op);
  if (!any) return 1.0f;
  const float rescale = expf(m_run - m_new);  // expf(-inf) = 0 on the first contribution
  l_run = l_run * rescale + e;
  m_run = m_new;
  return rescale;
}

// The statistics' partial record of one split (flash_stats_kernel with gridDim.z > 1): the
// split's running max m_p, its sum l_p of exp(c z - m_p) and the unnormalised [Qb | Kb]_p.
__host__ __device__ constexpr int stats_record_floats(int D) { return 2 * D + 2; }
constexpr int kRecM = 0, kRecL = 1, kRecAcc = 2;  // offsets in the record ([Qb | Kb] from 2)

// flash_stats_kernel's raw state after its split: the record of slot k0 + r (r = tid /
// kSlotThreads for m, l; the accumulator fragments as in its final store) for every slot k < K.
template <int D, int Rows>
__device__ __forceinline__ void store_stats_partials(const float (&acc)[Rows / 16][D / 32][4],
                                                     float m_run, float l_run,
                                                     float* __restrict__ partials, int64_t bh,
                                                     int K, int k0, bool kb_half, int col_base,
                                                     int g, int c) {
  constexpr int64_t DD = static_cast<int64_t>(D) * D;
  float* split = partials + static_cast<int64_t>(blockIdx.z) * stats_record_floats(D);
  if (threadIdx.x % kSlotThreads<Rows> == 0) {
    const int k = k0 + static_cast<int>(threadIdx.x / kSlotThreads<Rows>);
    if (k < K) {
      split[(bh * K + k) * DD + kRecM] = m_run;
      split[(bh * K + k) * DD + kRecL] = l_run;
    }
  }
  // Even offsets (record, kRecAcc, column) on a 16-byte aligned S: float2 stores are aligned.
  const int col0 = kRecAcc + (kb_half ? D : 0) + col_base + 2 * c;
  for_each_fragment_slot<Rows>(k0, g, K, [&](int mt, int h, int, int k) {
#pragma unroll
    for (int nt = 0; nt < D / 32; ++nt)
      *reinterpret_cast<float2*>(split + (bh * K + k) * DD + col0 + 8 * nt) =
          make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
  });
}

// Block (slot tile of Rows = 16 or 32 slots, bh, split z), 8 warps, one sweep over the s tiles
// of [z split_s, (z + 1) split_s) below t_max (split_s: a multiple of kStep; every s tile when
// gridDim.z = 1): the logits c z, the running max m and sum l of exp(c z - m) (online, as flash
// attention), and [Qb | Kb] accumulated unnormalised as sum_s exp(c z - m) [Qc | Kc] on TF32
// mma, rescaled whenever m grows.  Warps 0-3 hold Qb's D / 8 column tiles, warps 4-7 Kb's:
// NTw = D / 32 tiles each, for each of the Rows / 16 m-tiles.  One split: m, l and
// [Qb | Kb] / l written as barrier_flash_forward's outputs.  Several: the partial record of
// each slot k < K, split z, at partials + (bh K + k) D^2 + z stats_record_floats(D), written raw
// (m_p = -inf, l_p = 0 and zeros when the split saw no s < t of the slot, an empty s range
// included), for stats_combine_kernel.  (The S kernel keeps its two-kernel form: its 128
// accumulators a thread would need the rescaling in the hot loop; these 16 (8 with 16 slots)
// take it for as many multiplies a tile.)
//
// Why 16-slot tiles for K <= 16 (barrier_stats_rows), and 8 warps on them: with 32 slots and
// K = 8, 24 of the 32 rows compute logits, exponentials and mma for padding.  Such grids are
// small (one slot tile per bh) with long sweeps, latency bound even after the s split, so what
// counts is the time of one s tile on the block's critical path.  With 16 slots the 8 warps
// split the logit tile's d range in two (kDParts: 12 instead of 24 3xTF32 mma a warp for
// D = 64; the softmax adds the halves, which it reads anyway, so no extra barrier), the softmax
// takes 2 values a thread instead of 4, and [Qb | Kb] is one m-tile: 8 mma a warp instead of
// 16.  Four-warp blocks of 16 slots would instead keep the per-warp work of a 32-slot tile on
// the critical path and only add blocks, which the s split already supplies.
template <int D, int Rows>
__global__ void __launch_bounds__(kThreads)
    flash_stats_kernel(const float* __restrict__ Qg, const float* __restrict__ Qc,
                       const float* __restrict__ Kc, const int32_t* __restrict__ rows, int H,
                       int T, int K, float cscale, int split_s, int longest_first,
                       float* __restrict__ Qb,
                       float* __restrict__ Kb, float* __restrict__ m_out,
                       float* __restrict__ l_out, float* __restrict__ partials) {
  constexpr int MT = Rows / 16, NTw = D / 32, Ld = Smem<D, D, Rows>::kKLd;
  static_assert(Smem<D, D, Rows>::kQLd == Ld, "Qc and Kc tiles share the stride");
  constexpr int kSlotThr = kSlotThreads<Rows>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<Smem<D, D, Rows>*>(smem_raw);
  const SlotTile tile = slot_tile(Rows, longest_first);
  const int k0 = tile.k0;
  const int64_t bh = tile.bh;
  const int s_begin = static_cast<int>(blockIdx.z) * split_s;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  load_slots(sm, rows, bh / H, K, k0);
  load_qg(sm, Qg, bh, K, k0);
  __syncthreads();
  const float* Kc_bh = Kc + bh * T * D;
  const float* Qc_bh = Qc + bh * T * D;

  const bool kb_half = warp >= 4;
  const int col_base = 8 * NTw * (warp & 3);
  float m_run = -INFINITY, l_run = 0.0f;
  float acc[MT][NTw][4] = {};
  sweep_tiles<D, D>(
      sm, Kc_bh, Qc_bh, T, 0, s_begin, min(s_begin + split_s, sm.tmax),
      [&](int s0, int buf) {  // c z (its part, with 16 slots), or -inf for s >= t
        float z[4];
        logit_fragment(sm, buf, warp, g, c, z);
        store_fragment(sm, s0, warp, g, c, z, [&](int r, int s, float zz) {
          const int slot = kDParts<Rows> == 1 ? r : r % Rows;  // tile row r < kRows
          return s < sm.t[slot] ? cscale * zz : -INFINITY;
        });
      },
      [&](int buf) {
        const float rescale = online_softmax_tile<Rows>(sm.pi, m_run, l_run);
        if (threadIdx.x % kSlotThr == 0) sm.rescale[threadIdx.x / kSlotThr] = rescale;
        __syncthreads();  // the tile holds p, and every slot's factor is published
        const float* src = kb_half ? sm.k[buf] : sm.q[buf];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const float fa = sm.rescale[16 * mt + g], fb = sm.rescale[16 * mt + g + 8];
#pragma unroll
          for (int nt = 0; nt < NTw; ++nt) {
            acc[mt][nt][0] *= fa;
            acc[mt][nt][1] *= fa;
            acc[mt][nt][2] *= fb;
            acc[mt][nt][3] *= fb;
          }
        }
#pragma unroll
        for (int ks = 0; ks < kStep; ks += 8) {
          uint32_t a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const int ra = 16 * mt + g, rb = ra + 8;
            a[mt][0] = tf32_operand(sm.pi[ra * kPiLd + ks + c]);
            a[mt][1] = tf32_operand(sm.pi[rb * kPiLd + ks + c]);
            a[mt][2] = tf32_operand(sm.pi[ra * kPiLd + ks + c + 4]);
            a[mt][3] = tf32_operand(sm.pi[rb * kPiLd + ks + c + 4]);
          }
#pragma unroll
          for (int nt = 0; nt < NTw; ++nt) {
            const int col = col_base + 8 * nt + g;
            const uint32_t b0 = tf32_operand(src[(ks + c) * Ld + col]);
            const uint32_t b1 = tf32_operand(src[(ks + c + 4) * Ld + col]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma_tf32(acc[mt][nt], a[mt], b0, b1);
          }
        }
      });
  if (gridDim.z > 1) {
    store_stats_partials<D, Rows>(acc, m_run, l_run, partials, bh, K, k0, kb_half, col_base, g,
                                  c);
    return;
  }
  if (threadIdx.x % kSlotThr == 0) {
    const int r = threadIdx.x / kSlotThr, k = k0 + r;
    const bool counted = m_run != -INFINITY;  // t >= 1
    sm.m[r] = counted ? m_run : 0.0f;
    sm.l[r] = counted ? l_run : 1.0f;
    if (k < K) {
      m_out[bh * K + k] = sm.m[r];
      l_out[bh * K + k] = sm.l[r];
    }
  }
  __syncthreads();
  float* out = kb_half ? Kb : Qb;
  for_each_fragment_slot<Rows>(k0, g, K, [&](int mt, int h, int r, int k) {
    const float inv_l = 1.0f / sm.l[r];
#pragma unroll
    for (int nt = 0; nt < NTw; ++nt)
      *reinterpret_cast<float2*>(out + (bh * K + k) * D + col_base + 8 * nt + 2 * c) =
          make_float2(acc[mt][nt][2 * h] * inv_l, acc[mt][nt][2 * h + 1] * inv_l);
  });
}

// The splits' records of slot n = bh K + k (at partials + n D^2) combined into m, l, Qb, Kb as
// the one-split kernel writes them: M = max_p m_p, w_p = exp(m_p - M), L = sum_p l_p w_p,
// [Qb | Kb] = sum_p w_p [Qb | Kb]_p / L; no s < t in any split (M = -inf): m = 0, l = 1, zeros.
// One warp per slot, the sums in the order p = 0, 1, ... (deterministic); every lane computes
// M, L itself (the same values), and owns the column pairs 2 lane + 64 i of [Qb | Kb].  An empty
// split has m_p = -inf: w_p = 0 against its zero l_p, [Qb | Kb]_p.
template <int D>
__global__ void __launch_bounds__(kThreads)
    stats_combine_kernel(const float* __restrict__ partials, int64_t slots, int splits,
                         float* __restrict__ Qb, float* __restrict__ Kb,
                         float* __restrict__ m_out, float* __restrict__ l_out) {
  constexpr int kRec = stats_record_floats(D);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= slots) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const float* rec = partials + n * D * D;
  float M = -INFINITY;
  for (int p = 0; p < splits; ++p) M = fmaxf(M, rec[p * kRec + kRecM]);
  const bool counted = M != -INFINITY;
  float L = 0.0f;
  if (counted)
    for (int p = 0; p < splits; ++p) L += rec[p * kRec + kRecL] * expf(rec[p * kRec + kRecM] - M);
  const float inv_l = counted ? 1.0f / L : 0.0f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {  // 2 D columns, 64 a pass
    const int j = 2 * lane + 64 * i;
    float2 sum = make_float2(0.0f, 0.0f);
    if (counted)
      for (int p = 0; p < splits; ++p) {
        const float w = expf(rec[p * kRec + kRecM] - M);
        const float2 a = *reinterpret_cast<const float2*>(rec + p * kRec + kRecAcc + j);
        sum.x += w * a.x;
        sum.y += w * a.y;
      }
    float* out = j < D ? Qb + n * D + j : Kb + n * D + (j - D);
    *reinterpret_cast<float2*>(out) = make_float2(sum.x * inv_l, sum.y * inv_l);
  }
  if (lane == 0) {
    m_out[n] = counted ? M : 0.0f;
    l_out[n] = counted ? L : 1.0f;
  }
}

// ---- host ---------------------------------------------------------------------------------------

template <class Kernel>
void allow_smem(Kernel* kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
}

template <int D, bool kPiFromMemory>
void launch_s(const float* Qg, const float* Qc, const float* Kc, const int32_t* rows,
              const float* Pi, const float* m, const float* l, int64_t BH, int H, int T, int K,
              float c, float* S, cudaStream_t stream) {
  using C = SCols<D>;
  const size_t smem = sizeof(Smem<D, C::CI>);
  allow_smem(flash_s_kernel<D, kPiFromMemory>, smem);
  const dim3 grid(C::kChunks, static_cast<unsigned>(ceil_div(K, kRows)), static_cast<unsigned>(BH));
  flash_s_kernel<D, kPiFromMemory><<<grid, kThreads, smem, stream>>>(Qg, Qc, Kc, rows, Pi, m, l, H,
                                                                     T, K, c, S);
  BLM_CHECK_LAUNCH(kPiFromMemory ? "barrier_fused_s" : "barrier_flash_forward (S)");
}

int stats_splits(int64_t BH, int K, int T, int D, int rows_per_block);  // below

// m, l, Qb, Kb: flash_stats_kernel on tiles of barrier_stats_rows(K) slots over `splits` ranges
// of s (barrier_stats_splits), then, with more than one, stats_combine_kernel.
template <int D>
void launch_stats(const float* Qg, const float* Qc, const float* Kc, const int32_t* rows,
                  int64_t BH, int H, int T, int K, float c, float* S, float* Qb, float* Kb,
                  float* m, float* l, cudaStream_t stream) {
  const int tile_rows = barrier_stats_rows(K);
  const int splits = stats_splits(BH, K, T, D, tile_rows);
  // s per split: whole tiles, the s tiles below T shared out evenly (one split: all of them).
  const int split_s = static_cast<int>(ceil_div(ceil_div(T, kStep), splits)) * kStep;
  // The partial records live in S: [BH, K, D^2] floats, of which slot n's first
  // splits (2 D + 2) <= D^2 (barrier_stats_splits caps splits) hold its splits' records.  S is
  // written only by the S kernel launched after the combine on the same stream, which reads
  // only m and l, so its memory is free until then.  (A programmatic dependent launch of the S
  // kernel would have to wait for the combine to finish before its first store.)
  float* partials = splits > 1 ? S : nullptr;
  auto launch = [&](auto rows_tag) {
    constexpr int Rows = decltype(rows_tag)::value;
    const size_t smem = sizeof(Smem<D, D, Rows>);
    allow_smem(flash_stats_kernel<D, Rows>, smem);
    const bool longest_first = slots_longest_first(K, T);
    const dim3 grid = slot_tile_grid(BH, K, Rows, splits, longest_first);
    flash_stats_kernel<D, Rows><<<grid, kThreads, smem, stream>>>(
        Qg, Qc, Kc, rows, H, T, K, c, split_s, longest_first ? 1 : 0, Qb, Kb, m, l, partials);
  };
  if (tile_rows == 16) launch(std::integral_constant<int, 16>{});
  else launch(std::integral_constant<int, kRows>{});
  BLM_CHECK_LAUNCH("barrier_flash_forward (m, l, Qb, Kb)");
  if (splits == 1) return;
  const int64_t slots = BH * K;
  const dim3 cgrid(static_cast<unsigned>(ceil_div(slots, kWarps)));
  stats_combine_kernel<D><<<cgrid, kThreads, 0, stream>>>(partials, slots, splits, Qb, Kb, m, l);
  BLM_CHECK_LAUNCH("barrier_flash_forward (m, l, Qb, Kb: combine of the s splits)");
}

template <int D>
void launch_flash(const float* Qg, const float* Qc, const float* Kc, const int32_t* rows,
                  int64_t BH, int H, int T, int K, float c, float* S, float* Qb, float* Kb,
                  float* m, float* l, cudaStream_t stream) {
  launch_stats<D>(Qg, Qc, Kc, rows, BH, H, T, K, c, S, Qb, Kb, m, l, stream);
  if (barrier_s_on_wgmma(D, T)) {
    auto launch_wg = [&](auto slots_tag) {
      constexpr int kSlots = decltype(slots_tag)::value;
      const size_t wsmem = sizeof(wg::Smem<kSlots>);
      allow_smem(wg::s_kernel<kSlots>, wsmem);
      const bool longest_first = slots_longest_first(K, T);
      const dim3 wgrid = slot_tile_grid(BH, K, kSlots, 1, longest_first);
      wg::s_kernel<kSlots><<<wgrid, wg::kThreads, wsmem, stream>>>(
          Qg, Qc, Kc, rows, m, l, H, T, K, c, longest_first ? 1 : 0, S);
    };
    if (barrier_s_wgmma_slots(K, T) == 3) launch_wg(std::integral_constant<int, 3>{});
    else launch_wg(std::integral_constant<int, 4>{});
    BLM_CHECK_LAUNCH("barrier_flash_forward (S, wgmma)");
    return;
  }
  launch_s<D, false>(Qg, Qc, Kc, rows, nullptr, m, l, BH, H, T, K, c, S, stream);
}

// ---- the statistics' split of s ----------------------------------------------------------------

// The automatic split aims at kStatsBlocksPerSm blocks per SM over the whole grid (about three
// are resident at once with 32 slots: ~58 KiB of shared memory a block for D = 64; four with 16:
// ~49 KiB and <= 64 registers a thread), with at least kStatsMinSplitS positions per split so
// that the combine's extra pass (2 D + 2 floats per split and slot, written and read once) stays
// small against the split's tiles.
constexpr int kStatsBlocksPerSm = 4;
constexpr int kStatsMinSplitS = 4 * kStep;

// The most splits whose records fit a slot's D^2 floats of S.
int max_stats_splits(int D) { return D * D / stats_record_floats(D); }

// The device's SM count, queried once (the first device asked; the data-parallel runs use one
// GPU model throughout).
int sm_count() {
  static const int count = [] {
    int device = 0, n = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }();
  return count;
}

// BLM_BARRIER_STATS_SPLITS: 0 (automatic) when unset or empty, else a positive whole number
// (capped by the caller).
int stats_splits_from_env() {
  return static_cast<int>(env_count("BLM_BARRIER_STATS_SPLITS", 0, 1, 1L << 20,
                                    "a positive whole number (unset or empty: automatic)"));
}

// barrier_stats_splits for statistics blocks of rows_per_block slots (16 or 32).
int stats_splits(int64_t BH, int K, int T, int D, int rows_per_block) {
  const int forced = stats_splits_from_env();
  const int cap = std::max(1, max_stats_splits(D));
  if (forced > 0) return std::min(forced, cap);
  const int64_t blocks = ceil_div(std::max(K, 1), rows_per_block) * std::max<int64_t>(BH, 1);
  const int64_t target = static_cast<int64_t>(kStatsBlocksPerSm) * sm_count();
  if (blocks >= target) return 1;
  const int64_t by_length = std::max<int64_t>(1, ceil_div(T, kStatsMinSplitS));
  return static_cast<int>(std::min({ceil_div(target, blocks), by_length, int64_t{cap}}));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void require_supported(const char* who, int D, int64_t BH,
                       std::initializer_list<const float*> pointers) {
  if (!barrier_fused_s_supported(D, BH))
    throw DeviceError(std::string(who) + ": head size " + std::to_string(D) + " or " +
                      std::to_string(BH) + " sequence-heads unsupported (dh 32, 64; <= 65535)");
  for (const float* p : pointers)
    if (!aligned16(p))
      throw DeviceError(std::string(who) + ": a tensor is not 16-byte aligned (cp.async tiles)");
}

}  // namespace

bool barrier_fused_s_supported(int D, int64_t BH) {
  return (D == 32 || D == 64) && BH <= 65535;
}

namespace {
// BLM_BARRIER_S: 0 auto, 1 mma, 2 wgmma.
int s_kernel_choice() { return env_choice("BLM_BARRIER_S", {"auto", "mma", "wgmma"}, 0); }
}  // namespace

bool barrier_s_on_wgmma(int D, int T) {
  const int choice = s_kernel_choice();
  if (D != 64 || choice == 1) return false;
  return choice == 2 || T >= kBarrierSWgmmaMinT;
}

int barrier_s_wgmma_slots(int K, int T) {
  const int choice = env_choice("BLM_BARRIER_S_SLOTS", {"auto", "4", "3"}, 0);
  if (choice == 0) return slots_longest_first(K, T) ? 4 : 3;  // 3 for the exact barrier
  return choice == 1 ? 4 : 3;
}

int barrier_stats_splits(int64_t BH, int K, int T, int D) {
  return stats_splits(BH, K, T, D, barrier_stats_rows(K));
}

int barrier_stats_rows(int K) {
  const int choice = env_choice("BLM_BARRIER_STATS_ROWS", {"auto", "16", "32"}, 0);
  if (choice == 0) return K <= 16 ? 16 : kRows;  // one 16-slot tile holds every slot
  return choice == 1 ? 16 : kRows;
}

bool barrier_fused_s_from_env() { return env_choice("BLM_BARRIER_FUSED_S", {"0", "1"}, 0) == 1; }

void barrier_flash_forward(const float* Qg, const float* Qc, const float* Kc,
                           const int32_t* rows, int B, int H, int T, int K, int D, float c,
                           float* S, float* Qb, float* Kb, float* m, float* l,
                           cudaStream_t stream) {
  const int64_t BH = static_cast<int64_t>(B) * H;
  if (BH == 0 || K <= 0) {
    if (!barrier_fused_s_supported(D, BH))
      throw DeviceError("barrier_flash_forward: head size " + std::to_string(D) + " unsupported");
    return;
  }
  require_supported("barrier_flash_forward", D, BH, {Qc, Kc, S, Qb, Kb});
  if (D == 32) launch_flash<32>(Qg, Qc, Kc, rows, BH, H, T, K, c, S, Qb, Kb, m, l, stream);
  else launch_flash<64>(Qg, Qc, Kc, rows, BH, H, T, K, c, S, Qb, Kb, m, l, stream);
}

void barrier_fused_s(const float* Pi, const float* Qc, const float* Kc, const int32_t* rows,
                     int64_t BH, int H, int T, int K, int D, float* S, cudaStream_t stream) {
  if (BH == 0 || K <= 0) {
    if (!barrier_fused_s_supported(D, BH))
      throw DeviceError("barrier_fused_s: head size " + std::to_string(D) + " unsupported");
    return;
  }
  require_supported("barrier_fused_s", D, BH, {Qc, Kc, S});
  if (D == 32)
    launch_s<32, true>(nullptr, Qc, Kc, rows, Pi, nullptr, nullptr, BH, H, T, K, 0.0f, S, stream);
  else
    launch_s<64, true>(nullptr, Qc, Kc, rows, Pi, nullptr, nullptr, BH, H, T, K, 0.0f, S, stream);
}

}  // namespace cuda
}  // namespace blm
