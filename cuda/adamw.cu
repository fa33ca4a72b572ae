// AdamW exactly as torch.optim.AdamW (amsgrad off), one thread per parameter, in double:
//   g  = grad * clip_scale
//   p *= 1 - lr * wd                          (decoupled decay, decay tensors only)
//   m  = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// params, grads, m, v: [n] in the layout of core/params.h.  Whether an element decays comes from
// the per-tensor table (binary search over the tensors' start offsets).  With params16 (the bf16
// precision) the same pass also writes the bf16 copy of the new weights.  The step's scalars come
// from blm::adamw_scalars (core/optim.h), as for the CPU backend.
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"

namespace blm {
namespace cuda {

namespace {

__device__ __forceinline__ bool decays(int64_t i, const int64_t* __restrict__ seg_start,
                                       const uint8_t* __restrict__ decay, int n_seg) {
  int lo = 0, hi = n_seg - 1;  // the last segment whose start is <= i
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (seg_start[mid] <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return decay[lo] != 0;
}

__global__ void adamw_kernel(float* __restrict__ params, const float* __restrict__ grads,
                             float* __restrict__ m, float* __restrict__ v, int64_t n,
                             const int64_t* __restrict__ seg_start,
                             const uint8_t* __restrict__ decay, int n_seg, AdamWScalars s,
                             __nv_bfloat16* __restrict__ params16) {
  // s: the host-side scalars of core/optim.h (adamw_scalars), shared with the CPU backend.
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double p = params[i];
    if (decays(i, seg_start, decay, n_seg)) p *= s.decay_factor;
    const double g = static_cast<double>(grads[i]) * s.grad_scale;
    const double mi = s.beta1 * m[i] + (1.0 - s.beta1) * g;
    const double vi = s.beta2 * v[i] + (1.0 - s.beta2) * g * g;
    p -= s.step_size * mi / (sqrt(vi) / s.bc2_sqrt + s.eps);
    params[i] = static_cast<float>(p);
    if (params16) params16[i] = __float2bfloat16_rn(params[i]);
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
  }
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
  adamw_kernel<<<grid_for(n), kThreads, 0, stream>>>(params, grads, m, v, n, decay.seg_start,
                                                     decay.decay, decay.n_seg, s, params16);
  BLM_CHECK_LAUNCH("adamw_update");
}

}  // namespace cuda
}  // namespace blm
