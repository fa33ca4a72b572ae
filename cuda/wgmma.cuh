// Hopper's warpgroup tensor-core instruction (wgmma, sm_90a) as small tile primitives, TF32 for
// now: D[64 x 64] (+)= A[64 x 8] B[8 x 64] per call, A from registers, B from shared memory.
// The barrier's tile kernels run on mma.sync (cuda/mma.cuh), whose TF32 rate on the H200 is
// 320 TFLOP/s (test_gpu "[mma-rates]"); these are the building blocks for moving them to wgmma.
// tests/gpu/test_wgmma.cu checks them against a float64 product.
//
// A warpgroup is 4 consecutive warps starting at a warp index divisible by 4; every thread of
// it executes each call (the .aligned instructions).  Fragments, warp w of the warpgroup,
// lane = 4 g + c:
//   A (registers, TF32 bits): a[0] = A[16 w + g][c], a[1] = A[16 w + g + 8][c],
//     a[2] = A[16 w + g][c + 4], a[3] = A[16 w + g + 8][c + 4]  (mma.m16n8k8's A, per warp)
//   D (32 fp32 registers for N = 64): d[4 j + e], j = 0..7: e = 0, 1 at row 16 w + g, columns
//     8 j + 2 c, + 1; e = 2, 3 at row 16 w + g + 8, the same columns
//   B (shared memory, TF32 bits, "K-major": for each n its k values are contiguous), in core
//     matrices of 8 n by 4 k (8 rows of 16 bytes, 128 contiguous bytes).  The layout used here
//     for a [K][64] tile: word offset(k, n) = (k / 4) * 256 + 4 n + k % 4, i.e. K / 4 slabs of
//     [64 n][4 k]; a k-step of 8 starts at slab 2 ks, its two core matrices along K are 1024 bytes
//     apart (the descriptor's leading byte offset) and those along N 128 bytes apart (the stride
//     byte offset).
//
// Ordering rules (PTX ISA, wgmma): B written by ordinary stores needs
// fence.proxy.async.shared::cta in the writing threads before the barrier that precedes the
// wgmma; wgmma_fence() before the first wgmma that reads registers written by other
// instructions; results are read only after wgmma_commit() and wgmma_wait<0>().  tie() keeps
// the compiler from moving accumulator accesses across these points.
#pragma once
#include <cstdint>

namespace blm {
namespace cuda {

// Word offset of element (k, n) in the [K][64] K-major tile layout above.
__host__ __device__ constexpr int wgmma_b_offset(int k, int n) { return (k / 4) * 256 + 4 * n + k % 4; }

// Shared-memory matrix descriptor, no swizzle: start address, leading (K) and stride (M/N)
// byte offsets between core matrices, each stored >> 4 in 14 bits.
__device__ __forceinline__ uint64_t wgmma_descriptor(const void* smem, uint32_t leading_bytes,
                                                     uint32_t stride_bytes) {
  const uint64_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return ((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((leading_bytes & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((stride_bytes & 0x3FFFF) >> 4) << 32);
}

// The descriptor of k-step ks (k = 8 ks .. 8 ks + 7) of a [K][64] tile at `tile`.
__device__ __forceinline__ uint64_t wgmma_b_descriptor(const uint32_t* tile, int ks) {
  return wgmma_descriptor(tile + 2 * ks * 256, 1024, 128);
}

__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// An empty asm that "reads and writes" each register: no access to them moves across it, and
// they stay live (so not reused) up to it.  After wgmma_wait, on the accumulators and on the A
// fragments of the waited-for wgmmas (both are read asynchronously until then).
template <int R>
__device__ __forceinline__ void tie(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int R>
__device__ __forceinline__ void tie(uint32_t (&a)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

// d = a b (accumulate false) or d += a b: one m64n64k8 TF32 step, A from registers.
__device__ __forceinline__ void wgmma_tf32_m64n64k8(float (&d)[32], const uint32_t (&a)[4],
                                                    uint64_t b_desc, bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate ? 1 : 0));
#else
  __trap();
#endif
}

}  // namespace cuda
}  // namespace blm
