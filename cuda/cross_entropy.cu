// Fused softmax cross-entropy over the classifier logits, one block per row (position).
//
//   logits [N, V], targets [N] in [0, V)
//   m = max_c logits[n, c],  s = sum_c exp(logits[n, c] - m),  lse = m + log s
//   row_loss[n] = lse - logits[n, y]
//   row_hit[n]  = (argmax_c logits[n, c] == y), the first index among equal maxima
//   write_grad: logits[n, c] = (exp(logits[n, c] - m) / s - [c == y]) * grad_scale   (in place)
// The probabilities are never stored: the third pass recomputes exp and overwrites the logits
// with the gradient, so the [N, V] buffer is the only one of that size.  The logits are fp32 or
// bf16 (the bf16 precision); the math is fp32 either way, the gradient is stored in their type.
#include <climits>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace blm {
namespace cuda {

namespace {

constexpr int kCeThreads = 256;

// (value, index) maximum with ties to the smaller index: a total order (for non-NaN values), so
// every lane of the butterfly ends with the same winner.
__device__ __forceinline__ void take_max(float& v, int& idx, float ov, int oi) {
  if (ov > v || (ov == v && oi < idx)) {
    v = ov;
    idx = oi;
  }
}

template <class T>
__global__ void cross_entropy_kernel(T* __restrict__ logits, const int32_t* __restrict__ targets,
                                     int V, bool write_grad, float grad_scale,
                                     float* __restrict__ row_loss, int32_t* __restrict__ row_hit) {
  __shared__ float max_v[32];
  __shared__ int max_i[32];
  __shared__ float sum_scratch[32];
  const int64_t n = blockIdx.x;
  T* row = logits + n * V;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

  // Pass 1: maximum and first argmax.  Within a thread c ascends, so strict > keeps the first.
  float mv = -INFINITY;
  int mi = INT_MAX;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    const float v = load_f(row[c]);
    if (v > mv) {
      mv = v;
      mi = c;
    }
  }
  for (int o = 16; o > 0; o >>= 1)
    take_max(mv, mi, __shfl_xor_sync(0xffffffffu, mv, o), __shfl_xor_sync(0xffffffffu, mi, o));
  if (lane == 0) {
    max_v[warp] = mv;
    max_i[warp] = mi;
  }
  __syncthreads();
  mv = lane < nwarps ? max_v[lane] : -INFINITY;
  mi = lane < nwarps ? max_i[lane] : INT_MAX;
  for (int o = 16; o > 0; o >>= 1)
    take_max(mv, mi, __shfl_xor_sync(0xffffffffu, mv, o), __shfl_xor_sync(0xffffffffu, mi, o));
  const float m = mv;

  // Pass 2: the normaliser.
  float s = 0.0f;
  for (int c = threadIdx.x; c < V; c += blockDim.x) s += expf(load_f(row[c]) - m);
  s = block_sum(s, sum_scratch);

  const int y = targets[n];
  if (threadIdx.x == 0) {
    row_loss[n] = (m + logf(s)) - load_f(row[y]);
    row_hit[n] = mi == y ? 1 : 0;
  }
  if (!write_grad) return;
  __syncthreads();  // row[y] is read above before any thread overwrites it

  // Pass 3: gradient in place.
  const float inv_s = 1.0f / s;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    const float p = expf(load_f(row[c]) - m) * inv_s;
    row[c] = store_as<T>((p - (c == y ? 1.0f : 0.0f)) * grad_scale);
  }
}

}  // namespace

void cross_entropy(float* logits, const int32_t* targets, int N, int V, bool write_grad,
                   float grad_scale, float* row_loss, int32_t* row_hit, cudaStream_t stream) {
  if (N == 0) return;
  cross_entropy_kernel<float><<<N, kCeThreads, 0, stream>>>(logits, targets, V, write_grad,
                                                            grad_scale, row_loss, row_hit);
  BLM_CHECK_LAUNCH("cross_entropy");
}

void cross_entropy(__nv_bfloat16* logits, const int32_t* targets, int N, int V, bool write_grad,
                   float grad_scale, float* row_loss, int32_t* row_hit, cudaStream_t stream) {
  if (N == 0) return;
  cross_entropy_kernel<__nv_bfloat16><<<N, kCeThreads, 0, stream>>>(
      logits, targets, V, write_grad, grad_scale, row_loss, row_hit);
  BLM_CHECK_LAUNCH("cross_entropy(bf16)");
}

}  // namespace cuda
}  // namespace blm
