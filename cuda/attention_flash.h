// Flash-style causal attention on tensor cores (mma.sync m16n8k16, bf16 operands, fp32
// accumulation; FlashAttention-2 structure), the alternative to the batched-GEMM middle of
// cuda/attention_bf16.cu: no [T, T] matrix is stored.  Selected by BLM_ATTENTION=flash (read by
// attention_bf16.cu); not yet the default: it has not been run on a GPU
// (tests/gpu/test_bf16.cpp's attention test runs it against the fp32 flash kernels).
//
// Tensors per (sequence, head) bh, row-major, as attention_bf16.cu lays them out:
//   q, k, v, o, dO [BH, T, dh] bf16;  lse, D [BH, T] fp32 (D_t = sum_i dO_ti o_ti);
//   dq, dk, dv [BH, T, dh] fp32 (written over).
// z_ts = q_t . k_s / sqrt(dh), softmax over s <= t, lse_t = log sum_{s<=t} exp(z_ts).
// Backward: one kernel over key tiles (dk, dv) and one over query tiles (dq): deterministic.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/attention.h"

namespace blm {
namespace cuda {

// BLM_ATTENTION=flash in the environment.
bool flash_attention_enabled();

void flash_attention_forward(const AttentionShape& s, const __nv_bfloat16* q,
                             const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o,
                             float* lse, cudaStream_t stream);

void flash_attention_backward(const AttentionShape& s, const __nv_bfloat16* q,
                              const __nv_bfloat16* k, const __nv_bfloat16* v,
                              const __nv_bfloat16* dO, const float* lse, const float* D,
                              float* dq, float* dk, float* dv, cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
