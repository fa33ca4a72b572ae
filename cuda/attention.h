// Causal multi-head attention and the barrier on the GPU: the interface between the CUDA backend
// (cuda_backend.cu) and the attention/barrier kernels (attention.cu, barrier.cu).
//
// Tensors are device pointers, row-major, fp32 (bf16 variants come later):
//   qkv  [B, T, 3d]   the qkv projection output (bias included); head j's q, k, v are columns
//                     [j*dh, (j+1)*dh) of the blocks [0,d), [d,2d), [2d,3d)
//   out  [B, T, d]    attention output before the output projection, heads concatenated
//   lse  [B, H, T]    row log-sum-exp of the causal logits (s <= t), saved by the forward
// All launches go on `stream`; every launch is checked.  No T x T matrix is stored.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace blm {
namespace cuda {

struct AttentionShape {
  int B, T, H, dh;  // d = H * dh
};

// Flash-style causal attention (softmax over s <= t of q_t.k_s/sqrt(dh)).
void attention_forward(const AttentionShape& s, const float* qkv, float* out, float* lse,
                       cudaStream_t stream);
// Writes dqkv [B, T, 3d] (all three blocks, overwriting) from dout [B, T, d].  Recomputes the
// probabilities from qkv and lse.  `workspace` holds attention_workspace_bytes(s) bytes.
void attention_backward(const AttentionShape& s, const float* qkv, const float* out,
                        const float* dout, const float* lse, float* dqkv, void* workspace,
                        cudaStream_t stream);
size_t attention_workspace_bytes(const AttentionShape& s);

// The barrier of ../shared/docs/barrier-spec.md for one layer, every sequence and head.
//   mask      [B, T] or null: position t counts when t >= 2 and (mask null or mask[b*T+t])
//   eps       phi's switch point
// Forward writes, per (b, h, t): logdet [B, H, T] (log det J_t, -inf when det <= 0; 0 for
// uncounted t) and phi [B, H, T] (phi(det J_t) for counted t, else 0).  The caller reduces phi
// (deterministically) to the sum.  `workspace` holds barrier_workspace_bytes(s) bytes.
void barrier_forward(const AttentionShape& s, const float* qkv, const uint8_t* mask, double eps,
                     float* logdet, float* phi, void* workspace, cudaStream_t stream);
// Adds scale * d(sum of counted phi)/dq and /dk into the q and k blocks of dqkv [B, T, 3d].
void barrier_backward(const AttentionShape& s, const float* qkv, const uint8_t* mask, double eps,
                      float scale, float* dqkv, void* workspace, cudaStream_t stream);
size_t barrier_workspace_bytes(const AttentionShape& s);

// The counted positions per sequence that a barrier call taking at most kmax of them works on:
// kmax clamped to [0, T - 2] (positions 0 and 1 have no determinant to count).
inline int barrier_slots(const AttentionShape& s, int kmax) {
  const int exact = s.T > 2 ? s.T - 2 : 0;
  return kmax < 0 ? 0 : kmax < exact ? kmax : exact;
}
// logdet = phi = 0 at every (b, h, t), [B, H, T] each: what uncounted positions report; the first
// step of the matrix-product and flash forwards (cuda/barrier_tc.h, cuda/barrier_flash.h).
void barrier_zero_outputs(const AttentionShape& s, float* logdet, float* phi, cudaStream_t stream);

// J_t = I - C_t for every (b, h, t), [B, H, T, dh, dh] (identity for t < 2), for margins.
void barrier_jacobians(const AttentionShape& s, const float* qkv, float* jac, cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
