// The barrier of ../shared/docs/barrier-spec.md (sections 2-4) as batched matrix products (cuBLAS,
// optionally on TF32 tensor cores), the alternative to cuda/barrier.cu's per-position kernels
// behind the same contract as barrier_forward / barrier_backward in cuda/attention.h (same
// inputs, same outputs: logdet and phi [B, H, T]; dq, dk added into dqkv).
//
// Selected by the environment variable BLM_BARRIER: "tc" (TF32 products), "gemm" (fp32
// products, no TF32); unset or anything else: cuda/barrier.cu.  Not yet the default: it has not
// been run on a GPU; tests/gpu/test_barrier_tc.cpp compares it with cuda/barrier.cu.
//
// The decomposition, per (sequence b, head h), with c = 1/sqrt(dh), q~ = q - mean_s q and
// k~ = k - mean_s k (C_t is invariant to a common shift of all q_s or all k_s, and the shift
// removes the common component that makes the uncentred form lose digits) and
// P_s = vec(q~_s k~_s^T) [dh^2]:
//   pi    [T, T]     strict causal softmax of c q_t . k~_s over s < t; zero rows for uncounted t
//   qbar~ = pi q~,  kbar~ = pi k~,  S = pi P [T, dh^2]
//   C_t   = c (S_t - qbar~_t kbar~_t^T),  J_t = I - C_t  -> LU in fp64: log det J_t, phi
// backward, with G_t = scale (-phi'(delta) delta) J_t^{-T} (zero for uncounted t), Gv = vec(G):
//   u_t = G_t^T qbar~_t,  w_t = G_t kbar~_t,  e_t = u_t . kbar~_t
//   g    = c (Gv P^T - u k~^T - w q~^T + e 1^T)  [T, T] (used for s < t only)
//   dz_ts = pi_ts (g_ts - sum_r pi_tr g_tr)
//   dq  += c (dz k~ + M_s k~_s - (pi^T w)_s),   dk += c (dz^T q + M_s^T q~_s - (pi^T u)_s)
//   with M_s = sum_t pi_ts G_t, i.e. vec(M) = pi^T Gv.
// The full [T, T] products also compute the masked upper triangle.  Workspace:
// barrier_tc_workspace_bytes (for T = 1024, dh = 64: about 2 x B H T dh^2 x 4 bytes, 6.4 GiB at
// B H = 192).
#pragma once
#include <cstddef>
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "cuda/attention.h"

namespace blm {
namespace cuda {

enum class BarrierImpl { kernels, gemm_fp32, gemm_tf32 };
// From BLM_BARRIER (read once per call; cheap).
BarrierImpl barrier_impl_from_env();

size_t barrier_tc_workspace_bytes(const AttentionShape& s);

void barrier_forward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                        double eps, float* logdet, float* phi, void* workspace, bool tf32,
                        cublasHandle_t blas, cudaStream_t stream);

void barrier_backward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                         double eps, float scale, float* dqkv, void* workspace, bool tf32,
                         cublasHandle_t blas, cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
