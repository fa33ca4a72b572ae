// The barrier of ../shared/docs/barrier-spec.md (sections 2-4) as batched matrix products (cuBLAS,
// optionally on TF32 tensor cores), the alternative to cuda/barrier.cu's per-position kernels
// behind the same contract as barrier_forward / barrier_backward in cuda/attention.h (same
// inputs, same outputs: logdet and phi [B, H, T]; dq, dk added into dqkv).
//
// Selected by the environment variable BLM_BARRIER: "flash" (cuda/barrier_flash.h), "tc" (TF32
// products), "gemm" (fp32 products, no TF32), "kernels" (cuda/barrier.cu); any other value is
// refused.  Unset, the CUDA backend picks "flash" for precision bf16 (head sizes 32, 64; "tc" for
// 128) and "kernels" for fp32.  tests/gpu/test_barrier_tc.cpp
// compares it with cuda/barrier.cu.
// Opt-in: BLM_BARRIER_FUSED_S=1 (read once per call; "0", empty or unset: off; other values are
// refused) computes S = pi P with the fused tensor-core kernel of cuda/barrier_fused_s.cuh
// (P never stored) when the products are TF32 and dh is 32 or 64; otherwise it has no effect.
//
// The decomposition, per (sequence b, head h), with c = 1/sqrt(dh), q~ = q - mean_s q and
// k~ = k - mean_s k (C_t is invariant to a common shift of all q_s or all k_s, and the shift
// removes the common component that makes the uncentred form lose digits) and
// P_s = vec(q~_s k~_s^T) [dh^2].  Only the counted positions are computed: per sequence the list
// rows[b][0..K) of its counted t (t >= 2 and in the mask), padded to K = kmax, the largest count
// of one sequence, with rows that count nothing (zero pi row, zero G).  Index k below is a slot
// of that list (t = rows[b][k]); s runs over all T positions:
//   pi    [K, T]     strict causal softmax of c q_t . k~_s over s < t
//   qbar~ = pi q~,  kbar~ = pi k~,  S = pi P [K, dh^2]
//   C_t   = c (S_k - qbar~_k kbar~_k^T),  J_t = I - C_t  -> LU: log det J_t, phi
// backward, with G_t = scale (-phi'(delta) delta) J_t^{-T} (zero for padding), Gv = vec(G):
//   u_k = G^T qbar~_k,  w_k = G kbar~_k,  e_k = u_k . kbar~_k
//   g    = c (Gv P^T - u k~^T - w q~^T + e 1^T)  [K, T] (used for s < t only)
//   dz_ks = pi_ks (g_ks - sum_r pi_kr g_kr)
//   dq_t += c (dz k~)_k for counted t = rows[k];
//   dq_s += c (M_s k~_s - (pi^T w)_s),   dk_s += c ((dz^T q)_s + M_s^T q~_s - (pi^T u)_s)
//   with M_s = sum_k pi_ks G_k, i.e. vec(M) = pi^T Gv [T, dh^2].
// The work scales with K: exact mode (no mask) has K = T - 2, the sampled estimator with K
// positions per sequence K (cuda/barrier_tc.cu lists the kernels).  Workspace:
// barrier_tc_workspace_bytes (dominated by P, M [T, dh^2] and S, G [K, dh^2] per (b, h): for
// T = 1024, dh = 64, exact: about 2 x B H T dh^2 x 4 bytes, 6.4 GiB at B H = 192).
#pragma once
#include <cstddef>
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "cuda/attention.h"

namespace blm {
namespace cuda {

enum class BarrierImpl { kernels, gemm_fp32, gemm_tf32, flash };  // flash: cuda/barrier_flash.h
// From BLM_BARRIER (read once per call; cheap).
BarrierImpl barrier_impl_from_env();

// kmax: the largest number of counted positions (t >= 2, in the mask) of one sequence, or
// anything larger (wasted work); barrier_tc_max_counted computes it from the mask on the host.
// Without kmax: max(T - 2, 0), the exact mode's count and the bound for every mask.
size_t barrier_tc_workspace_bytes(const AttentionShape& s);
size_t barrier_tc_workspace_bytes(const AttentionShape& s, int kmax);

// The largest count of counted positions of one sequence: host_mask [B, T] (nullptr: exact mode).
int barrier_tc_max_counted(const uint8_t* host_mask, int B, int T);

// mask: device [B, T] or nullptr.  The overloads without kmax find it themselves: max(T - 2, 0)
// without a mask; with one, the mask is copied to the host, which waits for the stream (a caller
// that has the mask on the host passes barrier_tc_max_counted(host_mask, B, T) instead).  The
// workspace must hold barrier_tc_workspace_bytes(s, kmax) bytes.
void barrier_forward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                        double eps, float* logdet, float* phi, void* workspace, bool tf32,
                        cublasHandle_t blas, cudaStream_t stream);
void barrier_forward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask, int kmax,
                        double eps, float* logdet, float* phi, void* workspace, bool tf32,
                        cublasHandle_t blas, cudaStream_t stream);

void barrier_backward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                         double eps, float scale, float* dqkv, void* workspace, bool tf32,
                         cublasHandle_t blas, cudaStream_t stream);
void barrier_backward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask, int kmax,
                         double eps, float scale, float* dqkv, void* workspace, bool tf32,
                         cublasHandle_t blas, cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
