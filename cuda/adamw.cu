// AdamW exactly as torch.optim.AdamW (amsgrad off), per parameter in double:
//   g  = grad * clip_scale
//   p *= 1 - lr * wd                          (decoupled decay, decay tensors only)
//   m  = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// params, grads, m, v: [n] in the layout of core/params.h.  Whether an element decays comes from
// the per-tensor table: one binary search over the tensors' start offsets per 4-element vector,
// then a forward step when the vector crosses into the next tensor (tensors need not start at a
// multiple of 4).  With params16 (the bf16 precision) the same pass also writes the bf16 copy of
// the new weights.  The step's scalars come from blm::adamw_scalars (core/optim.h), as for the CPU
// backend.
//
// Bandwidth: one launch; each thread moves float4 vectors of p, g, m, v (and 8 bytes of bf16) in
// a grid-stride loop when every pointer is 16-byte aligned, else single elements; n % 4 trailing
// elements one by one.
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"
#include "cuda/vector_io.cuh"

namespace blm {
namespace cuda {

namespace {

// The last segment whose start is <= i.
__device__ __forceinline__ int segment_of(int64_t i, const int64_t* __restrict__ seg_start,
                                          int n_seg) {
  int lo = 0, hi = n_seg - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (seg_start[mid] <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Updates elements i .. i + K (K = 4: 16-byte aligned vectors; K = 1: any element).
template <int K>
__device__ __forceinline__ void adamw_vector(int64_t i, float* __restrict__ params,
                                             const float* __restrict__ grads,
                                             float* __restrict__ m, float* __restrict__ v,
                                             const int64_t* __restrict__ seg_start,
                                             const uint8_t* __restrict__ decay, int n_seg,
                                             const AdamWScalars& s,
                                             __nv_bfloat16* __restrict__ params16) {
  float pv[K], gv[K], mv[K], vv[K];
  load_vec<K>(params + i, pv);
  load_vec<K>(grads + i, gv);
  load_vec<K>(m + i, mv);
  load_vec<K>(v + i, vv);
  int seg = segment_of(i, seg_start, n_seg);
  int64_t next = seg_start[seg + 1];  // seg_start[n_seg] = n > every index
#pragma unroll
  for (int j = 0; j < K; ++j) {
    while (i + j >= next) next = seg_start[++seg + 1];
    double p = pv[j];
    if (decay[seg] != 0) p *= s.decay_factor;
    const double g = static_cast<double>(gv[j]) * s.grad_scale;
    const double mi = s.beta1 * mv[j] + (1.0 - s.beta1) * g;
    const double vi = s.beta2 * vv[j] + (1.0 - s.beta2) * g * g;
    p -= s.step_size * mi / (sqrt(vi) / s.bc2_sqrt + s.eps);
    pv[j] = static_cast<float>(p);
    mv[j] = static_cast<float>(mi);
    vv[j] = static_cast<float>(vi);
  }
  store_vec<K>(params + i, pv);
  store_vec<K>(m + i, mv);
  store_vec<K>(v + i, vv);
  if (params16) store_vec<K>(params16 + i, pv);  // bf16 of the new fp32 weights
}

template <int W>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* __restrict__ params, const float* __restrict__ grads,
                 float* __restrict__ m, float* __restrict__ v, int64_t n,
                 const int64_t* __restrict__ seg_start, const uint8_t* __restrict__ decay,
                 int n_seg, AdamWScalars s, __nv_bfloat16* __restrict__ params16) {
  const int64_t nv = n / W;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = first; k < nv; k += stride)
    adamw_vector<W>(k * W, params, grads, m, v, seg_start, decay, n_seg, s, params16);
  if (W > 1 && first < n - nv * W)
    adamw_vector<1>(nv * W + first, params, grads, m, v, seg_start, decay, n_seg, s, params16);
}

}  // namespace

void adamw_update(float* params, const float* grads, float* m, float* v, int64_t n,
                  const DecayTable& decay, const AdamWScalars& s, cudaStream_t stream) {
  adamw_update(params, grads, m, v, n, decay, s, nullptr, stream);
}

void adamw_update(float* params, const float* grads, float* m, float* v, int64_t n,
                  const DecayTable& decay, const AdamWScalars& s, __nv_bfloat16* params16,
                  cudaStream_t stream) {
  if (n == 0) return;
  const bool vec = aligned16(params) && aligned16(grads) && aligned16(m) && aligned16(v) &&
             (params16 == nullptr || aligned16(params16));
  if (vec)
    adamw_kernel<4><<<grid_for(ceil_div(n, 4)), kThreads, 0, stream>>>(
        params, grads, m, v, n, decay.seg_start, decay.decay, decay.n_seg, s, params16);
  else
    adamw_kernel<1><<<grid_for(n), kThreads, 0, stream>>>(params, grads, m, v, n, decay.seg_start,
                                                          decay.decay, decay.n_seg, s, params16);
  BLM_CHECK_LAUNCH("adamw_update");
}

}  // namespace cuda
}  // namespace blm
