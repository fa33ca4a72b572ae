// LayerNorm forward and backward (eps 1e-5, biased variance), one warp per row.  The forward's
// output y is fp32 or bf16 (the bf16 precision's GEMM input); everything else is fp32, and the
// backward may also write a bf16 copy of the dx it accumulated (the bf16 precision's GEMM input).
//
//   forward:  mean = sum x / C,  var = sum (x - mean)^2 / C,  rstd = 1 / sqrt(var + eps)
//             y = (x - mean) * rstd * w + b          x, y [N, C]; w, b [C]; mean, rstd [N]
//   backward: xhat = (x - mean) * rstd,  g = dy * w
//             dx += rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
//             dw += sum_n dy * xhat,  db += sum_n dy      (two-stage column sums, no atomics)
//             optionally dsum += sum_n dx (the new dx): dx is the residual stream's gradient, so
//             its column sums are the bias gradient of the product whose output was added into
//             that stream (the bf16 step's projections), at no extra read
// The variance uses a second pass over the row (not E[x^2] - mean^2) to avoid cancellation; the
// second and third reads of a row hit L1.
//
// Rows are read as 16-byte vectors (lane l of the warp owns vectors l, l + 32, ...) when x, y, dy,
// dx, w, b are 16-byte aligned and C % 4 == 0 (C % 8 for a bf16 y), else element by element.
// The fused backward (layernorm_backward_accumulate) gives each block one chunk of rows of the
// column reduction (cuda/reduce_columns.cuh): its warps take the chunk's rows in turn, each lane
// adds dy * xhat and dy of its own columns into its warp's slice of shared memory (no two lanes
// share a column, so no atomics), and at the end the block adds its warps' slices in warp order
// into partial[k][chunk][c]; column_final then adds the chunks.  Fixed order: deterministic.
#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/pdl.cuh"
#include "cuda/reduce_columns.cuh"
#include "cuda/vector_io.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr int kRowsPerBlock = 4;     // forward: warps per block, one row each
constexpr int kBackwardWarps = 8;    // backward: warps per block at most
// Shared memory of the fused backward's partials: [warps][outputs][C] floats, 72 KB for 8 warps
// of three outputs at C = 768 (two blocks per SM still fit).
constexpr int kBackwardSmem = 96 * 1024;

bool all_aligned(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (!aligned16(p)) return false;
  return true;
}

// One warp per row.  kVec > 0 (C <= 32 * W * kVec): a lane loads its kVec vectors of the row at
// once and keeps them in registers for the three passes (mean, variance, output), so the row's
// loads are all in flight together; kVec = 0: any C, one loop over the row per pass (L1 hits
// after the first).  Both forms add in the same order: the same bits.
// kResidual: the row normalised is sum = x + delta (delta bf16: a product's output), which is
// also stored (the residual stream after that product): the residual add fused with the
// LayerNorm that follows it, one read of x and delta and one write of sum instead of a product
// reading x as its C and the LayerNorm reading its output again.
template <int W, int kVec, class TOut, bool kResidual>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
    layernorm_forward_kernel(const float* __restrict__ x, const __nv_bfloat16* __restrict__ delta,
                             float* __restrict__ sum, const float* __restrict__ w,
                             const float* __restrict__ b, int N, int C, TOut* __restrict__ y,
                             float* __restrict__ mean, float* __restrict__ rstd) {
  // int64: blockIdx.x * 4 + 3 exceeds INT_MAX when N is within 3 of it (the padding warps of
  // the last block); the row offsets below are int64 products (N * C > 2^31 at GPT-2 sizes).
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  pdl_wait();
  pdl_launch_dependents();
  if (row >= N) return;  // a whole warp leaves together; no block-level barrier follows
  const int nvc = C / W;
  const float* xr = x + row * C;
  TOut* yr = y + row * C;
  // Vector v of the row as normalised: x, or x + delta (then stored into sum).
  auto load_row = [&](int v, float (&xv)[W]) {
    load_vec<W>(xr + v * W, xv);
    if constexpr (kResidual) {
      float dv[W];
      load_vec<W>(delta + row * C + v * W, dv);
#pragma unroll
      for (int j = 0; j < W; ++j) xv[j] += dv[j];
      store_vec<W>(sum + row * C + v * W, xv);
    }
  };
  // The loop form's later passes read the row back: from sum (this lane's own stores) when
  // kResidual.
  const float* rr = kResidual ? sum + row * C : xr;
  // The output of one vector: y = (x - mean) * rstd * w + b.
  auto write = [&](int v, float (&xv)[W], float mu, float rs) {
    float wv[W], bv[W];
    load_vec<W>(w + v * W, wv);
    load_vec<W>(b + v * W, bv);
#pragma unroll
    for (int j = 0; j < W; ++j) xv[j] = (xv[j] - mu) * rs * wv[j] + bv[j];
    store_vec<W>(yr + v * W, xv);
  };
  float s = 0.0f, var = 0.0f, mu, rs;
  if constexpr (kVec > 0) {
    float xv[kVec][W];
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (lane + 32 * i < nvc) load_row(lane + 32 * i, xv[i]);
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (lane + 32 * i < nvc)
#pragma unroll
        for (int j = 0; j < W; ++j) s += xv[i][j];
    mu = warp_sum(s) / C;
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (lane + 32 * i < nvc)
#pragma unroll
        for (int j = 0; j < W; ++j) var += (xv[i][j] - mu) * (xv[i][j] - mu);
    rs = 1.0f / sqrtf(warp_sum(var) / C + kLayerNormEps);
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (lane + 32 * i < nvc) write(lane + 32 * i, xv[i], mu, rs);
  } else {
    for (int v = lane; v < nvc; v += 32) {
      float xv[W];
      load_row(v, xv);
#pragma unroll
      for (int j = 0; j < W; ++j) s += xv[j];
    }
    mu = warp_sum(s) / C;
    for (int v = lane; v < nvc; v += 32) {
      float xv[W];
      load_vec<W>(rr + v * W, xv);
#pragma unroll
      for (int j = 0; j < W; ++j) var += (xv[j] - mu) * (xv[j] - mu);
    }
    rs = 1.0f / sqrtf(warp_sum(var) / C + kLayerNormEps);
    for (int v = lane; v < nvc; v += 32) {
      float xv[W];
      load_vec<W>(rr + v * W, xv);
      write(v, xv, mu, rs);
    }
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// A W-vector of T as loaded into registers: fp32 as is, bf16 still packed in pairs (half the
// registers), widened to fp32 where it is used.
template <class T, int W>
struct PackedVec {
  float v[W];
  __device__ __forceinline__ void load(const float* p) { load_vec<W>(p, v); }
  __device__ __forceinline__ void widen(float (&out)[W]) const {
#pragma unroll
    for (int j = 0; j < W; ++j) out[j] = v[j];
  }
};
template <int W>
struct PackedVec<__nv_bfloat16, W> {
  uint32_t v[W / 2];
  __device__ __forceinline__ void load(const __nv_bfloat16* p) { load_bf16_pairs(p, v); }
  __device__ __forceinline__ void widen(float (&out)[W]) const { widen_bf16_pairs(v, out); }
};

// Block = chunk of rows_per_chunk rows (blockIdx.x), warps take its rows in turn.  kOuts 2: also
// the chunk's column partials of dw (output 0) and db (output 1), through dynamic shared memory
// [warps][kOuts][C] floats; kOuts 3: also those of the new dx (output 2); kOuts 0: dx only.
// dx16 (may be null): also bf16(dx) after the add.  DyT: float, or bf16
// (the bf16 precision's product output; the arithmetic is fp32 either way).
// kVec > 0 (C <= 32 * W * kVec): a lane's kVec vectors of dy, x and dx are loaded at once and
// kept in registers for both passes (bf16 dy still packed: half the registers), so a warp has its
// whole row in flight, in one round trip to memory, instead of one vector at a time (the kernel
// is bound by memory latency, not bandwidth, with one row per warp); two blocks per SM (the grid
// is one wave of them at GPT-2 sizes).  kVec = 0: any C, a loop over the row per pass.  Both
// forms add in the same order: the same bits.
template <int W, int kVec, int kOuts, class DyT>
__global__ void __launch_bounds__(32 * kBackwardWarps, 2)
    layernorm_backward_kernel(const DyT* __restrict__ dy, const float* __restrict__ x,
                              const float* __restrict__ mean, const float* __restrict__ rstd,
                              const float* __restrict__ w, int N, int C, int rows_per_chunk,
                              int chunks, float* __restrict__ dx, __nv_bfloat16* __restrict__ dx16,
                              float* __restrict__ partial) {
  extern __shared__ float4 acc_raw[];
  float* acc = reinterpret_cast<float*>(acc_raw);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int nvc = C / W;
  constexpr bool kParams = kOuts > 0;
  static_assert(kOuts == 0 || kOuts == 2 || kOuts == 3, "outputs: none, dw db, dw db dsum");
  float* dw_acc = acc + static_cast<size_t>(warp) * kOuts * C;  // this warp's slice
  float* db_acc = dw_acc + C;
  float* ds_acc = db_acc + C;  // (kOuts 3)
  pdl_wait();
  pdl_launch_dependents();
  if constexpr (kParams) {
    for (int i = threadIdx.x; i < nwarps * kOuts * C; i += blockDim.x) acc[i] = 0.0f;
    __syncthreads();
  }
  constexpr int kRegs = kVec > 0 ? kVec : 1;
  // Pass 1 of one vector (columns c..c+W): the row sums, and the column partials of dw and db.
  auto pass1 = [&](int c, const float (&dyv)[W], const float (&xv)[W], float mu, float rs,
                   float& sum_g, float& sum_gx) {
    float wv[W];
    load_vec<W>(w + c, wv);
    float pw[W], pb[W];
    if constexpr (kParams) {
      load_vec<W>(dw_acc + c, pw);
      load_vec<W>(db_acc + c, pb);
    }
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float xh = (xv[j] - mu) * rs, g = dyv[j] * wv[j];
      sum_g += g;
      sum_gx += g * xh;
      if constexpr (kParams) {
        pw[j] += dyv[j] * xh;
        pb[j] += dyv[j];
      }
    }
    if constexpr (kParams) {
      store_vec<W>(dw_acc + c, pw);
      store_vec<W>(db_acc + c, pb);
    }
  };
  // Pass 2 of one vector, dxv holding dx's: dx += rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)).
  auto pass2 = [&](int64_t off, int c, const float (&dyv)[W], const float (&xv)[W], float mu,
                   float rs, float mean_g, float mean_gx, float (&dxv)[W]) {
    float wv[W];
    load_vec<W>(w + c, wv);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float xh = (xv[j] - mu) * rs, g = dyv[j] * wv[j];
      dxv[j] += rs * (g - mean_g - xh * mean_gx);
    }
    if constexpr (kOuts == 3) {
      float ps[W];
      load_vec<W>(ds_acc + c, ps);
#pragma unroll
      for (int j = 0; j < W; ++j) ps[j] += dxv[j];
      store_vec<W>(ds_acc + c, ps);
    }
    store_vec<W>(dx + off + c, dxv);
    if (dx16 != nullptr) store_vec<W>(dx16 + off + c, dxv);  // the new dx, rounded
  };
  const int r0 = blockIdx.x * rows_per_chunk;
  const int r1 = r0 + min(N - r0, rows_per_chunk);  // not r0 + rows: it may pass INT_MAX
  for (int row = r0 + warp; row < r1; row += nwarps) {
    const int64_t off = static_cast<int64_t>(row) * C;
    const float mu = mean[row], rs = rstd[row];
    float sum_g = 0.0f, sum_gx = 0.0f;
    if constexpr (kVec > 0) {
      PackedVec<DyT, W> dyp[kRegs];
      float xv[kRegs][W], dxv[kRegs][W];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const int v = lane + 32 * i;
        if (v < nvc) {
          dyp[i].load(dy + off + v * W);
          load_vec<W>(x + off + v * W, xv[i]);
          load_vec<W>(dx + off + v * W, dxv[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        if (lane + 32 * i < nvc) {
          float dyv[W];
          dyp[i].widen(dyv);
          pass1((lane + 32 * i) * W, dyv, xv[i], mu, rs, sum_g, sum_gx);
        }
      const float mean_g = warp_sum(sum_g) / C, mean_gx = warp_sum(sum_gx) / C;
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        if (lane + 32 * i < nvc) {
          float dyv[W];
          dyp[i].widen(dyv);
          pass2(off, (lane + 32 * i) * W, dyv, xv[i], mu, rs, mean_g, mean_gx, dxv[i]);
        }
    } else {
      for (int v = lane; v < nvc; v += 32) {
        float dyv[W], xv[W];
        load_vec<W>(dy + off + v * W, dyv);
        load_vec<W>(x + off + v * W, xv);
        pass1(v * W, dyv, xv, mu, rs, sum_g, sum_gx);
      }
      const float mean_g = warp_sum(sum_g) / C, mean_gx = warp_sum(sum_gx) / C;
      for (int v = lane; v < nvc; v += 32) {
        float dyv[W], xv[W], dxv[W];
        load_vec<W>(dy + off + v * W, dyv);
        load_vec<W>(x + off + v * W, xv);
        load_vec<W>(dx + off + v * W, dxv);
        pass2(off, v * W, dyv, xv, mu, rs, mean_g, mean_gx, dxv);
      }
    }
  }
  if constexpr (kParams) {
    __syncthreads();
    for (int i = threadIdx.x; i < kOuts * C; i += blockDim.x) {  // i = k * C + c
      float s = 0.0f;
      for (int q = 0; q < nwarps; ++q) s += acc[static_cast<size_t>(q) * kOuts * C + i];
      const int k = i / C, c = i - k * C;
      partial[(static_cast<int64_t>(k) * chunks + blockIdx.x) * C + c] = s;
    }
  }
}

// Per-column partial sums of dy * xhat (output 0) and dy (output 1): the terms of
// layernorm_backward_params_accumulate on its own.
template <class DyT>
struct LayerNormParamTerms {
  static constexpr int K = 2;
  const DyT* __restrict__ dy;
  const float* __restrict__ x;
  const float* __restrict__ mean;
  const float* __restrict__ rstd;
  template <int W>
  __device__ void add(int64_t n, int64_t i, float (&acc)[K][W]) const {
    float g[W], xv[W];
    load_vec<W>(dy + i, g);
    load_vec<W>(x + i, xv);
    const float mu = mean[n], rs = rstd[n];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      acc[0][j] += g[j] * (xv[j] - mu) * rs;
      acc[1][j] += g[j];
    }
  }
};

// delta, sum: both null (plain LayerNorm of x) or both set (of sum = x + delta, stored).
template <class TOut>
void layernorm_forward_impl(const float* x, const __nv_bfloat16* delta, float* sum,
                            const float* w, const float* b, int N, int C, TOut* y, float* mean,
                            float* rstd, cudaStream_t stream, const char* name) {
  if (N == 0) return;
  constexpr int W = kVecWidth<TOut>;  // 8 for a bf16 y (16-byte stores), else 4
  const unsigned grid = static_cast<unsigned>(ceil_div(N, kRowsPerBlock));
  const bool residual = delta != nullptr;
  const bool vec = C % W == 0 && all_aligned({x, w, b, y}) &&
                   (!residual || (aligned16(delta) && aligned16(sum)));
  auto launch = [&](auto kernel) {
    launch_pdl(kernel, grid, 32 * kRowsPerBlock, 0, stream, x, delta, sum, w, b, N, C, y, mean,
               rstd);
  };
  auto launch_form = [&](auto residual_tag) {
    constexpr bool kRes = decltype(residual_tag)::value;
    // The row in registers when a lane has at most 4 vectors of it (C <= 1024 for a bf16 y, 512
    // for fp32), else the loop form.
    if (vec && C / W <= 32 * 4)
      launch(layernorm_forward_kernel<W, 4, TOut, kRes>);
    else if (vec)
      launch(layernorm_forward_kernel<W, 0, TOut, kRes>);
    else
      launch(layernorm_forward_kernel<1, 0, TOut, kRes>);
  };
  if (residual)
    launch_form(std::true_type{});
  else
    launch_form(std::false_type{});
  BLM_CHECK_LAUNCH(name);
}

// Warps per block of the fused backward: as many as fit `outs` * C floats each in kBackwardSmem
// (0: C too large, use the unfused kernels).
int backward_warps(int C, int outs) {
  return static_cast<int>(std::min<int64_t>(
      kBackwardWarps, kBackwardSmem / (outs * 4 * static_cast<int64_t>(C))));
}

template <int kOuts, class DyT>
void launch_backward(const DyT* dy, const float* x, const float* mean, const float* rstd,
                     const float* w, int N, int C, float* dx, __nv_bfloat16* dx16, float* partial,
                     int warps, cudaStream_t stream) {
  constexpr bool kParams = kOuts > 0;
  const int rows = column_chunk_rows(N), chunks = column_chunks(N);
  const size_t smem = static_cast<size_t>(warps) * kOuts * C * sizeof(float);
  const bool vec = C % 4 == 0 && all_aligned({dy, x, w, dx}) && (!kParams || aligned16(partial)) &&
                   (dx16 == nullptr || aligned16(dx16));
  // Registers for the whole row when a lane has at most 8 vectors of it (C <= 1024 vectorised:
  // GPT-2 small's 768 and the paper size's 384), else the loop form.
  const int per_lane = static_cast<int>(ceil_div(vec ? C / 4 : C, 32));
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024) allow_dynamic_smem(kernel, smem);
    launch_pdl(kernel, chunks, 32 * warps, smem, stream, dy, x, mean, rstd, w, N, C, rows, chunks,
               dx, dx16, partial);
  };
  if (vec && per_lane <= 4)
    launch(layernorm_backward_kernel<4, 4, kOuts, DyT>);
  else if (vec && per_lane <= 8)
    launch(layernorm_backward_kernel<4, 8, kOuts, DyT>);
  else if (vec)
    launch(layernorm_backward_kernel<4, 0, kOuts, DyT>);
  else
    launch(layernorm_backward_kernel<1, 0, kOuts, DyT>);
  BLM_CHECK_LAUNCH(kParams ? "layernorm_backward" : "layernorm_backward_dx");
}

}  // namespace

void layernorm_forward(const float* x, const float* w, const float* b, int N, int C, float* y,
                       float* mean, float* rstd, cudaStream_t stream) {
  layernorm_forward_impl(x, nullptr, nullptr, w, b, N, C, y, mean, rstd, stream,
                         "layernorm_forward");
}

void layernorm_forward(const float* x, const float* w, const float* b, int N, int C,
                       __nv_bfloat16* y, float* mean, float* rstd, cudaStream_t stream) {
  layernorm_forward_impl(x, nullptr, nullptr, w, b, N, C, y, mean, rstd, stream,
                         "layernorm_forward(bf16)");
}

void residual_layernorm_forward(const float* x, const __nv_bfloat16* delta, float* sum,
                                const float* w, const float* b, int N, int C, float* y,
                                float* mean, float* rstd, cudaStream_t stream) {
  layernorm_forward_impl(x, delta, sum, w, b, N, C, y, mean, rstd, stream,
                         "residual_layernorm_forward");
}

void residual_layernorm_forward(const float* x, const __nv_bfloat16* delta, float* sum,
                                const float* w, const float* b, int N, int C, __nv_bfloat16* y,
                                float* mean, float* rstd, cudaStream_t stream) {
  layernorm_forward_impl(x, delta, sum, w, b, N, C, y, mean, rstd, stream,
                         "residual_layernorm_forward(bf16)");
}

namespace {

template <class DyT>
void backward_dx_accumulate(const DyT* dy, const float* x, const float* mean, const float* rstd,
                            const float* w, int N, int C, float* dx, cudaStream_t stream) {
  if (N <= 0 || C <= 0) return;
  launch_backward<0>(dy, x, mean, rstd, w, N, C, dx, nullptr, nullptr, kBackwardWarps, stream);
}

template <class DyT>
void backward_params_accumulate(const DyT* dy, const float* x, const float* mean,
                                const float* rstd, int N, int C, float* partial, float* dw,
                                float* db, cudaStream_t stream) {
  float* outs[2] = {dw, db};
  column_reduce<kVecWidth<float>>(LayerNormParamTerms<DyT>{dy, x, mean, rstd}, N, C, partial,
                                  outs, aligned16(dy) && aligned16(x), stream,
                                  "layernorm_backward_params");
}

template <class DyT>
void backward_accumulate(const DyT* dy, const float* x, const float* mean, const float* rstd,
                         const float* w, int N, int C, float* dx, __nv_bfloat16* dx16,
                         float* partial, float* dw, float* db, float* dsum, cudaStream_t stream) {
  if (N <= 0 || C <= 0) return;
  // Sized for three outputs either way: the block's warp count sets the order of the column sums,
  // so dw and db keep their bits whether or not dsum is asked for.
  const int warps = backward_warps(C, 3);
  if (warps == 0) {  // rows too long for the partials in shared memory: the unfused kernels
    backward_dx_accumulate(dy, x, mean, rstd, w, N, C, dx, stream);
    backward_params_accumulate(dy, x, mean, rstd, N, C, partial, dw, db, stream);
    if (dsum != nullptr) column_sum_accumulate(dx, N, C, partial, dsum, stream);
    if (dx16 != nullptr) convert_to_bf16(dx, dx16, static_cast<int64_t>(N) * C, stream);
    return;
  }
  if (dsum != nullptr) {
    launch_backward<3>(dy, x, mean, rstd, w, N, C, dx, dx16, partial, warps, stream);
    float* outs[3] = {dw, db, dsum};
    column_final<3>(partial, column_chunks(N), C, outs, stream, "layernorm_backward");
    return;
  }
  launch_backward<2>(dy, x, mean, rstd, w, N, C, dx, dx16, partial, warps, stream);
  float* outs[2] = {dw, db};
  column_final<2>(partial, column_chunks(N), C, outs, stream, "layernorm_backward");
}

}  // namespace

void layernorm_backward_dx_accumulate(const float* dy, const float* x, const float* mean,
                                      const float* rstd, const float* w, int N, int C,
                                      float* dx, cudaStream_t stream) {
  backward_dx_accumulate(dy, x, mean, rstd, w, N, C, dx, stream);
}

void layernorm_backward_params_accumulate(const float* dy, const float* x, const float* mean,
                                          const float* rstd, int N, int C, float* partial,
                                          float* dw, float* db, cudaStream_t stream) {
  backward_params_accumulate(dy, x, mean, rstd, N, C, partial, dw, db, stream);
}

void layernorm_backward_accumulate(const float* dy, const float* x, const float* mean,
                                   const float* rstd, const float* w, int N, int C, float* dx,
                                   float* partial, float* dw, float* db, cudaStream_t stream) {
  backward_accumulate(dy, x, mean, rstd, w, N, C, dx, nullptr, partial, dw, db, nullptr, stream);
}

void layernorm_backward_accumulate(const float* dy, const float* x, const float* mean,
                                   const float* rstd, const float* w, int N, int C, float* dx,
                                   __nv_bfloat16* dx16, float* partial, float* dw, float* db,
                                   cudaStream_t stream) {
  backward_accumulate(dy, x, mean, rstd, w, N, C, dx, dx16, partial, dw, db, nullptr, stream);
}

void layernorm_backward_accumulate(const __nv_bfloat16* dy, const float* x, const float* mean,
                                   const float* rstd, const float* w, int N, int C, float* dx,
                                   __nv_bfloat16* dx16, float* partial, float* dw, float* db,
                                   float* dx_column_sum, cudaStream_t stream) {
  backward_accumulate(dy, x, mean, rstd, w, N, C, dx, dx16, partial, dw, db, dx_column_sum,
                      stream);
}

}  // namespace cuda
}  // namespace blm
