// Flash-style causal attention on tensor cores (cuda/attention_flash.h says what it computes).
//
// Blocks of 4 warps (128 threads) own 64 rows, 16 per warp; key (or query) tiles of 64 rows are
// streamed through shared memory.  Products are mma.sync.m16n8k16 (bf16 in, fp32 accumulate),
// with the PTX fragment layouts (g = lane / 4, c = lane % 4):
//   A 16x16 row-major:  a0 = (g, 2c..2c+1)   a1 = (g+8, 2c..)   a2 = (g, 2c+8..)   a3 = (g+8, 2c+8..)
//   B 16x8  (k x n):    b0 = (k 2c..2c+1, n g)                  b1 = (k 2c+8..2c+9, n g)
//   C 16x8 fp32:        c0, c1 = (g, 2c), (g, 2c+1)             c2, c3 = (g+8, 2c), (g+8, 2c+1)
// (two bf16 per 32-bit register, the lower index in the low half).  A C fragment pair of score
// columns [16j, 16j+16) is exactly the A fragment of those 16 columns, so probabilities go from
// one product into the next without shared memory (FlashAttention-2).
//
//   forward  (per 64 queries): S = Q K^T, online softmax (running max m, sum l), O += P V;
//            o = O / l, lse = m + log l
//   dK, dV   (per 64 keys):    over query tiles t >= s: S^T = K Q^T, P^T = exp(S^T/sqrt(dh) -
//            lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q
//   dQ       (per 64 queries): over key tiles s <= t: P, dP = dO V^T, dS = P (dP - D), dQ += dS K
// dK and dQ are scaled by 1/sqrt(dh) at the end.  No atomics: deterministic.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cuda/attention_flash.h"
#include "cuda/common.cuh"

namespace blm {
namespace cuda {

namespace {

using bf16 = __nv_bfloat16;

constexpr int kFlashThreads = 128;  // 4 warps
constexpr int kTile = 64;           // rows per block and per streamed tile

template <int DH>
struct Flash {
  static constexpr int LD = DH + 8;  // shared row stride (bf16): 16-byte rows, fewer conflicts
  static constexpr int KS = DH / 16;  // k-steps over the head dimension
  static constexpr int NO = DH / 8;   // n-tiles of a [16, DH] accumulator
  static constexpr size_t tile_bytes = static_cast<size_t>(kTile) * LD * sizeof(bf16);
};

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(bf16 lo, bf16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}
// Two consecutive bf16 (4-byte aligned: even element offsets of 4-byte aligned rows).
__device__ __forceinline__ uint32_t load2(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A fragment of the 16x16 block at X (row-major, row stride ld); rows at or beyond `valid_rows`
// (counted from X's first row) read as zero.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* X, int ld, int g, int c,
                                       int valid_rows = 16) {
  a[0] = g < valid_rows ? load2(X + g * ld + 2 * c) : 0u;
  a[1] = g + 8 < valid_rows ? load2(X + (g + 8) * ld + 2 * c) : 0u;
  a[2] = g < valid_rows ? load2(X + g * ld + 2 * c + 8) : 0u;
  a[3] = g + 8 < valid_rows ? load2(X + (g + 8) * ld + 2 * c + 8) : 0u;
}
// B fragment with B[k][n] = Y[n][k] (Y row-major at [n0][k0]): contiguous pairs.
__device__ __forceinline__ void load_b_rows(uint32_t& b0, uint32_t& b1, const bf16* Y, int ld, int g,
                                            int c) {
  b0 = load2(Y + g * ld + 2 * c);
  b1 = load2(Y + g * ld + 2 * c + 8);
}
// B fragment with B[k][n] = Y[k][n] (Y row-major at [k0][n0]): pairs from two rows.
__device__ __forceinline__ void load_b_cols(uint32_t& b0, uint32_t& b1, const bf16* Y, int ld, int g,
                                            int c) {
  b0 = pack2(Y[(2 * c) * ld + g], Y[(2 * c + 1) * ld + g]);
  b1 = pack2(Y[(2 * c + 8) * ld + g], Y[(2 * c + 9) * ld + g]);
}
// The A fragment of columns [16j, 16j+16) of a [16, 64] C-fragment array.
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&s)[8][4], int j) {
  a[0] = pack2(s[2 * j][0], s[2 * j][1]);
  a[1] = pack2(s[2 * j][2], s[2 * j][3]);
  a[2] = pack2(s[2 * j + 1][0], s[2 * j + 1][1]);
  a[3] = pack2(s[2 * j + 1][2], s[2 * j + 1][3]);
}

// Rows [r0, r0 + 64) of a [T, DH] bf16 matrix into shared [64][LD]; rows >= T become zeros.
template <int DH>
__device__ void load_tile(bf16* sm, const bf16* src, int r0, int T) {
  constexpr int CH = DH / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < kTile * CH; idx += kFlashThreads) {
    const int r = idx / CH, ch = idx % CH, t = r0 + r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (t < T) val = *reinterpret_cast<const uint4*>(src + static_cast<size_t>(t) * DH + ch * 8);
    *reinterpret_cast<uint4*>(sm + r * Flash<DH>::LD + ch * 8) = val;
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// S[16, 64] (+)= A-rows (fragments a[KS]) times the tile's rows as B (S = X Y^T).
template <int DH>
__device__ __forceinline__ void scores(float (&s)[8][4], const uint32_t (&a)[Flash<DH>::KS][4],
                                       const bf16* tile, int g, int c) {
  constexpr int LD = Flash<DH>::LD;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < Flash<DH>::KS; ++kk) {
      uint32_t b0, b1;
      load_b_rows(b0, b1, tile + (nt * 8) * LD + kk * 16, LD, g, c);
      mma16816(s[nt], a[kk], b0, b1);
    }
  }
}

// acc[16, DH] += P[16, 64] (C fragments) times the tile [64, DH] (acc += P Y).
template <int DH>
__device__ __forceinline__ void accumulate_pv(float (&acc)[Flash<DH>::NO][4], const float (&p)[8][4],
                                              const bf16* tile, int g, int c) {
  constexpr int LD = Flash<DH>::LD;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t pa[4];
    c_to_a(pa, p, j);
#pragma unroll
    for (int no = 0; no < Flash<DH>::NO; ++no) {
      uint32_t b0, b1;
      load_b_cols(b0, b1, tile + (j * 16) * LD + no * 8, LD, g, c);
      mma16816(acc[no], pa, b0, b1);
    }
  }
}

// ------------------------------------------------------------------ forward

template <int DH>
__global__ void __launch_bounds__(kFlashThreads) flash_fwd_kernel(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    bf16* __restrict__ o, float* __restrict__ lse, int T, float scale) {
  extern __shared__ __align__(16) unsigned char flash_fwd_smem[];
  constexpr int LD = Flash<DH>::LD;
  bf16* Ks = reinterpret_cast<bf16*>(flash_fwd_smem);
  bf16* Vs = Ks + kTile * LD;
  const int bh = blockIdx.y, q0 = blockIdx.x * kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const size_t base = static_cast<size_t>(bh) * T * DH;
  const int r0 = q0 + warp * 16, row_a = r0 + g, row_b = r0 + g + 8;

  uint32_t qa[Flash<DH>::KS][4];
#pragma unroll
  for (int kk = 0; kk < Flash<DH>::KS; ++kk)
    load_a(qa[kk], q + base + static_cast<size_t>(r0) * DH + kk * 16, DH, g, c, T - r0);
  float acc[Flash<DH>::NO][4];
#pragma unroll
  for (int no = 0; no < Flash<DH>::NO; ++no) acc[no][0] = acc[no][1] = acc[no][2] = acc[no][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  const int last_key = min(T, q0 + kTile) - 1;
  for (int k0 = 0; k0 <= last_key; k0 += kTile) {
    __syncthreads();  // the previous tiles are no longer read
    load_tile<DH>(Ks, k + base, k0, T);
    load_tile<DH>(Vs, v + base, k0, T);
    __syncthreads();
    float s[8][4];
    scores<DH>(s, qa, Ks, g, c);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * c + (e & 1), row = e < 2 ? row_a : row_b;
        const float z = (key <= row && key < T) ? s[nt][e] * scale : -INFINITY;
        s[nt][e] = z;
        mx[e >> 1] = fmaxf(mx[e >> 1], z);
      }
    float corr[2], mnew[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mnew[h] = fmaxf(m[h], quad_max(mx[h]));
      corr[h] = mnew[h] == -INFINITY ? 1.0f : expf(m[h] - mnew[h]);
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = s[nt][e] == -INFINITY ? 0.0f : expf(s[nt][e] - mnew[e >> 1]);
        s[nt][e] = p;
        rs[e >> 1] += p;
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] = l[h] * corr[h] + quad_sum(rs[h]);
      m[h] = mnew[h];
    }
#pragma unroll
    for (int no = 0; no < Flash<DH>::NO; ++no) {
      acc[no][0] *= corr[0];
      acc[no][1] *= corr[0];
      acc[no][2] *= corr[1];
      acc[no][3] *= corr[1];
    }
    accumulate_pv<DH>(acc, s, Vs, g, c);
  }
  const float inv_a = l[0] > 0.0f ? 1.0f / l[0] : 0.0f, inv_b = l[1] > 0.0f ? 1.0f / l[1] : 0.0f;
#pragma unroll
  for (int no = 0; no < Flash<DH>::NO; ++no) {
    const int col = no * 8 + 2 * c;
    if (row_a < T)
      *reinterpret_cast<__nv_bfloat162*>(o + base + static_cast<size_t>(row_a) * DH + col) =
          __floats2bfloat162_rn(acc[no][0] * inv_a, acc[no][1] * inv_a);
    if (row_b < T)
      *reinterpret_cast<__nv_bfloat162*>(o + base + static_cast<size_t>(row_b) * DH + col) =
          __floats2bfloat162_rn(acc[no][2] * inv_b, acc[no][3] * inv_b);
  }
  if (c == 0) {
    if (row_a < T) lse[static_cast<size_t>(bh) * T + row_a] = m[0] + logf(l[0]);
    if (row_b < T) lse[static_cast<size_t>(bh) * T + row_b] = m[1] + logf(l[1]);
  }
}

// ------------------------------------------------------------------ backward: dK, dV

template <int DH>
__global__ void __launch_bounds__(kFlashThreads) flash_bwd_dkdv_kernel(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ dO, const float* __restrict__ lse, const float* __restrict__ D,
    float* __restrict__ dk, float* __restrict__ dv, int T, float scale) {
  extern __shared__ __align__(16) unsigned char flash_dkdv_smem[];
  constexpr int LD = Flash<DH>::LD;
  bf16* Ks = reinterpret_cast<bf16*>(flash_dkdv_smem);
  bf16* Vs = Ks + kTile * LD;
  bf16* Qs = Vs + kTile * LD;
  bf16* dOs = Qs + kTile * LD;
  float* lse_s = reinterpret_cast<float*>(dOs + kTile * LD);
  float* D_s = lse_s + kTile;
  const int bh = blockIdx.y, s0 = blockIdx.x * kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const size_t base = static_cast<size_t>(bh) * T * DH;
  const int key_a = s0 + warp * 16 + g, key_b = key_a + 8;
  load_tile<DH>(Ks, k + base, s0, T);
  load_tile<DH>(Vs, v + base, s0, T);
  float dka[Flash<DH>::NO][4], dva[Flash<DH>::NO][4];
#pragma unroll
  for (int no = 0; no < Flash<DH>::NO; ++no)
#pragma unroll
    for (int e = 0; e < 4; ++e) dka[no][e] = dva[no][e] = 0.0f;

  for (int t0 = s0; t0 < T; t0 += kTile) {  // queries t >= s: from the tile holding s0
    __syncthreads();
    load_tile<DH>(Qs, q + base, t0, T);
    load_tile<DH>(dOs, dO + base, t0, T);
    for (int i = threadIdx.x; i < kTile; i += kFlashThreads) {
      const bool in = t0 + i < T;
      lse_s[i] = in ? lse[static_cast<size_t>(bh) * T + t0 + i] : 0.0f;
      D_s[i] = in ? D[static_cast<size_t>(bh) * T + t0 + i] : 0.0f;
    }
    __syncthreads();
    // P^T [16 keys, 64 queries] from S^T = K Q^T
    uint32_t ka[Flash<DH>::KS][4];
#pragma unroll
    for (int kk = 0; kk < Flash<DH>::KS; ++kk) load_a(ka[kk], Ks + (warp * 16) * LD + kk * 16, LD, g, c);
    float pt[8][4];
    scores<DH>(pt, ka, Qs, g, c);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ti = nt * 8 + 2 * c + (e & 1), tq = t0 + ti, key = e < 2 ? key_a : key_b;
        const bool valid = tq < T && key < T && tq >= key;
        pt[nt][e] = valid ? expf(pt[nt][e] * scale - lse_s[ti]) : 0.0f;
      }
    accumulate_pv<DH>(dva, pt, dOs, g, c);  // dV += P^T dO
    // dP^T = V dO^T, then dS^T = P^T (dP^T - D_t) in place of dP^T
    uint32_t va[Flash<DH>::KS][4];
#pragma unroll
    for (int kk = 0; kk < Flash<DH>::KS; ++kk) load_a(va[kk], Vs + (warp * 16) * LD + kk * 16, LD, g, c);
    float dst[8][4];
    scores<DH>(dst, va, dOs, g, c);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ti = nt * 8 + 2 * c + (e & 1);
        dst[nt][e] = pt[nt][e] * (dst[nt][e] - D_s[ti]);
      }
    accumulate_pv<DH>(dka, dst, Qs, g, c);  // dK += dS^T Q
  }
#pragma unroll
  for (int no = 0; no < Flash<DH>::NO; ++no) {
    const int col = no * 8 + 2 * c;
    if (key_a < T) {
      float* pk = dk + base + static_cast<size_t>(key_a) * DH + col;
      float* pv = dv + base + static_cast<size_t>(key_a) * DH + col;
      pk[0] = dka[no][0] * scale;
      pk[1] = dka[no][1] * scale;
      pv[0] = dva[no][0];
      pv[1] = dva[no][1];
    }
    if (key_b < T) {
      float* pk = dk + base + static_cast<size_t>(key_b) * DH + col;
      float* pv = dv + base + static_cast<size_t>(key_b) * DH + col;
      pk[0] = dka[no][2] * scale;
      pk[1] = dka[no][3] * scale;
      pv[0] = dva[no][2];
      pv[1] = dva[no][3];
    }
  }
}

// ------------------------------------------------------------------ backward: dQ

template <int DH>
__global__ void __launch_bounds__(kFlashThreads) flash_bwd_dq_kernel(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ dO, const float* __restrict__ lse, const float* __restrict__ D,
    float* __restrict__ dq, int T, float scale) {
  extern __shared__ __align__(16) unsigned char flash_dq_smem[];
  constexpr int LD = Flash<DH>::LD;
  bf16* Ks = reinterpret_cast<bf16*>(flash_dq_smem);
  bf16* Vs = Ks + kTile * LD;
  const int bh = blockIdx.y, q0 = blockIdx.x * kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const size_t base = static_cast<size_t>(bh) * T * DH;
  const int r0 = q0 + warp * 16, row_a = r0 + g, row_b = r0 + g + 8;
  uint32_t qa[Flash<DH>::KS][4], da[Flash<DH>::KS][4];
#pragma unroll
  for (int kk = 0; kk < Flash<DH>::KS; ++kk) {
    load_a(qa[kk], q + base + static_cast<size_t>(r0) * DH + kk * 16, DH, g, c, T - r0);
    load_a(da[kk], dO + base + static_cast<size_t>(r0) * DH + kk * 16, DH, g, c, T - r0);
  }
  const size_t rbase = static_cast<size_t>(bh) * T;
  const float lse_a = row_a < T ? lse[rbase + row_a] : 0.0f, lse_b = row_b < T ? lse[rbase + row_b] : 0.0f;
  const float D_a = row_a < T ? D[rbase + row_a] : 0.0f, D_b = row_b < T ? D[rbase + row_b] : 0.0f;
  float acc[Flash<DH>::NO][4];
#pragma unroll
  for (int no = 0; no < Flash<DH>::NO; ++no) acc[no][0] = acc[no][1] = acc[no][2] = acc[no][3] = 0.0f;

  const int last_key = min(T, q0 + kTile) - 1;
  for (int k0 = 0; k0 <= last_key; k0 += kTile) {
    __syncthreads();
    load_tile<DH>(Ks, k + base, k0, T);
    load_tile<DH>(Vs, v + base, k0, T);
    __syncthreads();
    float p[8][4], ds[8][4];
    scores<DH>(p, qa, Ks, g, c);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * c + (e & 1), row = e < 2 ? row_a : row_b;
        const bool valid = key <= row && row < T;
        p[nt][e] = valid ? expf(p[nt][e] * scale - (e < 2 ? lse_a : lse_b)) : 0.0f;
      }
    scores<DH>(ds, da, Vs, g, c);  // dP = dO V^T
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nt][e] = p[nt][e] * (ds[nt][e] - (e < 2 ? D_a : D_b));
    accumulate_pv<DH>(acc, ds, Ks, g, c);  // dQ += dS K
  }
#pragma unroll
  for (int no = 0; no < Flash<DH>::NO; ++no) {
    const int col = no * 8 + 2 * c;
    if (row_a < T) {
      dq[base + static_cast<size_t>(row_a) * DH + col] = acc[no][0] * scale;
      dq[base + static_cast<size_t>(row_a) * DH + col + 1] = acc[no][1] * scale;
    }
    if (row_b < T) {
      dq[base + static_cast<size_t>(row_b) * DH + col] = acc[no][2] * scale;
      dq[base + static_cast<size_t>(row_b) * DH + col + 1] = acc[no][3] * scale;
    }
  }
}

template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)));
}

template <int DH>
void forward_dh(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, bf16* o,
                float* lse, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(s.T, kTile)), static_cast<unsigned>(s.B * s.H));
  const size_t smem = 2 * Flash<DH>::tile_bytes;
  allow_smem(flash_fwd_kernel<DH>, smem);
  flash_fwd_kernel<DH><<<grid, kFlashThreads, smem, stream>>>(q, k, v, o, lse, s.T,
                                                              1.0f / std::sqrt(static_cast<float>(DH)));
  BLM_CHECK_LAUNCH("flash_attention_forward");
}

template <int DH>
void backward_dh(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v,
                 const bf16* dO, const float* lse, const float* D, float* dq, float* dk,
                 float* dv, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(s.T, kTile)), static_cast<unsigned>(s.B * s.H));
  const float scale = 1.0f / std::sqrt(static_cast<float>(DH));
  const size_t smem_kv = 4 * Flash<DH>::tile_bytes + 2 * kTile * sizeof(float);
  allow_smem(flash_bwd_dkdv_kernel<DH>, smem_kv);
  flash_bwd_dkdv_kernel<DH><<<grid, kFlashThreads, smem_kv, stream>>>(q, k, v, dO, lse, D, dk, dv,
                                                                      s.T, scale);
  BLM_CHECK_LAUNCH("flash_attention_backward dk dv");
  const size_t smem_q = 2 * Flash<DH>::tile_bytes;
  allow_smem(flash_bwd_dq_kernel<DH>, smem_q);
  flash_bwd_dq_kernel<DH><<<grid, kFlashThreads, smem_q, stream>>>(q, k, v, dO, lse, D, dq, s.T,
                                                                   scale);
  BLM_CHECK_LAUNCH("flash_attention_backward dq");
}

[[noreturn]] void unsupported(int dh) {
  throw DeviceError("flash attention: head size " + std::to_string(dh) +
                    " (the kernels support 32, 64 and 128)");
}

}  // namespace

bool flash_attention_enabled() {
  const char* v = std::getenv("BLM_ATTENTION");
  return v != nullptr && std::strcmp(v, "flash") == 0;
}

void flash_attention_forward(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v,
                             bf16* o, float* lse, cudaStream_t stream) {
  if (s.B == 0 || s.T == 0) return;
  switch (s.dh) {
    case 32: return forward_dh<32>(s, q, k, v, o, lse, stream);
    case 64: return forward_dh<64>(s, q, k, v, o, lse, stream);
    case 128: return forward_dh<128>(s, q, k, v, o, lse, stream);
    default: unsupported(s.dh);
  }
}

void flash_attention_backward(const AttentionShape& s, const bf16* q, const bf16* k,
                              const bf16* v, const bf16* dO, const float* lse, const float* D,
                              float* dq, float* dk, float* dv, cudaStream_t stream) {
  if (s.B == 0 || s.T == 0) return;
  switch (s.dh) {
    case 32: return backward_dh<32>(s, q, k, v, dO, lse, D, dq, dk, dv, stream);
    case 64: return backward_dh<64>(s, q, k, v, dO, lse, D, dq, dk, dv, stream);
    case 128: return backward_dh<128>(s, q, k, v, dO, lse, D, dq, dk, dv, stream);
    default: unsupported(s.dh);
  }
}

}  // namespace cuda
}  // namespace blm
