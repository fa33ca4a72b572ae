// Elementwise kernels: bias add, bias + GELU (tanh approximation) forward, GELU backward, the
// residual add, and for the bf16 precision GELU forward / backward on bf16 storage and the fp32 ->
// bf16 conversion.  Shapes: [N, C] row-major, column c = index % C.
//
//   gelu(x)  = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)
//   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr float kGeluK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluK1 = 0.044715f;

__device__ __forceinline__ float gelu(float x) {
  const float u = kGeluK0 * (x + kGeluK1 * x * x * x);
  return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_grad(float x) {
  const float u = kGeluK0 * (x + kGeluK1 * x * x * x);
  const float th = tanhf(u);
  return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kGeluK0 * (1.0f + 3.0f * kGeluK1 * x * x);
}

#define BLM_GRID_STRIDE(i, n)                                                             \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ b, int64_t n,
                                int C) {
  BLM_GRID_STRIDE(i, n) y[i] += b[i % C];
}

__global__ void bias_gelu_kernel(float* __restrict__ pre, const float* __restrict__ b,
                                 float* __restrict__ out, int64_t n, int C) {
  BLM_GRID_STRIDE(i, n) {
    const float x = pre[i] + b[i % C];
    pre[i] = x;
    out[i] = gelu(x);
  }
}

// T: float or __nv_bfloat16 (math in float either way).
template <class T>
__global__ void gelu_backward_kernel(const T* __restrict__ pre, T* __restrict__ dact, int64_t n) {
  BLM_GRID_STRIDE(i, n) dact[i] = store_as<T>(load_f(dact[i]) * gelu_grad(load_f(pre[i])));
}

__global__ void gelu_forward_bf16_kernel(const __nv_bfloat16* __restrict__ pre,
                                         __nv_bfloat16* __restrict__ out, int64_t n) {
  BLM_GRID_STRIDE(i, n) out[i] = store_as<__nv_bfloat16>(gelu(load_f(pre[i])));
}

__global__ void convert_to_bf16_kernel(const float* __restrict__ x, __nv_bfloat16* __restrict__ y,
                                       int64_t n) {
  BLM_GRID_STRIDE(i, n) y[i] = store_as<__nv_bfloat16>(x[i]);
}

// No __restrict__: out may alias resid or y (each element is read before it is written).
__global__ void residual_bias_add_kernel(const float* resid, const float* y,
                                         const float* __restrict__ bias, float* out, int64_t n,
                                         int C) {
  BLM_GRID_STRIDE(i, n) out[i] = resid[i] + (y[i] + bias[i % C]);
}

#undef BLM_GRID_STRIDE

}  // namespace

void add_bias(float* y, const float* b, int64_t N, int C, cudaStream_t stream) {
  const int64_t n = N * C;
  if (n == 0) return;
  add_bias_kernel<<<grid_for(n), kThreads, 0, stream>>>(y, b, n, C);
  BLM_CHECK_LAUNCH("add_bias");
}

void bias_gelu_forward(float* pre, const float* b, float* out, int64_t N, int C,
                       cudaStream_t stream) {
  const int64_t n = N * C;
  if (n == 0) return;
  bias_gelu_kernel<<<grid_for(n), kThreads, 0, stream>>>(pre, b, out, n, C);
  BLM_CHECK_LAUNCH("bias_gelu_forward");
}

void gelu_backward_inplace(const float* pre, float* dact, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  gelu_backward_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(pre, dact, n);
  BLM_CHECK_LAUNCH("gelu_backward");
}

void gelu_backward_inplace(const __nv_bfloat16* pre, __nv_bfloat16* dact, int64_t n,
                           cudaStream_t stream) {
  if (n == 0) return;
  gelu_backward_kernel<__nv_bfloat16><<<grid_for(n), kThreads, 0, stream>>>(pre, dact, n);
  BLM_CHECK_LAUNCH("gelu_backward(bf16)");
}

void gelu_forward(const __nv_bfloat16* pre, __nv_bfloat16* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  gelu_forward_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(pre, out, n);
  BLM_CHECK_LAUNCH("gelu_forward(bf16)");
}

void convert_to_bf16(const float* x, __nv_bfloat16* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  convert_to_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, y, n);
  BLM_CHECK_LAUNCH("convert_to_bf16");
}

void residual_bias_add(const float* resid, const float* y, const float* bias, float* out,
                       int64_t N, int C, cudaStream_t stream) {
  const int64_t n = N * C;
  if (n == 0) return;
  residual_bias_add_kernel<<<grid_for(n), kThreads, 0, stream>>>(resid, y, bias, out, n, C);
  BLM_CHECK_LAUNCH("residual_bias_add");
}

}  // namespace cuda
}  // namespace blm
