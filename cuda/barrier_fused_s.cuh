// S = pi @ P without P in global memory (opt-in part of cuda/barrier_tc.cu, environment
// BLM_BARRIER_FUSED_S=1): per (sequence b, head h) = bh and counted slot k,
//   S[bh, k, i*D + j] = sum_{s < T} pi[bh, k, s] q~[bh, s, i] k~[bh, s, j]      [BH, K, D^2]
// where P_s = vec(q~_s k~_s^T) is formed tile by tile from q~ and k~ (never stored) and the
// product runs on TF32 tensor cores (mma.sync m16n8k8, fp32 accumulators), skipping the s tiles
// above the causal diagonal of each tile of slots (pi[k, s] = 0 for s >= rows[k]).
// Host-only declarations: this header is included by C++ tests as well as by barrier_tc.cu.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace blm {
namespace cuda {

// Tiles of the fused kernel: 64 slots (rows of S) x 128 columns of S per block of 4 warps, s in
// steps of 32.
constexpr int kFusedRows = 64;
constexpr int kFusedCols = 128;
constexpr int kFusedSteps = 32;

// Whether the fused kernel handles head size D (32, 64) and BH sequences-heads (grid.z <= 65535).
bool barrier_fused_s_supported(int D, int64_t BH);

// BLM_BARRIER_FUSED_S: unset, empty or "0" -> false, "1" -> true; anything else is refused
// (ConfigError naming the value).  Read once per barrier_tc call.
bool barrier_fused_s_from_env();

// Pi [BH, K, T] (row k zero for s >= rows[b, k], all zero for padding slots rows = -1),
// Qc, Kc [BH, T, D] (centred), rows [B, K] (b = bh / H) -> S [BH, K, D^2], every element of it
// written (zeros for padding slots).  K = 0 or BH = 0 launches nothing.  Requires
// barrier_fused_s_supported(D, BH); throws DeviceError otherwise.  Deterministic: fixed-order
// accumulation, no atomics.
void barrier_fused_s(const float* Pi, const float* Qc, const float* Kc, const int32_t* rows,
                     int64_t BH, int H, int T, int K, int D, float* S, cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
