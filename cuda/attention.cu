// Flash-style causal multi-head attention in fp32 (FlashAttention-2 structure), forward and
// backward, for head sizes dh in {32, 64, 128} (templated on dh).
//
//   z_ts = q_t . k_s / sqrt(dh),  a_ts = softmax_{s<=t}(z_ts),  out_t = sum_s a_ts v_s
//   lse_t = log sum_{s<=t} exp(z_ts)                                   (saved for the backward)
//
// Shapes (see attention.h): qkv [B, T, 3d], out/dout [B, T, d], lse [B, H, T], dqkv [B, T, 3d].
// No T x T matrix is ever stored: the forward keeps a running max / normaliser per query row
// (online softmax) and the backward recomputes a_ts = exp(z_ts - lse_t) tile by tile.
//
// Thread layout used by every kernel here ("row groups"): a block of 256 threads owns a tile of
// 64 rows (query rows in the forward and dQ kernels, key rows in the dK/dV kernel); thread
// tid works on row tid/4 and on the columns sub + 4j (sub = tid%4) of that row, both of the
// score tile (j < tile width / 4) and of the dh-wide accumulators (j < dh/4).  The four
// threads of a row sit in one warp, so row reductions are two shuffles and the probabilities
// they share go through shared memory with only a __syncwarp.
//
// Determinism: every sum has a fixed order and there are no atomics; dK/dV and dQ are computed
// by two kernels (one parallel over key tiles, one over query tiles), so results are
// bit-identical from run to run.
#include <cmath>

#include "cuda/attn_common.cuh"

namespace blm {
namespace cuda {
namespace {

// Threads of every block.  __launch_bounds__(256, 2) caps registers at 128: no spills (with the
// default bounds ptxas spills a few bytes), and two blocks fit an SM where shared memory allows.
constexpr int kThreads = 256;
constexpr int kRowTile = 64;   // rows owned by a block (4 threads per row)
constexpr int kColTile = 32;   // width of the score tile streamed through shared memory
constexpr int kPLd = kColTile + 1;  // padded leading dimension of score tiles in shared memory

// Shared-memory leading dimension of a [rows][dh] tile: +1 so that rows r, r+1, ... fall into
// different banks when several rows are read at the same column.
template <int DH>
constexpr int tile_ld() {
  return DH + 1;
}

// Copies rows [row0, row0 + nrows) of one dh-wide block of qkv (src points at the block's
// column 0 for position 0) into the [nrows][dh+1] shared tile; rows >= T become zeros.
template <int DH>
__device__ __forceinline__ void load_rows(float* tile, const float* src, size_t row_stride,
                                          int row0, int nrows, int T) {
  constexpr int LD = tile_ld<DH>();
  for (int idx = threadIdx.x; idx < nrows * DH; idx += kThreads) {
    const int r = idx / DH, c = idx % DH, t = row0 + r;
    tile[r * LD + c] = t < T ? src[static_cast<size_t>(t) * row_stride + c] : 0.f;
  }
}

// Sum over the 4 threads of a row group (lanes 4g..4g+3); every lane gets the same value.
__device__ __forceinline__ float row4_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
__device__ __forceinline__ float row4_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}

// a . b over dh for two rows in shared memory.
template <int DH>
__device__ __forceinline__ float row_dot(const float* a, const float* b) {
  float acc = 0.f;
#pragma unroll 8
  for (int i = 0; i < DH; ++i) acc = fmaf(a[i], b[i], acc);
  return acc;
}

// ------------------------------------------------------------------ forward
// Grid (ceil(T/64), B*H); block 256.  Block = 64 query rows of one (b, h); loops over the key
// tiles s < min(T, q0 + 64) in steps of 32, online softmax per row.
// Shared: Q [64][dh+1], K, V [32][dh+1], P [64][33].
template <int DH>
__global__ void __launch_bounds__(kThreads, 2)
    attention_forward_kernel(const float* __restrict__ qkv, float* __restrict__ out,
                             float* __restrict__ lse, int T, int H) {
  constexpr int LD = tile_ld<DH>(), CPT = DH / 4;
  extern __shared__ float smem[];
  float* Qs = smem;                     // [64][LD]
  float* Ks = Qs + kRowTile * LD;       // [32][LD]
  float* Vs = Ks + kColTile * LD;       // [32][LD]
  float* Ps = Vs + kColTile * LD;       // [64][kPLd]

  const int ntiles = (T + kRowTile - 1) / kRowTile;
  const int q0 = (ntiles - 1 - static_cast<int>(blockIdx.x)) * kRowTile;  // long rows first
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int d = H * DH;
  const size_t rs = 3 * static_cast<size_t>(d);
  const float* qbase = qkv + qkv_head_base(b, h, T, H, DH);
  const float scale = 1.f / sqrtf(static_cast<float>(DH));

  const int r = threadIdx.x >> 2, sub = threadIdx.x & 3;
  const int tq = q0 + r;  // this thread's query row (>= T: padding row, computed, not written)

  load_rows<DH>(Qs, qbase, rs, q0, kRowTile, T);

  float m = -INFINITY, l = 0.f, acc[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) acc[j] = 0.f;

  const int kend = min(T, q0 + kRowTile);  // keys any row of the tile can see
  for (int k0 = 0; k0 < kend; k0 += kColTile) {
    __syncthreads();  // the previous tile's K, V, P are no longer read
    load_rows<DH>(Ks, qbase + d, rs, k0, kColTile, T);
    load_rows<DH>(Vs, qbase + 2 * d, rs, k0, kColTile, T);
    __syncthreads();

    // Scores of row r against columns sub + 4j of this key tile; masked ones are -inf.
    // The first tile holds s = 0 <= tq for every row, so m is finite after it and
    // exp(-inf - m) = 0 below never sees -inf - (-inf).
    float sc[kColTile / 4], cmax = -INFINITY;
#pragma unroll
    for (int j = 0; j < kColTile / 4; ++j) {
      const int c = sub + 4 * j, s = k0 + c;
      const float z = row_dot<DH>(Qs + r * LD, Ks + c * LD) * scale;
      sc[j] = (s <= tq && s < T) ? z : -INFINITY;
      cmax = fmaxf(cmax, sc[j]);
    }
    const float m_new = fmaxf(m, row4_max(cmax));
    const float alpha = expf(m - m_new);  // rescales what was accumulated with the old max
    float psum = 0.f;
#pragma unroll
    for (int j = 0; j < kColTile / 4; ++j) {
      const float p = expf(sc[j] - m_new);
      Ps[r * kPLd + sub + 4 * j] = p;
      psum += p;
    }
    l = l * alpha + row4_sum(psum);
    m = m_new;
    __syncwarp();  // row r's probabilities were written by the 4 lanes that read them

#pragma unroll
    for (int j = 0; j < CPT; ++j) acc[j] *= alpha;
    for (int c = 0; c < kColTile; ++c) {
      const float p = Ps[r * kPLd + c];
      const float* v = Vs + c * LD + sub;
#pragma unroll
      for (int j = 0; j < CPT; ++j) acc[j] = fmaf(p, v[4 * j], acc[j]);
    }
  }

  if (tq < T) {
    const float inv_l = 1.f / l;
    float* o = out + (static_cast<size_t>(b) * T + tq) * d + h * DH + sub;
#pragma unroll
    for (int j = 0; j < CPT; ++j) o[4 * j] = acc[j] * inv_l;
    if (sub == 0) lse[static_cast<size_t>(bh) * T + tq] = m + logf(l);
  }
}

// ------------------------------------------------------------------ backward
// D_t = dout_t . out_t per (b, h, t): the softmax backward's row term, [B, H, T] into `Dt`.
// One warp per (b, t, h).
template <int DH>
__global__ void __launch_bounds__(kThreads, 2)
    attention_row_dot_kernel(const float* __restrict__ out, const float* __restrict__ dout,
                             float* __restrict__ Dt, int B, int T, int H) {
  const long long warp = (static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= static_cast<long long>(B) * T * H) return;  // whole warp leaves together
  const int h = static_cast<int>(warp % H);
  const long long bt = warp / H;  // b*T + t
  const int b = static_cast<int>(bt / T), t = static_cast<int>(bt % T);
  const size_t off = static_cast<size_t>(bt) * H * DH + static_cast<size_t>(h) * DH;
  float acc = 0.f;
  for (int i = lane; i < DH; i += 32) acc = fmaf(dout[off + i], out[off + i], acc);
  acc = warp_sum(acc);
  if (lane == 0) Dt[(static_cast<size_t>(b) * H + h) * T + t] = acc;
}

// dK and dV.  Grid (ceil(T/64), B*H); block 256.  Block = 64 key rows s of one (b, h); loops over
// the query tiles t >= s0 in steps of 32:
//   p_ts = exp(z_ts - lse_t)  (t >= s),   ds_ts = p_ts (dout_t . v_s - D_t)
//   dv_s = sum_t p_ts dout_t,   dk_s = scale sum_t ds_ts q_t
// Shared: K, V [64][dh+1], Q, dO [32][dh+1], P, dS [64][33], lse, D [32].
template <int DH>
__global__ void __launch_bounds__(kThreads, 2)
    attention_dkdv_kernel(const float* __restrict__ qkv, const float* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ Dt,
                          float* __restrict__ dqkv, int T, int H) {
  constexpr int LD = tile_ld<DH>(), CPT = DH / 4;
  extern __shared__ float smem[];
  float* Ks = smem;                    // [64][LD]
  float* Vs = Ks + kRowTile * LD;      // [64][LD]
  float* Qs = Vs + kRowTile * LD;      // [32][LD]
  float* dOs = Qs + kColTile * LD;     // [32][LD]
  float* Ps = dOs + kColTile * LD;     // [64][kPLd]
  float* dSs = Ps + kRowTile * kPLd;   // [64][kPLd]
  float* lse_s = dSs + kRowTile * kPLd;  // [32]
  float* D_s = lse_s + kColTile;         // [32]

  const int s0 = static_cast<int>(blockIdx.x) * kRowTile;  // early keys (most queries) first
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int d = H * DH;
  const size_t rs = 3 * static_cast<size_t>(d);
  const float* qbase = qkv + qkv_head_base(b, h, T, H, DH);
  const float* dobase = dout + static_cast<size_t>(b) * T * d + static_cast<size_t>(h) * DH;
  const float* lse_bh = lse + static_cast<size_t>(bh) * T;
  const float* D_bh = Dt + static_cast<size_t>(bh) * T;
  const float scale = 1.f / sqrtf(static_cast<float>(DH));

  const int r = threadIdx.x >> 2, sub = threadIdx.x & 3;
  const int s = s0 + r;  // this thread's key row

  load_rows<DH>(Ks, qbase + d, rs, s0, kRowTile, T);
  load_rows<DH>(Vs, qbase + 2 * d, rs, s0, kRowTile, T);

  float dk[CPT], dv[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) dk[j] = dv[j] = 0.f;

  for (int t0 = s0; t0 < T; t0 += kColTile) {
    __syncthreads();  // the previous query tile is no longer read
    load_rows<DH>(Qs, qbase, rs, t0, kColTile, T);
    load_rows<DH>(dOs, dobase, static_cast<size_t>(d), t0, kColTile, T);
    if (threadIdx.x < kColTile) {
      const int t = t0 + threadIdx.x;
      lse_s[threadIdx.x] = t < T ? lse_bh[t] : 0.f;
      D_s[threadIdx.x] = t < T ? D_bh[t] : 0.f;
    }
    __syncthreads();

#pragma unroll
    for (int j = 0; j < kColTile / 4; ++j) {
      const int c = sub + 4 * j, t = t0 + c;
      const bool live = t < T && t >= s && s < T;
      const float z = row_dot<DH>(Qs + c * LD, Ks + r * LD) * scale;
      const float dp = row_dot<DH>(dOs + c * LD, Vs + r * LD);
      const float p = live ? expf(z - lse_s[c]) : 0.f;
      Ps[r * kPLd + c] = p;
      dSs[r * kPLd + c] = p * (dp - D_s[c]);
    }
    __syncwarp();

    for (int c = 0; c < kColTile; ++c) {
      const float p = Ps[r * kPLd + c], ds = dSs[r * kPLd + c];
      const float* go = dOs + c * LD + sub;
      const float* qt = Qs + c * LD + sub;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        dv[j] = fmaf(p, go[4 * j], dv[j]);
        dk[j] = fmaf(ds, qt[4 * j], dk[j]);
      }
    }
  }

  if (s < T) {
    float* dks = dqkv + (static_cast<size_t>(b) * T + s) * rs + d + static_cast<size_t>(h) * DH + sub;
    float* dvs = dks + d;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      dks[4 * j] = dk[j] * scale;
      dvs[4 * j] = dv[j];
    }
  }
}

// dQ.  Grid (ceil(T/64), B*H); block 256.  Block = 64 query rows t of one (b, h); loops over the
// key tiles s < min(T, t0 + 64) in steps of 32:  dq_t = scale sum_{s<=t} ds_ts k_s.
// Shared: Q, dO [64][dh+1], K, V [32][dh+1], dS [64][33].
template <int DH>
__global__ void __launch_bounds__(kThreads, 2)
    attention_dq_kernel(const float* __restrict__ qkv, const float* __restrict__ dout,
                        const float* __restrict__ lse, const float* __restrict__ Dt,
                        float* __restrict__ dqkv, int T, int H) {
  constexpr int LD = tile_ld<DH>(), CPT = DH / 4;
  extern __shared__ float smem[];
  float* Qs = smem;                    // [64][LD]
  float* dOs = Qs + kRowTile * LD;     // [64][LD]
  float* Ks = dOs + kRowTile * LD;     // [32][LD]
  float* Vs = Ks + kColTile * LD;      // [32][LD]
  float* dSs = Vs + kColTile * LD;     // [64][kPLd]

  const int ntiles = (T + kRowTile - 1) / kRowTile;
  const int t0 = (ntiles - 1 - static_cast<int>(blockIdx.x)) * kRowTile;  // long rows first
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int d = H * DH;
  const size_t rs = 3 * static_cast<size_t>(d);
  const float* qbase = qkv + qkv_head_base(b, h, T, H, DH);
  const float* dobase = dout + static_cast<size_t>(b) * T * d + static_cast<size_t>(h) * DH;
  const float scale = 1.f / sqrtf(static_cast<float>(DH));

  const int r = threadIdx.x >> 2, sub = threadIdx.x & 3;
  const int tq = t0 + r;
  const float lse_r = tq < T ? lse[static_cast<size_t>(bh) * T + tq] : 0.f;
  const float D_r = tq < T ? Dt[static_cast<size_t>(bh) * T + tq] : 0.f;

  load_rows<DH>(Qs, qbase, rs, t0, kRowTile, T);
  load_rows<DH>(dOs, dobase, static_cast<size_t>(d), t0, kRowTile, T);

  float dq[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) dq[j] = 0.f;

  const int kend = min(T, t0 + kRowTile);
  for (int k0 = 0; k0 < kend; k0 += kColTile) {
    __syncthreads();
    load_rows<DH>(Ks, qbase + d, rs, k0, kColTile, T);
    load_rows<DH>(Vs, qbase + 2 * d, rs, k0, kColTile, T);
    __syncthreads();

#pragma unroll
    for (int j = 0; j < kColTile / 4; ++j) {
      const int c = sub + 4 * j, s = k0 + c;
      const bool live = s <= tq && s < T && tq < T;
      const float z = row_dot<DH>(Qs + r * LD, Ks + c * LD) * scale;
      const float dp = row_dot<DH>(dOs + r * LD, Vs + c * LD);
      const float p = live ? expf(z - lse_r) : 0.f;
      dSs[r * kPLd + c] = p * (dp - D_r);
    }
    __syncwarp();

    for (int c = 0; c < kColTile; ++c) {
      const float ds = dSs[r * kPLd + c];
      const float* k = Ks + c * LD + sub;
#pragma unroll
      for (int j = 0; j < CPT; ++j) dq[j] = fmaf(ds, k[4 * j], dq[j]);
    }
  }

  if (tq < T) {
    float* dqt = dqkv + (static_cast<size_t>(b) * T + tq) * rs + static_cast<size_t>(h) * DH + sub;
#pragma unroll
    for (int j = 0; j < CPT; ++j) dqt[4 * j] = dq[j] * scale;
  }
}

// ------------------------------------------------------------------ launchers

template <int DH>
size_t forward_smem_bytes() {
  return sizeof(float) * ((kRowTile + 2 * kColTile) * tile_ld<DH>() + kRowTile * kPLd);
}
template <int DH>
size_t dkdv_smem_bytes() {
  return sizeof(float) *
         ((2 * kRowTile + 2 * kColTile) * tile_ld<DH>() + 2 * kRowTile * kPLd + 2 * kColTile);
}
template <int DH>
size_t dq_smem_bytes() {
  return sizeof(float) * ((2 * kRowTile + 2 * kColTile) * tile_ld<DH>() + kRowTile * kPLd);
}

template <int DH>
void launch_forward(const AttentionShape& s, const float* qkv, float* out, float* lse,
                    cudaStream_t stream) {
  const size_t smem = forward_smem_bytes<DH>();
  allow_dynamic_smem(attention_forward_kernel<DH>, smem);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.T, kRowTile)), static_cast<unsigned>(s.B * s.H));
  attention_forward_kernel<DH><<<grid, kThreads, smem, stream>>>(qkv, out, lse, s.T, s.H);
  BLM_CHECK_LAUNCH("attention_forward_kernel");
}

template <int DH>
void launch_backward(const AttentionShape& s, const float* qkv, const float* out,
                     const float* dout, const float* lse, float* dqkv, float* Dt,
                     cudaStream_t stream) {
  const long long rows = static_cast<long long>(s.B) * s.T * s.H;
  const unsigned dot_blocks = static_cast<unsigned>(ceil_div(rows * 32, kThreads));
  attention_row_dot_kernel<DH><<<dot_blocks, kThreads, 0, stream>>>(out, dout, Dt, s.B, s.T, s.H);
  BLM_CHECK_LAUNCH("attention_row_dot_kernel");

  const dim3 grid(static_cast<unsigned>(ceil_div(s.T, kRowTile)), static_cast<unsigned>(s.B * s.H));
  const size_t smem_kv = dkdv_smem_bytes<DH>();
  allow_dynamic_smem(attention_dkdv_kernel<DH>, smem_kv);
  attention_dkdv_kernel<DH><<<grid, kThreads, smem_kv, stream>>>(qkv, dout, lse, Dt, dqkv, s.T, s.H);
  BLM_CHECK_LAUNCH("attention_dkdv_kernel");

  const size_t smem_q = dq_smem_bytes<DH>();
  allow_dynamic_smem(attention_dq_kernel<DH>, smem_q);
  attention_dq_kernel<DH><<<grid, kThreads, smem_q, stream>>>(qkv, dout, lse, Dt, dqkv, s.T, s.H);
  BLM_CHECK_LAUNCH("attention_dq_kernel");
}

}  // namespace

void attention_forward(const AttentionShape& s, const float* qkv, float* out, float* lse,
                       cudaStream_t stream) {
  check_attention_shape(s, "attention_forward");
  if (s.B == 0 || s.T == 0) return;
  switch (s.dh) {
    case 32: launch_forward<32>(s, qkv, out, lse, stream); break;
    case 64: launch_forward<64>(s, qkv, out, lse, stream); break;
    default: launch_forward<128>(s, qkv, out, lse, stream); break;
  }
}

void attention_backward(const AttentionShape& s, const float* qkv, const float* out,
                        const float* dout, const float* lse, float* dqkv, void* workspace,
                        cudaStream_t stream) {
  check_attention_shape(s, "attention_backward");
  if (s.B == 0 || s.T == 0) return;
  float* Dt = static_cast<float*>(workspace);
  switch (s.dh) {
    case 32: launch_backward<32>(s, qkv, out, dout, lse, dqkv, Dt, stream); break;
    case 64: launch_backward<64>(s, qkv, out, dout, lse, dqkv, Dt, stream); break;
    default: launch_backward<128>(s, qkv, out, dout, lse, dqkv, Dt, stream); break;
  }
}

// D_t per (b, h, t).
size_t attention_workspace_bytes(const AttentionShape& s) {
  return sizeof(float) * static_cast<size_t>(s.B) * s.H * s.T;
}

}  // namespace cuda
}  // namespace blm
