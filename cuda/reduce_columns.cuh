// Deterministic two-stage column reductions of an [N, C] matrix (bias and LayerNorm parameter
// gradients), without atomics:
//   stage 1: block (x = column tile, y = chunk of rows) sums its rows in a fixed order (fp32;
//            row lanes, see column_partial_kernel) into partial[k][chunk][c] for each of the K
//            outputs.  Each thread owns W adjacent
//            columns and reads them as 16-byte vectors (W = 4 fp32 / 8 bf16; W = 1 when a pointer
//            is unaligned or C % W != 0).  The terms may also write elementwise results for the
//            elements they read (fused GELU backward, with or without the recomputed GELU
//            output; fp32 -> bf16 copy), saving a pass.
//   stage 2: block (32 columns x 32 chunk groups) per (column tile, output): group g adds chunks
//            g, g + 32, ... in double, then the 32 group sums are added in order g = 0..31 and the
//            total is added into out[k][c].
// The chunking depends only on N, so results are bit-identical across runs and devices.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/pdl.cuh"
#include "cuda/vector_io.cuh"

namespace blm {
namespace cuda {

constexpr int kMaxColumnChunks = 1024;
constexpr int kColumnMaxThreads = 512;  // stage-1 threads per block (one W-column vector each)
constexpr int kFinalGroups = 32;        // stage-2 chunk groups per block

// Rows per chunk: at least 64, and few enough chunks that the partials stay small.
inline int column_chunk_rows(int N) {
  return std::max<int>(64, static_cast<int>(ceil_div(N, kMaxColumnChunks)));
}
inline int column_chunks(int N) { return N <= 0 ? 0 : static_cast<int>(ceil_div(N, column_chunk_rows(N))); }

template <int K>
struct ColumnOutputs {
  float* p[K];
};

// The bf16 GELU backward of BLM_RECOMPUTE=gelu (cuda/reduce.cu), fused with the FC1 bias gradient
// and the recomputed GELU output.  pre, dact, act [N, C] bf16; out [C] fp32; partial:
// column_partial_floats(N, C, 1) floats (cuda/kernels.h):
//   dact[n, c] = bf16(dact[n, c] * gelu'(pre[n, c]));  out[c] += sum_n dact[n, c] (new values);
//   act[n, c] = bf16(gelu(pre[n, c]))
// dact and out are bit for bit gelu_backward_column_sum_accumulate's (kernels.h), act is bit for
// bit gelu_forward's (kernels.h) output for the same pre: the backward rebuilds the forward's GELU
// output instead of keeping it per layer.
void gelu_backward_recompute_column_sum_accumulate(const __nv_bfloat16* pre, __nv_bfloat16* dact,
                                                   __nv_bfloat16* act, int N, int C,
                                                   float* partial, float* out,
                                                   cudaStream_t stream);

#if defined(__CUDACC__)

// Terms: a functor with `static constexpr int K` (outputs) and
//   template <int W> __device__ void add(int64_t n, int64_t i, float (&acc)[K][W]) const
// adding the contributions of row n, columns c .. c + W (i = n * C + c, W-aligned when W > 1) to
// acc[k][0 .. W).
//
// Block (x: blockDim.x column vectors, y: blockDim.y row lanes) per (column tile, chunk): row lane
// y takes the chunk's rows y, y + blockDim.y, ... in ascending order, then lane 0 adds lanes
// 1 .. blockDim.y - 1 in that order (through shared memory [y][k][j][x]: conflict-free), so the
// sum's order depends only on N and C.  The row lanes give the bandwidth-bound pass enough
// threads in flight when C is small (C = 384 fp32 read as 8-wide vectors is 48 threads per row).
template <int W, class Terms>
__global__ void __launch_bounds__(kColumnMaxThreads)
    column_partial_kernel(Terms terms, int N, int C, int rows_per_chunk, int chunks,
                          float* __restrict__ partial) {
  constexpr int K = Terms::K;
  __shared__ float lanes[kColumnMaxThreads * K * W];
  pdl_wait();
  pdl_launch_dependents();
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
  const int c = (blockIdx.x * bx + tx) * W;
  const int chunk = blockIdx.y;
  const bool active = c < C;
  float acc[K][W];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < W; ++j) acc[k][j] = 0.0f;
  const int64_t r0 = static_cast<int64_t>(chunk) * rows_per_chunk;
  const int64_t r1 = std::min<int64_t>(N, r0 + rows_per_chunk);
  if (active) {
    int64_t i = (r0 + ty) * C + c;
    const int64_t step = static_cast<int64_t>(blockDim.y) * C;
#pragma unroll 2
    for (int64_t n = r0 + ty; n < r1; n += blockDim.y, i += step) terms.template add<W>(n, i, acc);
  }
  auto lane_at = [&](int y, int k, int j) -> float& {
    return lanes[((static_cast<int64_t>(y) * K + k) * W + j) * bx + tx];
  };
  if (ty > 0 && active) {
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int j = 0; j < W; ++j) lane_at(ty, k, j) = acc[k][j];
  }
  __syncthreads();
  if (ty != 0 || !active) return;
  for (int y = 1; y < static_cast<int>(blockDim.y); ++y)
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int j = 0; j < W; ++j) acc[k][j] += lane_at(y, k, j);
#pragma unroll
  for (int k = 0; k < K; ++k)
    store_vec<W>(partial + (static_cast<int64_t>(k) * chunks + chunk) * C + c, acc[k]);
}

template <int K>
__global__ void __launch_bounds__(32 * kFinalGroups)
    column_final_kernel(const float* __restrict__ partial, int chunks, int C,
                        ColumnOutputs<K> out) {
  __shared__ double group_sum[kFinalGroups][33];  // padded: no bank conflicts on the column read
  pdl_wait();
  pdl_launch_dependents();
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int k = blockIdx.y, g = threadIdx.y;
  double s = 0.0;
  if (c < C) {
    const float* p = partial + static_cast<int64_t>(k) * chunks * C + c;
    for (int j = g; j < chunks; j += kFinalGroups) s += p[static_cast<int64_t>(j) * C];
  }
  group_sum[g][threadIdx.x] = s;
  __syncthreads();
  if (g == 0 && c < C) {
    double t = 0.0;
    for (int q = 0; q < kFinalGroups; ++q) t += group_sum[q][threadIdx.x];
    out.p[k][c] += static_cast<float>(t);
  }
}

// Stage 2 alone: out[k][c] += sum over chunks of partial[k][chunk][c].
template <int K>
void column_final(const float* partial, int chunks, int C, float* const (&outs)[K],
                  cudaStream_t stream, const char* name) {
  ColumnOutputs<K> o;
  for (int k = 0; k < K; ++k) o.p[k] = outs[k];
  const dim3 grid(static_cast<unsigned>(ceil_div(C, 32)), K);
  launch_pdl(column_final_kernel<K>, grid, dim3(32, kFinalGroups), 0, stream, partial, chunks, C, o);
  BLM_CHECK_LAUNCH(name);
}

// out[k][c] += sum_n terms_k(n, c).  partial: K * column_chunks(N) * C floats.  vector_ok: every
// pointer the terms touch is 16-byte aligned and C % W == 0 (else width 1 is used).
template <int W, class Terms>
void column_reduce(const Terms& terms, int N, int C, float* partial,
                   float* const (&outs)[Terms::K], bool vector_ok, cudaStream_t stream,
                   const char* name) {
  if (N <= 0 || C <= 0) return;
  const int rows = column_chunk_rows(N), chunks = column_chunks(N);
  const bool vec = vector_ok && C % W == 0 && aligned16(partial);
  const int64_t nvc = vec ? C / W : C;  // column vectors per row
  // Threads per block: the column vectors split evenly over the fewest tiles of <= 256, and as
  // many row lanes as keep the block within kColumnMaxThreads (at most one per row of a chunk).
  const int64_t tiles = ceil_div(nvc, 256);
  const int bx = static_cast<int>(ceil_div(nvc, tiles));
  const int by = std::max(1, std::min(kColumnMaxThreads / bx, rows));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks));
  const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  if (vec)
    launch_pdl(column_partial_kernel<W, Terms>, grid, block, 0, stream, terms, N, C, rows, chunks,
               partial);
  else
    launch_pdl(column_partial_kernel<1, Terms>, grid, block, 0, stream, terms, N, C, rows, chunks,
               partial);
  BLM_CHECK_LAUNCH(name);
  column_final<Terms::K>(partial, chunks, C, outs, stream, name);
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace blm
