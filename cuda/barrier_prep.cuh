// The preparation the matrix-product barriers share (cuda/barrier_tc.cu, cuda/barrier_flash.cu):
// per sequence the list of counted positions, and the per-head q, k copies, centred.
//   rows_kernel    mask -> rows [B, K] (counted t in increasing order, -1 padding),
//                  kof [B, T] (slot of t, or -1)
//   extract_kernel qkv [B, T, 3d] -> Qr, Kr [BH, T, D] (raw), Qg [BH, K, D] (q of counted rows)
//   center_kernel  Qc = Qr - mean_t Qr, Kc = Kr - mean_t Kr (in place over Kr)
// C_t is invariant to a common shift of every q_s or every k_s; the centring removes the common
// component that would otherwise make S - qbar kbar^T lose digits.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/barrier_phi.cuh"

namespace blm {
namespace cuda {
namespace barrier_prep {
namespace {  // each including file gets its own copy of the kernels

// One warp per sequence b: rows[b, 0..count) = the counted t in increasing order, -1 up to K;
// kof[b, t] = slot of t or -1.  Positions past slot K - 1 (a kmax smaller than the true count,
// which the host API never passes) are dropped.
__global__ void rows_kernel(const uint8_t* __restrict__ mask, int B, int T, int K,
                            int32_t* __restrict__ rows, int32_t* __restrict__ kof) {
  const int b = static_cast<int>((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32);
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

// qkv [B, T, 3d] -> Qr, Kr [BH, T, D] (raw), and Qg[bh, kof(b, t)] = q for counted t.  One block
// per token n = b*T + t, threads over the d = H*D columns (coalesced reads).
__global__ void extract_kernel(const float* __restrict__ qkv, int T, int H, int D, int K,
                               const int32_t* __restrict__ kof, float* __restrict__ Qr,
                               float* __restrict__ Kr, float* __restrict__ Qg) {
  const int64_t n = blockIdx.x;
  const int64_t b = n / T;
  const int t = static_cast<int>(n - b * T);
  const int d = H * D;
  const int k = kof[n];
  const float* src = qkv + n * 3 * d;
  for (int col = threadIdx.x; col < d; col += blockDim.x) {
    const int h = col / D, i = col - h * D;
    const int64_t bh = b * H + h;
    const float q = src[col];
    Qr[(bh * T + t) * D + i] = q;
    Kr[(bh * T + t) * D + i] = src[d + col];
    if (k >= 0) Qg[(bh * K + k) * D + i] = q;
  }
}

// One block (256 threads) per bh: Qc = Qr - mean_t Qr, Kc -= mean_t Kc.  Thread (g, i) sums
// column i over t = g mod 256/D in double; the 256/D partial sums are added in a fixed order.
template <int D>
__global__ void __launch_bounds__(256) center_kernel(const float* __restrict__ Qr, int T,
                                                     float* __restrict__ Qc,
                                                     float* __restrict__ Kc) {
  constexpr int G = 256 / D;
  static_assert(G * D == 256, "D must divide 256");
  __shared__ double part_q[256], part_k[256];
  __shared__ float mean_q[D], mean_k[D];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * T * D;
  const int i = threadIdx.x % D, g = threadIdx.x / D;
  double sq = 0, sk = 0;
  for (int t = g; t < T; t += G) {
    sq += Qr[base + static_cast<int64_t>(t) * D + i];
    sk += Kc[base + static_cast<int64_t>(t) * D + i];
  }
  part_q[threadIdx.x] = sq;
  part_k[threadIdx.x] = sk;
  __syncthreads();
  if (g == 0) {
    double tq = 0, tk = 0;
    for (int gg = 0; gg < G; ++gg) tq += part_q[gg * D + i], tk += part_k[gg * D + i];
    mean_q[i] = static_cast<float>(tq / T);
    mean_k[i] = static_cast<float>(tk / T);
  }
  __syncthreads();
  const int64_t n = static_cast<int64_t>(T) * D;
  for (int64_t idx = threadIdx.x; idx < n; idx += 256) {
    const int col = static_cast<int>(idx % D);  // D is a constant: a mask
    Qc[base + idx] = Qr[base + idx] - mean_q[col];
    Kc[base + idx] = Kc[base + idx] - mean_k[col];
  }
}

}  // namespace
}  // namespace barrier_prep
}  // namespace cuda
}  // namespace blm
