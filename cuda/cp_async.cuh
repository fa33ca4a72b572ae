// Ampere's asynchronous 16-byte copies from global into shared memory (cp.async.cg), as the
// barrier's tile kernels stage their rows: issue, commit a group, wait for groups.
//   cp_async16(dst, src)         copy 16 bytes
//   cp_async16(dst, src, valid)  the same, or 16 zero bytes when !valid (src must still be a
//                                valid address: pass any in-range one)
//   cp_async_commit()            close the group of the copies issued since the last commit
//   cp_async_wait<N>()           wait until at most N committed groups are still in flight
// dst and src 16-byte aligned.  A block barrier (or __syncwarp for a warp's own copies) must
// follow the wait before other threads read what landed.
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

}  // namespace cuda
}  // namespace blm
