// GELU with the tanh approximation (the model's activation), on the device, in fp32:
//   gelu(x)  = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)
//   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// evaluated through the exact identities 0.5 (1 + tanh(u)) = s = 1 / (1 + exp(-2u)) and
// 1 - tanh(u)^2 = 4 s (1 - s), 1 - s = exp(-2u) s: one exp (__expf: relative error ~1e-6 for
// |2u| < 20) and one division per element, with no cancellation; tanhf costs several times more.
// Every GELU kernel (elementwise.cu's forward, reduce.cu's backward and the backward that
// recomputes the forward's output for BLM_RECOMPUTE=gelu) calls these two functions, so the
// recomputed bf16 output has the forward's bits: keep it one definition.
#pragma once
#if defined(__CUDACC__)
namespace blm {
namespace cuda {

constexpr float kGeluK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluK1 = 0.044715f;

// s = 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)); one_minus_s = 1 - s = exp(-2u) s.
// The exponent is capped at 88 (exp(88) < FLT_MAX), so exp never overflows and e * s stays finite
// (an x below about -10 gets s ~ 1e-38 instead of something smaller: far below the fp32 resolution of
// anything it is added to).
__device__ __forceinline__ float gelu_sigmoid(float x, float& one_minus_s) {
  const float u = kGeluK0 * (x + kGeluK1 * x * x * x);
  const float e = __expf(fminf(-2.0f * u, 88.0f));
  const float s = 1.0f / (1.0f + e);
  one_minus_s = e * s;
  return s;
}

__device__ __forceinline__ float gelu(float x) {
  float oms;
  return x * gelu_sigmoid(x, oms);
}

__device__ __forceinline__ float gelu_grad(float x) {
  float oms;
  const float s = gelu_sigmoid(x, oms);
  // 0.5 x (1 - tanh^2) k0 (1 + 3 k1 x^2) = 2 x s (1 - s) k0 (1 + 3 k1 x^2)
  return s + 2.0f * x * s * oms * kGeluK0 * (1.0f + 3.0f * kGeluK1 * x * x);
}

}  // namespace cuda
}  // namespace blm
#endif
