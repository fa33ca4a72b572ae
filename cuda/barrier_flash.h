// The barrier of ../shared/docs/barrier-spec.md (sections 2-4) as flash-style kernels: the
// default for precision bf16 (BLM_BARRIER=flash; barrier_forward_flash, barrier_backward_flash), behind the same contract as barrier_forward /
// barrier_backward in cuda/attention.h (logdet and phi [B, H, T]; dq, dk added into dqkv).
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
// on TF32 tensor cores, and only the causal tiles are visited.
//
// The training forward keeps what the backward needs ("saved": G, U, W, E, the row term and the
// softmax statistics, barrier_flash_saved_bytes per call) so the backward does not redo the
// forward; with saved == nullptr the backward recomputes it (half the memory, about twice the
// barrier's forward time).  The backend decides by BLM_BARRIER_SAVE (cuda/cuda_backend.cu).
//
// Head sizes 32 and 64 (barrier_flash_supported); the backend uses barrier_tc for 128.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "cuda/attention.h"

namespace blm {
namespace cuda {

bool barrier_flash_supported(int dh);

// Scratch of one call (forward or backward) on s with at most kmax counted positions per sequence;
// saved_elsewhere: the caller passes a `saved` buffer (else the scratch has room for its content).
size_t barrier_flash_workspace_bytes(const AttentionShape& s, int kmax, bool saved_elsewhere);
// What the training forward keeps for the backward of the same call.
size_t barrier_flash_saved_bytes(const AttentionShape& s, int kmax);

// logdet, phi [B, H, T] (0 at uncounted positions).  mask: device [B, T] or nullptr (exact);
// kmax as in cuda/barrier_tc.h (the backend passes it from the host mask).  saved != nullptr:
// also the inverse, into saved (barrier_flash_saved_bytes(s, kmax) bytes).
void barrier_forward_flash(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                           int kmax, double eps, float* logdet, float* phi, void* saved,
                           void* workspace, cudaStream_t stream);

// dqkv += scale * (dq, dk of the barrier).  saved: what barrier_forward_flash kept for the same
// qkv, mask and kmax, or nullptr (recomputed here).
void barrier_backward_flash(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                            int kmax, double eps, float scale, float* dqkv, const void* saved,
                            void* workspace, cublasHandle_t blas, cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
