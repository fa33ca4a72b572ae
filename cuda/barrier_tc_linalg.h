// The barrier's per-position linear algebra on the GPU (D = d_head = 32 or 64), the step between
// the flash-style forward (S, Qb, Kb) and the flash-style backward (G, U, W, E, rowterm) of the
// flash barrier.  Notation: cuda/barrier_flash.h; per compact row rr = bh * K + k (bh = b * H + h, slot k of sequence b):
//   J_k  = I - c (S_k - Qb_k Kb_k^T)                       (D x D, fp32)
//   logdet[bh, t] = log det J_k (-inf when det <= 0), phi[bh, t] = phi(det J_k)   (t = rows[b, k])
// and, for training, with coef = -phi'(det) det (1 when det >= eps):
//   G_k = scale coef J_k^{-T}  written over S_k,  U_k = G_k^T Qb_k,  W_k = G_k Kb_k,
//   E_k = U_k . Kb_k,  rowterm_k = c (<G_k, S_k> - E_k)   (S_k before it is overwritten).
// Padding slots (rows = -1) write no logdet / phi and zero G, U, W, E, rowterm; an exactly
// singular J (a zero pivot) gives logdet -inf, phi(0) and zero G, U, W, E, rowterm.
//
// Shapes (fp32 / int32, row-major, contiguous; S 16-byte aligned):
//   S [BH, K, D*D]   Qb, Kb [BH, K, D]   rows [B, K]   logdet, phi [BH, T]
//   U, W [BH, K, D]  E, rowterm [BH, K]
// Every output is a pure function of the inputs (fixed-order sums, no atomics): bit-identical
// from run to run.  Kernels, layout and measured speed: cuda/barrier_tc_linalg.cu.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace blm {
namespace cuda {

// How the elimination (D 64) finds its pivots.  diagonal_first tries the diagonal without the
// search, checking that partial pivoting would choose it at every step, and searches only where
// that fails (about 1% of the matrices of trained models); its accepted results are those of
// `search` (which searches at every step) up to rounding, with the same pivot rows, and the
// matrices it hands to the search are `search`'s bit for bit (the test holds the two to that).
// D 32 always searches.
enum class Pivots { diagonal_first, search };

// logdet and phi at the counted positions (the caller zeroes the rest); nothing else.  An LU,
// two steps per sweep on the diagonal first (pivots).  D must be 32 or 64 (anything else throws
// blm::DeviceError naming it).
void barrier_linalg_det(const float* S, const float* Qb, const float* Kb, const int32_t* rows,
                        int BH, int H, int T, int K, int D, float c, double eps, float* logdet,
                        float* phi, cudaStream_t stream, Pivots pivots = Pivots::diagonal_first);

// How the training forward stores G over S_k: fp32 (all D * D floats), or bf16 (row-major in
// the first D * D * 2 bytes of S_k, the rest left as it was): the rounding the bf16 products of
// the flash backward apply anyway (round to nearest even), at half the bytes.
enum class GFormat { fp32, bf16 };

// The training forward: logdet and phi as barrier_linalg_det, and when `training` also G (over
// S, in g_format), U, W, E, rowterm (from the fp32 G either way).  With training == false it is
// barrier_linalg_det (S is not written and U, W, E, rowterm may be null).
//
// pivots: how the Gauss-Jordan (or, without training, the LU) finds its pivots (Pivots above).

void barrier_linalg_forward(float* S, const float* Qb, const float* Kb, const int32_t* rows,
                            int BH, int H, int T, int K, int D, float c, double eps, float scale,
                            bool training, float* logdet, float* phi, float* U, float* W, float* E,
                            float* rowterm, cudaStream_t stream,
                            GFormat g_format = GFormat::fp32,
                            Pivots pivots = Pivots::diagonal_first);

}  // namespace cuda
}  // namespace blm
