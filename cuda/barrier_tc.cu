// The barrier as batched matrix products (cuda/barrier_tc.h has the decomposition and the
// selection).  Per (sequence b, head h), bh = b*H + h; c = 1/sqrt(dh), D = dh; K = kmax, the
// padded number of counted positions per sequence; "full" rows bh*T + s, "compact" rows bh*K + k:
//
//   rows       mask -> rows [B, K] (counted t, -1 padding), kof [B, T] (slot k of t, or -1)
//   prep       qkv -> Qc, Kc [BH, T, D] centred (q - mean_t q, k - mean_t k; the means in double
//              sums), Qg = raw q at the counted rows [BH, K, D] (cuda/barrier_prep.cuh)
//   outer      Pm[bh, s, i*D + j] = Qc[bh, s, i] Kc[bh, s, j]      [BH, T, D^2] (float4 stores)
//   Z = Qg Kc^T [BH, K, T] (GEMM);  pi = strict causal softmax of c Z over s < rows[k]
//   Qb = pi Qc, Kb = pi Kc [BH, K, D], S = pi Pm [BH, K, D^2] (GEMMs)
//   forward:   det: J = I - c (S_k - Qb_k Kb_k^T) -> LU -> logdet, phi at (bh, rows[k]);
//              D = 32, 64: one warp per matrix in registers (cuda/barrier_tc_linalg.h, shared
//              with the flash barrier; fp32 with the pivot product in double); D = 128: one block per matrix in shared
//              memory, fp64 (cuda/barrier_linalg.cuh)
//   backward:  grad: J^{-1} (warp Gauss-Jordan for D = 32, 64; block fp32 for 128),
//              G = scale coef J^{-T} written over S as Gv; u = G^T Qb_k, w = G Kb_k, e = u . Kb_k
//              A = Gv Pm^T - U Kc^T - W Qc^T [BH, K, T] (GEMMs, into Z's buffer)
//              dz: g = c (A + e), dz = pi (g - pi.g) for s < t (in place)
//              dQa = dz Kc [K, D], dKa = dz^T Qg [T, D], Mv = pi^T Gv [T, D^2] (over Pm),
//              PW = pi^T W, PU = pi^T U [T, D]
//              final: dq_s += c (M_s Kc_s - PW_s + dQa[kof s]), dk_s += c (dKa_s + M_s^T Qc_s - PU_s)
// No atomics; cuBLAS products and fixed-order kernels: bit-identical from run to run.
//
// Opt-in (BLM_BARRIER_FUSED_S=1, TF32 products, D = 32, 64): S = pi Pm is computed by the fused
// kernel of cuda/barrier_fused_s.cu from pi, Qc, Kc (P formed on the fly, causal s tiles only)
// instead of the cuBLAS product; the forward then skips outer (Pm is not needed), the backward
// still forms Pm for A = Gv Pm^T and reuses its buffer for Mv.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/barrier_fused_s.cuh"
#include "cuda/barrier_linalg.cuh"
#include "cuda/barrier_phi.cuh"
#include "cuda/barrier_prep.cuh"
#include "cuda/barrier_tc.h"
#include "cuda/barrier_tc_linalg.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"

namespace blm {
namespace cuda {

namespace {

using namespace barrier_prep;

constexpr int kBlock = 256;     // threads of the block-per-matrix kernels (D = 128)

struct TcWork {
  float *Means, *Qc, *Kc, *Qg, *Pm, *Z, *Pi, *Qb, *Kb, *S, *U, *W, *E, *dQa, *dKa, *PW, *PU;
  float *Ld, *Ph, *Rt;  // backward scratch of barrier_linalg_forward: logdet, phi, rowterm
  int32_t *rows, *kof;
  int K;
  size_t bytes;
};

// Workspace carving: 256-byte aligned pieces (float4 access needs 16).
TcWork tc_layout(const AttentionShape& s, int K, void* base) {
  TcWork w{};
  Carver c(base);
  auto f = [&](size_t n) { return c.take<float>(n); };
  const size_t BH = static_cast<size_t>(s.B) * s.H, D = s.dh;
  const size_t R = BH * s.T, RK = BH * K;  // full and compact rows
  w.K = K;
  w.rows = c.take<int32_t>(static_cast<size_t>(s.B) * K);
  w.kof = c.take<int32_t>(static_cast<size_t>(s.B) * s.T);
  w.Means = f(static_cast<size_t>(s.B) * 2 * s.H * D);
  w.Qc = f(R * D);
  w.Kc = f(R * D);
  w.Qg = f(RK * D);
  w.Pm = f(R * D * D);
  w.Z = f(RK * s.T);
  w.Pi = f(RK * s.T);
  w.Qb = f(RK * D);
  w.Kb = f(RK * D);
  w.S = f(RK * D * D);
  w.U = f(RK * D);
  w.W = f(RK * D);
  w.E = f(RK);
  w.dQa = f(RK * D);
  w.dKa = f(R * D);
  w.PW = f(R * D);
  w.PU = f(R * D);
  w.Ld = f(R);
  w.Ph = f(R);
  w.Rt = f(RK);
  w.bytes = c.size();
  return w;
}

__device__ __forceinline__ float tc_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One block per full row r: Pm[r, i*D + j] = Qc[r, i] Kc[r, j], 16-byte stores; q and k come
// through the L1 (each element is read D/4 or D times by the block).
template <int D>
__global__ void __launch_bounds__(256) outer_kernel(const float* __restrict__ Qc,
                                                    const float* __restrict__ Kc,
                                                    float* __restrict__ Pm) {
  constexpr int V = D * D / 4, PerRow = D / 4;
  const int64_t r = blockIdx.x;
  const float* q = Qc + r * D;
  const float4* k4 = reinterpret_cast<const float4*>(Kc + r * D);
  float4* out = reinterpret_cast<float4*>(Pm + r * D * D);
  for (int v = threadIdx.x; v < V; v += 256) {
    const float qi = q[v / PerRow];
    const float4 kk = k4[v % PerRow];
    out[v] = make_float4(qi * kk.x, qi * kk.y, qi * kk.z, qi * kk.w);
  }
}

// One warp per compact row rr = bh*K + k: pi[rr, s] = softmax_{s<t}(c Z[rr, s]) for
// t = rows[b, k], zeros for s >= t and for padding (t = -1).
__global__ void pi_kernel(const float* __restrict__ Z, const int32_t* __restrict__ rows,
                          int64_t nrows, int T, int H, int K, float c, float* __restrict__ Pi) {
  const int64_t rr = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (rr >= nrows) return;
  const int64_t bh = rr / K;
  const int t = rows[(bh / H) * K + (rr - bh * K)];  // -1 for padding: every s >= t
  const float* z = Z + rr * T;
  float* p = Pi + rr * T;
  float m = -INFINITY;
  for (int s = lane; s < t; s += 32) m = fmaxf(m, c * z[s]);
  m = tc_warp_max(m);
  float l = 0.0f;
  for (int s = lane; s < t; s += 32) l += expf(c * z[s] - m);
  l = warp_sum(l);
  for (int s = lane; s < T; s += 32) p[s] = s < t ? expf(c * z[s] - m) / l : 0.0f;
}

// The position of compact row rr (-1: padding) and its full-row index bh*T + t.
struct CompactRow {
  int t;
  int64_t full;
};
__device__ __forceinline__ CompactRow compact_row(const int32_t* rows, int64_t rr, int H, int K,
                                                  int T) {
  const int64_t bh = rr / K;
  const int t = rows[(bh / H) * K + (rr - bh * K)];
  return CompactRow{t, bh * T + t};
}

// ---- D = 128: one block per matrix in shared memory (cuda/barrier_linalg.cuh) ---------------------

template <int D>
__global__ void __launch_bounds__(kBlock) det_block_kernel(
    const float* __restrict__ S, const float* __restrict__ Qb, const float* __restrict__ Kb,
    const int32_t* __restrict__ rows, int T, int H, int K, float c, double eps,
    float* __restrict__ logdet, float* __restrict__ phi) {
  extern __shared__ double smem_d[];
  constexpr int LD = D + 1;
  double* J = smem_d;  // [D][D+1]
  __shared__ float qb[D], kb[D];
  __shared__ int slot;
  const int64_t rr = blockIdx.x;
  const CompactRow cr = compact_row(rows, rr, H, K, T);
  if (cr.t < 0) return;  // the whole block leaves: no barrier follows
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    qb[i] = Qb[rr * D + i];
    kb[i] = Kb[rr * D + i];
  }
  __syncthreads();
  const float* St = S + rr * D * D;
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
    logdet[cr.full] = sign > 0 ? static_cast<float>(logabs) : -INFINITY;
    phi[cr.full] = static_cast<float>(phi_from_det(sign, logabs, eps));
  }
}

template <int D>
__global__ void __launch_bounds__(kBlock) grad_block_kernel(
    float* __restrict__ S, const float* __restrict__ Qb, const float* __restrict__ Kb,
    const int32_t* __restrict__ rows, int T, int H, int K, float c, double eps, float scale,
    float* __restrict__ U, float* __restrict__ W, float* __restrict__ E) {
  extern __shared__ float smem_f[];
  constexpr int LD = D + 1;
  float* Ji = smem_f;  // [D][D+1]: J, then J^{-1}
  __shared__ float qb[D], kb[D], fcol[D], red[32];
  __shared__ int perm[D], slot;
  const int64_t rr = blockIdx.x;
  const CompactRow cr = compact_row(rows, rr, H, K, T);
  float* St = S + rr * D * D;
  if (cr.t < 0) {
    for (int idx = threadIdx.x; idx < D * D; idx += blockDim.x) St[idx] = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) U[rr * D + i] = W[rr * D + i] = 0.0f;
    if (threadIdx.x == 0) E[rr] = 0.0f;
    return;
  }
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    qb[i] = Qb[rr * D + i];
    kb[i] = Kb[rr * D + i];
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
  const float coef = sign == 0 ? 0.0f
                               : static_cast<float>(static_cast<double>(scale) *
                                                    grad_coefficient(sign, logabs, eps));
  // G_ij = coef (J^{-1})_ji; a singular J's garbage is replaced by zeros, not scaled by 0.
  for (int idx = threadIdx.x; idx < D * D; idx += blockDim.x) {
    const int i = idx / D, j = idx % D;
    St[idx] = sign == 0 ? 0.0f : coef * Ji[j * LD + i];
  }
  float e_part = 0.0f;
  for (int k = threadIdx.x; k < D; k += blockDim.x) {
    float u = 0.0f, w = 0.0f;
    if (sign != 0) {
      // u_k = coef sum_i Ji[k][i] qb_i;  w_k = coef sum_j Ji[j][k] kb_j
      for (int m = 0; m < D; ++m) {
        u = fmaf(Ji[k * LD + m], qb[m], u);
        w = fmaf(Ji[m * LD + k], kb[m], w);
      }
    }
    u *= coef;
    w *= coef;
    U[rr * D + k] = u;
    W[rr * D + k] = w;
    e_part = fmaf(u, kb[k], e_part);
  }
  const float e = block_sum(e_part, red);
  if (threadIdx.x == 0) E[rr] = e;
}

// One warp per compact row: A holds Gv Pm^T - U Kc^T - W Qc^T; g_s = c (A_s + E) for s < t;
// writes dz_s = pi_s (g_s - sum_s pi_s g_s) over A (0 for s >= t and for padding rows).
__global__ void dz_kernel(float* __restrict__ A, const float* __restrict__ Pi,
                          const float* __restrict__ E, const int32_t* __restrict__ rows,
                          int64_t nrows, int T, int H, int K, float c) {
  const int64_t rr = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (rr >= nrows) return;
  const int64_t bh = rr / K;
  const int t = rows[(bh / H) * K + (rr - bh * K)];
  float* a = A + rr * T;
  const float* p = Pi + rr * T;
  const float e = E[rr];
  float gbar = 0.0f;
  for (int s = lane; s < t; s += 32) gbar = fmaf(p[s], c * (a[s] + e), gbar);
  gbar = warp_sum(gbar);
  for (int s = lane; s < T; s += 32) a[s] = s < t ? p[s] * (c * (a[s] + e) - gbar) : 0.0f;
}

// One block (2D threads) per full row (bh, s): M_s (D x D) staged in shared memory by coalesced
// 16-byte loads; threads 0..D-1 form (M k~)_k and add dq, threads D..2D-1 form (M^T q~)_k and
// add dk.  dq also gets dQa of the slot of s when s is counted.
template <int D>
__global__ void __launch_bounds__(2 * D) final_kernel(
    const float* __restrict__ Mv, const float* __restrict__ Qc, const float* __restrict__ Kc,
    const float* __restrict__ dQa, const float* __restrict__ dKa, const float* __restrict__ PW,
    const float* __restrict__ PU, const int32_t* __restrict__ kof, int T, int H, int K, float c,
    float* __restrict__ dqkv) {
  extern __shared__ float sm_final[];
  constexpr int LD = D + 1;
  float* Ms = sm_final;  // [D][D+1]
  float* qs = Ms + D * LD;
  float* ks = qs + D;
  const int64_t r = blockIdx.x;
  const int64_t bh = r / T;
  const int s = static_cast<int>(r - bh * T);
  const int64_t b = bh / H;
  const int h = static_cast<int>(bh - b * H);
  const int tid = threadIdx.x;
  if (tid < D) qs[tid] = Qc[r * D + tid];
  else ks[tid - D] = Kc[r * D + tid - D];
  const float4* M4 = reinterpret_cast<const float4*>(Mv + r * D * D);
  for (int v = tid; v < D * D / 4; v += 2 * D) {
    const float4 m = M4[v];
    const int i = (4 * v) / D, j = (4 * v) % D;
    float* dst = Ms + i * LD + j;
    dst[0] = m.x, dst[1] = m.y, dst[2] = m.z, dst[3] = m.w;
  }
  __syncthreads();
  const int d = H * D;
  float* row = dqkv + (b * T + s) * 3 * d;
  if (tid < D) {
    const int k = tid;
    float mk = 0.0f;  // (M k~)_k
    for (int m = 0; m < D; ++m) mk = fmaf(Ms[k * LD + m], ks[m], mk);
    const int slot = kof[b * T + s];
    const float qa = slot >= 0 ? dQa[(bh * K + slot) * D + k] : 0.0f;
    row[h * D + k] += c * (qa + mk - PW[r * D + k]);
  } else {
    const int k = tid - D;
    float mq = 0.0f;  // (M^T q~)_k
    for (int m = 0; m < D; ++m) mq = fmaf(Ms[m * LD + k], qs[m], mq);
    row[d + h * D + k] += c * (dKa[r * D + k] + mq - PU[r * D + k]);
  }
}

unsigned warp_grid(int64_t rows) { return static_cast<unsigned>(ceil_div(rows * 32, kThreads)); }

template <int D>
void launch_outer(const TcWork& w, int64_t R, cudaStream_t stream) {
  outer_kernel<D><<<static_cast<unsigned>(R), 256, 0, stream>>>(w.Qc, w.Kc, w.Pm);
  BLM_CHECK_LAUNCH("barrier_tc outer");
}

// Everything up to S (shared by the forward and the backward).  Requires K >= 1 (so T >= 3).
// need_pm: the caller reads Pm afterwards (the backward); otherwise the fused S kernel, when
// chosen, lets outer be skipped.
TcWork tc_common(const AttentionShape& s, const float* qkv, const uint8_t* mask, int K,
                 void* workspace, bool tf32, bool need_pm, cublasHandle_t blas,
                 cudaStream_t stream) {
  const TcWork w = tc_layout(s, K, workspace);
  const int T = s.T, D = s.dh, BH = s.B * s.H;
  const int64_t R = static_cast<int64_t>(BH) * T, RK = static_cast<int64_t>(BH) * K;
  const float c = 1.0f / std::sqrt(static_cast<float>(D));
  const long long sd = static_cast<long long>(T) * D, st = static_cast<long long>(T) * D * D;
  const long long kd = static_cast<long long>(K) * D, kt = static_cast<long long>(K) * T;
  const long long kdd = static_cast<long long>(K) * D * D;
  // The fused S kernel is TF32 only (gemm_fp32 keeps the fp32 product) and D = 32, 64 only;
  // the variable is read (and a bad value refused) whatever the shape.
  const bool fused_env = barrier_fused_s_from_env();
  const bool fused = fused_env && tf32 && barrier_fused_s_supported(D, BH);
  const bool outer = need_pm || !fused;
  prepare_barrier_inputs(qkv, mask, s.B, T, s.H, D, K, w.rows, w.kof, w.Means, w.Qc, w.Kc, w.Qg,
                         stream);
  if (outer) {
    switch (D) {
      case 32: launch_outer<32>(w, R, stream); break;
      case 64: launch_outer<64>(w, R, stream); break;
      default: launch_outer<128>(w, R, stream); break;
    }
  }
  // Logits against the centred keys: softmax over s is unchanged (q_t . mean k is constant in s).
  gemm_strided_batched(blas, false, true, K, T, D, 1.0f, w.Qg, D, kd, w.Kc, D, sd, 0.0f, w.Z, T, kt, BH,
                false);
  pi_kernel<<<warp_grid(RK), kThreads, 0, stream>>>(w.Z, w.rows, RK, T, s.H, K, c, w.Pi);
  BLM_CHECK_LAUNCH("barrier_tc pi");
  gemm_strided_batched(blas, false, false, K, D, T, 1.0f, w.Pi, T, kt, w.Qc, D, sd, 0.0f, w.Qb, D, kd, BH,
                false);
  gemm_strided_batched(blas, false, false, K, D, T, 1.0f, w.Pi, T, kt, w.Kc, D, sd, 0.0f, w.Kb, D, kd, BH,
                false);
  if (fused)
    barrier_fused_s(w.Pi, w.Qc, w.Kc, w.rows, BH, s.H, T, K, D, w.S, stream);
  else
    gemm_strided_batched(blas, false, false, K, D * D, T, 1.0f, w.Pi, T, kt, w.Pm, D * D, st, 0.0f, w.S,
                  D * D, kdd, BH, tf32);
  return w;
}

template <class F>
void set_smem(F* kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
}

void launch_det_block128(const TcWork& w, int64_t RK, const AttentionShape& s, double eps,
                         float* logdet, float* phi, cudaStream_t stream) {
  constexpr int D = 128;
  const size_t smem = static_cast<size_t>(D) * (D + 1) * sizeof(double);
  set_smem(det_block_kernel<D>, smem);
  det_block_kernel<D><<<static_cast<unsigned>(RK), kBlock, smem, stream>>>(
      w.S, w.Qb, w.Kb, w.rows, s.T, s.H, w.K, 1.0f / std::sqrt(static_cast<float>(D)), eps,
      logdet, phi);
  BLM_CHECK_LAUNCH("barrier_tc det (block)");
}

void launch_grad_block128(const TcWork& w, int64_t RK, const AttentionShape& s, double eps,
                          float scale, cudaStream_t stream) {
  constexpr int D = 128;
  const size_t smem = static_cast<size_t>(D) * (D + 1) * sizeof(float);
  set_smem(grad_block_kernel<D>, smem);
  grad_block_kernel<D><<<static_cast<unsigned>(RK), kBlock, smem, stream>>>(
      w.S, w.Qb, w.Kb, w.rows, s.T, s.H, w.K, 1.0f / std::sqrt(static_cast<float>(D)), eps,
      scale, w.U, w.W, w.E);
  BLM_CHECK_LAUNCH("barrier_tc grad (block)");
}

template <int D>
void launch_final(const TcWork& w, const float* Mv, const AttentionShape& s, int64_t R, float c,
                  float* dqkv, cudaStream_t stream) {
  const size_t smem = (static_cast<size_t>(D) * (D + 1) + 2 * D) * sizeof(float);
  set_smem(final_kernel<D>, smem);
  final_kernel<D><<<static_cast<unsigned>(R), 2 * D, smem, stream>>>(
      Mv, w.Qc, w.Kc, w.dQa, w.dKa, w.PW, w.PU, w.kof, s.T, s.H, w.K, c, dqkv);
  BLM_CHECK_LAUNCH("barrier_tc final");
}

void check_head_size(int dh) {
  if (dh != 32 && dh != 64 && dh != 128)
    throw DeviceError("barrier_tc: head size " + std::to_string(dh) + " unsupported (32, 64 or 128)");
}

// kmax of a device mask: copies it to the host (waits for the stream).
int device_mask_kmax(const AttentionShape& s, const uint8_t* mask, cudaStream_t stream) {
  if (mask == nullptr) return barrier_slots(s, s.T);
  std::vector<uint8_t> host(static_cast<size_t>(s.B) * s.T);
  CUDA_CHECK(cudaMemcpyAsync(host.data(), mask, host.size(), cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  return barrier_tc_max_counted(host.data(), s.B, s.T);
}

}  // namespace

BarrierImpl barrier_impl_from_env() {
  constexpr BarrierImpl kImpls[] = {BarrierImpl::kernels, BarrierImpl::gemm_tf32,
                                    BarrierImpl::gemm_fp32, BarrierImpl::flash};
  return kImpls[env_choice("BLM_BARRIER", {"kernels", "tc", "gemm", "flash"}, 0)];
}

size_t barrier_tc_workspace_bytes(const AttentionShape& s, int kmax) {
  return tc_layout(s, barrier_slots(s, kmax), nullptr).bytes;
}

size_t barrier_tc_workspace_bytes(const AttentionShape& s) {
  return barrier_tc_workspace_bytes(s, s.T);
}

int barrier_tc_max_counted(const uint8_t* host_mask, int B, int T) {
  if (host_mask == nullptr) return T > 2 ? T - 2 : 0;  // every t >= 2
  int best = 0;
  for (int b = 0; b < B; ++b) {
    int n = 0;
    for (int t = 2; t < T; ++t) n += host_mask[static_cast<size_t>(b) * T + t] != 0;
    best = std::max(best, n);
  }
  return best;
}

void barrier_forward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask, int kmax,
                        double eps, float* logdet, float* phi, void* workspace, bool tf32,
                        cublasHandle_t blas, cudaStream_t stream) {
  check_head_size(s.dh);
  if (s.B == 0 || s.T == 0) return;
  barrier_zero_outputs(s, logdet, phi, stream);  // uncounted positions report 0
  const int K = barrier_slots(s, kmax);
  if (K == 0) return;
  const TcWork w = tc_common(s, qkv, mask, K, workspace, tf32, false, blas, stream);
  const int64_t RK = static_cast<int64_t>(s.B) * s.H * K;
  if (s.dh == 128)
    launch_det_block128(w, RK, s, eps, logdet, phi, stream);
  else
    barrier_linalg_det(w.S, w.Qb, w.Kb, w.rows, s.B * s.H, s.H, s.T, K, s.dh,
                       1.0f / std::sqrt(static_cast<float>(s.dh)), eps, logdet, phi, stream);
}

void barrier_forward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                        double eps, float* logdet, float* phi, void* workspace, bool tf32,
                        cublasHandle_t blas, cudaStream_t stream) {
  check_head_size(s.dh);
  if (s.B == 0 || s.T == 0) return;
  barrier_forward_tc(s, qkv, mask, device_mask_kmax(s, mask, stream), eps, logdet, phi, workspace,
                     tf32, blas, stream);
}

void barrier_backward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask, int kmax,
                         double eps, float scale, float* dqkv, void* workspace, bool tf32,
                         cublasHandle_t blas, cudaStream_t stream) {
  check_head_size(s.dh);
  const int K = barrier_slots(s, kmax);
  if (s.B == 0 || K == 0) return;  // nothing counted: nothing to add
  const TcWork w = tc_common(s, qkv, mask, K, workspace, tf32, true, blas, stream);
  const int T = s.T, D = s.dh, BH = s.B * s.H;
  const int64_t R = static_cast<int64_t>(BH) * T, RK = static_cast<int64_t>(BH) * K;
  if (D == 128)
    launch_grad_block128(w, RK, s, eps, scale, stream);
  else  // G over S, U, W, E (its logdet, phi and rowterm go to scratch)
    barrier_linalg_forward(w.S, w.Qb, w.Kb, w.rows, BH, s.H, T, K, D,
                           1.0f / std::sqrt(static_cast<float>(D)), eps, scale, true, w.Ld, w.Ph,
                           w.U, w.W, w.E, w.Rt, stream);
  const float c = 1.0f / std::sqrt(static_cast<float>(D));
  const long long sd = static_cast<long long>(T) * D, st = static_cast<long long>(T) * D * D;
  const long long kd = static_cast<long long>(K) * D, kt = static_cast<long long>(K) * T;
  const long long kdd = static_cast<long long>(K) * D * D;
  float* A = w.Z;   // [K, T] per bh
  float* Gv = w.S;  // [K, D^2] per bh
  // A = Gv Pm^T - U Kc^T - W Qc^T
  gemm_strided_batched(blas, false, true, K, T, D * D, 1.0f, Gv, D * D, kdd, w.Pm, D * D, st, 0.0f, A, T,
                kt, BH, tf32);
  gemm_strided_batched(blas, false, true, K, T, D, -1.0f, w.U, D, kd, w.Kc, D, sd, 1.0f, A, T, kt, BH,
                false);
  gemm_strided_batched(blas, false, true, K, T, D, -1.0f, w.W, D, kd, w.Qc, D, sd, 1.0f, A, T, kt, BH,
                false);
  dz_kernel<<<warp_grid(RK), kThreads, 0, stream>>>(A, w.Pi, w.E, w.rows, RK, T, s.H, K, c);
  BLM_CHECK_LAUNCH("barrier_tc dz");
  // dQa = dz Kc [K, D], dKa = dz^T Qg [T, D], Mv = pi^T Gv (over Pm), PW = pi^T W, PU = pi^T U
  gemm_strided_batched(blas, false, false, K, D, T, 1.0f, A, T, kt, w.Kc, D, sd, 0.0f, w.dQa, D, kd, BH,
                false);
  gemm_strided_batched(blas, true, false, T, D, K, 1.0f, A, T, kt, w.Qg, D, kd, 0.0f, w.dKa, D, sd, BH,
                false);
  float* Mv = w.Pm;
  gemm_strided_batched(blas, true, false, T, D * D, K, 1.0f, w.Pi, T, kt, Gv, D * D, kdd, 0.0f, Mv, D * D,
                st, BH, tf32);
  gemm_strided_batched(blas, true, false, T, D, K, 1.0f, w.Pi, T, kt, w.W, D, kd, 0.0f, w.PW, D, sd, BH,
                false);
  gemm_strided_batched(blas, true, false, T, D, K, 1.0f, w.Pi, T, kt, w.U, D, kd, 0.0f, w.PU, D, sd, BH,
                false);
  switch (D) {
    case 32: launch_final<32>(w, Mv, s, R, c, dqkv, stream); break;
    case 64: launch_final<64>(w, Mv, s, R, c, dqkv, stream); break;
    default: launch_final<128>(w, Mv, s, R, c, dqkv, stream); break;
  }
}

void barrier_backward_tc(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                         double eps, float scale, float* dqkv, void* workspace, bool tf32,
                         cublasHandle_t blas, cudaStream_t stream) {
  check_head_size(s.dh);
  if (s.B == 0 || s.T == 0) return;
  barrier_backward_tc(s, qkv, mask, device_mask_kmax(s, mask, stream), eps, scale, dqkv,
                      workspace, tf32, blas, stream);
}

}  // namespace cuda
}  // namespace blm
