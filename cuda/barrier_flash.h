// The barrier of ../shared/docs/barrier-spec.md (sections 2-4) as flash-style kernels: the
// default for precision bf16 (BLM_BARRIER=flash).  Outputs as barrier_forward / barrier_backward
// in cuda/attention.h (logdet and phi [B, H, T]; dq, dk of the barrier), but training takes one
// call (below) instead of a forward and a backward.
//
// Per (sequence, head), with the notation of cuda/barrier_tc.h (counted slots k = 0..K-1 of the
// positions t = rows[k], q~, k~ centred):
//   forward   the attention logits are recomputed tile by tile on tensor cores; the strict causal
//             softmax pi lives only in registers (its row max m and sum l are kept), and
//             S = sum_s pi_ks q~_s k~_s^T, qbar, kbar are accumulated in the same tiles
//             (cuda/barrier_fused_s.cuh); then one linear-algebra kernel per position gives
//             log det J_t, phi and, when training, G = coef J^{-T} and the vectors the backward
//             needs (cuda/barrier_tc_linalg.h).
//   backward  pi is recomputed in tiles from m, l; the bilinear forms g_ks, dz = pi (g - pi.g)
//             and the direct terms sum_k pi_ks G_k k~_s, sum_k pi_ks G_k^T q~_s are accumulated
//             per key tile (cuda/barrier_flash_bwd.cuh); dz k~ is one batched product.
// No [K, T] or [T, dh^2] matrix is ever stored.  The work is O(K T dh^2) per (sequence, head)
// on tensor cores (TF32 in the forward, bf16 operands in the backward's products by default),
// and only the causal tiles are visited.
//
// Two calls.  Training: barrier_forward_backward_flash, the forward and the backward together
// during the model's forward, leaving only dq, dk ([B, T, 2 d], added into the attention's
// gradient in the model's backward).  Evaluation and margins: barrier_forward_flash, log det
// and phi through an LU (no inverse).
//
// Head sizes 32 and 64 (barrier_flash_supported); the backend uses barrier_tc for 128.
//
// Notation shared by the pipeline's kernels (cuda/barrier_fused_s.cuh, barrier_tc_linalg.h,
// barrier_flash_bwd.cuh); per sequence b and head h, bh = b H + h, D = dh, c = 1/sqrt(D), K counted
// slots per sequence, rows[b, k] = the position t of slot k (increasing; -1 = padding), kof[b, t]
// = the slot of t or -1; fp32, row-major:
//   Qg [BH, K, D]      raw q_t of the counted rows;  Qc, Kc [BH, T, D]  q, k centred over t
//   z_ks = Qg_k . Kc_s (the attention logit up to a per-row constant: the same softmax)
//   m[bh, k] = max_{s<t} c z_ks,  l[bh, k] = sum_{s<t} exp(c z_ks - m),
//   pi_ks = exp(c z_ks - m) / l
//   S [BH, K, D*D] = sum_{s<t} pi_ks Qc_s Kc_s^T;  Qb, Kb [BH, K, D] = sum_s pi_ks Qc_s, Kc_s
//   J_k = I - c (S_k - Qb_k Kb_k^T) (the spec's J_t = I - C_t), logdet, phi per (bh, t)
//   G [BH, K, D*D] = scale coef_k J_k^{-T} (coef = -phi'(det) det; dL/dC_t of spec section 4)
//   U = G^T Qb, W = G Kb [BH, K, D],  E = U . Kb,  rowterm = sum_s pi_ks g_ks = c (<G, S> - E)
//   g_ks = c (Qc_s - Qb_k)^T G_k (Kc_s - Kb_k),  dz_ks = pi_ks (g_ks - rowterm_k)  (s < t)
//   dq_s += c (sum_{k: t_k > s} pi_ks (G_k Kc_s - W_k) + [s counted] sum_s' dz_{kof(s), s'} Kc_s')
//   dk_s += c sum_{k: t_k > s} [pi_ks (G_k^T Qc_s - U_k) + dz_ks Qg_k]
#pragma once
#include <cstddef>
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/attention.h"

namespace blm {
namespace cuda {

bool barrier_flash_supported(int dh);

// Scratch of one call of either function on s with at most kmax counted positions per sequence.
size_t barrier_flash_workspace_bytes(const AttentionShape& s, int kmax);

// logdet, phi [B, H, T] (0 at uncounted positions), no gradient.  mask: device [B, T] or nullptr
// (exact); kmax as in cuda/barrier_tc.h (the backend passes it from the host mask).
// qkv_copy: nullptr, or [B, T, 3 H dh] that receives bf16(qkv) (the attention's input), formed
// in the pass that reads qkv for its means anyway (both calls).
void barrier_forward_flash(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                           int kmax, double eps, float* logdet, float* phi, void* workspace,
                           cudaStream_t stream, __nv_bfloat16* qkv_copy = nullptr);

// Training in one call (the barrier's gradient does not depend on the loss's upstream gradient,
// so it can be finished in the forward): logdet, phi as barrier_forward_flash, and
// dqk [B, T, 2 H dh] = scale * (dq, dk of the barrier), written (q in columns [0, H dh), k in
// [H dh, 2 H dh)); dqk 16-byte aligned.  G and the other per-position state live in the
// workspace (barrier_flash_workspace_bytes(s, kmax)) for this call only: nothing is kept from
// the forward to the backward but dqk, and the centred q, k are formed once.  log det comes from
// the Gauss-Jordan inverse here and from an LU in barrier_forward_flash: equal within rounding,
// not bit for bit.
void barrier_forward_backward_flash(const AttentionShape& s, const float* qkv,
                                    const uint8_t* mask, int kmax, double eps, float scale,
                                    float* logdet, float* phi, float* dqk, void* workspace,
                                    cublasHandle_t blas, cudaStream_t stream,
                                    __nv_bfloat16* qkv_copy = nullptr);
// The same with dqk in bf16 (the bf16 precision, whose backward rounds the sum with the
// attention's gradient to bf16 anyway; half the memory and traffic): every element is the fp32
// call's value rounded to nearest even, except dq at the counted positions' rows, rounded twice
// (the tiles' part, then that plus scale (dz k~)_k computed in fp32: off by at most half a bf16
// ulp of the part plus half a bf16 ulp of the sum).  dqk 16-byte aligned.
void barrier_forward_backward_flash(const AttentionShape& s, const float* qkv,
                                    const uint8_t* mask, int kmax, double eps, float scale,
                                    float* logdet, float* phi, __nv_bfloat16* dqk,
                                    void* workspace, cublasHandle_t blas, cudaStream_t stream,
                                    __nv_bfloat16* qkv_copy = nullptr);

// The same two calls on a bf16 qkv (the bf16 precision's attention input, BLM_BARRIER_QKV=bf16):
// the barrier of float(qkv), every output bit for bit what the fp32 calls give on the widened
// values; nothing to copy.
void barrier_forward_flash(const AttentionShape& s, const __nv_bfloat16* qkv,
                           const uint8_t* mask, int kmax, double eps, float* logdet, float* phi,
                           void* workspace, cudaStream_t stream);
void barrier_forward_backward_flash(const AttentionShape& s, const __nv_bfloat16* qkv,
                                    const uint8_t* mask, int kmax, double eps, float scale,
                                    float* logdet, float* phi, __nv_bfloat16* dqk,
                                    void* workspace, cublasHandle_t blas, cudaStream_t stream);

// dqkv[n, 0:2 d] += dqk[n, 0:2 d] for the rows n < rows of [rows, 3 d] dqkv and [rows, 2 d] dqk
// (both 16-byte aligned, d even): the fp32 backward's use of barrier_forward_backward_flash's
// result (the bf16 backward folds its bf16 dqk into column_sum_convert_accumulate or
// column_sum_add_accumulate, cuda/kernels.h).
void barrier_flash_add_gradient(const float* dqk, int64_t rows, int d, float* dqkv,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
