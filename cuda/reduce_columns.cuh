// Deterministic two-stage column reductions of an [N, C] matrix (bias and LayerNorm parameter
// gradients), without atomics:
//   stage 1: block (x = column tile, y = chunk of rows) sums its rows in ascending order (fp32)
//            into partial[k][chunk][c] for each of the K outputs;
//   stage 2: one thread per (column, output) adds the chunks in ascending order in double and
//            adds the total into out[k][c].
// The chunking depends only on N, so results are bit-identical across runs and devices.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"

namespace blm {
namespace cuda {

constexpr int kColumnTile = 128;    // columns per stage-1 block (one per thread)
constexpr int kMaxColumnChunks = 1024;

// Rows per chunk: at least 64, and few enough chunks that the partials stay small.
inline int column_chunk_rows(int N) {
  return std::max<int>(64, static_cast<int>(ceil_div(N, kMaxColumnChunks)));
}
inline int column_chunks(int N) { return N <= 0 ? 0 : static_cast<int>(ceil_div(N, column_chunk_rows(N))); }

template <int K>
struct ColumnOutputs {
  float* p[K];
};

// Terms: a functor with __device__ void operator()(int64_t n, int c, float* acc) that adds the
// row-n, column-c contribution to each acc[0..K).
template <int K, class Terms>
__global__ void column_partial_kernel(Terms terms, int N, int C, int rows_per_chunk, int chunks,
                                      float* __restrict__ partial) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int chunk = blockIdx.y;
  if (c >= C) return;
  float acc[K];
  for (int k = 0; k < K; ++k) acc[k] = 0.0f;
  const int64_t r0 = static_cast<int64_t>(chunk) * rows_per_chunk;
  const int64_t r1 = std::min<int64_t>(N, r0 + rows_per_chunk);
  for (int64_t n = r0; n < r1; ++n) terms(n, c, acc);
  for (int k = 0; k < K; ++k) partial[(static_cast<int64_t>(k) * chunks + chunk) * C + c] = acc[k];
}

template <int K>
__global__ void column_final_kernel(const float* __restrict__ partial, int chunks, int C,
                                    ColumnOutputs<K> out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int k = blockIdx.y;
  if (c >= C) return;
  const float* p = partial + static_cast<int64_t>(k) * chunks * C + c;
  double s = 0.0;
  for (int j = 0; j < chunks; ++j) s += p[static_cast<int64_t>(j) * C];
  out.p[k][c] += static_cast<float>(s);
}

// out[k][c] += sum_n terms_k(n, c).  partial: K * column_chunks(N) * C floats.
template <int K, class Terms>
void column_reduce(const Terms& terms, int N, int C, float* partial, float* const (&outs)[K],
                   cudaStream_t stream, const char* name) {
  if (N <= 0 || C <= 0) return;
  const int rows = column_chunk_rows(N), chunks = column_chunks(N);
  const dim3 grid1(static_cast<unsigned>(ceil_div(C, kColumnTile)), static_cast<unsigned>(chunks));
  column_partial_kernel<K, Terms><<<grid1, kColumnTile, 0, stream>>>(terms, N, C, rows, chunks,
                                                                      partial);
  BLM_CHECK_LAUNCH(name);
  ColumnOutputs<K> o;
  for (int k = 0; k < K; ++k) o.p[k] = outs[k];
  const dim3 grid2(static_cast<unsigned>(ceil_div(C, kColumnTile)), K);
  column_final_kernel<K><<<grid2, kColumnTile, 0, stream>>>(partial, chunks, C, o);
  BLM_CHECK_LAUNCH(name);
}

}  // namespace cuda
}  // namespace blm
