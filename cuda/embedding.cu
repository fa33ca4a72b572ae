// Token + position embedding (spec section 1, with the evaluation noise of section 6) and its
// deterministic backward.
//
//   forward:  out[b,t,:] = wte[x[b,t], :] + wpe[t, :] + noise_std * normal01(seed, (b*T+t)*d + i)
//             tokens [B, T], wte [V, d], wpe [>= T, d], out [B, T, d]
//   backward: dwte[v, :] += sum of dout over the positions holding token v
//             dwpe[t, :] += sum over b of dout[b, t, :]
// The wte backward never uses atomics: the host groups positions by token id (a counting sort),
// and one block per used token sums its positions in ascending order.
#include "core/rng.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"

namespace blm {
namespace cuda {

namespace {

__global__ void embedding_forward_kernel(const int32_t* __restrict__ tokens,
                                         const float* __restrict__ wte,
                                         const float* __restrict__ wpe, int T, int d,
                                         int64_t total, double noise_std, uint64_t noise_seed,
                                         float* __restrict__ out) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / d;  // position b*T + t
    const int i = static_cast<int>(idx - n * d);
    const int t = static_cast<int>(n % T);
    const int64_t tok = tokens[n];
    float e = wte[tok * d + i] + wpe[static_cast<int64_t>(t) * d + i];
    // The noise index (b*T+t)*d + i is exactly idx: the same draw as the CPU reference.
    if (noise_std != 0.0)
      e += static_cast<float>(noise_std * normal01(noise_seed, static_cast<uint64_t>(idx)));
    out[idx] = e;
  }
}

// One block per used token u; each thread owns columns i, i + blockDim.x, ...
__global__ void embedding_backward_wte_kernel(const float* __restrict__ dout,
                                              const int32_t* __restrict__ used,
                                              const int32_t* __restrict__ offsets,
                                              const int32_t* __restrict__ positions, int d,
                                              float* __restrict__ dwte) {
  const int u = blockIdx.x;
  const int begin = offsets[u], end = offsets[u + 1];
  float* row = dwte + static_cast<int64_t>(used[u]) * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float s = 0.0f;
    for (int p = begin; p < end; ++p) s += dout[static_cast<int64_t>(positions[p]) * d + i];
    row[i] += s;
  }
}

// One thread per (t, i): sums over b in ascending order.
__global__ void embedding_backward_wpe_kernel(const float* __restrict__ dout, int B, int T, int d,
                                              float* __restrict__ dwpe) {
  const int64_t total = static_cast<int64_t>(T) * d;
  const int64_t seq_stride = static_cast<int64_t>(T) * d;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int b = 0; b < B; ++b) s += dout[b * seq_stride + idx];
    dwpe[idx] += s;
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
  const int64_t total = static_cast<int64_t>(B) * T * d;
  if (total == 0) return;
  embedding_forward_kernel<<<grid_for(total), kThreads, 0, stream>>>(
      tokens, wte, wpe, T, d, total, noise_std, noise_seed, out);
  BLM_CHECK_LAUNCH("embedding_forward");
}

void embedding_backward_wte_accumulate(const float* dout, const int32_t* used,
                                       const int32_t* offsets, const int32_t* positions,
                                       int n_used, int d, float* dwte, cudaStream_t stream) {
  if (n_used == 0) return;
  const int threads = d >= 256 ? 256 : ((d + 31) / 32) * 32;
  embedding_backward_wte_kernel<<<n_used, threads, 0, stream>>>(dout, used, offsets, positions, d,
                                                                dwte);
  BLM_CHECK_LAUNCH("embedding_backward_wte");
}

void embedding_backward_wpe_accumulate(const float* dout, int B, int T, int d, float* dwpe,
                                       cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(T) * d;
  if (total == 0) return;
  embedding_backward_wpe_kernel<<<grid_for(total), kThreads, 0, stream>>>(dout, B, T, d, dwpe);
  BLM_CHECK_LAUNCH("embedding_backward_wpe");
}

}  // namespace cuda
}  // namespace blm
