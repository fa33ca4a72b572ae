// Token + position embedding (spec section 1, with the evaluation noise of section 6) and its
// deterministic backward.
//
//   forward:  out[b,t,:] = wte[x[b,t], :] + wpe[t, :] + noise_std * normal01(seed, (b*T+t)*d + i)
//             tokens [B, T], wte [V, d], wpe [>= T, d], out [B, T, d]
//   backward: dwte[v, :] += sum of dout over the positions holding token v
//             dwpe[t, :] += sum over b of dout[b, t, :]
// The wte backward never uses atomics: the host groups positions by token id (a counting sort),
// and one block per used token sums its positions in ascending order.  Rows move as float4
// vectors when d % 4 == 0 and the buffers are 16-byte aligned (else element by element).
#include <algorithm>

#include "core/rng.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"
#include "cuda/vector_io.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr int kEmbThreads = 128;

// Blocks take positions n = b*T + t in turn (grid-stride over rows: one t = n % T per row, no
// division per element); threads take W-element vectors of the row (W = 4: wte, wpe, out
// 16-byte aligned and d % 4 == 0; else W = 1).
// Large shapes: n is int64 because n + gridDim.x (up to 65535 past n) overflowed a 32-bit n for
// N within 65535 of INT_MAX (the largest N check_batch admits); row offsets are int64 products.
template <int W>
__global__ void __launch_bounds__(kEmbThreads)
    embedding_forward_kernel(const int32_t* __restrict__ tokens, const float* __restrict__ wte,
                             const float* __restrict__ wpe, int N, int T, int d,
                             double noise_std, uint64_t noise_seed, float* __restrict__ out) {
  const int nvec = d / W;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int t = static_cast<int>(n % T);
    const float* te = wte + static_cast<int64_t>(tokens[n]) * d;
    const float* pe = wpe + static_cast<int64_t>(t) * d;
    float* o = out + static_cast<int64_t>(n) * d;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float a[W], b[W];
      load_vec<W>(te + v * W, a);
      load_vec<W>(pe + v * W, b);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        a[j] += b[j];
        // The noise index (b*T+t)*d + i: the same draw as the CPU reference.
        if (noise_std != 0.0) {
          const uint64_t idx = static_cast<uint64_t>(n) * d + v * W + j;
          a[j] += static_cast<float>(noise_std * normal01(noise_seed, idx));
        }
      }
      store_vec<W>(o + v * W, a);
    }
  }
}

// One block per used token u; each thread owns W-column vectors v, v + blockDim.x, ...
template <int W>
__global__ void embedding_backward_wte_kernel(const float* __restrict__ dout,
                                              const int32_t* __restrict__ used,
                                              const int32_t* __restrict__ offsets,
                                              const int32_t* __restrict__ positions, int d,
                                              float* __restrict__ dwte) {
  const int u = blockIdx.x;
  const int begin = offsets[u], end = offsets[u + 1];
  if (begin == end) return;  // a padding group (the CUDA graph's fixed group count): nothing
  float* row = dwte + static_cast<int64_t>(used[u]) * d;
  for (int v = threadIdx.x; v < d / W; v += blockDim.x) {
    float s[W] = {};
    for (int p = begin; p < end; ++p) {
      float x[W];
      load_vec<W>(dout + static_cast<int64_t>(positions[p]) * d + v * W, x);
#pragma unroll
      for (int j = 0; j < W; ++j) s[j] += x[j];
    }
    float r[W];
    load_vec<W>(row + v * W, r);
#pragma unroll
    for (int j = 0; j < W; ++j) r[j] += s[j];
    store_vec<W>(row + v * W, r);
  }
}

// One thread per W-vector of (t, i) (flat index over [T, d]): sums over b in ascending order;
// the total % W trailing elements one by one.
template <int W>
__global__ void embedding_backward_wpe_kernel(const float* __restrict__ dout, int B,
                                              int64_t total, float* __restrict__ dwpe) {
  const int64_t nv = total / W;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = first; k < nv; k += stride) {
    const int64_t i = k * W;
    float s[W] = {};
    for (int b = 0; b < B; ++b) {
      float x[W];
      load_vec<W>(dout + b * total + i, x);
#pragma unroll
      for (int j = 0; j < W; ++j) s[j] += x[j];
    }
    float r[W];
    load_vec<W>(dwpe + i, r);
#pragma unroll
    for (int j = 0; j < W; ++j) r[j] += s[j];
    store_vec<W>(dwpe + i, r);
  }
  if (W > 1 && first < total - nv * W) {
    const int64_t i = nv * W + first;
    float s = 0.0f;
    for (int b = 0; b < B; ++b) s += dout[b * total + i];
    dwpe[i] += s;
  }
}

}  // namespace

void group_positions_by_token(const int32_t* tokens, int N, int V, std::vector<int32_t>& count,
                              std::vector<int32_t>& used, std::vector<int32_t>& offsets,
                              std::vector<int32_t>& positions) {
  count.assign(V, 0);
  for (int n = 0; n < N; ++n) ++count[tokens[n]];
  used.clear();
  offsets.assign(1, 0);
  for (int v = 0; v < V; ++v) {
    if (count[v] == 0) continue;
    used.push_back(v);
    const int start = offsets.back();
    offsets.push_back(start + count[v]);
    count[v] = start;  // from here on: the next free slot of token v
  }
  positions.resize(N);
  for (int n = 0; n < N; ++n) positions[count[tokens[n]]++] = n;
}

void embedding_forward(const int32_t* tokens, const float* wte, const float* wpe, int B, int T,
                       int d, double noise_std, uint64_t noise_seed, float* out,
                       cudaStream_t stream) {
  const int N = B * T;
  if (N == 0 || d == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(N, kMaxBlocks));
  if (d % 4 == 0 && aligned16(wte) && aligned16(wpe) && aligned16(out))
    embedding_forward_kernel<4><<<grid, kEmbThreads, 0, stream>>>(tokens, wte, wpe, N, T, d,
                                                                  noise_std, noise_seed, out);
  else
    embedding_forward_kernel<1><<<grid, kEmbThreads, 0, stream>>>(tokens, wte, wpe, N, T, d,
                                                                  noise_std, noise_seed, out);
  BLM_CHECK_LAUNCH("embedding_forward");
}

void embedding_backward_wte_accumulate(const float* dout, const int32_t* used,
                                       const int32_t* offsets, const int32_t* positions,
                                       int n_used, int d, float* dwte, cudaStream_t stream) {
  if (n_used == 0) return;
  const bool vec = d % 4 == 0 && aligned16(dout) && aligned16(dwte);
  const int cols = vec ? d / 4 : d;
  const int threads = cols >= 256 ? 256 : std::max(32, (cols + 31) / 32 * 32);
  if (vec)
    embedding_backward_wte_kernel<4><<<n_used, threads, 0, stream>>>(dout, used, offsets,
                                                                     positions, d, dwte);
  else
    embedding_backward_wte_kernel<1><<<n_used, threads, 0, stream>>>(dout, used, offsets,
                                                                     positions, d, dwte);
  BLM_CHECK_LAUNCH("embedding_backward_wte");
}

void embedding_backward_wpe_accumulate(const float* dout, int B, int T, int d, float* dwpe,
                                       cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(T) * d;
  if (total == 0) return;
  // Vectors need every b's slice aligned: total % 4 == 0 keeps dout + b * total aligned.
  if (total % 4 == 0 && aligned16(dout) && aligned16(dwpe))
    embedding_backward_wpe_kernel<4><<<grid_for(ceil_div(total, 4)), kThreads, 0, stream>>>(
        dout, B, total, dwpe);
  else
    embedding_backward_wpe_kernel<1><<<grid_for(total), kThreads, 0, stream>>>(dout, B, total,
                                                                             dwpe);
  BLM_CHECK_LAUNCH("embedding_backward_wpe");
}

}  // namespace cuda
}  // namespace blm
