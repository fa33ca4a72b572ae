// The flash-style barrier pipeline (cuda/barrier_flash.h says what it computes).  Per call on
// B sequences, BH = B H, D = dh, c = 1/sqrt(D), K = kmax (counted slots per sequence):
//
//   prep      rows [B, K], kof [B, T]; Qc, Kc [BH, T, D] centred from qkv; Qg [BH, K, D] raw
//             (cuda/barrier_prep.cuh)
//   forward   barrier_flash_forward: S [BH, K, D^2], Qb, Kb [BH, K, D], m, l [BH, K]
//             barrier_linalg_forward (training): logdet, phi; G over S (bf16 when the backward
//             products are bf16), U, W [BH, K, D], E, rowterm [BH, K]
//             -- or barrier_linalg_det (no gradient)
//   backward  barrier_flash_backward_into: dz [BH, K, T]; dq_s = c scale dQs_s,
//             dk_s = c scale dKs_s straight into dqk [B, T, 2 H D]
//             barrier_flash_slot_rows: dQa = dz Kc [BH, K, D] (one batched TF32 product) and
//             the slot rows dq_t += c scale dQa_k at t = rows[b, k]
// G is kept unscaled (scale = 1): every backward quantity is linear in it, so lambda / N_R and
// the loss scale enter once, where the backward writes dqk.  Evaluation runs prep and the
// forward with the LU (barrier_linalg_det) instead of the inverse; training runs all of it in
// one call.
#include <cmath>
#include <string>

#include "core/error.h"
#include "cuda/barrier_fused_s.cuh"
#include "cuda/barrier_flash.h"
#include "cuda/barrier_flash_bwd.cuh"
#include "cuda/barrier_prep.cuh"
#include "cuda/barrier_tc_linalg.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"

namespace blm {
namespace cuda {

namespace {

using namespace barrier_prep;

// The scratch of one call: the inputs the tiles read, the per-slot state the forward leaves for
// the backward (G unscaled, S until the inverse overwrites it), and the backward's partial sums.
struct Work {
  int32_t *rows, *kof;                  // [B, K], [B, T]
  float *Means, *Qc, *Kc, *Qg, *Qb, *Kb;  // [B, 2 H D], [BH, T, D] x 2, [BH, K, D] x 3
  float *G, *U, *W, *E, *rowterm, *m, *l;  // [BH, K, D^2], [BH, K, D] x 2, [BH, K] x 4
  float *dz, *dQa;                       // [BH, K, T], [BH, K, D]
  size_t bytes;
};

Work work_layout(const AttentionShape& s, int K, void* base) {
  Carver p(base);
  const size_t BH = static_cast<size_t>(s.B) * s.H, D = s.dh;
  const size_t R = BH * s.T, RK = BH * K;
  Work w{};
  w.rows = p.take<int32_t>(static_cast<size_t>(s.B) * K);
  w.kof = p.take<int32_t>(static_cast<size_t>(s.B) * s.T);
  w.Means = p.take<float>(static_cast<size_t>(s.B) * 2 * s.H * D);
  w.Qc = p.take<float>(R * D);
  w.Kc = p.take<float>(R * D);
  w.Qg = p.take<float>(RK * D);
  w.Qb = p.take<float>(RK * D);
  w.Kb = p.take<float>(RK * D);
  w.G = p.take<float>(RK * D * D);
  w.U = p.take<float>(RK * D);
  w.W = p.take<float>(RK * D);
  w.E = p.take<float>(RK);
  w.rowterm = p.take<float>(RK);
  w.m = p.take<float>(RK);
  w.l = p.take<float>(RK);
  w.dz = p.take<float>(RK * s.T);
  w.dQa = p.take<float>(RK * D);
  w.bytes = p.size();
  return w;
}

float inv_sqrt(int D) { return 1.0f / std::sqrt(static_cast<float>(D)); }

// rows, kof, the centred Qc, Kc and the raw Qg: everything the tiles read (and qkv_copy, when
// asked for, in the same read of an fp32 qkv).  In: float or bf16.
template <class In>
void prep(const AttentionShape& s, const In* qkv, const uint8_t* mask, int K, const Work& w,
          __nv_bfloat16* qkv_copy, cudaStream_t stream) {
  prepare_barrier_inputs(qkv, mask, s.B, s.T, s.H, s.dh, K, w.rows, w.kof, w.Means, w.Qc, w.Kc,
                         w.Qg, stream, qkv_copy);
}

// The forward after prep: S (into G's room), Qb, Kb, m, l, then the per-position linear
// algebra: with `inverse` (training) G over S and U, W, E, rowterm, else log det and phi only.
// g_format: how G is stored for the backward (bf16 when its products are bf16).
void forward_tiles_and_linalg(const AttentionShape& s, int K, double eps, const Work& w,
                              bool inverse, GFormat g_format, float* logdet, float* phi,
                              cudaStream_t stream) {
  const float c = inv_sqrt(s.dh);
  barrier_flash_forward(w.Qg, w.Qc, w.Kc, w.rows, s.B, s.H, s.T, K, s.dh, c, w.G, w.Qb, w.Kb,
                        w.m, w.l, stream);
  const int BH = s.B * s.H;
  if (inverse)
    barrier_linalg_forward(w.G, w.Qb, w.Kb, w.rows, BH, s.H, s.T, K, s.dh, c, eps, 1.0f, true,
                           logdet, phi, w.U, w.W, w.E, w.rowterm, stream, g_format);
  else
    barrier_linalg_det(w.G, w.Qb, w.Kb, w.rows, BH, s.H, s.T, K, s.dh, c, eps, logdet, phi,
                       stream);
}

// After the training forward (w holds G and friends): the backward tiles, which write the
// direct terms into dqk (fp32 or bf16: Elem), then dQa = dz Kc and its slot rows
// (barrier_flash_slot_rows: a TF32 GEMM into w.dQa and a pass).
template <class Elem>
void backward_tiles_and_slots(const AttentionShape& s, int K, const Work& w,
                              const FlashBwdVariant& variant, float scale, Elem* dqk,
                              cublasHandle_t blas, cudaStream_t stream) {
  const int T = s.T, D = s.dh;
  const float c = inv_sqrt(D);
  const int64_t hd = static_cast<int64_t>(s.H) * D;
  const FlashBwdRows out = FlashBwdRows::at(dqk, dqk + hd, T * 2 * hd, D, 2 * hd, c * scale);
  barrier_flash_backward_into(w.Qg, w.Qc, w.Kc, w.rows, w.m, w.l, w.G, w.U, w.W, w.E,
                              w.rowterm, s.B, s.H, T, K, D, c, w.dz, out, variant, stream);
  barrier_flash_slot_rows(w.dz, w.Kc, w.rows, s.B, s.H, T, K, D, out, w.dQa, blas, stream);
}

// dqkv[n, 0:2d] += dqk[n, 0:2d], one thread per float4 (d % 2 == 0: 2d % 4 == 0).
__global__ void add_gradient_kernel(const float4* __restrict__ dqk, int64_t n4, int quads_per_row,
                                    int d, float* __restrict__ dqkv) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n4) return;
  const int64_t r = idx / quads_per_row;
  const int c = 4 * static_cast<int>(idx - r * quads_per_row);
  float4* out = reinterpret_cast<float4*>(dqkv + r * 3 * d + c);
  const float4 g = dqk[idx];
  float4 v = *out;
  v.x += g.x, v.y += g.y, v.z += g.z, v.w += g.w;
  *out = v;
}

// qkv_copy = bf16(qkv) when nothing is counted (no prep to fold it into).
void copy_without_prep(const AttentionShape& s, const float* qkv, __nv_bfloat16* qkv_copy,
                       cudaStream_t stream) {
  if (qkv_copy != nullptr)
    convert_to_bf16(qkv, qkv_copy, static_cast<int64_t>(s.B) * s.T * 3 * s.H * s.dh, stream);
}
// A bf16 qkv is the attention's input itself: nothing to copy.
void copy_without_prep(const AttentionShape&, const __nv_bfloat16*, __nv_bfloat16*,
                       cudaStream_t) {}

void check_head_size(int dh) {
  if (!barrier_flash_supported(dh))
    throw DeviceError("barrier_flash: head size " + std::to_string(dh) +
                      " unsupported (32 or 64; BLM_BARRIER=tc covers 128)");
}

}  // namespace

bool barrier_flash_supported(int dh) { return dh == 32 || dh == 64; }

size_t barrier_flash_workspace_bytes(const AttentionShape& s, int kmax) {
  return work_layout(s, barrier_slots(s, kmax), nullptr).bytes;
}

namespace {

// barrier_forward_flash from an fp32 or a bf16 qkv.
template <class In>
void forward_only(const AttentionShape& s, const In* qkv, const uint8_t* mask, int kmax,
                  double eps, float* logdet, float* phi, void* workspace, cudaStream_t stream,
                  __nv_bfloat16* qkv_copy) {
  check_head_size(s.dh);
  if (s.B == 0 || s.T == 0) return;
  barrier_zero_outputs(s, logdet, phi, stream);
  const int K = barrier_slots(s, kmax);
  if (K == 0) return copy_without_prep(s, qkv, qkv_copy, stream);
  const Work w = work_layout(s, K, workspace);
  prep(s, qkv, mask, K, w, qkv_copy, stream);
  forward_tiles_and_linalg(s, K, eps, w, false, GFormat::fp32, logdet, phi, stream);
}

// barrier_forward_backward_flash with dqk of either type, from an fp32 or a bf16 qkv.
template <class In, class Elem>
void forward_backward(const AttentionShape& s, const In* qkv, const uint8_t* mask, int kmax,
                      double eps, float scale, float* logdet, float* phi, Elem* dqk,
                      void* workspace, cublasHandle_t blas, cudaStream_t stream,
                      __nv_bfloat16* qkv_copy) {
  check_head_size(s.dh);
  if (s.B == 0 || s.T == 0) return;
  barrier_zero_outputs(s, logdet, phi, stream);
  const int64_t two_d = 2LL * s.H * s.dh;
  const int K = barrier_slots(s, kmax);
  if (K == 0) {  // nothing counted: a zero gradient (all bits 0 in either type)
    CUDA_CHECK(cudaMemsetAsync(dqk, 0, static_cast<size_t>(s.B) * s.T * two_d * sizeof(Elem),
                               stream));
    return copy_without_prep(s, qkv, qkv_copy, stream);
  }
  const Work w = work_layout(s, K, workspace);
  prep(s, qkv, mask, K, w, qkv_copy, stream);
  const FlashBwdVariant variant = barrier_flash_backward_variant_from_env();
  const GFormat g_format =
      variant.products == FlashBwdProducts::bf16_mma ? GFormat::bf16 : GFormat::fp32;
  forward_tiles_and_linalg(s, K, eps, w, true, g_format, logdet, phi, stream);
  backward_tiles_and_slots(s, K, w, variant, scale, dqk, blas, stream);
}

}  // namespace

void barrier_forward_flash(const AttentionShape& s, const float* qkv, const uint8_t* mask,
                           int kmax, double eps, float* logdet, float* phi, void* workspace,
                           cudaStream_t stream, __nv_bfloat16* qkv_copy) {
  forward_only(s, qkv, mask, kmax, eps, logdet, phi, workspace, stream, qkv_copy);
}

void barrier_forward_flash(const AttentionShape& s, const __nv_bfloat16* qkv,
                           const uint8_t* mask, int kmax, double eps, float* logdet, float* phi,
                           void* workspace, cudaStream_t stream) {
  forward_only(s, qkv, mask, kmax, eps, logdet, phi, workspace, stream, nullptr);
}

void barrier_forward_backward_flash(const AttentionShape& s, const float* qkv,
                                    const uint8_t* mask, int kmax, double eps, float scale,
                                    float* logdet, float* phi, float* dqk, void* workspace,
                                    cublasHandle_t blas, cudaStream_t stream,
                                    __nv_bfloat16* qkv_copy) {
  forward_backward(s, qkv, mask, kmax, eps, scale, logdet, phi, dqk, workspace, blas, stream,
                   qkv_copy);
}

void barrier_forward_backward_flash(const AttentionShape& s, const float* qkv,
                                    const uint8_t* mask, int kmax, double eps, float scale,
                                    float* logdet, float* phi, __nv_bfloat16* dqk,
                                    void* workspace, cublasHandle_t blas, cudaStream_t stream,
                                    __nv_bfloat16* qkv_copy) {
  forward_backward(s, qkv, mask, kmax, eps, scale, logdet, phi, dqk, workspace, blas, stream,
                   qkv_copy);
}

void barrier_forward_backward_flash(const AttentionShape& s, const __nv_bfloat16* qkv,
                                    const uint8_t* mask, int kmax, double eps, float scale,
                                    float* logdet, float* phi, __nv_bfloat16* dqk,
                                    void* workspace, cublasHandle_t blas, cudaStream_t stream) {
  forward_backward(s, qkv, mask, kmax, eps, scale, logdet, phi, dqk, workspace, blas, stream,
                   nullptr);
}

void barrier_flash_add_gradient(const float* dqk, int64_t rows, int d, float* dqkv,
                                cudaStream_t stream) {
  const int quads = d / 2;  // 2 d floats a row
  const int64_t n4 = rows * quads;
  if (n4 == 0) return;
  constexpr int kThreadsAdd = 256;
  add_gradient_kernel<<<static_cast<unsigned>(ceil_div(n4, kThreadsAdd)), kThreadsAdd, 0, stream>>>(
      reinterpret_cast<const float4*>(dqk), n4, quads, d, dqkv);
  BLM_CHECK_LAUNCH("barrier_flash add gradient");
}

}  // namespace cuda
}  // namespace blm
