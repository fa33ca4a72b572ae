// 16-byte vector loads and stores of fp32 / bf16 tensors, widened to (narrowed from) float
// registers, shared by the bandwidth-bound kernels (elementwise, LayerNorm, cross-entropy,
// column sums, AdamW).
//
// A vector of K elements is moved with K*sizeof(T)/16 16-byte transactions when K is a multiple
// of 16/sizeof(T) (4 floats, 8 bf16), else element by element (K = 1: the scalar fallback used for
// unaligned pointers, row lengths that are not a multiple of the vector width, and tails).
// The caller guarantees 16-byte alignment of p whenever K > 1 (host side: aligned16()).  bf16
// loads and stores of K = 4 use one 8-byte access (AdamW's bf16 weight copy, the LayerNorm
// backward's bf16 dy: bf16 data next to float4 fp32 math).
#pragma once
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace blm {
namespace cuda {

// Elements of T in one 16-byte vector: 4 floats, 8 bf16.
template <class T>
constexpr int kVecWidth = static_cast<int>(16 / sizeof(T));

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

#if defined(__CUDACC__)

template <int K>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[K]) {
  if constexpr (K % 4 == 0) {
#pragma unroll
    for (int j = 0; j < K / 4; ++j) {
      const float4 t = reinterpret_cast<const float4*>(p)[j];
      v[4 * j] = t.x;
      v[4 * j + 1] = t.y;
      v[4 * j + 2] = t.z;
      v[4 * j + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = p[j];
  }
}

// N 32-bit words of packed bf16 pairs widened to 2 N floats: out[2 q], out[2 q + 1] from word q.
template <int N>
__device__ __forceinline__ void widen_bf16_pairs(const uint32_t (&w)[N], float* out) {
#pragma unroll
  for (int q = 0; q < N; ++q) {
    __nv_bfloat162 h;
    memcpy(&h, &w[q], 4);
    const float2 f = __bfloat1622float2(h);
    out[2 * q] = f.x;
    out[2 * q + 1] = f.y;
  }
}

// The 2 N bf16 at p (16-byte aligned for N = 4, 8-byte for N = 2) as N packed words, one load.
template <int N>
__device__ __forceinline__ void load_bf16_pairs(const __nv_bfloat16* p, uint32_t (&w)[N]) {
  static_assert(N == 2 || N == 4, "one 8- or 16-byte load");
  if constexpr (N == 4) {
    const uint4 t = *reinterpret_cast<const uint4*>(p);
    w[0] = t.x, w[1] = t.y, w[2] = t.z, w[3] = t.w;
  } else {
    const uint2 t = *reinterpret_cast<const uint2*>(p);
    w[0] = t.x, w[1] = t.y;
  }
}

template <int K>
__device__ __forceinline__ void load_vec(const __nv_bfloat16* p, float (&v)[K]) {
  // 16-byte loads, or 8-byte ones (an fp32 kernel's 4-wide vectors over bf16 data).
  constexpr int kWords = K % 8 == 0 ? 4 : 2;
  if constexpr (K % 4 == 0) {
#pragma unroll
    for (int j = 0; j < K / (2 * kWords); ++j) {
      uint32_t w[kWords];
      load_bf16_pairs(p + 2 * kWords * j, w);
      widen_bf16_pairs(w, v + 2 * kWords * j);
    }
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = __bfloat162float(p[j]);
  }
}

template <int K>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[K]) {
  if constexpr (K % 4 == 0) {
#pragma unroll
    for (int j = 0; j < K / 4; ++j)
      reinterpret_cast<float4*>(p)[j] =
          make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) p[j] = v[j];
  }
}

// Rounds to nearest even (as __float2bfloat16_rn, which the scalar path uses).
template <int K>
__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const float (&v)[K]) {
  if constexpr (K % 8 == 0) {
#pragma unroll
    for (int j = 0; j < K / 8; ++j) {
      uint32_t w[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(v[8 * j + 2 * q], v[8 * j + 2 * q + 1]);
        memcpy(&w[q], &h, 4);
      }
      reinterpret_cast<uint4*>(p)[j] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else if constexpr (K % 4 == 0) {  // 8-byte stores (4 bf16; p 8-byte aligned)
#pragma unroll
    for (int j = 0; j < K / 4; ++j) {
      uint32_t w[2];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(v[4 * j + 2 * q], v[4 * j + 2 * q + 1]);
        memcpy(&w[q], &h, 4);
      }
      reinterpret_cast<uint2*>(p)[j] = make_uint2(w[0], w[1]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) p[j] = __float2bfloat16_rn(v[j]);
  }
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace blm
