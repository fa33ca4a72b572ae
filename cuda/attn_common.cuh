// Pieces shared by the attention kernels (attention.cu) and the barrier kernels (barrier.cu):
// where head h's q, k, v live inside the qkv activation, the supported head sizes, and raising a
// kernel's dynamic shared-memory limit.
//
//   qkv [B, T, 3d], d = H * dh:  q of (b, t, h) at qkv[(b*T + t)*3d + h*dh + i],
//                                k at the same offset + d, v at + 2d   (i in [0, dh))
#pragma once
#include <cstddef>
#include <string>

#include <cuda_runtime.h>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/common.cuh"

namespace blm {
namespace cuda {

// Head sizes the kernels are instantiated for (they are templated on dh).
inline bool attention_head_size_supported(int dh) { return dh == 32 || dh == 64 || dh == 128; }

// Throws blm::Error naming the caller and the offending value when the shape cannot run.
inline void check_attention_shape(const AttentionShape& s, const char* who) {
  if (!attention_head_size_supported(s.dh))
    throw Error(std::string(who) + ": head size dh=" + std::to_string(s.dh) +
                " is not supported (32, 64 or 128)");
  if (s.B < 0 || s.T < 0 || s.H <= 0)
    throw Error(std::string(who) + ": bad shape B=" + std::to_string(s.B) +
                " T=" + std::to_string(s.T) + " H=" + std::to_string(s.H));
  // Grids put (b, h) on the y dimension.
  if (static_cast<long long>(s.B) * s.H > 65535)
    throw Error(std::string(who) + ": B*H=" + std::to_string(static_cast<long long>(s.B) * s.H) +
                " exceeds 65535");
}

#if defined(__CUDACC__)
// Offset of (b, t=0, head h)'s q within qkv; add t*3d for position t, d for k, 2d for v.
__device__ __forceinline__ size_t qkv_head_base(int b, int h, int T, int H, int dh) {
  return static_cast<size_t>(b) * T * 3 * H * dh + static_cast<size_t>(h) * dh;
}
#endif

}  // namespace cuda
}  // namespace blm
