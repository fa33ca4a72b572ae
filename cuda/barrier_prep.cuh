// The preparation the matrix-product barriers share (cuda/barrier_tc.cu, cuda/barrier_flash.cu):
// per sequence the list of counted positions, and the per-head q, k copies, centred.
//   rows_kernel              mask -> rows [B, K] (counted t in increasing order, -1 padding),
//                            kof [B, T] (slot of t, or -1)
//   qk_means_kernel          qkv [B, T, 3d] -> the means over t of the q and k columns [B, 2d];
//                            optionally, in the same read, an fp32 qkv's bf16 copy (the
//                            attention's input: one pass over the fp32 qkv instead of two)
//   extract_centered_kernel  -> Qc, Kc [BH, T, D] centred, Qg [BH, K, D] (raw q, counted rows)
//   prepare_barrier_inputs   all three on a stream
// C_t is invariant to a common shift of every q_s or every k_s; the centring removes the common
// component that would otherwise make S - qbar kbar^T lose digits.
// qkv is fp32 or bf16 (In): a bf16 qkv is widened as it is read, so every output is the fp32
// kernels' on float(qkv), bit for bit (the bf16 precision's barrier on the attention's own q, k).
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/barrier_phi.cuh"
#include "cuda/common.cuh"
#include "cuda/vector_io.cuh"

namespace blm {
namespace cuda {
namespace barrier_prep {
namespace {  // each including file gets its own copy of the kernels

// One block per sequence b: rows[b, 0..count) = the counted t in increasing order, -1 up to K;
// kof[b, t] = slot of t or -1.  The block takes kRowsThreads positions at a time: a ballot per
// warp, the warps' counts summed in shared memory (an exclusive scan over 32 warps), so a
// sequence of 1024 positions is one step (the first form, one warp per sequence walking T in
// steps of 32, took 13 us a layer at T = 1024).  Positions past slot K - 1 (a kmax smaller than
// the true count, which the host API never passes) are dropped.
constexpr int kRowsThreads = 1024;
__global__ void __launch_bounds__(kRowsThreads)
    rows_kernel(const uint8_t* __restrict__ mask, int T, int K, int32_t* __restrict__ rows,
                int32_t* __restrict__ kof) {
  constexpr int kWarpsPerBlock = kRowsThreads / 32;
  __shared__ int warp_base[kWarpsPerBlock];
  __shared__ int block_count;
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int base = 0;  // counted positions before this chunk (the same in every thread)
  for (int t0 = 0; t0 < T; t0 += kRowsThreads) {
    const int t = t0 + threadIdx.x;
    const bool counted = t < T && position_counted(t, b, T, mask);
    const unsigned ballot = __ballot_sync(0xffffffffu, counted);
    if (lane == 0) warp_base[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the warps' counts
      const int n = warp_base[lane];
      int incl = n;
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      warp_base[lane] = incl - n;
      if (lane == 31) block_count = incl;
    }
    __syncthreads();
    const int k = base + warp_base[warp] + __popc(ballot & ((1u << lane) - 1u));
    if (t < T) {
      const bool kept = counted && k < K;
      kof[static_cast<int64_t>(b) * T + t] = kept ? k : -1;
      if (kept) rows[static_cast<int64_t>(b) * K + k] = t;
    }
    base += block_count;
    __syncthreads();  // warp_base and block_count are rewritten by the next chunk
  }
  for (int k = base + threadIdx.x; k < K; k += kRowsThreads)
    rows[static_cast<int64_t>(b) * K + k] = -1;
}

// means [B, 2d]: the mean over t of columns 0 .. 2d-1 (the q and k blocks) of sequence b's rows
// of qkv [B, T, 3d]; with copy != nullptr also copy [B, T, 3d] = bf16(qkv), all 3d columns.
// Grid (ceil(C / (32 V)), B) with C = 3d (copy) or 2d, kMeansThreads threads: thread (g, lane)
// takes V consecutive columns 32 V blockIdx.x + V lane .. + V - 1 (V = 4, 16-byte loads, when
// 4 | d) and sums them over t = g mod kMeansGroups in double; the groups' partial sums are added
// in a fixed order (deterministic).  Coalesced: a warp reads 32 V consecutive columns of a row.
// 16 row groups and three blocks per SM: at GPT-2 small (B 16, 3d = 2304) the 288 blocks are
// then resident at once.  (8 groups of 256 threads ran at about 3 TB/s; 32 groups of 1024
// threads at 40 registers, one block per SM, took 2.2 waves and ran no faster.)
constexpr int kMeansGroups = 16, kMeansThreads = 32 * kMeansGroups;
template <int V, class In>
__global__ void __launch_bounds__(kMeansThreads, 3)
    qk_means_kernel(const In* __restrict__ qkv, int T, int d, float* __restrict__ means,
                    __nv_bfloat16* __restrict__ copy) {
  __shared__ double part[kMeansGroups][32 * V];
  const int lane = threadIdx.x & 31, g = threadIdx.x >> 5;
  const int col = blockIdx.x * 32 * V + V * lane, C = copy ? 3 * d : 2 * d;
  const int64_t b = blockIdx.y;
  double sum[V] = {};
  if (col < C) {
    const bool summed = col < 2 * d;  // V | 2d: a group is all q, k or all v
#pragma unroll 4
    for (int t = g; t < T; t += kMeansGroups) {
      const int64_t at = (b * T + t) * 3 * d + col;
      float x[V];
      load_vec<V>(qkv + at, x);
      if (summed)
#pragma unroll
        for (int e = 0; e < V; ++e) sum[e] += x[e];
      if (copy) store_vec<V>(copy + at, x);  // round to nearest even, as convert_to_bf16
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) part[g][V * lane + e] = sum[e];
  __syncthreads();
  if (g == 0 && col < 2 * d) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      double total = 0;
      for (int gg = 0; gg < kMeansGroups; ++gg) total += part[gg][V * lane + e];
      means[b * 2 * d + col + e] = static_cast<float>(total / T);
    }
  }
}

// qkv [B, T, 3d] -> Qc, Kc [BH, T, D] centred (q - mean_t q, k - mean_t k, means from
// qk_means_kernel) and Qg [BH, K, D] = the raw q of the counted rows (slot kof(b, t)).  One block
// per token n = b*T + t, threads over groups of V columns of the d = H*D (coalesced reads; V = 4,
// 16-byte loads and stores, when 4 | D: a group then never straddles two heads).
template <int V, class In>
__global__ void extract_centered_kernel(const In* __restrict__ qkv, int T, int H, int D, int K,
                                        const int32_t* __restrict__ kof,
                                        const float* __restrict__ means, float* __restrict__ Qc,
                                        float* __restrict__ Kc, float* __restrict__ Qg) {
  const int64_t n = blockIdx.x;
  const int64_t b = n / T;
  const int t = static_cast<int>(n - b * T);
  const int d = H * D;
  const int k = kof[n];
  const In* src = qkv + n * 3 * d;
  const float* mean = means + b * 2 * d;
  for (int col = V * threadIdx.x; col < d; col += V * blockDim.x) {
    const int h = col / D, i = col - h * D;
    const int64_t bh = b * H + h;
    float q[V], kk[V], mq[V], mk[V], qc[V], kc[V];
    load_vec<V>(src + col, q);
    load_vec<V>(src + d + col, kk);
    load_vec<V>(mean + col, mq);
    load_vec<V>(mean + d + col, mk);
#pragma unroll
    for (int e = 0; e < V; ++e) qc[e] = q[e] - mq[e], kc[e] = kk[e] - mk[e];
    store_vec<V>(Qc + (bh * T + t) * D + i, qc);
    store_vec<V>(Kc + (bh * T + t) * D + i, kc);
    if (k >= 0) store_vec<V>(Qg + (bh * K + k) * D + i, q);
  }
}

// The whole preparation on the stream: rows, kof, means [B, 2d] (scratch), Qc, Kc, Qg (zero rows
// for padding slots); with qkv_copy != nullptr (an fp32 qkv only) also qkv_copy [B, T, 3d] =
// bf16(qkv).
template <class In>
void prepare_barrier_inputs(const In* qkv, const uint8_t* mask, int B, int T, int H, int D, int K,
                            int32_t* rows, int32_t* kof, float* means, float* Qc, float* Kc,
                            float* Qg, cudaStream_t stream, __nv_bfloat16* qkv_copy = nullptr) {
  static_assert(std::is_same_v<In, float> || std::is_same_v<In, __nv_bfloat16>, "fp32 or bf16");
  if (!std::is_same_v<In, float> && qkv_copy != nullptr)
    throw DeviceError("prepare_barrier_inputs: a bf16 copy of a bf16 qkv");
  const int d = H * D;
  rows_kernel<<<static_cast<unsigned>(B), kRowsThreads, 0, stream>>>(mask, T, K, rows, kof);
  BLM_CHECK_LAUNCH("barrier prep rows");
  const int columns = qkv_copy ? 3 * d : 2 * d;
  if (d % 4 == 0)
    qk_means_kernel<4, In><<<dim3(static_cast<unsigned>(ceil_div(columns, 128)),
                              static_cast<unsigned>(B)), kMeansThreads, 0, stream>>>(
        qkv, T, d, means, qkv_copy);
  else
    qk_means_kernel<1, In><<<dim3(static_cast<unsigned>(ceil_div(columns, 32)),
                              static_cast<unsigned>(B)), kMeansThreads, 0, stream>>>(
        qkv, T, d, means, qkv_copy);
  BLM_CHECK_LAUNCH("barrier prep means");
  CUDA_CHECK(cudaMemsetAsync(Qg, 0, static_cast<size_t>(B) * H * K * D * sizeof(float), stream));
  const unsigned tokens = static_cast<unsigned>(static_cast<int64_t>(B) * T);
  if (D % 4 == 0)
    extract_centered_kernel<4, In>
        <<<tokens, 128, 0, stream>>>(qkv, T, H, D, K, kof, means, Qc, Kc, Qg);
  else
    extract_centered_kernel<1, In>
        <<<tokens, 128, 0, stream>>>(qkv, T, H, D, K, kof, means, Qc, Kc, Qg);
  BLM_CHECK_LAUNCH("barrier prep extract");
}

}  // namespace
}  // namespace barrier_prep
}  // namespace cuda
}  // namespace blm
