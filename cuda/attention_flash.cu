// Flash-style causal attention on tensor cores (cuda/attention_flash.h says what it computes).
//
// Work split.  Each warp owns 16 rows (queries, or keys in the dK/dV kernel); key or query tiles
// of 64 rows are staged through shared memory, read from the [B, T, *] tensors with 16-byte loads
// (qkv fp32, rounded to bf16 on the way, or bf16; dout fp32; no per-head copies in global memory):
//   forward  (one block per 16*W queries, W warps): over key tiles s <= t:
//            S = Q K^T, online softmax in base 2 (running max m, sum l), O += P V;
//            out = O / l,  lse = (m + log2 l) ln 2
//   dQ       (one block per 16*W queries): D_t = dout_t . out_t (fp32, before dO is rounded),
//            stored for the dK/dV kernel; over key tiles s <= t: P = exp2(S c - lse log2 e),
//            dP = dO V^T, dS = P (dP - D), dQ += dS K
//   dK, dV   (one block per 64 keys, 4 warps): over query tiles t >= s: S^T = K Q^T, P^T,
//            dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q
// with c = log2(e) / sqrt(dh) folded into one multiply, and dK, dQ scaled by 1/sqrt(dh) at the
// end.  The dQ kernel runs first because it produces D.  No atomics: deterministic.
//
// Products are mma.sync.m16n8k16 (bf16 in, fp32 accumulate), with the PTX fragment layouts
// (g = lane / 4, c = lane % 4; two bf16 per 32-bit register, the lower index in the low half):
//   A 16x16 row-major:  a0 = (g, 2c..2c+1)   a1 = (g+8, 2c..)   a2 = (g, 2c+8..)   a3 = (g+8, 2c+8..)
//   B 16x8  (k x n):    b0 = (k 2c..2c+1, n g)                  b1 = (k 2c+8..2c+9, n g)
//   C 16x8 fp32:        c0, c1 = (g, 2c), (g, 2c+1)             c2, c3 = (g+8, 2c), (g+8, 2c+1)
// Shared-memory fragments come from ldmatrix (x4: four 8x8 matrices, lanes 8j..8j+7 give the row
// addresses of matrix j; .trans for B = a row-major [k][n] tile).  A C fragment pair of score
// columns [16j, 16j+16) is exactly the A fragment of those 16 columns, so probabilities go from
// one product into the next without shared memory (FlashAttention-2).
// Blocks run the longest causal rows first (query tile order reversed) to even out the tail.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

#include "core/error.h"
#include "cuda/attention_flash.h"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace blm {
namespace cuda {

namespace {

using bf16 = __nv_bfloat16;

constexpr int kTile = 64;          // rows of a staged tile; keys per dK/dV block
constexpr int kKvWarps = 4;        // dK/dV kernel: 4 warps x 16 keys = kTile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Warps of the query-tile kernels (forward, dQ): 8 (128 queries per block, each staged K/V tile
// serves twice the rows of a 64-row block) except at dh 128, where a warp's accumulators alone
// take 64 registers and 4 warps keep two blocks resident per SM.
constexpr int query_warps(int dh) { return dh == 128 ? 4 : 8; }
// The forward at dh <= 64 is fitted to 128 registers (__launch_bounds__ minimum 2 blocks of 8
// warps per SM; ptxas: 8 bytes spilled at dh 64).  The backward kernels are not capped: at 128
// registers the dQ kernel spills ~100 bytes per thread in its loop (measured with -Xptxas -v).
constexpr int fwd_min_blocks(int dh) { return dh == 128 ? 1 : 2; }

template <int DH>
struct Flash {
  static constexpr int LD = DH + 8;   // shared row stride (bf16): 16-byte rows, ldmatrix conflict-free
  static constexpr int KS = DH / 16;  // k-steps over the head dimension
  static constexpr int NO = DH / 8;   // n-tiles of a [16, DH] accumulator
  static constexpr size_t tile_bytes = static_cast<size_t>(kTile) * LD * sizeof(bf16);
};

// ------------------------------------------------------------------ small device helpers

// 2^x (ex2.approx: relative error ~2^-22, 2^-inf = +0).
__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Calls f(std::integral_constant<int, I>) for I = 0..N-1: an unrolled loop whose index is a
// compile-time constant, so shared-memory offsets become ldmatrix immediates (with #pragma
// unroll the compiler hoists every base + offset sum into its own register: 64 more at dh 128).
template <class F, int... I>
__device__ __forceinline__ void unrolled_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
__device__ __forceinline__ void unrolled(F&& f) {
  unrolled_impl(f, std::make_integer_sequence<int, N>{});
}

// This lane's ldmatrix row address for the 16x16 block at X (shared, row stride LD), in one of
// two matrix orders:
//   "row pairs": (rows 0-7, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 0-7),
//                (rows 8-15, cols 8-15): the B fragments b0, b1 of two n-tiles when
//                B[k][n] = X[n][k] (X holds n rows of k);
//   "col pairs": (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15),
//                (rows 8-15, cols 8-15): the A fragment a0..a3 of X, and, loaded transposed,
//                the B fragments of two n-tiles when B[k][n] = X[k][n].
template <int LD>
__device__ __forceinline__ uint32_t lane_address_row_pairs(const bf16* X, int lane) {
  const int j = lane >> 3, row = (lane & 7) + ((j >> 1) << 3), col = (j & 1) << 3;
  return static_cast<uint32_t>(__cvta_generic_to_shared(X + row * LD + col));
}
template <int LD>
__device__ __forceinline__ uint32_t lane_address_col_pairs(const bf16* X, int lane) {
  const int j = lane >> 3, row = (lane & 7) + ((j & 1) << 3), col = (j >> 1) << 3;
  return static_cast<uint32_t>(__cvta_generic_to_shared(X + row * LD + col));
}

// Two consecutive elements of global memory as a bf16 pair: fp32 (8-byte aligned) rounded, or
// bf16 (4-byte aligned) as stored.
__device__ __forceinline__ uint32_t load_pair(const float* p) {
  const float2 f = __ldg(reinterpret_cast<const float2*>(p));
  return pack_bf16x2(f.x, f.y);
}
__device__ __forceinline__ uint32_t load_pair(const bf16* p) {
  return __ldg(reinterpret_cast<const unsigned int*>(p));
}
// A fragment of the 16x16 block at X (global fp32 or bf16, row stride ld) in bf16; rows at or
// beyond valid_rows (counted from X's first row) read as zero and are not touched.
template <class In>
__device__ __forceinline__ void load_a_global(uint32_t (&a)[4], const In* X, int ld, int g,
                                              int c, int valid_rows) {
  const size_t ra = static_cast<size_t>(g) * ld, rb = static_cast<size_t>(g + 8) * ld;
  a[0] = g < valid_rows ? load_pair(X + ra + 2 * c) : 0u;
  a[1] = g + 8 < valid_rows ? load_pair(X + rb + 2 * c) : 0u;
  a[2] = g < valid_rows ? load_pair(X + ra + 2 * c + 8) : 0u;
  a[3] = g + 8 < valid_rows ? load_pair(X + rb + 2 * c + 8) : 0u;
}

// The A fragment of columns [16j, 16j+16) of a [16, 64] C-fragment array.
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&s)[8][4], int j) {
  a[0] = pack_bf16x2(s[2 * j][0], s[2 * j][1]);
  a[1] = pack_bf16x2(s[2 * j][2], s[2 * j][3]);
  a[2] = pack_bf16x2(s[2 * j + 1][0], s[2 * j + 1][1]);
  a[3] = pack_bf16x2(s[2 * j + 1][2], s[2 * j + 1][3]);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// One 16-byte global load of the staged tensors and its bf16 form in shared memory: 4 fp32
// (rounded: 8 bytes stored) or 8 bf16 (stored as loaded).
template <class In>
struct Chunk;
template <>
struct Chunk<float> {
  static constexpr int kElems = 4;
  using Raw = float4;
  __device__ static Raw zero() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }
  __device__ static void store(bf16* dst, const Raw& v) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
  }
};
template <>
struct Chunk<bf16> {
  static constexpr int kElems = 8;
  using Raw = uint4;
  __device__ static Raw zero() { return make_uint4(0u, 0u, 0u, 0u); }
  __device__ static void store(bf16* dst, const Raw& v) { *reinterpret_cast<uint4*>(dst) = v; }
};

// Rows [r0, r0 + 64) of one head's [T, DH] slice (src: row 0, row stride ld elements; fp32 or
// bf16) into shared [64][LD] bf16; rows >= T become zeros.  16-byte loads, issued in batches of up
// to kStageBatch per thread before their stores (latency overlap without holding a whole tile in
// registers next to the accumulators).
constexpr int kStageBatch = 4;
template <int DH, int THREADS, class In>
__device__ __forceinline__ void stage_tile(bf16* sm, const In* __restrict__ src, int ld, int r0,
                                           int T) {
  using C = Chunk<In>;
  constexpr int CH = DH / C::kElems, ITER = kTile * CH / THREADS;
  constexpr int BATCH = ITER < kStageBatch ? ITER : kStageBatch;
  static_assert(kTile * CH % THREADS == 0 && ITER % BATCH == 0, "whole block-wide steps");
#pragma unroll
  for (int i0 = 0; i0 < ITER; i0 += BATCH) {
    typename C::Raw v[BATCH];
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + (i0 + i) * THREADS, r = idx / CH,
                ch = idx % CH;
      v[i] = r0 + r < T ? __ldg(reinterpret_cast<const typename C::Raw*>(
                              src + static_cast<size_t>(r0 + r) * ld + ch * C::kElems))
                        : C::zero();
    }
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + (i0 + i) * THREADS, r = idx / CH,
                ch = idx % CH;
      C::store(sm + r * Flash<DH>::LD + ch * C::kElems, v[i]);
    }
  }
}

// S[16, 64] = A-rows (fragments a[KS]) times the 64 rows of a shared [64][LD] tile as B
// (S = X Y^T); tile: lane_address_row_pairs of the tile's origin.
template <int DH>
__device__ __forceinline__ void scores(float (&s)[8][4], const uint32_t (&a)[Flash<DH>::KS][4],
                                       uint32_t tile) {
  constexpr int LD = Flash<DH>::LD;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
  unrolled<4>([&](auto np) {
    unrolled<Flash<DH>::KS>([&](auto kk) {
      constexpr int n = decltype(np)::value, k = decltype(kk)::value;
      uint32_t b[4];
      ldsm_x4<(n * 16 * LD + k * 16) * 2>(b, tile);
      mma16816(s[2 * n], a[k], b[0], b[1]);
      mma16816(s[2 * n + 1], a[k], b[2], b[3]);
    });
  });
}

// acc[16, DH] += P[16, 64] (C fragments) times a shared [64][LD] tile (acc += P Y); tile:
// lane_address_col_pairs of the tile's origin.
template <int DH>
__device__ __forceinline__ void accumulate_pv(float (&acc)[Flash<DH>::NO][4],
                                              const float (&p)[8][4], uint32_t tile) {
  constexpr int LD = Flash<DH>::LD;
  unrolled<4>([&](auto jc) {
    constexpr int j = decltype(jc)::value;
    uint32_t pa[4];
    c_to_a(pa, p, j);
    unrolled<Flash<DH>::NO / 2>([&](auto npc) {
      constexpr int n = decltype(npc)::value;
      uint32_t b[4];
      ldsm_x4_trans<(j * 16 * LD + n * 16) * 2>(b, tile);
      mma16816(acc[2 * n], pa, b[0], b[1]);
      mma16816(acc[2 * n + 1], pa, b[2], b[3]);
    });
  });
}

// The A fragments of the 16 x DH block at a shared tile's row (address: lane_address_col_pairs).
template <int DH>
__device__ __forceinline__ void load_a_smem(uint32_t (&a)[Flash<DH>::KS][4], uint32_t block) {
  unrolled<Flash<DH>::KS>([&](auto kc) {
    constexpr int k = decltype(kc)::value;
    ldsm_x4<k * 16 * 2>(a[k], block);
  });
}

// Where one (sequence b, head h) lives in the [B, T, *] tensors.
struct HeadView {
  int b, h;
  size_t qkv_off;  // element of q_{b,0} (head h's columns) in qkv [B, T, 3d]
  size_t out_off;  // element of out_{b,0} (head h's columns) in out / dout [B, T, d]
};
__device__ __forceinline__ HeadView head_view(int bh, int T, int H, int dh) {
  HeadView v;
  v.b = bh / H;
  v.h = bh - v.b * H;
  const size_t d = static_cast<size_t>(H) * dh, seq = static_cast<size_t>(v.b) * T;
  v.qkv_off = seq * 3 * d + static_cast<size_t>(v.h) * dh;
  v.out_off = seq * d + static_cast<size_t>(v.h) * dh;
  return v;
}

// ------------------------------------------------------------------ forward

// grid (query tiles, B*H); qkv [B, T, 3d] -> out [B, T, d] bf16, lse [B, H, T].
template <int DH, int W, class In>
__global__ void __launch_bounds__(W * 32, fwd_min_blocks(DH)) flash_fwd_kernel(const In* __restrict__ qkv,
                                                           bf16* __restrict__ out,
                                                           float* __restrict__ lse, int T, int H,
                                                           float scale_log2) {
  constexpr int LD = Flash<DH>::LD, KS = Flash<DH>::KS, NO = Flash<DH>::NO, ROWS = 16 * W;
  extern __shared__ __align__(16) unsigned char flash_fwd_smem[];
  bf16* Ks = reinterpret_cast<bf16*>(flash_fwd_smem);
  bf16* Vs = Ks + kTile * LD;
  const int d = H * DH, ld = 3 * d, bh = blockIdx.y;
  const int q0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * ROWS;  // longest rows first
  const HeadView hv = head_view(bh, T, H, DH);
  const In* qh = qkv + hv.qkv_off;
  const In* kh = qh + d;
  const In* vh = qh + 2 * d;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const uint32_t k_rows = lane_address_row_pairs<LD>(Ks, lane);  // K as B of S = Q K^T
  const uint32_t v_cols = lane_address_col_pairs<LD>(Vs, lane);  // V as B of O += P V
  const int r0 = q0 + warp * 16, row_a = r0 + g, row_b = row_a + 8;

  uint32_t qa[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk)
    load_a_global(qa[kk], qh + static_cast<size_t>(r0) * ld + kk * 16, ld, g, c, T - r0);
  float acc[NO][4];
#pragma unroll
  for (int no = 0; no < NO; ++no) acc[no][0] = acc[no][1] = acc[no][2] = acc[no][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // m in base-2 units

  const int last_key = min(T, q0 + ROWS) - 1;
  for (int k0 = 0; k0 <= last_key; k0 += kTile) {
    __syncthreads();  // the previous tiles are no longer read
    stage_tile<DH, W * 32>(Ks, kh, ld, k0, T);
    stage_tile<DH, W * 32>(Vs, vh, ld, k0, T);
    __syncthreads();
    // Warp-uniform: rows past T, or every key of the tile after every row of this warp.
    if (r0 >= T || k0 > r0 + 15) continue;
    float s[8][4];
    scores<DH>(s, qa, k_rows);
    const bool diagonal = k0 + kTile - 1 > r0;  // some key after some row: mask
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * c + (e & 1), row = e < 2 ? row_a : row_b;
        const float z = (diagonal && key > row) ? -INFINITY : s[nt][e] * scale_log2;
        s[nt][e] = z;
        mx[e >> 1] = fmaxf(mx[e >> 1], z);
      }
    float corr[2], base[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float mnew = fmaxf(m[hf], quad_max(mx[hf]));
      base[hf] = mnew == -INFINITY ? 0.0f : mnew;  // all masked so far: p = 2^-inf = 0
      corr[hf] = exp2_fast(m[hf] - base[hf]);       // m = -inf: 0 (acc and l are 0 anyway)
      m[hf] = mnew;
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2_fast(s[nt][e] - base[e >> 1]);
        s[nt][e] = p;
        rs[e >> 1] += p;
      }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) l[hf] = l[hf] * corr[hf] + quad_sum(rs[hf]);
#pragma unroll
    for (int no = 0; no < NO; ++no) {
      acc[no][0] *= corr[0];
      acc[no][1] *= corr[0];
      acc[no][2] *= corr[1];
      acc[no][3] *= corr[1];
    }
    accumulate_pv<DH>(acc, s, v_cols);
  }
  const float inv_a = l[0] > 0.0f ? 1.0f / l[0] : 0.0f, inv_b = l[1] > 0.0f ? 1.0f / l[1] : 0.0f;
  bf16* oh = out + hv.out_off;
#pragma unroll
  for (int no = 0; no < NO; ++no) {
    const int col = no * 8 + 2 * c;
    if (row_a < T)
      *reinterpret_cast<__nv_bfloat162*>(oh + static_cast<size_t>(row_a) * d + col) =
          __floats2bfloat162_rn(acc[no][0] * inv_a, acc[no][1] * inv_a);
    if (row_b < T)
      *reinterpret_cast<__nv_bfloat162*>(oh + static_cast<size_t>(row_b) * d + col) =
          __floats2bfloat162_rn(acc[no][2] * inv_b, acc[no][3] * inv_b);
  }
  if (c == 0) {
    float* lh = lse + static_cast<size_t>(bh) * T;
    if (row_a < T) lh[row_a] = (m[0] + log2f(l[0])) * kLn2;
    if (row_b < T) lh[row_b] = (m[1] + log2f(l[1])) * kLn2;
  }
}

// ------------------------------------------------------------------ backward: dQ (and D)

// The dO A fragment of the 16x16 block at X (dout fp32, row stride ld) rounded to bf16, and the
// block's share of D for rows g and g+8 (dout . out in fp32; out bf16 at O, row stride ld).
__device__ __forceinline__ void load_dout_a(uint32_t (&a)[4], float (&dsum)[2], const float* X,
                                            const bf16* O, int ld, int g, int c, int valid_rows) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = g + ((i & 1) << 3), col = 2 * c + ((i >> 1) << 3);
    a[i] = 0u;
    if (r < valid_rows) {
      const size_t at = static_cast<size_t>(r) * ld + col;
      const float2 f = __ldg(reinterpret_cast<const float2*>(X + at));
      const float2 o = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(O + at));
      dsum[i & 1] += f.x * o.x + f.y * o.y;
      a[i] = pack_bf16x2(f.x, f.y);
    }
  }
}

// grid (query tiles, B*H).  Writes D [B, H, T] and the q block of dqkv.
template <int DH, int W, class In>
__global__ void __launch_bounds__(W * 32) flash_bwd_dq_kernel(
    const In* __restrict__ qkv, const bf16* __restrict__ out, const float* __restrict__ dout,
    const float* __restrict__ lse, float* __restrict__ Dg, float* __restrict__ dqkv, int T, int H,
    float scale_log2, float scale) {
  constexpr int LD = Flash<DH>::LD, KS = Flash<DH>::KS, NO = Flash<DH>::NO, ROWS = 16 * W;
  extern __shared__ __align__(16) unsigned char flash_dq_smem[];
  bf16* Ks = reinterpret_cast<bf16*>(flash_dq_smem);
  bf16* Vs = Ks + kTile * LD;
  const int d = H * DH, ld = 3 * d, bh = blockIdx.y;
  const int q0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * ROWS;
  const HeadView hv = head_view(bh, T, H, DH);
  const In* qh = qkv + hv.qkv_off;
  const In* kh = qh + d;
  const In* vh = qh + 2 * d;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int r0 = q0 + warp * 16, row_a = r0 + g, row_b = row_a + 8;
  const uint32_t k_rows = lane_address_row_pairs<LD>(Ks, lane);  // K as B of S = Q K^T
  const uint32_t v_rows = lane_address_row_pairs<LD>(Vs, lane);  // V as B of dP = dO V^T
  const uint32_t k_cols = lane_address_col_pairs<LD>(Ks, lane);  // K as B of dQ += dS K

  uint32_t qa[KS][4], da[KS][4];
  float dsum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    const size_t at = static_cast<size_t>(r0) * d + kk * 16;
    load_a_global(qa[kk], qh + static_cast<size_t>(r0) * ld + kk * 16, ld, g, c, T - r0);
    load_dout_a(da[kk], dsum, dout + hv.out_off + at, out + hv.out_off + at, d, g, c, T - r0);
  }
  const float D_a = quad_sum(dsum[0]), D_b = quad_sum(dsum[1]);
  const size_t rbase = static_cast<size_t>(bh) * T;
  if (c == 0) {
    if (row_a < T) Dg[rbase + row_a] = D_a;
    if (row_b < T) Dg[rbase + row_b] = D_b;
  }
  const float lse_a = row_a < T ? lse[rbase + row_a] * kLog2e : 0.0f;
  const float lse_b = row_b < T ? lse[rbase + row_b] * kLog2e : 0.0f;
  float acc[NO][4];
#pragma unroll
  for (int no = 0; no < NO; ++no) acc[no][0] = acc[no][1] = acc[no][2] = acc[no][3] = 0.0f;

  const int last_key = min(T, q0 + ROWS) - 1;
  for (int k0 = 0; k0 <= last_key; k0 += kTile) {
    __syncthreads();
    stage_tile<DH, W * 32>(Ks, kh, ld, k0, T);
    stage_tile<DH, W * 32>(Vs, vh, ld, k0, T);
    __syncthreads();
    if (r0 >= T || k0 > r0 + 15) continue;  // warp-uniform, as in the forward
    float p[8][4], ds[8][4];
    scores<DH>(p, qa, k_rows);
    const bool diagonal = k0 + kTile - 1 > r0;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * c + (e & 1), row = e < 2 ? row_a : row_b;
        const bool masked = diagonal && key > row;
        p[nt][e] = masked ? 0.0f : exp2_fast(p[nt][e] * scale_log2 - (e < 2 ? lse_a : lse_b));
      }
    scores<DH>(ds, da, v_rows);  // dP = dO V^T
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nt][e] = p[nt][e] * (ds[nt][e] - (e < 2 ? D_a : D_b));
    accumulate_pv<DH>(acc, ds, k_cols);  // dQ += dS K
  }
  float* dqh = dqkv + hv.qkv_off;
#pragma unroll
  for (int no = 0; no < NO; ++no) {
    const int col = no * 8 + 2 * c;
    if (row_a < T)
      *reinterpret_cast<float2*>(dqh + static_cast<size_t>(row_a) * ld + col) =
          make_float2(acc[no][0] * scale, acc[no][1] * scale);
    if (row_b < T)
      *reinterpret_cast<float2*>(dqh + static_cast<size_t>(row_b) * ld + col) =
          make_float2(acc[no][2] * scale, acc[no][3] * scale);
  }
}

// ------------------------------------------------------------------ backward: dK, dV

// grid (key tiles, B*H), 4 warps.  Reads D from the dQ kernel; writes the k and v blocks of dqkv.
template <int DH, class In>
__global__ void __launch_bounds__(kKvWarps * 32) flash_bwd_dkdv_kernel(
    const In* __restrict__ qkv, const float* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ Dg, float* __restrict__ dqkv, int T, int H, float scale_log2,
    float scale) {
  constexpr int LD = Flash<DH>::LD, KS = Flash<DH>::KS, NO = Flash<DH>::NO;
  constexpr int THREADS = kKvWarps * 32;
  extern __shared__ __align__(16) unsigned char flash_dkdv_smem[];
  bf16* Ks = reinterpret_cast<bf16*>(flash_dkdv_smem);
  bf16* Vs = Ks + kTile * LD;
  bf16* Qs = Vs + kTile * LD;
  bf16* dOs = Qs + kTile * LD;
  float* lse_s = reinterpret_cast<float*>(dOs + kTile * LD);  // base-2 units
  float* D_s = lse_s + kTile;
  const int d = H * DH, ld = 3 * d, bh = blockIdx.y;
  const int s0 = blockIdx.x * kTile;  // the first key tiles have the most queries: first
  const HeadView hv = head_view(bh, T, H, DH);
  const In* qh = qkv + hv.qkv_off;
  const float* doh = dout + hv.out_off;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int w0 = s0 + warp * 16, key_a = w0 + g, key_b = key_a + 8;
  const uint32_t k_block = lane_address_col_pairs<LD>(Ks + warp * 16 * LD, lane);  // A of K Q^T
  const uint32_t v_block = lane_address_col_pairs<LD>(Vs + warp * 16 * LD, lane);  // A of V dO^T
  const uint32_t q_rows = lane_address_row_pairs<LD>(Qs, lane);    // B of S^T = K Q^T
  const uint32_t q_cols = lane_address_col_pairs<LD>(Qs, lane);    // B of dK += dS^T Q
  const uint32_t do_rows = lane_address_row_pairs<LD>(dOs, lane);  // B of dP^T = V dO^T
  const uint32_t do_cols = lane_address_col_pairs<LD>(dOs, lane);  // B of dV += P^T dO
  stage_tile<DH, THREADS>(Ks, qh + d, ld, s0, T);
  stage_tile<DH, THREADS>(Vs, qh + 2 * d, ld, s0, T);
  float dka[NO][4], dva[NO][4];
#pragma unroll
  for (int no = 0; no < NO; ++no)
#pragma unroll
    for (int e = 0; e < 4; ++e) dka[no][e] = dva[no][e] = 0.0f;

  const size_t rbase = static_cast<size_t>(bh) * T;
  for (int t0 = s0; t0 < T; t0 += kTile) {  // queries t >= s: from the tile holding s0
    __syncthreads();
    stage_tile<DH, THREADS>(Qs, qh, ld, t0, T);
    stage_tile<DH, THREADS>(dOs, doh, d, t0, T);
    for (int i = threadIdx.x; i < kTile; i += THREADS) {
      const bool in = t0 + i < T;
      lse_s[i] = in ? lse[rbase + t0 + i] * kLog2e : 0.0f;
      D_s[i] = in ? Dg[rbase + t0 + i] : 0.0f;
    }
    __syncthreads();
    if (w0 >= T) continue;  // warp-uniform: every key of this warp is past T
    uint32_t ka[KS][4];
    load_a_smem<DH>(ka, k_block);
    float pt[8][4];  // P^T [16 keys, 64 queries] from S^T = K Q^T
    scores<DH>(pt, ka, q_rows);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ti = nt * 8 + 2 * c + (e & 1), tq = t0 + ti, key = e < 2 ? key_a : key_b;
        const bool valid = tq < T && tq >= key;
        pt[nt][e] = valid ? exp2_fast(pt[nt][e] * scale_log2 - lse_s[ti]) : 0.0f;
      }
    accumulate_pv<DH>(dva, pt, do_cols);  // dV += P^T dO
    uint32_t va[KS][4];
    load_a_smem<DH>(va, v_block);
    float dst[8][4];  // dP^T = V dO^T, then dS^T = P^T (dP^T - D_t) in place
    scores<DH>(dst, va, do_rows);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ti = nt * 8 + 2 * c + (e & 1);
        dst[nt][e] = pt[nt][e] * (dst[nt][e] - D_s[ti]);
      }
    accumulate_pv<DH>(dka, dst, q_cols);  // dK += dS^T Q
  }
  float* dkh = dqkv + hv.qkv_off + d;
  float* dvh = dkh + d;
#pragma unroll
  for (int no = 0; no < NO; ++no) {
    const int col = no * 8 + 2 * c;
    if (key_a < T) {
      const size_t at = static_cast<size_t>(key_a) * ld + col;
      *reinterpret_cast<float2*>(dkh + at) = make_float2(dka[no][0] * scale, dka[no][1] * scale);
      *reinterpret_cast<float2*>(dvh + at) = make_float2(dva[no][0], dva[no][1]);
    }
    if (key_b < T) {
      const size_t at = static_cast<size_t>(key_b) * ld + col;
      *reinterpret_cast<float2*>(dkh + at) = make_float2(dka[no][2] * scale, dka[no][3] * scale);
      *reinterpret_cast<float2*>(dvh + at) = make_float2(dva[no][2], dva[no][3]);
    }
  }
}

// ------------------------------------------------------------------ host side

template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)));
}

float inv_sqrt(int dh) { return 1.0f / std::sqrt(static_cast<float>(dh)); }

// Grid (tiles of `rows` along T, B*H).
dim3 grid_of(const AttentionShape& s, int rows) {
  return dim3(static_cast<unsigned>(ceil_div(s.T, rows)), static_cast<unsigned>(s.B * s.H));
}

template <int DH, class In>
void forward_dh(const AttentionShape& s, const In* qkv, bf16* out, float* lse,
                cudaStream_t stream) {
  constexpr int W = query_warps(DH);
  const size_t smem = 2 * Flash<DH>::tile_bytes;
  allow_smem(flash_fwd_kernel<DH, W, In>, smem);
  flash_fwd_kernel<DH, W, In><<<grid_of(s, 16 * W), W * 32, smem, stream>>>(
      qkv, out, lse, s.T, s.H, inv_sqrt(DH) * kLog2e);
  BLM_CHECK_LAUNCH("flash_attention_forward");
}

template <int DH, class In>
void backward_dh(const AttentionShape& s, const In* qkv, const bf16* out, const float* dout,
                 const float* lse, float* D, float* dqkv, cudaStream_t stream) {
  constexpr int W = query_warps(DH);
  const float scale = inv_sqrt(DH), scale_log2 = scale * kLog2e;
  const size_t smem_q = 2 * Flash<DH>::tile_bytes;
  allow_smem(flash_bwd_dq_kernel<DH, W, In>, smem_q);
  flash_bwd_dq_kernel<DH, W, In><<<grid_of(s, 16 * W), W * 32, smem_q, stream>>>(
      qkv, out, dout, lse, D, dqkv, s.T, s.H, scale_log2, scale);
  BLM_CHECK_LAUNCH("flash_attention_backward dq");
  const size_t smem_kv = 4 * Flash<DH>::tile_bytes + 2 * kTile * sizeof(float);
  allow_smem(flash_bwd_dkdv_kernel<DH, In>, smem_kv);
  flash_bwd_dkdv_kernel<DH, In><<<grid_of(s, kTile), kKvWarps * 32, smem_kv, stream>>>(
      qkv, dout, lse, D, dqkv, s.T, s.H, scale_log2, scale);
  BLM_CHECK_LAUNCH("flash_attention_backward dk dv");
}

// The shapes and pointers the kernels assume; throws DeviceError naming what does not hold.
// Large shapes (reviewed for B*T = 131072, d = 1600, H = 25, T = 2048): every element offset is
// formed in size_t (head_view, load_a_global, stage_tile, the row stores), the y axis holds B*H
// (refused above 65535 rather than folded: 64 x 25 = 1600 is far below), x holds ceil(T / rows).
// H <= 0 would launch a grid with y = 0 (an invalid configuration at launch): refused here.
void check_arguments(const AttentionShape& s, std::initializer_list<const void*> pointers) {
  if (s.dh != 32 && s.dh != 64 && s.dh != 128)
    throw DeviceError("flash attention: head size " + std::to_string(s.dh) +
                      " (the kernels support 32, 64 and 128)");
  if (s.B < 0 || s.T < 0 || s.H <= 0)
    throw DeviceError("flash attention: bad shape B=" + std::to_string(s.B) + " T=" +
                      std::to_string(s.T) + " H=" + std::to_string(s.H) +
                      " (B, T >= 0 and H >= 1 needed)");
  if (static_cast<int64_t>(s.B) * s.H > 65535)
    throw DeviceError("flash attention: batch x heads = " +
                      std::to_string(static_cast<int64_t>(s.B) * s.H) + " exceeds 65535");
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
      throw DeviceError("flash attention: a tensor is not 16-byte aligned (16-byte loads)");
}

template <class In>
void forward_any(const AttentionShape& s, const In* qkv, bf16* out, float* lse,
                 cudaStream_t stream) {
  if (s.B == 0 || s.T == 0) return;
  check_arguments(s, {qkv, out, lse});
  switch (s.dh) {
    case 32: return forward_dh<32>(s, qkv, out, lse, stream);
    case 64: return forward_dh<64>(s, qkv, out, lse, stream);
    default: return forward_dh<128>(s, qkv, out, lse, stream);
  }
}

template <class In>
void backward_any(const AttentionShape& s, const In* qkv, const bf16* out, const float* dout,
                  const float* lse, float* dqkv, void* workspace, cudaStream_t stream) {
  if (s.B == 0 || s.T == 0) return;
  float* D = static_cast<float*>(workspace);
  if (D == nullptr) throw DeviceError("flash attention backward: no workspace (D [B, H, T])");
  check_arguments(s, {qkv, out, dout, lse, dqkv, D});
  switch (s.dh) {
    case 32: return backward_dh<32>(s, qkv, out, dout, lse, D, dqkv, stream);
    case 64: return backward_dh<64>(s, qkv, out, dout, lse, D, dqkv, stream);
    default: return backward_dh<128>(s, qkv, out, dout, lse, D, dqkv, stream);
  }
}

}  // namespace

bool flash_attention_enabled() { return env_choice("BLM_ATTENTION", {"flash", "gemm"}, 0) == 0; }

size_t flash_attention_workspace_bytes(const AttentionShape& s) {
  return static_cast<size_t>(s.B) * s.H * s.T * sizeof(float);
}

void flash_attention_forward(const AttentionShape& s, const float* qkv, bf16* out, float* lse,
                             cudaStream_t stream) {
  forward_any(s, qkv, out, lse, stream);
}
void flash_attention_forward(const AttentionShape& s, const bf16* qkv, bf16* out, float* lse,
                             cudaStream_t stream) {
  forward_any(s, qkv, out, lse, stream);
}

void flash_attention_backward(const AttentionShape& s, const float* qkv, const bf16* out,
                              const float* dout, const float* lse, float* dqkv, void* workspace,
                              cudaStream_t stream) {
  backward_any(s, qkv, out, dout, lse, dqkv, workspace, stream);
}
void flash_attention_backward(const AttentionShape& s, const bf16* qkv, const bf16* out,
                              const float* dout, const float* lse, float* dqkv, void* workspace,
                              cudaStream_t stream) {
  backward_any(s, qkv, out, dout, lse, dqkv, workspace, stream);
}

}  // namespace cuda
}  // namespace blm
