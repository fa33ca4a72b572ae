// Ampere's asynchronous 16-byte copies from global into shared memory (cp.async.cg), as the
// barrier's tile kernels stage their rows: issue, commit a group, wait for groups.
//   cp_async16(dst, src)         copy 16 bytes
//   cp_async16(dst, src, valid)  the same, or 16 zero bytes when !valid (src must still be a
//                                valid address: pass any in-range one)
//   cp_async_commit()            close the group of the copies issued since the last commit
//   cp_async_wait<N>()           wait until at most N committed groups are still in flight
// dst and src 16-byte aligned.  A block barrier (or __syncwarp for a warp's own copies) must
// follow the wait before other threads read what landed.
//   for_each_strided<kCount, kThreads>(f)  f(idx) for this thread's share of idx < kCount
#pragma once
#include <cstdint>

namespace blm {
namespace cuda {

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// f(idx) for idx = threadIdx.x + j kThreads < kCount, j = 0, 1, ...: a block of kThreads threads
// shares kCount pieces of work (16-byte copies, as a rule).  The same indices as
// `for (idx = threadIdx.x; idx < kCount; idx += kThreads)`, but with the trip count known to the
// compiler, which cannot bound threadIdx.x: that loop compiles to an unrolled body, a remainder
// loop and their 64-bit address arithmetic (about 340 instructions per slot in the barrier's
// backward tiles, where one G copy is 4 pieces per thread; SASS, 2026-11-29).
template <int kCount, int kThreads, class F>
__device__ __forceinline__ void for_each_strided(F&& f) {
#pragma unroll
  for (int j = 0; j < (kCount + kThreads - 1) / kThreads; ++j) {
    const int idx = static_cast<int>(threadIdx.x) + j * kThreads;
    if (kCount % kThreads == 0 || idx < kCount) f(idx);
  }
}

}  // namespace cuda
}  // namespace blm
