// Flash-style causal attention on tensor cores (mma.sync m16n8k16, bf16 operands, fp32
// accumulation; FlashAttention-2 structure): the default middle of the bf16 precision's attention
// (cuda/attention_bf16.h).  No [T, T] matrix is stored, and no per-head copies of q, k, v, o or
// their gradients: the kernels read the fp32 qkv [B, T, 3d] and dout [B, T, d] the backend
// holds, rounding to bf16 as they stage tiles into shared memory, and write out [B, T, d] bf16
// and dqkv [B, T, 3d] fp32 directly.  BLM_ATTENTION=gemm selects the batched-GEMM path instead.
//
//   z_ts = q_t . k_s / sqrt(dh),  softmax over s <= t,  lse_t = log sum_{s<=t} exp(z_ts)
//   out_t = sum_s softmax(z)_ts v_s;   D_t = sum_i dout_ti out_ti (out as stored, in bf16)
//
// Shapes (row-major, device pointers, 16-byte aligned; dh in {32, 64, 128}):
//   qkv [B, T, 3d] fp32 or bf16 (head h's q, k, v: columns h*dh + [0, dh) of the blocks 0, d,
//   2d)
//   out [B, T, d] bf16 (heads concatenated);  lse, D [B, H, T] fp32;  dout [B, T, d] fp32;
//   dqkv [B, T, 3d] fp32: all three blocks written over (=, not +=), as attention_backward.
// Backward: one kernel over query tiles (dq, and D for the other), then one over key tiles
// (dk, dv): no atomics, deterministic.
#pragma once
#include <cstddef>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/attention.h"

namespace blm {
namespace cuda {

// The bf16 attention path from BLM_ATTENTION: unset, empty or "flash" -> true (these kernels);
// "gemm" -> false (cuBLAS batched GEMMs, cuda/attention_bf16.cu).  Any other value throws
// ConfigError naming the variable and the value.
bool flash_attention_enabled();

// The backward's scratch: D [B, H, T] fp32.
size_t flash_attention_workspace_bytes(const AttentionShape& s);

// qkv fp32 (rounded to bf16 as tiles are staged) or bf16 (the same kernels, half the reads).
void flash_attention_forward(const AttentionShape& s, const float* qkv, __nv_bfloat16* out,
                             float* lse, cudaStream_t stream);
void flash_attention_forward(const AttentionShape& s, const __nv_bfloat16* qkv,
                             __nv_bfloat16* out, float* lse, cudaStream_t stream);

// out, lse: the forward's.  workspace: flash_attention_workspace_bytes(s) bytes.
void flash_attention_backward(const AttentionShape& s, const float* qkv,
                              const __nv_bfloat16* out, const float* dout, const float* lse,
                              float* dqkv, void* workspace, cudaStream_t stream);
void flash_attention_backward(const AttentionShape& s, const __nv_bfloat16* qkv,
                              const __nv_bfloat16* out, const float* dout, const float* lse,
                              float* dqkv, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
