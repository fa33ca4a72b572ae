// The fused S = pi @ P kernel of cuda/barrier_fused_s.cuh (P_s = vec(q~_s k~_s^T) formed in
// registers, never in memory) on TF32 tensor cores.
//
// Block (bh, tile of 64 slots k0.., chunk of 128 columns c0 = 128 chunk) with 4 warps; warp w
// owns slots k0 + 16 w .. + 15 and all 128 columns: 16 accumulator tiles of 16 x 8 (64 fp32
// registers per thread).  Column n of the chunk is S column c0 + n = i D + j with
// i = chunk NI + n / D, j = n % D, NI = 128 / D values of i per chunk (2 for D = 64, 4 for 32).
// Loop over s tiles of 32 below the tile's largest counted position t_max (pi[k, s] = 0 for
// s >= rows[k] >= ... so later tiles add nothing):
//   shared pi tile  [64][32] (rounded to TF32 once, when staged)
//   shared k~ tile  [32][D]  and the tile's q~ columns [32][NI]
//   per 8 s (one k-step): A fragment from the pi tile; B(s, n) = tf32(q~_s[i(n)] * k~_s[j(n)])
//   computed in registers from the two shared tiles; mma into the accumulators.
// Then the rows k < K are stored (padding slots have zero pi rows, hence zero S rows).
//
// Why TF32 m16n8k8 and not bf16 m16n8k16: the path it replaces is cuBLAS with TF32 inputs
// (10-bit mantissa); bf16 (7 bits) would make S 8x less precise than today and J = I - c (S -
// qbar kbar^T) loses digits to cancellation.  With both operands rounded to TF32 (round to
// nearest, cvt.rna) each product pi_ks P_s,ij has relative error <= 2^-10 and the fp32 sum is
// as cuBLAS's up to order.
//
// Fragment layouts of mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (PTX ISA), lane =
// 4 g + c (g = lane / 4 in 0..7, c = lane % 4 in 0..3); every index below is derived from these:
//   A (16 x 8, row major), 4 registers:  a0 = A[g][c], a1 = A[g + 8][c], a2 = A[g][c + 4],
//                                        a3 = A[g + 8][c + 4]
//   B (8 x 8, "col": element (row k, col n)), 2 registers:  b0 = B[c][g], b1 = B[c + 4][g]
//   C/D (16 x 8), 4 fp32 registers:      d0 = C[g][2c], d1 = C[g][2c + 1], d2 = C[g + 8][2c],
//                                        d3 = C[g + 8][2c + 1]
// Here A = pi[slot, s] (rows: slots, k-dimension: s), B = P[s, column], C = S[slot, column].
//
// Shared-memory banks: the pi tile has row stride 36 (A reads hit bank 4 g + c: 32 distinct),
// the k~ tile row stride D + 8 (B reads hit bank 8 c + g: 32 distinct); the q~ reads are 4
// addresses per warp (broadcast).
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "cuda/barrier_fused_s.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr int kWarps = kFusedRows / 16;  // 4: one 16-row band of slots each
constexpr int kThreadsF = 32 * kWarps;
constexpr int kPiLd = kFusedSteps + 4;   // 36

template <int D>
struct FusedSmem {
  static constexpr int NI = kFusedCols / D;  // values of i per chunk
  static constexpr int kLd = D + 8;          // k~ tile row stride
  uint32_t pi[kFusedRows * kPiLd];           // TF32 bits of pi[slot][s]
  float k[kFusedSteps * kLd];                // k~[s][j]
  float q[kFusedSteps * NI];                 // q~[s][chunk NI + il]
  int tmax;
};

// Stages s tile s0: pi (TF32, zeros outside [K) x [T)), k~ and the chunk's q~ (zeros past T).
template <int D>
__device__ __forceinline__ void stage_tile(FusedSmem<D>& sm, const float* __restrict__ Pi,
                                           const float* __restrict__ Qc,
                                           const float* __restrict__ Kc, int64_t bh, int T,
                                           int K, int k0, int s0, int chunk) {
  constexpr int NI = FusedSmem<D>::NI, Ld = FusedSmem<D>::kLd;
  const int tid = threadIdx.x;
  // pi: 32 consecutive s of one slot per warp-row: 128-byte coalesced reads.
  for (int idx = tid; idx < kFusedRows * kFusedSteps; idx += kThreadsF) {
    const int r = idx / kFusedSteps, sc = idx % kFusedSteps;
    const int k = k0 + r, s = s0 + sc;
    const float v = (k < K && s < T) ? Pi[(bh * K + k) * T + s] : 0.0f;
    sm.pi[r * kPiLd + sc] = to_tf32(v);
  }
  for (int idx = tid; idx < kFusedSteps * D; idx += kThreadsF) {
    const int sr = idx / D, j = idx % D, s = s0 + sr;
    sm.k[sr * Ld + j] = s < T ? Kc[(bh * T + s) * D + j] : 0.0f;
  }
  for (int idx = tid; idx < kFusedSteps * NI; idx += kThreadsF) {
    const int sr = idx / NI, il = idx % NI, s = s0 + sr;
    sm.q[sr * NI + il] = s < T ? Qc[(bh * T + s) * D + chunk * NI + il] : 0.0f;
  }
}

// One k-step (8 values of s at offset ks of the staged tile) for warp w: acc[nt] += A B_nt.
// Accumulator tile nt covers chunk columns 8 nt .. 8 nt + 7, i.e. il = nt / (D / 8),
// j = 8 (nt % (D / 8)) + 0..7.
template <int D>
__device__ __forceinline__ void kstep(const FusedSmem<D>& sm, int warp, int g, int c, int ks,
                                      float (&acc)[kFusedCols / 8][4]) {
  constexpr int NI = FusedSmem<D>::NI, Ld = FusedSmem<D>::kLd, JG = D / 8;
  const int r0 = 16 * warp + g;
  uint32_t a[4];
  a[0] = sm.pi[r0 * kPiLd + ks + c];
  a[1] = sm.pi[(r0 + 8) * kPiLd + ks + c];
  a[2] = sm.pi[r0 * kPiLd + ks + c + 4];
  a[3] = sm.pi[(r0 + 8) * kPiLd + ks + c + 4];
  // B rows (values of s) of this thread: ks + c (b0) and ks + c + 4 (b1).
  const int sa = ks + c, sb = ks + c + 4;
  float qa[NI], qb[NI];
#pragma unroll
  for (int il = 0; il < NI; ++il) qa[il] = sm.q[sa * NI + il], qb[il] = sm.q[sb * NI + il];
#pragma unroll
  for (int jg = 0; jg < JG; ++jg) {
    const float ka = sm.k[sa * Ld + 8 * jg + g], kb = sm.k[sb * Ld + 8 * jg + g];  // B col g
#pragma unroll
    for (int il = 0; il < NI; ++il)
      mma_tf32(acc[il * JG + jg], a, to_tf32(qa[il] * ka), to_tf32(qb[il] * kb));
  }
}

template <int D>
__global__ void __launch_bounds__(kThreadsF) fused_s_kernel(
    const float* __restrict__ Pi, const float* __restrict__ Qc, const float* __restrict__ Kc,
    const int32_t* __restrict__ rows, int H, int T, int K, float* __restrict__ S) {
  static_assert(kFusedCols % D == 0 && D % 8 == 0, "chunk = whole values of i");
  constexpr int NT = kFusedCols / 8;
  __shared__ FusedSmem<D> sm;
  const int chunk = blockIdx.x, k0 = blockIdx.y * kFusedRows;
  const int64_t bh = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane / 4, c = lane % 4;
  if (threadIdx.x == 0) {
    // Largest counted position of the tile's slots (-1 if all padding): s < tmax suffices.
    const int32_t* rw = rows + (bh / H) * K;
    int m = -1;
    for (int k = k0; k < min(k0 + kFusedRows, K); ++k) m = max(m, rw[k]);
    sm.tmax = m;
  }
  __syncthreads();
  const int tmax = sm.tmax;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
  for (int s0 = 0; s0 < tmax; s0 += kFusedSteps) {
    __syncthreads();  // the previous tile's readers are done
    stage_tile<D>(sm, Pi, Qc, Kc, bh, T, K, k0, s0, chunk);
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kFusedSteps; ks += 8) kstep<D>(sm, warp, g, c, ks, acc);
  }
  // d0, d1 -> row g, columns 2c, 2c + 1; d2, d3 -> row g + 8 (8-byte stores).
  constexpr int64_t DD = static_cast<int64_t>(D) * D;
  const int ra = k0 + 16 * warp + g, rb = ra + 8;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t col = static_cast<int64_t>(chunk) * kFusedCols + 8 * nt + 2 * c;
    if (ra < K)
      *reinterpret_cast<float2*>(S + (bh * K + ra) * DD + col) = make_float2(acc[nt][0], acc[nt][1]);
    if (rb < K)
      *reinterpret_cast<float2*>(S + (bh * K + rb) * DD + col) = make_float2(acc[nt][2], acc[nt][3]);
  }
}

template <int D>
void launch_fused(const float* Pi, const float* Qc, const float* Kc, const int32_t* rows,
                  int64_t BH, int H, int T, int K, float* S, cudaStream_t stream) {
  const dim3 grid(D * D / kFusedCols, static_cast<unsigned>(ceil_div(K, kFusedRows)),
                  static_cast<unsigned>(BH));
  fused_s_kernel<D><<<grid, kThreadsF, 0, stream>>>(Pi, Qc, Kc, rows, H, T, K, S);
  BLM_CHECK_LAUNCH("barrier_fused_s");
}

}  // namespace

bool barrier_fused_s_supported(int D, int64_t BH) {
  return (D == 32 || D == 64) && BH <= 65535;
}

bool barrier_fused_s_from_env() {
  const char* v = std::getenv("BLM_BARRIER_FUSED_S");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "0") == 0) return false;
  if (std::strcmp(v, "1") == 0) return true;
  throw ConfigError(std::string("environment BLM_BARRIER_FUSED_S: unknown value '") + v +
                    "' (0 or 1)");
}

void barrier_fused_s(const float* Pi, const float* Qc, const float* Kc, const int32_t* rows,
                     int64_t BH, int H, int T, int K, int D, float* S, cudaStream_t stream) {
  if (!barrier_fused_s_supported(D, BH))
    throw DeviceError("barrier_fused_s: head size " + std::to_string(D) + " or " +
                      std::to_string(BH) + " sequence-heads unsupported (dh 32, 64; <= 65535)");
  if (BH == 0 || K <= 0) return;
  if (D == 32) launch_fused<32>(Pi, Qc, Kc, rows, BH, H, T, K, S, stream);
  else launch_fused<64>(Pi, Qc, Kc, rows, BH, H, T, K, S, stream);
}

}  // namespace cuda
}  // namespace blm
