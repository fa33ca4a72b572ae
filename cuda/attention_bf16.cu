// Causal attention for the bf16 precision (cuda/attention_bf16.h says what it computes).
//
// Default (BLM_ATTENTION unset or "flash"): cuda/attention_flash.h's flash-style tensor-core
// kernels, which read qkv [B, T, 3d] and dout [B, T, d] in fp32 and write out [B, T, d] and dqkv
// [B, T, 3d] directly; the workspace is D [BH, T] fp32 (backward only).
//
// BLM_ATTENTION=gemm: cuBLAS batched GEMMs.  Per (sequence b, head h), batch index bh = b*H + h,
// row-major:
//
//   forward:   q, k, v [T, dh] bf16  <- qkv (split_heads; fp32 -> bf16)
//              S  [T, T] fp32 = q k^T                 (GEMM)
//              P  [T, T] bf16 = exp(S/sqrt(dh) - lse), lse_t over s <= t; P_ts = 0 for s > t
//              o  [T, dh] bf16 = P v                  (GEMM)  -> out [B, T, d] (merge_heads)
//   backward:  D_t = sum_i dout_ti out_ti;  do [T, dh] bf16 <- dout
//              S = q k^T again, P from S and lse      (recomputed, as the flash kernels do)
//              dP [T, T] fp32 = do v^T                (GEMM, into S's buffer)
//              dv = P^T do                            (GEMM, fp32)
//              dz' = P (dP - D) / sqrt(dh)  bf16      (in place over P)
//              dq = dz' k,  dk = dz'^T q              (GEMMs, fp32)  -> dqkv (scatter)
//
// Workspace of the GEMM path (bytes, 256-aligned regions): q, k, v, o [BH, T, dh] bf16;
// S [BH, T, T] fp32; P [BH, T, T] bf16; backward also do [BH, T, dh] bf16, D [BH, T] fp32,
// dq, dk, dv [BH, T, dh] fp32.  The full T x T products also compute the masked upper triangle
// (twice the causal work): simple and on tensor cores, but the [T, T] matrices make it the
// memory-hungry path, kept as a cross-check of the flash kernels.
#include <cmath>

#include "cuda/attention_bf16.h"
#include "cuda/attention_flash.h"
#include "cuda/common.cuh"
#include "cuda/launch.cuh"

namespace blm {
namespace cuda {

namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarpRowsThreads = 256;  // warp-per-row kernels: 8 rows per block

// The workspace's regions, measured (base null) or placed.  The flash path uses only D.
struct AttnWork {
  bool flash;           // BLM_ATTENTION is not "gemm"
  bf16 *q, *k, *v, *o;  // [BH, T, dh]
  float* S;             // [BH, T, T] scores, then dP in the backward
  bf16* P;              // [BH, T, T] probabilities, then dz' in the backward
  bf16* dO;             // [BH, T, dh]
  float* D;             // [BH, T]
  float *dq, *dk, *dv;  // [BH, T, dh]
  size_t bytes;
};

AttnWork layout(const AttentionShape& s, void* base, bool backward) {
  AttnWork w{};
  size_t off = 0;
  auto take = [&](size_t bytes) -> char* {
    off = (off + 255) / 256 * 256;
    char* p = base ? static_cast<char*>(base) + off : nullptr;
    off += bytes;
    return p;
  };
  const size_t bh = static_cast<size_t>(s.B) * s.H;
  const size_t rows = bh * s.T, head = rows * s.dh, scores = rows * s.T;
  w.flash = flash_attention_enabled();
  if (w.flash) {  // the kernels' own scratch, D [BH, T]; nothing in the forward
    w.D = backward ? reinterpret_cast<float*>(take(flash_attention_workspace_bytes(s))) : nullptr;
    w.bytes = off;
    return w;
  }
  w.q = reinterpret_cast<bf16*>(take(head * sizeof(bf16)));
  w.k = reinterpret_cast<bf16*>(take(head * sizeof(bf16)));
  w.v = reinterpret_cast<bf16*>(take(head * sizeof(bf16)));
  w.o = reinterpret_cast<bf16*>(take(head * sizeof(bf16)));
  w.S = reinterpret_cast<float*>(take(scores * sizeof(float)));
  w.P = reinterpret_cast<bf16*>(take(scores * sizeof(bf16)));
  if (backward) {
    w.dO = reinterpret_cast<bf16*>(take(head * sizeof(bf16)));
    w.D = reinterpret_cast<float*>(take(rows * sizeof(float)));
    w.dq = reinterpret_cast<float*>(take(head * sizeof(float)));
    w.dk = reinterpret_cast<float*>(take(head * sizeof(float)));
    w.dv = reinterpret_cast<float*>(take(head * sizeof(float)));
  }
  w.bytes = off;
  return w;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Element idx of qkv [B, T, 3d] <-> element of q / k / v [BH, T, dh].
struct HeadIndex {
  int which;    // 0 q, 1 k, 2 v
  int64_t dst;  // index in [BH, T, dh]
};
__device__ __forceinline__ HeadIndex head_index(int64_t idx, int T, int H, int dh) {
  const int d = H * dh;
  const int c = static_cast<int>(idx % (3 * d));
  const int64_t n = idx / (3 * d);  // b*T + t
  const int64_t b = n / T;
  const int t = static_cast<int>(n % T);
  const int cc = c % d, h = cc / dh, i = cc % dh;
  return {c / d, ((b * H + h) * T + t) * dh + i};
}

__global__ void split_heads_kernel(const float* __restrict__ qkv, int64_t total, int T, int H,
                                   int dh, bf16* __restrict__ q, bf16* __restrict__ k,
                                   bf16* __restrict__ v) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const HeadIndex hi = head_index(idx, T, H, dh);
    bf16* dst = hi.which == 0 ? q : (hi.which == 1 ? k : v);
    dst[hi.dst] = __float2bfloat16_rn(qkv[idx]);
  }
}

// dqkv[idx] = (dq | dk | dv)[...]: overwrites all three blocks.
__global__ void scatter_grads_kernel(const float* __restrict__ dq, const float* __restrict__ dk,
                                     const float* __restrict__ dv, int64_t total, int T, int H,
                                     int dh, float* __restrict__ dqkv) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const HeadIndex hi = head_index(idx, T, H, dh);
    const float* src = hi.which == 0 ? dq : (hi.which == 1 ? dk : dv);
    dqkv[idx] = src[hi.dst];
  }
}

// out [B, T, d] <- o [BH, T, dh].
__global__ void merge_heads_kernel(const bf16* __restrict__ o, int64_t total, int T, int H, int dh,
                                   bf16* __restrict__ out) {
  const int d = H * dh;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % d);
    const int64_t n = idx / d;
    const int64_t b = n / T;
    const int t = static_cast<int>(n % T);
    const int h = c / dh, i = c % dh;
    out[idx] = o[((b * H + h) * T + t) * dh + i];
  }
}

// One warp per score row (bh, t): lse_t = log sum_{s<=t} exp(scale S_ts) (when compute_lse),
// P_ts = exp(scale S_ts - lse_t) for s <= t, 0 above the diagonal.
// lse_in null: compute lse into lse_out; else read it from lse_in.
__global__ void causal_probs_kernel(const float* __restrict__ S, int64_t rows, int T, float scale,
                                    const float* __restrict__ lse_in, float* __restrict__ lse_out,
                                    bf16* __restrict__ P) {
  const int64_t row =
      (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together
  const int t = static_cast<int>(row % T);
  const float* s = S + row * T;
  float l;
  if (lse_in == nullptr) {
    float m = -INFINITY;
    for (int c = lane; c <= t; c += 32) m = fmaxf(m, s[c] * scale);
    m = warp_max(m);
    float sum = 0.0f;
    for (int c = lane; c <= t; c += 32) sum += expf(s[c] * scale - m);
    l = m + logf(warp_sum(sum));
    if (lane == 0) lse_out[row] = l;
  } else {
    l = lse_in[row];
  }
  bf16* p = P + row * T;
  for (int c = lane; c < T; c += 32)
    p[c] = __float2bfloat16_rn(c <= t ? expf(s[c] * scale - l) : 0.0f);
}

// One warp per (bh, t): dO row [dh] in bf16 and D = sum_i dout_i out_i (dout fp32 [B, T, d],
// out bf16 [B, T, d]).
__global__ void dout_prep_kernel(const float* __restrict__ dout, const bf16* __restrict__ out,
                                 int64_t rows, int T, int H, int dh, bf16* __restrict__ dO,
                                 float* __restrict__ D) {
  const int64_t row =
      (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int64_t bh = row / T;
  const int t = static_cast<int>(row % T);
  const int64_t b = bh / H;
  const int h = static_cast<int>(bh % H);
  const int64_t src = (b * T + t) * static_cast<int64_t>(H) * dh + static_cast<int64_t>(h) * dh;
  float acc = 0.0f;
  for (int i = lane; i < dh; i += 32) {
    const float g = dout[src + i];
    acc += g * __bfloat162float(out[src + i]);
    dO[row * dh + i] = __float2bfloat16_rn(g);
  }
  acc = warp_sum(acc);
  if (lane == 0) D[row] = acc;
}

// dz'_ts = scale P_ts (dP_ts - D_t), written over P.  [rows, T].
__global__ void dscores_kernel(bf16* __restrict__ P, const float* __restrict__ dP,
                               const float* __restrict__ D, int64_t total, int T, float scale) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float p = __bfloat162float(P[idx]);
    P[idx] = __float2bfloat16_rn(scale * p * (dP[idx] - D[idx / T]));
  }
}

// Row-major batched D_i[M,N] = op(A_i) op(B_i) (see cuda/matmul.cu for the column-major
// mapping), bf16 operands, fp32 accumulation, output type c_type.
void gemm_batched(cublasHandle_t h, bool ta, bool tb, int M, int N, int K, const bf16* A, int lda,
                  long long sa, const bf16* B, int ldb, long long sb, void* C,
                  cudaDataType_t c_type, int ldc, long long sc, int batch) {
  const float alpha = 1.0f, beta = 0.0f;
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                          ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B,
                                          CUDA_R_16BF, ldb, sb, A, CUDA_R_16BF, lda, sa, &beta, C,
                                          c_type, ldc, sc, batch, CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT));
}

unsigned warp_rows_grid(int64_t rows) {
  return static_cast<unsigned>(ceil_div(rows * 32, kWarpRowsThreads));
}

// The GEMM path's shape check.  Large shapes (reviewed for B*T = 131072, d = 1600, H = 25,
// T = 2048): element indices are int64 (head_index, the grid-stride loops, row * T), the
// workspace is sized in size_t (S alone is B H T^2 floats: 27 GB at B = 64, H = 25, T = 2048),
// cuBLAS strides are long long, and every grid is either capped (grid_for) or rows / 8 blocks.
// H <= 0 or dh <= 0 would make BH = 0 and a zero-block launch (invalid configuration): refused.
void check_gemm_shape(const AttentionShape& s) {
  if (s.B < 0 || s.T < 0 || s.H <= 0 || s.dh <= 0)
    throw DeviceError("attention (bf16, BLM_ATTENTION=gemm): bad shape B=" + std::to_string(s.B) +
                      " T=" + std::to_string(s.T) + " H=" + std::to_string(s.H) +
                      " dh=" + std::to_string(s.dh) + " (B, T >= 0 and H, dh >= 1 needed)");
}

}  // namespace

size_t attention_bf16_workspace_bytes(const AttentionShape& s, bool backward) {
  return layout(s, nullptr, backward).bytes;
}

void attention_forward_bf16(const AttentionShape& s, const float* qkv, bf16* out, float* lse,
                            void* workspace, cublasHandle_t blas, cudaStream_t stream) {
  const int T = s.T, dh = s.dh, BH = s.B * s.H;
  if (s.B == 0 || T == 0) return;
  const AttnWork w = layout(s, workspace, false);
  if (w.flash) return flash_attention_forward(s, qkv, out, lse, stream);
  check_gemm_shape(s);
  const int64_t rows = static_cast<int64_t>(BH) * T;
  const int64_t elems = static_cast<int64_t>(s.B) * T * 3 * s.H * dh;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const long long sh = static_cast<long long>(T) * dh, ss = static_cast<long long>(T) * T;
  split_heads_kernel<<<grid_for(elems), kThreads, 0, stream>>>(qkv, elems, T, s.H, dh, w.q, w.k,
                                                               w.v);
  BLM_CHECK_LAUNCH("attention_bf16 split_heads");
  gemm_batched(blas, false, true, T, T, dh, w.q, dh, sh, w.k, dh, sh, w.S, CUDA_R_32F, T, ss, BH);
  causal_probs_kernel<<<warp_rows_grid(rows), kWarpRowsThreads, 0, stream>>>(w.S, rows, T, scale,
                                                                             nullptr, lse, w.P);
  BLM_CHECK_LAUNCH("attention_bf16 causal_probs");
  gemm_batched(blas, false, false, T, dh, T, w.P, T, ss, w.v, dh, sh, w.o, CUDA_R_16BF, dh, sh, BH);
  merge_heads_kernel<<<grid_for(elems / 3), kThreads, 0, stream>>>(w.o, elems / 3, T, s.H, dh, out);
  BLM_CHECK_LAUNCH("attention_bf16 merge_heads");
}

void attention_backward_bf16(const AttentionShape& s, const float* qkv, const bf16* out,
                             const float* dout, const float* lse, float* dqkv, void* workspace,
                             cublasHandle_t blas, cudaStream_t stream) {
  const int T = s.T, dh = s.dh, BH = s.B * s.H;
  if (s.B == 0 || T == 0) return;
  const AttnWork w = layout(s, workspace, true);
  if (w.flash) return flash_attention_backward(s, qkv, out, dout, lse, dqkv, w.D, stream);
  check_gemm_shape(s);
  const int64_t rows = static_cast<int64_t>(BH) * T;
  const int64_t elems = static_cast<int64_t>(s.B) * T * 3 * s.H * dh;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const long long sh = static_cast<long long>(T) * dh, ss = static_cast<long long>(T) * T;
  split_heads_kernel<<<grid_for(elems), kThreads, 0, stream>>>(qkv, elems, T, s.H, dh, w.q, w.k,
                                                               w.v);
  BLM_CHECK_LAUNCH("attention_bf16 split_heads");
  dout_prep_kernel<<<warp_rows_grid(rows), kWarpRowsThreads, 0, stream>>>(dout, out, rows, T, s.H,
                                                                          dh, w.dO, w.D);
  BLM_CHECK_LAUNCH("attention_bf16 dout_prep");
  // P again from q, k and the forward's lse.
  gemm_batched(blas, false, true, T, T, dh, w.q, dh, sh, w.k, dh, sh, w.S, CUDA_R_32F, T, ss, BH);
  causal_probs_kernel<<<warp_rows_grid(rows), kWarpRowsThreads, 0, stream>>>(
      w.S, rows, T, scale, lse, nullptr, w.P);
  BLM_CHECK_LAUNCH("attention_bf16 causal_probs (backward)");
  // dP = do v^T (over S), dv = P^T do; then dz' over P, dq = dz' k, dk = dz'^T q.
  gemm_batched(blas, false, true, T, T, dh, w.dO, dh, sh, w.v, dh, sh, w.S, CUDA_R_32F, T, ss, BH);
  gemm_batched(blas, true, false, T, dh, T, w.P, T, ss, w.dO, dh, sh, w.dv, CUDA_R_32F, dh, sh, BH);
  dscores_kernel<<<grid_for(rows * T), kThreads, 0, stream>>>(w.P, w.S, w.D, rows * T, T, scale);
  BLM_CHECK_LAUNCH("attention_bf16 dscores");
  gemm_batched(blas, false, false, T, dh, T, w.P, T, ss, w.k, dh, sh, w.dq, CUDA_R_32F, dh, sh, BH);
  gemm_batched(blas, true, false, T, dh, T, w.P, T, ss, w.q, dh, sh, w.dk, CUDA_R_32F, dh, sh, BH);
  scatter_grads_kernel<<<grid_for(elems), kThreads, 0, stream>>>(w.dq, w.dk, w.dv, elems, T, s.H,
                                                                 dh, dqkv);
  BLM_CHECK_LAUNCH("attention_bf16 scatter_grads");
}

}  // namespace cuda
}  // namespace blm
