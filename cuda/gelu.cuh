// GELU with the tanh approximation (the model's activation), on the device, in fp32:
//   gelu(x)  = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)
//   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// evaluated through the exact identities 0.5 (1 + tanh(u)) = s = 1 / (1 + exp(-2u)) and
// 1 - tanh(u)^2 = 4 s (1 - s), 1 - s = exp(-2u) s: one 2^y and one reciprocal per element on
// the special-function unit (about 2 ulp each), with no cancellation; tanhf costs several times
// more.  The GELU passes are bandwidth passes whose arithmetic showed: 26 fp32 operations and an
// IEEE division per element before this form, about 14 and two MUFU operations now.
// Every GELU kernel (elementwise.cu's forward, reduce.cu's backward and the backward that
// recomputes the forward's output for BLM_RECOMPUTE=gelu) calls these two functions, so the
// recomputed bf16 output has the forward's bits: keep it one definition.
#pragma once
#if defined(__CUDACC__)
namespace blm {
namespace cuda {

constexpr float kGeluK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluK1 = 0.044715f;
// -2 sqrt(2/pi) log2(e): exp(-2u) = 2^(x (1 + k1 x^2) * this), one multiply before MUFU.EX2.
constexpr float kGeluNeg2K0Log2e = -2.0f * 0.7978845608028654f * 1.4426950408889634f;
// The exponent's cap, 88 / ln 2 in base 2: exp(88) < FLT_MAX, so 1 + e stays finite.
constexpr float kGeluMaxExp2 = 88.0f * 1.4426950408889634f;

// 2^y and 1 / y on the special-function unit (MUFU.EX2, MUFU.RCP; about 2 ulp, subnormal
// results flushed to zero): one instruction each, where exp2f / the IEEE division add range
// handling and Newton steps that a bf16 result, or gelu's fp32 tolerance, does not need.
__device__ __forceinline__ float ex2_approx(float y) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}
__device__ __forceinline__ float rcp_approx(float y) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}

// s = 0.5 (1 + tanh(u)) = 1 / (1 + e),  e = exp(-2u);  one_minus_s = 1 - s = e s.
// For x below about -10.5, 1 + e exceeds 2^126 and s flushes to 0 (the true value is below
// 1e-38): gelu and gelu' are then 0, far below the fp32 resolution of what they are added to.
// Explicit roundings (__fmul_rn, fmaf): every kernel gets these exact operations, so gelu()'s
// bits do not depend on how the compiler contracts the surrounding code.
__device__ __forceinline__ float gelu_sigmoid(float x, float& one_minus_s) {
  const float t = fmaf(kGeluK1, __fmul_rn(x, x), 1.0f);  // 1 + k1 x^2
  const float y = fminf(__fmul_rn(__fmul_rn(x, t), kGeluNeg2K0Log2e), kGeluMaxExp2);
  const float e = ex2_approx(y);
  const float s = rcp_approx(__fadd_rn(1.0f, e));
  one_minus_s = __fmul_rn(e, s);
  return s;
}

// gelu(x), and gelu'(x) into grad, from one sigmoid (the recomputing backward needs both):
// gelu'(x) = s + 0.5 x (1 - tanh^2) k0 (1 + 3 k1 x^2) = s + 2 k0 (x s)(1 - s)(1 + 3 k1 x^2).
__device__ __forceinline__ float gelu_and_grad(float x, float& grad) {
  float oms;
  const float s = gelu_sigmoid(x, oms);
  const float xs = __fmul_rn(x, s);  // gelu(x)
  grad = fmaf(__fmul_rn(__fmul_rn(xs, oms), 2.0f * kGeluK0),
              fmaf(3.0f * kGeluK1, __fmul_rn(x, x), 1.0f), s);
  return xs;
}

__device__ __forceinline__ float gelu(float x) {
  float oms;
  return __fmul_rn(x, gelu_sigmoid(x, oms));
}

__device__ __forceinline__ float gelu_grad(float x) {
  float grad;
  gelu_and_grad(x, grad);
  return grad;
}

}  // namespace cuda
}  // namespace blm
#endif
