// Causal attention of the bf16 precision through cuDNN's fused flash-attention engines (cuDNN v9
// backend graph API; selected by BLM_ATTENTION=cudnn).  Same mathematics and the same lse as
// cuda/attention_bf16.h:
//
//   z_ts = q_t . k_s / sqrt(dh),  a_ts = softmax_{s<=t}(z_ts),  out_t = sum_s a_ts v_s
//   lse_t = log sum_{s<=t} exp(z_ts)                               (natural log, fp32)
//
// Two levels:
//   - cudnn_sdpa_forward / cudnn_sdpa_backward: the cuDNN graphs alone, on bf16 tensors.  Strided
//     tensor descriptors read head h's q, k, v straight out of the fused qkv [B, T, 3d] (columns
//     h*dh, d + h*dh, 2d + h*dh) and write out [B, T, d], lse [B, H, T] and dqkv [B, T, 3d] in
//     place: no layout kernels.
//   - cudnn_attention_forward / cudnn_attention_backward: the interface of attention_*_bf16 (fp32
//     qkv, dout and dqkv, as the backend holds them): round qkv (and dout) to bf16 into the
//     workspace, run the graphs, widen dqkv to fp32.  Those three elementwise passes are the price
//     of the backend keeping qkv and dqkv in fp32.
//
// Each graph (per shape, per direction) is built once, its execution plan chosen from cuDNN's
// heuristics (the first that finalizes; with `deterministic`, the first whose engine carries no
// non-determinism note) and cached with its workspace size, per device.  The backward's
// deterministic graph writes dQ directly (cuDNN then uses its dP-workspace algorithm, no atomics);
// the non-deterministic one accumulates dQ in fp32 through a workspace tensor (faster, atomics:
// only for the benchmark).  Backend errors throw blm::DeviceError naming the call and the status.
//
// Built without cuDNN (BLM_HAVE_CUDNN undefined) every entry point but the availability queries
// throws DeviceError("... not available").
#pragma once
#include <cstddef>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/attention.h"

namespace blm {
namespace cuda {

// True when this build has cuDNN and a cuDNN 9 library loads and gives a handle on the current
// device; otherwise cudnn_attention_unavailable_reason() says why (one line).
bool cudnn_attention_available();
std::string cudnn_attention_unavailable_reason();
// "cuDNN 91400 loaded, built against 91900" (or "no cuDNN in this build"): for logs and benches.
std::string cudnn_attention_version();

// The head sizes the wrapper accepts: 32, 64, 128 (as the other attention paths).  Others throw
// ConfigError naming the value.
bool cudnn_attention_head_size_supported(int dh);

// ------------------------------------------------------------------ bf16 level (cuDNN only)

// Workspace of cudnn_sdpa_forward / cudnn_sdpa_backward: the plan's scratch, plus for the
// backward the softmax_sum tensor [B, H, T] fp32 (and dQ_accum [B, H, T, dh] fp32 when not
// deterministic).  Builds (and caches) the graph on first use: needs the device.
size_t cudnn_sdpa_workspace_bytes(const AttentionShape& s, bool backward, bool deterministic = true);

// qkv [B, T, 3d] bf16, out [B, T, d] bf16, lse [B, H, T] fp32; 16-byte aligned device pointers.
void cudnn_sdpa_forward(const AttentionShape& s, const __nv_bfloat16* qkv, __nv_bfloat16* out,
                        float* lse, void* workspace, cudaStream_t stream);

// out, lse: the forward's; dout [B, T, d] bf16; dqkv [B, T, 3d] bf16, all three blocks written.
void cudnn_sdpa_backward(const AttentionShape& s, const __nv_bfloat16* qkv,
                         const __nv_bfloat16* out, const __nv_bfloat16* dout, const float* lse,
                         __nv_bfloat16* dqkv, void* workspace, cudaStream_t stream,
                         bool deterministic = true);

// ------------------------------------------------------------------ fp32 interface (the backend's)

// Workspace of cudnn_attention_forward (backward = false) or of both (backward = true): the bf16
// copies (qkv; and dout, dqkv for the backward) plus cudnn_sdpa_workspace_bytes.
size_t cudnn_attention_workspace_bytes(const AttentionShape& s, bool backward);

// As attention_forward_bf16: qkv [B, T, 3d] fp32, out [B, T, d] bf16, lse [B, H, T] fp32.
void cudnn_attention_forward(const AttentionShape& s, const float* qkv, __nv_bfloat16* out,
                             float* lse, void* workspace, cudaStream_t stream);

// As attention_backward_bf16: dout [B, T, d] fp32, dqkv [B, T, 3d] fp32 written over (=).
// Deterministic (two runs give the same bits).
void cudnn_attention_backward(const AttentionShape& s, const float* qkv, const __nv_bfloat16* out,
                              const float* dout, const float* lse, float* dqkv, void* workspace,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
