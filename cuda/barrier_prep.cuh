// The preparation the matrix-product barriers share (cuda/barrier_tc.cu, cuda/barrier_flash.cu):
// per sequence the list of counted positions, and the per-head q, k copies, centred.
//   rows_kernel              mask -> rows [B, K] (counted t in increasing order, -1 padding),
//                            kof [B, T] (slot of t, or -1)
//   qk_means_kernel          qkv [B, T, 3d] -> the means over t of the q and k columns [B, 2d]
//   extract_centered_kernel  -> Qc, Kc [BH, T, D] centred, Qg [BH, K, D] (raw q, counted rows)
//   prepare_barrier_inputs   all three on a stream
// C_t is invariant to a common shift of every q_s or every k_s; the centring removes the common
// component that would otherwise make S - qbar kbar^T lose digits.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/barrier_phi.cuh"
#include "cuda/common.cuh"

namespace blm {
namespace cuda {
namespace barrier_prep {
namespace {  // each including file gets its own copy of the kernels

// One warp per sequence b: rows[b, 0..count) = the counted t in increasing order, -1 up to K;
// kof[b, t] = slot of t or -1.  Positions past slot K - 1 (a kmax smaller than the true count,
// which the host API never passes) are dropped.
__global__ void rows_kernel(const uint8_t* __restrict__ mask, int B, int T, int K,
                            int32_t* __restrict__ rows, int32_t* __restrict__ kof) {
  const int b =
      static_cast<int>((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32);
  const int lane = threadIdx.x & 31;
  if (b >= B) return;  // warp-uniform
  int base = 0;
  for (int t0 = 0; t0 < T; t0 += 32) {
    const int t = t0 + lane;
    const bool counted = t < T && position_counted(t, b, T, mask);
    const unsigned ballot = __ballot_sync(0xffffffffu, counted);
    const int k = base + __popc(ballot & ((1u << lane) - 1u));
    if (t < T) {
      const bool kept = counted && k < K;
      kof[static_cast<int64_t>(b) * T + t] = kept ? k : -1;
      if (kept) rows[static_cast<int64_t>(b) * K + k] = t;
    }
    base += __popc(ballot);
  }
  for (int k = base + lane; k < K; k += 32) rows[static_cast<int64_t>(b) * K + k] = -1;
}

// means [B, 2d]: the mean over t of columns 0 .. 2d-1 (the q and k blocks) of sequence b's rows
// of qkv [B, T, 3d].  Grid (ceil(2d / 32), B), 256 threads: thread (g, j) sums column
// 32 blockIdx.x + j over t = g mod 8 in double, the 8 partial sums are added in a fixed order
// (deterministic).  Coalesced: a warp reads 32 consecutive columns of one row.
__global__ void __launch_bounds__(256) qk_means_kernel(const float* __restrict__ qkv, int T, int d,
                                                       float* __restrict__ means) {
  __shared__ double part[8][32];
  const int j = threadIdx.x & 31, g = threadIdx.x >> 5;
  const int col = blockIdx.x * 32 + j;
  const int64_t b = blockIdx.y;
  double sum = 0;
  if (col < 2 * d)
    for (int t = g; t < T; t += 8) sum += qkv[(b * T + t) * 3 * d + col];
  part[g][j] = sum;
  __syncthreads();
  if (g == 0 && col < 2 * d) {
    double total = 0;
    for (int gg = 0; gg < 8; ++gg) total += part[gg][j];
    means[b * 2 * d + col] = static_cast<float>(total / T);
  }
}

// qkv [B, T, 3d] -> Qc, Kc [BH, T, D] centred (q - mean_t q, k - mean_t k, means from
// qk_means_kernel) and Qg [BH, K, D] = the raw q of the counted rows (slot kof(b, t)).  One block
// per token n = b*T + t, threads over the d = H*D columns (coalesced reads).
__global__ void extract_centered_kernel(const float* __restrict__ qkv, int T, int H, int D, int K,
                                        const int32_t* __restrict__ kof,
                                        const float* __restrict__ means, float* __restrict__ Qc,
                                        float* __restrict__ Kc, float* __restrict__ Qg) {
  const int64_t n = blockIdx.x;
  const int64_t b = n / T;
  const int t = static_cast<int>(n - b * T);
  const int d = H * D;
  const int k = kof[n];
  const float* src = qkv + n * 3 * d;
  const float* mean = means + b * 2 * d;
  for (int col = threadIdx.x; col < d; col += blockDim.x) {
    const int h = col / D, i = col - h * D;
    const int64_t bh = b * H + h;
    const float q = src[col];
    Qc[(bh * T + t) * D + i] = q - mean[col];
    Kc[(bh * T + t) * D + i] = src[d + col] - mean[d + col];
    if (k >= 0) Qg[(bh * K + k) * D + i] = q;
  }
}

// The whole preparation on the stream: rows, kof, means [B, 2d] (scratch), Qc, Kc, Qg (zero rows
// for padding slots).
inline void prepare_barrier_inputs(const float* qkv, const uint8_t* mask, int B, int T, int H,
                                   int D, int K, int32_t* rows, int32_t* kof, float* means,
                                   float* Qc, float* Kc, float* Qg, cudaStream_t stream) {
  const int d = H * D;
  rows_kernel<<<static_cast<unsigned>((B + 3) / 4), 128, 0, stream>>>(mask, B, T, K, rows, kof);
  BLM_CHECK_LAUNCH("barrier prep rows");
  qk_means_kernel<<<dim3(static_cast<unsigned>((2 * d + 31) / 32), static_cast<unsigned>(B)), 256,
                    0, stream>>>(qkv, T, d, means);
  BLM_CHECK_LAUNCH("barrier prep means");
  CUDA_CHECK(cudaMemsetAsync(Qg, 0, static_cast<size_t>(B) * H * K * D * sizeof(float), stream));
  extract_centered_kernel<<<static_cast<unsigned>(static_cast<int64_t>(B) * T), 128, 0, stream>>>(
      qkv, T, H, D, K, kof, means, Qc, Kc, Qg);
  BLM_CHECK_LAUNCH("barrier prep extract");
}

}  // namespace
}  // namespace barrier_prep
}  // namespace cuda
}  // namespace blm
