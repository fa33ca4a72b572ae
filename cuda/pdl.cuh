// Programmatic dependent launch (PDL, Hopper and later): hiding the gap between two kernels of
// one stream.
//
// A kernel launched with launch_pdl() may be scheduled onto the SMs before the kernel ahead of it
// in the stream has finished: its blocks start, then wait in pdl_wait() until that kernel has
// completed and its memory writes are visible.  What this saves is the launch and block-dispatch
// latency between two short memory-bound kernels (a few microseconds each, hundreds of times per
// training step); nothing runs out of order.
//
// The contract, for every kernel launched through launch_pdl():
//   - it calls pdl_wait() before its first access to global memory (read or write: the kernel
//     ahead may still be reading what this one overwrites);
//   - it may call pdl_launch_dependents() at any point; the next PDL kernel is then scheduled once
//     every block of this one has called it or exited (a hint, never a memory fence).
// Launched normally (or with BLM_PDL=0), both calls do nothing.  cuBLAS and cuDNN kernels are
// launched by their libraries, normally; a PDL kernel after one of them simply waits for it.
// Stream capture turns the attribute into a programmatic edge of the CUDA graph.
#pragma once
#include <utility>

#include <cuda_runtime.h>

#include "cuda/common.cuh"

namespace blm {
namespace cuda {

// BLM_PDL (default 1): launch the memory-bound kernels with programmatic dependent launch.
// Read once per process.
bool pdl_enabled();

#ifdef __CUDACC__
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when pdl_enabled().
// Followed by BLM_CHECK_LAUNCH at the call site, like any launch.
template <class... Params, class... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = pdl_enabled() ? 1 : 0;
  config.attrs = attribute;
  config.numAttrs = 1;
  const cudaError_t e =
      cudaLaunchKernelEx(&config, kernel, static_cast<Params>(std::forward<Args>(args))...);
  if (e != cudaSuccess) throw_cuda_error(e, "cudaLaunchKernelEx", __FILE__, __LINE__);
}
#endif

}  // namespace cuda
}  // namespace blm
