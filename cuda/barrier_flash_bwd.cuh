// The flash-style backward kernel of the barrier (notation: cuda/barrier_flash.h, spec
// sections 4 and 7): from the saved per-slot quantities G, U, W, E, rowterm, m, l and the
// centred Qc, Kc (no [K, T] pi in memory) it computes, per sequence-head bh, counted slot k
// with position t_k = rows[b, k] and attended position s < t_k,
//   z_ks  = Qg_k . Kc_s,   pi_ks = exp(c z_ks - m_k) / l_k
//   g_ks  = c (Qc_s^T G_k Kc_s - U_k . Kc_s - W_k . Qc_s + E_k)
//   dz    [BH, K, T]  dz_ks = pi_ks (g_ks - rowterm_k)        (0 for s >= t_k and padding slots)
//   dQs   [BH, T, D]  dQs_s = sum_{k: t_k > s} pi_ks (G_k Kc_s - W_k)
//   dKs   [BH, T, D]  dKs_s = sum_{k: t_k > s} [pi_ks (G_k^T Qc_s - U_k) + dz_ks Qg_k]
// The caller adds c (dQs + dz Kc at the counted rows) into dq and c dKs into dk (the dz Kc part:
// barrier_flash_slot_rows below).  The products
// G_k Kc_s and G_k^T Qc_s run on tensor cores (bf16 or TF32 operands, FlashBwdProducts below)
// with fp32 accumulation; z, pi and the vector dots are fp32.  Host-only declarations: included
// by C++ tests and by barrier_tc.cu.
#pragma once
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace blm {
namespace cuda {

// Whether the kernel handles head size D (32, 64; 128 is refused) and BH sequence-heads
// (<= 65535: bh is a grid dimension limited to that in the tiles-adjacent order).
bool barrier_flash_backward_supported(int D, int64_t BH);

// Shapes (all fp32 row-major contiguous, 16-byte aligned base pointers), bh = b H + h:
//   Qg [BH, K, D]  raw queries of the counted rows      Qc, Kc [BH, T, D]  centred q, k
//   rows [B, K]    position of slot k, increasing in k; padding slots (-1) only at the end
//   m, l [BH, K]   strict-causal softmax row max of c z and normaliser (s < t_k)
//   G [BH, K, D*D] (G_k[i*D + j]),  U, W [BH, K, D],  E, rowterm [BH, K]; with the bf16
//     products (the default) each slot's D*D floats hold G_k as D*D bf16 in their first half
//     (row-major, barrier_linalg_forward's GFormat::bf16), the rest unread
//   c = 1 / sqrt(D)
// Outputs: dz [BH, K, T], dQs, dKs [BH, T, D]; every element is written (K = 0: dQs = dKs = 0).
// Deterministic (fixed summation order, no atomics).  Throws DeviceError for an unsupported
// D or BH.
void barrier_flash_backward(const float* Qg, const float* Qc, const float* Kc,
                            const int32_t* rows, const float* m, const float* l, const float* G,
                            const float* U, const float* W, const float* E,
                            const float* rowterm, int B, int H, int T, int K, int D, float c,
                            float* dz, float* dQs, float* dKs, cudaStream_t stream);

// How the two D x D products per slot (X = Kc G^T, Y = Qc G) run:
//   bf16_mma    bf16 mma.sync m16n8k16 (the default): G, Kc and Qc rounded to bf16 for the
//               products only (z, pi, the vector dots and every sum stay fp32); half the tensor
//               instructions and operand loads of TF32, 8x its rounding (2^-8 per operand
//               instead of 2^-11), the precision of the rest of a bf16 model's gradient
//   tf32_mma    TF32 mma.sync m16n8k8 (BLM_BARRIER_BWD=mma)
//   tf32_wgmma  TF32 wgmma m64n64k8 (head size 64; 32 runs tf32_mma)
enum class FlashBwdProducts { tf32_mma, tf32_wgmma, bf16_mma };

// Block height, dispatch order and products of the kernel.  barrier_flash_backward runs
// barrier_flash_backward_variant_from_env(): BLM_BARRIER_BWD's products ("bf16", the default;
// "mma", "wgmma"), 64 rows per block with the bf16 products and 128 with TF32 ones unless
// BLM_BARRIER_BWD_ROWS says "64" or "128" ("auto" or unset: that rule), longest first.  The
// struct's own defaults are the TF32 kernels' choice; the other choices exist for the [.bench]
// case that picked them (see the .cu header).
struct FlashBwdVariant {
  int rows_per_block = 128;   // attended rows per block: 64 (4 warps) or 128 (8 warps)
  bool longest_first = true;  // grid (BH, tiles): every bh's first tile before any second one;
                              // false: (tiles, BH), the tiles of one bh next to each other
  FlashBwdProducts products = FlashBwdProducts::bf16_mma;
};

// The variant barrier_flash_backward runs (above); values of BLM_BARRIER_BWD or
// BLM_BARRIER_BWD_ROWS other than those named throw ConfigError.  Its products decide G's format
// above.
FlashBwdVariant barrier_flash_backward_variant_from_env();

// Where and how the kernel writes the direct terms: element i of row (b, h, s) of dQs goes to
// dq[b stride_b + h stride_h + s stride_s + i] as scale * dQs_s[i] (dKs into dk alike), in fp32
// (dq, dk) or, for the bf16 precision, in bf16 (dq16, dk16; the fp32 pair null): the fp32 value
// scale * dQs_s[i] rounded to nearest even, so the bf16 rows are bit for bit the fp32 rows
// rounded.  The [BH, T, D] layout of barrier_flash_backward is bhtd; the training pipeline
// (cuda/barrier_flash.cu) writes c lambda-scaled rows straight into the model's [B, T, 2 H D]
// dq | dk block, which saves a pass that would read [BH, T, D] and write them there.  dq, dk
// 8-byte aligned (dq16, dk16: 4-byte), strides even.
struct FlashBwdRows {
  float* dq = nullptr;
  float* dk = nullptr;
  __nv_bfloat16* dq16 = nullptr;
  __nv_bfloat16* dk16 = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_s = 0;
  float scale = 1.0f;
  static FlashBwdRows at(float* dq, float* dk, int64_t stride_b, int64_t stride_h,
                         int64_t stride_s, float scale) {
    return {dq, dk, nullptr, nullptr, stride_b, stride_h, stride_s, scale};
  }
  static FlashBwdRows at(__nv_bfloat16* dq, __nv_bfloat16* dk, int64_t stride_b,
                         int64_t stride_h, int64_t stride_s, float scale) {
    return {nullptr, nullptr, dq, dk, stride_b, stride_h, stride_s, scale};
  }
  template <class Elem>
  static FlashBwdRows bhtd(Elem* dQs, Elem* dKs, int H, int T, int D) {
    const int64_t td = static_cast<int64_t>(T) * D;
    return at(dQs, dKs, H * td, td, D, 1.0f);
  }
};

// barrier_flash_backward with a chosen variant, writing the direct terms as `out` says; an
// unsupported rows_per_block throws DeviceError.
void barrier_flash_backward_into(const float* Qg, const float* Qc, const float* Kc,
                                 const int32_t* rows, const float* m, const float* l,
                                 const float* G, const float* U, const float* W, const float* E,
                                 const float* rowterm, int B, int H, int T, int K, int D, float c,
                                 float* dz, const FlashBwdRows& out, FlashBwdVariant variant,
                                 cudaStream_t stream);

// The backward's second step, dQa and its slot rows: for each counted slot k of sequence b
// (t_k = rows[b, k] >= 0; padding slots add nothing), bh = b H + h,
//   dQa_k = sum_s dz[bh, k, s] Kc[bh, s]     [K, T] x [T, D] per bh
//   dq row (b, h, t_k) += out.scale * dQa_k   (out's dq rows as barrier_flash_backward_into writes
//                                              them; dk is not touched)
// with dz [BH, K, T] as barrier_flash_backward_into leaves it (exactly 0 for s >= t_k, so a sum
// may run past t_k) and Kc [BH, T, D] (16-byte aligned).  dQa runs on one cuBLAS strided-batched
// TF32 GEMM (blas, on stream) into the scratch dQa [BH, K, D] (TF32 operands: ~1e-3 relative,
// like the tiles' products), then a pass adds its rows.  The slots of a sequence are distinct
// positions, so every dq element is updated by one thread: deterministic, no atomics.  bf16 rows
// (out.dq16) are read, added to in fp32 and rounded once to nearest even.  D 32 or 64; out's dq
// rows 16-byte aligned (bf16: 8-byte), strides multiples of 4.
void barrier_flash_slot_rows(const float* dz, const float* Kc, const int32_t* rows, int B, int H,
                             int T, int K, int D, const FlashBwdRows& out, float* dQa,
                             cublasHandle_t blas, cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
