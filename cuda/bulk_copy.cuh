// Hopper's bulk copy engine (TMA, 1-D form) into shared memory, with the mbarrier that counts its
// bytes: one thread starts a copy of any 16-byte multiple, the other threads spend no registers or
// instructions on it, and every thread of the block waits for its completion.
//
//   __shared__ uint64_t bar;                      // 8-byte aligned
//   if (threadIdx.x == 0) mbarrier_init(&bar, 1);
//   mbarrier_init_fence(); __syncthreads();       // the copy engine and the block see the init
//   if (threadIdx.x == 0) bulk_copy_to_shared(dst, src, bytes, &bar);  // arrive + expect bytes
//   mbarrier_wait(&bar, 0);                       // phase 0 completes when all bytes landed
//
// src, dst and bytes must be multiples of 16; bytes < 2^20 (the mbarrier's transaction count).
// sm_90 and later (the project builds for sm_90a); callers check the device before choosing it.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
namespace blm {
namespace cuda {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(arrivals)
               : "memory");
#endif
}

// Makes an mbarrier's initialisation visible to the copy engine (the async proxy).
__device__ __forceinline__ void mbarrier_init_fence() {
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// Arrives on bar expecting `bytes`, and starts the copy of src[0, bytes) to dst, which completes
// those bytes on bar.
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, uint32_t bytes,
                                                    uint64_t* bar) {
#if __CUDA_ARCH__ >= 900
  const uint32_t b = shared_address(bar);
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(shared_address(dst)),
      "l"(src), "r"(bytes), "r"(b)
      : "memory");
#endif
}

// Waits until the phase with parity `phase` of bar has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t phase) {
#if __CUDA_ARCH__ >= 900
  const uint32_t b = shared_address(bar);
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(b), "r"(phase)
        : "memory");
  }
#endif
}

}  // namespace cuda
}  // namespace blm
#endif  // __CUDACC__
