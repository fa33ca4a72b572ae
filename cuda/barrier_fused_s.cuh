// The flash-style barrier forward (notation of cuda/barrier_flash.h and
// ../shared/docs/barrier-spec.md): per sequence-head bh = b H + h and counted slot k
// (t = rows[b, k], -1 = padding), from Qg [BH, K, D], centred Qc, Kc [BH, T, D]:
//   z_ks = Qg_k . Kc_s,  m_k = max_{s<t} c z_ks,  l_k = sum_{s<t} exp(c z_ks - m_k),
//   pi_ks = exp(c z_ks - m_k) / l_k  (s < t; 0 otherwise)
//   S [BH, K, D*D]  S_k[i D + j] = sum_s pi_ks Qc_s[i] Kc_s[j]
//   Qb, Kb [BH, K, D]  Qb_k = sum_s pi_ks Qc_s,  Kb_k = sum_s pi_ks Kc_s;  m, l [BH, K]
// without any [K, T] (z, pi) or [T, D*D] (outer products) array in device memory: the blocks
// recompute their logit tiles on tensor cores and form the products Qc_s[i] Kc_s[j] in
// registers.  TF32 mma.sync with fp32 accumulators; causal s tiles skipped.
// Also the older entry barrier_fused_s: S from a materialised pi (opt-in BLM_BARRIER_FUSED_S of
// cuda/barrier_tc.cu), on the same S tile code.
// Host-only declarations: this header is included by C++ tests as well as by barrier_tc.cu.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace blm {
namespace cuda {

// Whether the kernels handle head size D (32, 64; 128 is refused: the caller keeps the cuBLAS
// path) and BH sequences-heads (grid.y/z <= 65535).
bool barrier_fused_s_supported(int D, int64_t BH);

// BLM_BARRIER_FUSED_S: unset, empty or "0" -> false, "1" -> true; anything else is refused
// (ConfigError naming the value).  Read once per barrier_tc call.
bool barrier_fused_s_from_env();

// Whether barrier_flash_forward computes S on wgmma (Hopper's warpgroup instruction, head size 64
// only) rather than on mma.sync (flash_s_kernel), for sequences of T positions.  BLM_BARRIER_S:
// unset, empty or "auto" -> wgmma when D = 64 and T >= kBarrierSWgmmaMinT; "mma" / "wgmma" force
// one (wgmma still only at D = 64); anything else is refused (ConfigError; "gemm", an S as one
// GEMM per 64 slots, was removed on 2026-11-30: slower, and its per-s rounding of pi less
// accurate, docs/PERFORMANCE.md).  Read at every barrier_flash_forward call.  Measured on the
// H200 ([.bench][barrier-flash-fwd], the whole forward): with 8 slots a wgmma block (until
// 2026-11-29) it won only on long rows - T = 1024, 64 sampled positions: 0.78 against 0.95 ms on
// mma.sync; T = 256, every position: 2.24 against 2.00.  With 4 slots a block it wins both: 0.69
// against 0.95, and 1.91 against 2.00.  Shorter rows were not measured: they keep mma.sync.
constexpr int kBarrierSWgmmaMinT = 256;
bool barrier_s_on_wgmma(int D, int T);
// Positions a block of that wgmma kernel, for K slots per sequence of T positions: 4 (two
// blocks an SM) or 3 (three blocks an SM at 168 registers; the same bits).  BLM_BARRIER_S_SLOTS:
// unset, empty or "auto" -> 3 for the exact barrier (K >= T - 2, dense slots), 4 for sampled
// positions; "3" / "4" force one; anything else is refused (ConfigError).  Read at every
// barrier_flash_forward call.
int barrier_s_wgmma_slots(int K, int T);

// Over how many ranges of s barrier_flash_forward's statistics kernel (m, l, Qb, Kb) splits each
// (bh, slot tile) block's sweep, for BH sequence-heads, K slots, T positions, head size D; the
// splits' partials are combined by a second small kernel (deterministic order).  Splitting
// fills the GPU when there are few blocks with long sweeps (BH 192, K 8, T 1024: 192 blocks of
// 32 serial tiles).  BLM_BARRIER_STATS_SPLITS: unset or empty -> automatic (1 when the
// ceil(K / R) BH blocks, R = barrier_stats_rows(K), reach 4 per SM, else enough splits for
// that, at most ceil(T / 128)); a positive whole number forces that many; anything else is
// refused (ConfigError naming the value).  Either way at most D^2 / (2 D + 2) (15 for D 32, 31
// for D 64: the partials live in the S output before S is computed).  Read at every
// barrier_flash_forward call.
int barrier_stats_splits(int64_t BH, int K, int T, int D);

// How many slots (16 or 32) a block of barrier_flash_forward's statistics kernel owns, for K
// slots per sequence: with few slots (the sampled estimator, K 8 or 16) most of a 32-slot tile
// would be padding whose logits, exponentials and mma cost as much as real slots'.
// BLM_BARRIER_STATS_ROWS: unset, empty or "auto" -> 16 when K <= 16, else 32; "16" / "32" force
// that tile height at any K (16 at K > 16: ceil(K / 16) tiles a sequence-head); anything else is
// refused (ConfigError naming the value).  The two heights give the same values up to rounding
// (16: the logits summed from two halves of d).  Read at every barrier_flash_forward call.
int barrier_stats_rows(int K);

// Qg [BH, K, D] (rows of padding slots are ignored), Qc, Kc [BH, T, D], rows [B, K] (b = bh / H;
// counted positions t in [1, T), increasing or not; -1 or 0 = padding) ->
// S [BH, K, D*D], Qb, Kb [BH, K, D], m, l [BH, K], every element written; padding slots get
// zeros in S, Qb, Kb and m = 0, l = 1.  c: the logit scale (1/sqrt(D)).  K = 0 or B H = 0
// launches nothing.  Qc, Kc, S, Qb, Kb must be 16-byte aligned (cudaMalloc'd or 256-byte
// workspace pieces are).  Requires barrier_fused_s_supported(D, B H); throws DeviceError
// otherwise.  Deterministic (fixed-order fp32 sums, no atomics).  Two or three kernels: one
// block per (bh, 16 or 32 slots: barrier_stats_rows, range of s) for m, l, Qb, Kb (with more
// than one range, barrier_stats_splits, a combine over the ranges after it), then one block per
// (bh, 32 slots, D*D/1024 chunk of S).
void barrier_flash_forward(const float* Qg, const float* Qc, const float* Kc,
                           const int32_t* rows, int B, int H, int T, int K, int D, float c,
                           float* S, float* Qb, float* Kb, float* m, float* l,
                           cudaStream_t stream);

// Pi [BH, K, T] (row k zero for s >= rows[b, k], all zero for padding slots rows = -1),
// Qc, Kc [BH, T, D] (centred), rows [B, K] (b = bh / H) -> S [BH, K, D^2], every element of it
// written (zeros for padding slots).  K = 0 or BH = 0 launches nothing.  Same requirements as
// barrier_flash_forward.  The S of barrier_flash_forward without recomputing pi.
void barrier_fused_s(const float* Pi, const float* Qc, const float* Kc, const int32_t* rows,
                     int64_t BH, int H, int T, int K, int D, float* S, cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
