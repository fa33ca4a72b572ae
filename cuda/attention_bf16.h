// Causal multi-head attention for the bf16 precision, on tensor cores.  Two implementations:
//   - default (BLM_ATTENTION unset or "flash"): the flash-style kernels of cuda/attention_flash.h,
//     reading qkv and dout and writing out and dqkv in place (no [T, T] matrix, no per-head
//     copies); workspace D [B, H, T] fp32 in the backward, none in the forward;
//   - BLM_ATTENTION=gemm: cuBLAS batched GEMMs over (sequence, head) with the [T, T] score
//     matrices materialised in a workspace (trades memory for simple, cuBLAS-only code).
// Any other BLM_ATTENTION value throws ConfigError.
// Same mathematics and the same lse as attention.h:
//
//   z_ts = q_t . k_s / sqrt(dh),  a_ts = softmax_{s<=t}(z_ts),  out_t = sum_s a_ts v_s
//   lse_t = log sum_{s<=t} exp(z_ts)
//
// Shapes: qkv [B, T, 3d] fp32 (the qkv GEMM's output, bias included; the barrier reads it too),
// out [B, T, d] bf16 (heads concatenated: the projection GEMM's input), lse [B, H, T] fp32,
// dout [B, T, d] fp32, dqkv [B, T, 3d] fp32 (written over, as attention_backward does).
// Products: bf16 operands, fp32 accumulation; scores S and their gradient dP in fp32,
// probabilities P and dz in bf16.  The backward recomputes S and P from q, k and lse.
// Deterministic (cuBLAS products and fixed-order kernels, no atomics).
#pragma once
#include <cstddef>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/attention.h"

namespace blm {
namespace cuda {

// Workspace of the forward (backward = false) or of both passes (backward = true).
size_t attention_bf16_workspace_bytes(const AttentionShape& s, bool backward);

void attention_forward_bf16(const AttentionShape& s, const float* qkv, __nv_bfloat16* out,
                            float* lse, void* workspace, cublasHandle_t blas,
                            cudaStream_t stream);

// out: the forward's output (bf16), for D_t = sum_i dout_ti out_ti.
void attention_backward_bf16(const AttentionShape& s, const float* qkv,
                             const __nv_bfloat16* out, const float* dout, const float* lse,
                             float* dqkv, void* workspace, cublasHandle_t blas,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
