// The barrier as batched matrix products (cuda/barrier_tc.h has the decomposition and the
// selection).  Per (sequence b, head h), bh = b*H + h, rows r = bh*T + t; c = 1/sqrt(dh), D = dh:
//
//   extract    qkv -> Qr (raw q), Kc (raw k)                        [BH, T, D]
//   center     Qc = Qr - mean_t Qr,  Kc -= mean_t Kc                 (one block per bh, double)
//   outer      Pm[r, i*D + j] = Qc[r, i] Kc[r, j]                    [BH, T, D^2]
//   Z = Qr Kc^T (GEMM);  pi = strict causal softmax of c Z, zero rows for uncounted t
//   Qb = pi Qc, Kb = pi Kc, S = pi Pm (GEMMs)
//   forward:   det_kernel: one block per counted row: J = I - c (S_t - Qb_t Kb_t^T) in fp64,
//              LU -> logdet, phi
//   backward:  grad_kernel: one block per row: J^{-1} (fp32 Gauss-Jordan, as cuda/barrier.cu),
//              G = scale coef J^{-T} written over S as Gv; u = G^T Qb_t, w = G Kb_t, e = u . Kb_t
//              A = Gv Pm^T - U Kc^T - W Qc^T (GEMMs, into Z's buffer)
//              dz_kernel: g = c (A + e), dz = pi (g - pi.g) for s < t (in place)
//              dQa = dz Kc, dKa = dz^T Qr, Mv = pi^T Gv (over Pm), PW = pi^T W, PU = pi^T U
//              final_kernel: dq += c (dQa + M_s Kc_s - PW_s), dk += c (dKa + M_s^T Qc_s - PU_s)
// No atomics; cuBLAS products and fixed-order kernels: bit-identical from run to run.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cuda/barrier_linalg.cuh"
#include "cuda/barrier_phi.cuh"
#include "cuda/barrier_tc.h"
#include "cuda/common.cuh"
#include "cuda/launch.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr int kBlock = 256;  // threads of the per-row linear-algebra kernels

struct TcWork {
  float *Qr, *Qc, *Kc, *Pm, *Z, *Pi, *Qb, *Kb, *S, *U, *W, *E, *dQa, *dKa, *PW, *PU;
  size_t bytes;
};

TcWork tc_layout(const AttentionShape& s, void* base) {
  TcWork w{};
  size_t off = 0;
  auto take = [&](size_t floats) -> float* {
    off = (off + 255) / 256 * 256;
    float* p = base ? reinterpret_cast<float*>(static_cast<char*>(base) + off) : nullptr;
    off += floats * sizeof(float);
    return p;
  };
  const size_t R = static_cast<size_t>(s.B) * s.H * s.T, D = s.dh;
  const size_t TT = static_cast<size_t>(s.B) * s.H * s.T * s.T;
  w.Qr = take(R * D);
  w.Qc = take(R * D);
  w.Kc = take(R * D);
  w.Pm = take(R * D * D);
  w.Z = take(TT);
  w.Pi = take(TT);
  w.Qb = take(R * D);
  w.Kb = take(R * D);
  w.S = take(R * D * D);
  w.U = take(R * D);
  w.W = take(R * D);
  w.E = take(R);
  w.dQa = take(R * D);
  w.dKa = take(R * D);
  w.PW = take(R * D);
  w.PU = take(R * D);
  w.bytes = off;
  return w;
}

__device__ __forceinline__ float tc_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// qkv [B, T, 3d] -> Qr, Kc [BH, T, D] (raw).  One element (b, t, h, i) per iteration.
__global__ void extract_kernel(const float* __restrict__ qkv, int B, int T, int H, int D,
                               float* __restrict__ Qr, float* __restrict__ Kr) {
  const int d = H * D;
  const int64_t total = static_cast<int64_t>(B) * T * d;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % d);
    const int64_t n = idx / d;  // b*T + t
    const int64_t b = n / T;
    const int t = static_cast<int>(n % T), h = c / D, i = c % D;
    const int64_t row = (b * H + h) * T + t;
    Qr[row * D + i] = qkv[n * 3 * d + c];
    Kr[row * D + i] = qkv[n * 3 * d + d + c];
  }
}

// One block per bh: Qc = Qr - mean_t Qr, Kc = Kc - mean_t Kc (means in double).
__global__ void center_kernel(const float* __restrict__ Qr, int T, int D, float* __restrict__ Qc,
                              float* __restrict__ Kc) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * T * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    double sq = 0, sk = 0;
    for (int t = 0; t < T; ++t) {
      sq += Qr[base + static_cast<int64_t>(t) * D + i];
      sk += Kc[base + static_cast<int64_t>(t) * D + i];
    }
    const float mq = static_cast<float>(sq / T), mk = static_cast<float>(sk / T);
    for (int t = 0; t < T; ++t) {
      const int64_t k = base + static_cast<int64_t>(t) * D + i;
      Qc[k] = Qr[k] - mq;
      Kc[k] = Kc[k] - mk;
    }
  }
}

// Pm[r, i*D + j] = Qc[r, i] Kc[r, j].
__global__ void outer_kernel(const float* __restrict__ Qc, const float* __restrict__ Kc,
                             int64_t rows, int D, float* __restrict__ Pm) {
  const int64_t DD = static_cast<int64_t>(D) * D, total = rows * DD;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / DD;
    const int ij = static_cast<int>(idx % DD), i = ij / D, j = ij % D;
    Pm[idx] = Qc[r * D + i] * Kc[r * D + j];
  }
}

// One warp per row r = bh*T + t: pi_ts = softmax_{s<t}(c Z_ts) when t is counted, else zeros.
__global__ void pi_kernel(const float* __restrict__ Z, const uint8_t* __restrict__ mask,
                          int64_t rows, int T, int H, float c, float* __restrict__ Pi) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const int t = static_cast<int>(r % T);
  const int b = static_cast<int>((r / T) / H);
  const float* z = Z + r * T;
  float* p = Pi + r * T;
  if (!position_counted(t, b, T, mask)) {
    for (int s = lane; s < T; s += 32) p[s] = 0.0f;
    return;
  }
  float m = -INFINITY;
  for (int s = lane; s < t; s += 32) m = fmaxf(m, c * z[s]);
  m = tc_warp_max(m);
  float l = 0.0f;
  for (int s = lane; s < t; s += 32) l += expf(c * z[s] - m);
  l = warp_sum(l);
  for (int s = lane; s < T; s += 32) p[s] = s < t ? expf(c * z[s] - m) / l : 0.0f;
}

template <int D>
struct DetShared {
  static constexpr int LD = D + 1;
};

// Forward: one block per row.  logdet = log det J_t (-inf when det <= 0; 0 uncounted),
// phi = phi(det J_t) (0 uncounted).
template <int D>
__global__ void __launch_bounds__(kBlock) det_kernel(const float* __restrict__ S,
                                                     const float* __restrict__ Qb,
                                                     const float* __restrict__ Kb,
                                                     const uint8_t* __restrict__ mask, int T,
                                                     int H, float c, double eps,
                                                     float* __restrict__ logdet,
                                                     float* __restrict__ phi) {
  extern __shared__ double smem_d[];
  constexpr int LD = D + 1;
  double* J = smem_d;  // [D][D+1]
  __shared__ float qb[D], kb[D];
  __shared__ int slot;
  const int64_t r = blockIdx.x;
  const int t = static_cast<int>(r % T), b = static_cast<int>((r / T) / H);
  if (!position_counted(t, b, T, mask)) {  // the whole block leaves: no barrier follows
    if (threadIdx.x == 0) {
      logdet[r] = 0.0f;
      phi[r] = 0.0f;
    }
    return;
  }
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    qb[i] = Qb[r * D + i];
    kb[i] = Kb[r * D + i];
  }
  __syncthreads();
  const float* St = S + r * D * D;
  for (int idx = threadIdx.x; idx < D * D; idx += blockDim.x) {
    const int i = idx / D, j = idx % D;
    const double cij = static_cast<double>(c) *
                       (static_cast<double>(St[idx]) - static_cast<double>(qb[i]) * kb[j]);
    J[i * LD + j] = (i == j ? 1.0 : 0.0) - cij;
  }
  __syncthreads();
  int sign = 0;
  double logabs = 0;
  block_lu_logdet<D, kBlock>(J, &slot, &sign, &logabs);
  if (threadIdx.x == 0) {
    logdet[r] = sign > 0 ? static_cast<float>(logabs) : -INFINITY;
    phi[r] = static_cast<float>(phi_from_det(sign, logabs, eps));
  }
}

// Backward: one block per row.  Gv_t = vec(G_t) over S_t, U_t = G^T Qb_t, W_t = G Kb_t,
// E_t = U_t . Kb_t (all zero for uncounted rows and exactly singular J_t).
template <int D>
__global__ void __launch_bounds__(kBlock) grad_kernel(float* __restrict__ S,
                                                      const float* __restrict__ Qb,
                                                      const float* __restrict__ Kb,
                                                      const uint8_t* __restrict__ mask, int T,
                                                      int H, float c, double eps, float scale,
                                                      float* __restrict__ U, float* __restrict__ W,
                                                      float* __restrict__ E) {
  extern __shared__ float smem_f[];
  constexpr int LD = D + 1;
  float* Ji = smem_f;  // [D][D+1]: J, then J^{-1}
  __shared__ float qb[D], kb[D], fcol[D], red[32];
  __shared__ int perm[D], slot;
  const int64_t r = blockIdx.x;
  const int t = static_cast<int>(r % T), b = static_cast<int>((r / T) / H);
  float* St = S + r * D * D;
  if (!position_counted(t, b, T, mask)) {
    for (int idx = threadIdx.x; idx < D * D; idx += blockDim.x) St[idx] = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) U[r * D + i] = W[r * D + i] = 0.0f;
    if (threadIdx.x == 0) E[r] = 0.0f;
    return;
  }
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    qb[i] = Qb[r * D + i];
    kb[i] = Kb[r * D + i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < D * D; idx += blockDim.x) {
    const int i = idx / D, j = idx % D;
    const double cij = static_cast<double>(c) *
                       (static_cast<double>(St[idx]) - static_cast<double>(qb[i]) * kb[j]);
    Ji[i * LD + j] = static_cast<float>((i == j ? 1.0 : 0.0) - cij);
  }
  __syncthreads();
  int sign = 0;
  double logabs = 0;
  block_gj_inverse<D, kBlock>(Ji, fcol, perm, &slot, &sign, &logabs);
  __syncthreads();  // a singular J leaves the inversion early, before its last barrier
  const float coef =
      sign == 0 ? 0.0f : static_cast<float>(static_cast<double>(scale) * grad_coefficient(sign, logabs, eps));
  // G_ij = coef (J^{-1})_ji
  for (int idx = threadIdx.x; idx < D * D; idx += blockDim.x) {
    const int i = idx / D, j = idx % D;
    St[idx] = coef * Ji[j * LD + i];
  }
  float e_part = 0.0f;
  for (int k = threadIdx.x; k < D; k += blockDim.x) {
    // u_k = sum_i G_ik qb_i = coef sum_i Ji[k][i] qb_i;  w_k = sum_j G_kj kb_j = coef sum_j Ji[j][k] kb_j
    float u = 0.0f, w = 0.0f;
    for (int m = 0; m < D; ++m) {
      u = fmaf(Ji[k * LD + m], qb[m], u);
      w = fmaf(Ji[m * LD + k], kb[m], w);
    }
    u *= coef;
    w *= coef;
    U[r * D + k] = u;
    W[r * D + k] = w;
    e_part = fmaf(u, kb[k], e_part);
  }
  const float e = block_sum(e_part, red);
  if (threadIdx.x == 0) E[r] = e;
}

// One warp per row: A holds Gv Pm^T - U Kc^T - W Qc^T; g_ts = c (A_ts + E_t) for s < t;
// writes dz_ts = pi_ts (g_ts - sum_s pi_ts g_ts) over A (0 for s >= t).
__global__ void dz_kernel(float* __restrict__ A, const float* __restrict__ Pi,
                          const float* __restrict__ E, int64_t rows, int T, float c) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const int t = static_cast<int>(r % T);
  float* a = A + r * T;
  const float* p = Pi + r * T;
  const float e = E[r];
  float gbar = 0.0f;
  for (int s = lane; s < t; s += 32) gbar = fmaf(p[s], c * (a[s] + e), gbar);
  gbar = warp_sum(gbar);
  for (int s = lane; s < T; s += 32) a[s] = s < t ? p[s] * (c * (a[s] + e) - gbar) : 0.0f;
}

// One block per row (bh, s): adds dq_s and dk_s (see the top of this file) into dqkv.
__global__ void final_kernel(const float* __restrict__ Mv, const float* __restrict__ Qc,
                             const float* __restrict__ Kc, const float* __restrict__ dQa,
                             const float* __restrict__ dKa, const float* __restrict__ PW,
                             const float* __restrict__ PU, int T, int H, int D, float c,
                             float* __restrict__ dqkv) {
  extern __shared__ float sv[];  // q~_s, k~_s
  float* qs = sv;
  float* ks = sv + D;
  const int64_t r = blockIdx.x;
  const int s = static_cast<int>(r % T);
  const int64_t bh = r / T;
  const int64_t b = bh / H;
  const int h = static_cast<int>(bh % H);
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    qs[i] = Qc[r * D + i];
    ks[i] = Kc[r * D + i];
  }
  __syncthreads();
  const float* M = Mv + r * D * D;
  const int d = H * D;
  float* row = dqkv + (b * T + s) * 3 * d;
  for (int k = threadIdx.x; k < D; k += blockDim.x) {
    float mk = 0.0f, mq = 0.0f;  // (M k~)_k and (M^T q~)_k
    for (int m = 0; m < D; ++m) {
      mk = fmaf(M[k * D + m], ks[m], mk);
      mq = fmaf(M[m * D + k], qs[m], mq);
    }
    row[h * D + k] += c * (dQa[r * D + k] + mk - PW[r * D + k]);
    row[d + h * D + k] += c * (dKa[r * D + k] + mq - PU[r * D + k]);
  }
}

// Row-major batched C_i = alpha op(A_i) op(B_i) + beta C_i in fp32 (TF32 tensor cores when
// tf32), as cuda/matmul.cu maps row-major products onto cuBLAS.
void sgemm_batched(cublasHandle_t h, bool ta, bool tb, int M, int N, int K, float alpha,
                   const float* A, int lda, long long sa, const float* B, int ldb, long long sb,
                   float beta, float* C, int ldc, long long sc, int batch, bool tf32) {
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B,
      CUDA_R_32F, ldb, sb, A, CUDA_R_32F, lda, sa, &beta, C, CUDA_R_32F, ldc, sc, batch,
      tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

unsigned warp_grid(int64_t rows) { return static_cast<unsigned>(ceil_div(rows * 32, kThreads)); }

// Everything up to S (shared by the forward and the backward).
TcWork tc_common(const AttentionShape& s, const float* qkv, const uint8_t* mask, void* workspace,
                 bool tf32, cublasHandle_t blas, cudaStream_t stream) {
  const TcWork w = tc_layout(s, workspace);
  const int T = s.T, D = s.dh, BH = s.B * s.H;
  const int64_t R = static_cast<int64_t>(BH) * T;
  const float c = 1.0f / std::sqrt(static_cast<float>(D));
  const long long sd = static_cast<long long>(T) * D, st = static_cast<long long>(T) * T;
  const long long sdd = static_cast<long long>(T) * D * D;
  const int64_t elems = static_cast<int64_t>(s.B) * T * s.H * D;
  extract_kernel<<<grid_for(elems), kThreads, 0, stream>>>(qkv, s.B, T, s.H, D, w.Qr, w.Kc);
  BLM_CHECK_LAUNCH("barrier_tc extract");
  center_kernel<<<BH, 128, 0, stream>>>(w.Qr, T, D, w.Qc, w.Kc);
  BLM_CHECK_LAUNCH("barrier_tc center");
  outer_kernel<<<grid_for(R * D * D), kThreads, 0, stream>>>(w.Qc, w.Kc, R, D, w.Pm);
  BLM_CHECK_LAUNCH("barrier_tc outer");
  // Logits against the centred keys: softmax over s is unchanged (q_t . mean k is constant in s).
  sgemm_batched(blas, false, true, T, T, D, 1.0f, w.Qr, D, sd, w.Kc, D, sd, 0.0f, w.Z, T, st, BH,
                false);
  pi_kernel<<<warp_grid(R), kThreads, 0, stream>>>(w.Z, mask, R, T, s.H, c, w.Pi);
  BLM_CHECK_LAUNCH("barrier_tc pi");
  sgemm_batched(blas, false, false, T, D, T, 1.0f, w.Pi, T, st, w.Qc, D, sd, 0.0f, w.Qb, D, sd, BH,
                false);
  sgemm_batched(blas, false, false, T, D, T, 1.0f, w.Pi, T, st, w.Kc, D, sd, 0.0f, w.Kb, D, sd, BH,
                false);
  sgemm_batched(blas, false, false, T, D * D, T, 1.0f, w.Pi, T, st, w.Pm, D * D, sdd, 0.0f, w.S,
                D * D, sdd, BH, tf32);
  return w;
}

template <int D>
void launch_det(const TcWork& w, int64_t R, const AttentionShape& s, const uint8_t* mask,
                double eps, float* logdet, float* phi, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(D) * (D + 1) * sizeof(double);
  CUDA_CHECK(cudaFuncSetAttribute(det_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  det_kernel<D><<<static_cast<unsigned>(R), kBlock, smem, stream>>>(
      w.S, w.Qb, w.Kb, mask, s.T, s.H, 1.0f / std::sqrt(static_cast<float>(D)), eps, logdet, phi);
  BLM_CHECK_LAUNCH("barrier_tc det");
}

template <int D>
void launch_grad(const TcWork& w, int64_t R, const AttentionShape& s, const uint8_t* mask,
                 double eps, float scale, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(D) * (D + 1) * sizeof(float);
  CUDA_CHECK(cudaFuncSetAttribute(grad_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  grad_kernel<D><<<static_cast<unsigned>(R), kBlock, smem, stream>>>(
      w.S, w.Qb, w.Kb, mask, s.T, s.H, 1.0f / std::sqrt(static_cast<float>(D)), eps, scale, w.U,
      w.W, w.E);
  BLM_CHECK_LAUNCH("barrier_tc grad");
}

}  // namespace

BarrierImpl barrier_impl_from_env() {
  const char* v = std::getenv("BLM_BARRIER");
  if (v == nullptr) return BarrierImpl::kernels;
  if (std::strcmp(v, "tc") == 0) return BarrierImpl::gemm_tf32;
  if (std::strcmp(v, "gemm") == 0) return BarrierImpl::gemm_fp32;
  return BarrierImpl::kernels;
}

size_t barrier_tc_workspace_bytes(const AttentionShape& s) { return tc_layout(s, nullptr).bytes; }

void barrier_forward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                        double eps, float* logdet, float* phi, void* workspace, bool tf32,
                        cublasHandle_t blas, cudaStream_t stream) {
  if (s.B == 0 || s.T == 0) return;
  const TcWork w = tc_common(s, qkv, mask, workspace, tf32, blas, stream);
  const int64_t R = static_cast<int64_t>(s.B) * s.H * s.T;
  switch (s.dh) {
    case 32: launch_det<32>(w, R, s, mask, eps, logdet, phi, stream); break;
    case 64: launch_det<64>(w, R, s, mask, eps, logdet, phi, stream); break;
    case 128: launch_det<128>(w, R, s, mask, eps, logdet, phi, stream); break;
    default: throw DeviceError("barrier_tc: head size " + std::to_string(s.dh) + " unsupported");
  }
}

void barrier_backward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                         double eps, float scale, float* dqkv, void* workspace, bool tf32,
                         cublasHandle_t blas, cudaStream_t stream) {
  if (s.B == 0 || s.T == 0) return;
  const TcWork w = tc_common(s, qkv, mask, workspace, tf32, blas, stream);
  const int T = s.T, D = s.dh, BH = s.B * s.H;
  const int64_t R = static_cast<int64_t>(BH) * T;
  switch (D) {
    case 32: launch_grad<32>(w, R, s, mask, eps, scale, stream); break;
    case 64: launch_grad<64>(w, R, s, mask, eps, scale, stream); break;
    case 128: launch_grad<128>(w, R, s, mask, eps, scale, stream); break;
    default: throw DeviceError("barrier_tc: head size " + std::to_string(D) + " unsupported");
  }
  const float c = 1.0f / std::sqrt(static_cast<float>(D));
  const long long sd = static_cast<long long>(T) * D, st = static_cast<long long>(T) * T;
  const long long sdd = static_cast<long long>(T) * D * D;
  float* A = w.Z;   // [T, T] per bh
  float* Gv = w.S;  // [T, D^2] per bh
  // A = Gv Pm^T - U Kc^T - W Qc^T
  sgemm_batched(blas, false, true, T, T, D * D, 1.0f, Gv, D * D, sdd, w.Pm, D * D, sdd, 0.0f, A, T,
                st, BH, tf32);
  sgemm_batched(blas, false, true, T, T, D, -1.0f, w.U, D, sd, w.Kc, D, sd, 1.0f, A, T, st, BH,
                false);
  sgemm_batched(blas, false, true, T, T, D, -1.0f, w.W, D, sd, w.Qc, D, sd, 1.0f, A, T, st, BH,
                false);
  dz_kernel<<<warp_grid(R), kThreads, 0, stream>>>(A, w.Pi, w.E, R, T, c);
  BLM_CHECK_LAUNCH("barrier_tc dz");
  // dQa = dz Kc, dKa = dz^T Qr, Mv = pi^T Gv (over Pm), PW = pi^T W, PU = pi^T U
  sgemm_batched(blas, false, false, T, D, T, 1.0f, A, T, st, w.Kc, D, sd, 0.0f, w.dQa, D, sd, BH,
                false);
  sgemm_batched(blas, true, false, T, D, T, 1.0f, A, T, st, w.Qr, D, sd, 0.0f, w.dKa, D, sd, BH,
                false);
  float* Mv = w.Pm;
  sgemm_batched(blas, true, false, T, D * D, T, 1.0f, w.Pi, T, st, Gv, D * D, sdd, 0.0f, Mv, D * D,
                sdd, BH, tf32);
  sgemm_batched(blas, true, false, T, D, T, 1.0f, w.Pi, T, st, w.W, D, sd, 0.0f, w.PW, D, sd, BH,
                false);
  sgemm_batched(blas, true, false, T, D, T, 1.0f, w.Pi, T, st, w.U, D, sd, 0.0f, w.PU, D, sd, BH,
                false);
  final_kernel<<<static_cast<unsigned>(R), 128, 2 * D * sizeof(float), stream>>>(
      Mv, w.Qc, w.Kc, w.dQa, w.dKa, w.PW, w.PU, T, s.H, D, c, dqkv);
  BLM_CHECK_LAUNCH("barrier_tc final");
}

}  // namespace cuda
}  // namespace blm
