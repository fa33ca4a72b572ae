// Deterministic reductions: column sums (bias gradients; fused with the bf16 copy or the GELU
// backward of the same tensor, the latter optionally also recomputing the GELU output, see
// cuda/reduce_columns.cuh), sums and sums of squares in double
// (loss totals, the global gradient norm), and the barrier's sum of phi and min of log det.
//
// Whole-array reductions run in two stages: stage 1 uses G = min(kReducePartials, ceil(n/2048))
// blocks of 256 threads, thread i of block g reading elements g*256 + i + k*G*256 in order and
// accumulating in double, then a fixed-order block tree; stage 2 reduces the G partials in one
// block.  G depends on n only, so the result is bit-identical on every run and device.
#include <algorithm>
#include <cfloat>
#include <string>

#include "cuda/common.cuh"
#include "cuda/pdl.cuh"
#include "cuda/gelu.cuh"
#include "cuda/kernels.h"
#include "cuda/reduce_columns.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr int kReduceThreads = 256;

int reduce_blocks(int64_t n) {
  int64_t g = ceil_div(n, kReduceThreads * 8);
  if (g < 1) g = 1;
  if (g > kReducePartials) g = kReducePartials;
  return static_cast<int>(g);
}

// out[c] += sum_n x[n, c]
template <class T>
struct ColumnSumTerms {
  static constexpr int K = 1;
  const T* __restrict__ x;
  template <int W>
  __device__ void add(int64_t, int64_t i, float (&acc)[K][W]) const {
    float v[W];
    load_vec<W>(x + i, v);
#pragma unroll
    for (int j = 0; j < W; ++j) acc[0][j] += v[j];
  }
};

// v += addend[n, c .. c + W) when the vector's columns c = i - n C lie in [0, addend_cols) (all
// or none of them do: addend_cols % W == 0); false when there is no addend there.  The addend is
// fp32 or bf16 (A), widened to fp32 before the add.
template <int W, class A>
__device__ __forceinline__ bool add_addend(float (&v)[W], const A* __restrict__ addend,
                                           int addend_cols, int64_t n, int64_t i, int C) {
  const int64_t c = i - n * C;
  if (addend == nullptr || c >= addend_cols) return false;
  float a[W];
  load_vec<W>(addend + n * addend_cols + c, a);
#pragma unroll
  for (int j = 0; j < W; ++j) v[j] += a[j];
  return true;
}

// y = x + addend (the addend in columns [0, addend_cols) only, when given), out[c] += sum_n
// y[n, c] and x16 = bf16(y): one read of x for the bias gradient and the bf16 copy the next
// matmul needs.  A: the addend's type (fp32, or bf16 for the bf16 precision's barrier gradient).
template <class A>
struct ColumnSumConvertTerms {
  static constexpr int K = 1;
  const float* __restrict__ x;
  __nv_bfloat16* __restrict__ x16;
  const A* __restrict__ addend;  // [N, addend_cols] or null
  int C, addend_cols;
  template <int W>
  __device__ void add(int64_t n, int64_t i, float (&acc)[K][W]) const {
    float v[W];
    load_vec<W>(x + i, v);
    add_addend<W>(v, addend, addend_cols, n, i, C);
    store_vec<W>(x16 + i, v);
#pragma unroll
    for (int j = 0; j < W; ++j) acc[0][j] += v[j];
  }
};

// The same on a bf16 x in place: y = x + addend, out[c] += sum_n y[n, c], x = bf16(y) written
// back where the addend changed it.  The same sums and bits as ColumnSumConvertTerms on x widened
// to fp32.
template <class A>
struct ColumnSumAddBf16Terms {
  static constexpr int K = 1;
  __nv_bfloat16* __restrict__ x;
  const A* __restrict__ addend;  // [N, addend_cols]
  int C, addend_cols;
  template <int W>
  __device__ void add(int64_t n, int64_t i, float (&acc)[K][W]) const {
    float v[W];
    load_vec<W>(x + i, v);
    if (add_addend<W>(v, addend, addend_cols, n, i, C)) store_vec<W>(x + i, v);
#pragma unroll
    for (int j = 0; j < W; ++j) acc[0][j] += v[j];
  }
};

__device__ __forceinline__ float round_as(float x, float) { return x; }
__device__ __forceinline__ float round_as(float x, __nv_bfloat16) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

// dact[n, c] *= gelu'(pre[n, c]), out[c] += sum_n dact[n, c] (the new values as stored, i.e.
// rounded to T first, exactly as a column sum over the stored tensor would see them).
template <class T>
struct GeluBackwardColumnSumTerms {
  static constexpr int K = 1;
  const T* __restrict__ pre;
  T* __restrict__ dact;
  template <int W>
  __device__ void add(int64_t, int64_t i, float (&acc)[K][W]) const {
    float x[W], d[W];
    load_vec<W>(pre + i, x);
    load_vec<W>(dact + i, d);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      d[j] = round_as(d[j] * gelu_grad(x[j]), T());
      acc[0][j] += d[j];
    }
    store_vec<W>(dact + i, d);  // exact: d is representable in T
  }
};

// The bf16 GELU backward of the recompute path (BLM_RECOMPUTE=gelu): GeluBackwardColumnSumTerms'
// dact and out, computed the same way (so bit for bit the same), plus act[n, c] = gelu(pre[n, c])
// rounded to bf16: the GELU output the forward's gelu_forward wrote and the backward no longer
// keeps.  gelu() of cuda/gelu.cuh on the same bf16 input and the same round-to-nearest store as
// elementwise.cu's GeluForwardBf16, so act has the forward's bits.
struct GeluBackwardRecomputeColumnSumTerms {
  static constexpr int K = 1;
  const __nv_bfloat16* __restrict__ pre;
  __nv_bfloat16* __restrict__ dact;
  __nv_bfloat16* __restrict__ act;
  template <int W>
  __device__ void add(int64_t, int64_t i, float (&acc)[K][W]) const {
    float x[W], d[W], a[W];
    load_vec<W>(pre + i, x);
    load_vec<W>(dact + i, d);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      float g;
      a[j] = gelu_and_grad(x[j], g);  // gelu()'s bits (the same operations)
      d[j] = round_as(d[j] * g, __nv_bfloat16());
      acc[0][j] += d[j];
    }
    store_vec<W>(dact + i, d);  // exact: d is representable in bf16
    store_vec<W>(act + i, a);   // rounds to nearest even, as the forward's store
  }
};

template <class T>
struct LoadValue {
  const T* x;
  __device__ double operator()(int64_t i) const { return static_cast<double>(x[i]); }
};
struct LoadSquare {
  const float* x;
  __device__ double operator()(int64_t i) const {
    const double v = x[i];
    return v * v;
  }
};

template <class Load>
__global__ void sum_stage1_kernel(Load load, int64_t n, double* __restrict__ partials) {
  __shared__ double scratch[32];
  pdl_wait();
  pdl_launch_dependents();
  double s = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    s += load(i);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

__global__ void sum_stage2_kernel(const double* __restrict__ partials, int g,
                                  double* __restrict__ out) {
  __shared__ double scratch[32];
  pdl_wait();
  pdl_launch_dependents();
  double s = 0.0;
  for (int i = threadIdx.x; i < g; i += blockDim.x) s += partials[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s;
}

template <class Load>
void reduce_sum_impl(Load load, int64_t n, double* partials, double* out, cudaStream_t stream,
                     const char* name) {
  const int g = reduce_blocks(n);
  launch_pdl(sum_stage1_kernel<Load>, g, kReduceThreads, 0, stream, load, n, partials);
  BLM_CHECK_LAUNCH(name);
  launch_pdl(sum_stage2_kernel, 1, 1024, 0, stream, partials, g, out);
  BLM_CHECK_LAUNCH(name);
}

__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ float block_min(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_min(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? scratch[lane] : INFINITY;
  return warp_min(r);
}

// Terms [Lb, B, H, T]; index i -> t = i % T, b = (i / (T*H)) % B.
__global__ void barrier_stage1_kernel(const float* __restrict__ phi,
                                      const float* __restrict__ logdet,
                                      const uint8_t* __restrict__ mask, int B, int H, int T,
                                      int64_t n, double* __restrict__ partials,
                                      float* __restrict__ min_partials) {
  __shared__ double dscratch[32];
  __shared__ float fscratch[32];
  double s = 0.0;
  float m = INFINITY;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int t = static_cast<int>(i % T);
    const int b = static_cast<int>((i / (static_cast<int64_t>(T) * H)) % B);
    const bool counted = t >= 2 && (mask == nullptr || mask[static_cast<int64_t>(b) * T + t]);
    if (!counted) continue;
    s += phi[i];
    m = fminf(m, logdet[i]);
  }
  s = block_sum(s, dscratch);
  m = block_min(m, fscratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = s;
    min_partials[blockIdx.x] = m;
  }
}

__global__ void barrier_stage2_kernel(const double* __restrict__ partials,
                                      const float* __restrict__ min_partials, int g,
                                      double* __restrict__ out_sum, float* __restrict__ out_min) {
  __shared__ double dscratch[32];
  __shared__ float fscratch[32];
  double s = 0.0;
  float m = INFINITY;
  for (int i = threadIdx.x; i < g; i += blockDim.x) {
    s += partials[i];
    m = fminf(m, min_partials[i]);
  }
  s = block_sum(s, dscratch);
  m = block_min(m, fscratch);
  if (threadIdx.x == 0) {
    *out_sum = s;
    *out_min = m;
  }
}

}  // namespace

size_t column_partial_floats(int N, int C, int outputs) {
  return static_cast<size_t>(outputs) * static_cast<size_t>(column_chunks(N)) *
         static_cast<size_t>(C > 0 ? C : 0);
}

void column_sum_accumulate(const float* x, int N, int C, float* partial, float* out,
                           cudaStream_t stream) {
  float* outs[1] = {out};
  column_reduce<kVecWidth<float>>(ColumnSumTerms<float>{x}, N, C, partial, outs, aligned16(x),
                                  stream, "column_sum");
}

void column_sum_accumulate(const __nv_bfloat16* x, int N, int C, float* partial, float* out,
                           cudaStream_t stream) {
  float* outs[1] = {out};
  column_reduce<kVecWidth<__nv_bfloat16>>(ColumnSumTerms<__nv_bfloat16>{x}, N, C, partial, outs,
                                          aligned16(x), stream, "column_sum(bf16)");
}

namespace {

template <class A>
void column_sum_add_impl(__nv_bfloat16* x, const A* addend, int addend_cols, int N, int C,
                         float* partial, float* out, cudaStream_t stream, const char* name) {
  constexpr int W = kVecWidth<__nv_bfloat16>;
  float* outs[1] = {out};
  const bool vectors = aligned16(x) && aligned16(addend) && addend_cols % W == 0;
  column_reduce<W>(ColumnSumAddBf16Terms<A>{x, addend, C, addend_cols}, N, C, partial, outs,
                   vectors, stream, name);
}

template <class A>
void column_sum_convert_impl(const float* x, const A* addend, int addend_cols, int N, int C,
                             float* partial, float* out, __nv_bfloat16* x16, cudaStream_t stream,
                             const char* name) {
  constexpr int W = kVecWidth<__nv_bfloat16>;
  float* outs[1] = {out};
  // 8 columns per thread: 16 bytes of bf16 out (two float4 in).
  const bool vectors = aligned16(x) && aligned16(x16) &&
                       (addend == nullptr || (aligned16(addend) && addend_cols % W == 0));
  column_reduce<W>(ColumnSumConvertTerms<A>{x, x16, addend, C, addend_cols}, N, C, partial, outs,
                   vectors, stream, name);
}

}  // namespace

void column_sum_add_accumulate(__nv_bfloat16* x, const float* addend, int addend_cols, int N, int C,
                               float* partial, float* out, cudaStream_t stream) {
  column_sum_add_impl(x, addend, addend_cols, N, C, partial, out, stream, "column_sum_add(bf16)");
}

void column_sum_add_accumulate(__nv_bfloat16* x, const __nv_bfloat16* addend, int addend_cols,
                               int N, int C, float* partial, float* out, cudaStream_t stream) {
  column_sum_add_impl(x, addend, addend_cols, N, C, partial, out, stream,
                      "column_sum_add(bf16, bf16 addend)");
}

void column_sum_convert_accumulate(const float* x, const float* addend, int addend_cols, int N,
                                   int C, float* partial, float* out, __nv_bfloat16* x16,
                                   cudaStream_t stream) {
  column_sum_convert_impl(x, addend, addend_cols, N, C, partial, out, x16, stream,
                          "column_sum_convert");
}

void column_sum_convert_accumulate(const float* x, const __nv_bfloat16* addend, int addend_cols,
                                   int N, int C, float* partial, float* out, __nv_bfloat16* x16,
                                   cudaStream_t stream) {
  column_sum_convert_impl(x, addend, addend_cols, N, C, partial, out, x16, stream,
                          "column_sum_convert(bf16 addend)");
}

void gelu_backward_column_sum_accumulate(const float* pre, float* dact, int N, int C,
                                         float* partial, float* out, cudaStream_t stream) {
  float* outs[1] = {out};
  column_reduce<kVecWidth<float>>(GeluBackwardColumnSumTerms<float>{pre, dact}, N, C, partial,
                                  outs, aligned16(pre) && aligned16(dact), stream,
                                  "gelu_backward_column_sum");
}

void gelu_backward_column_sum_accumulate(const __nv_bfloat16* pre, __nv_bfloat16* dact, int N,
                                         int C, float* partial, float* out, cudaStream_t stream) {
  float* outs[1] = {out};
  column_reduce<kVecWidth<__nv_bfloat16>>(GeluBackwardColumnSumTerms<__nv_bfloat16>{pre, dact},
                                          N, C, partial, outs, aligned16(pre) && aligned16(dact),
                                          stream, "gelu_backward_column_sum(bf16)");
}

void gelu_backward_recompute_column_sum_accumulate(const __nv_bfloat16* pre, __nv_bfloat16* dact,
                                                   __nv_bfloat16* act, int N, int C,
                                                   float* partial, float* out,
                                                   cudaStream_t stream) {
  float* outs[1] = {out};
  // Same width, grid and chunking as gelu_backward_column_sum_accumulate (bf16) whenever act is
  // aligned like pre and dact (the backend's arena: 256-byte aligned), so out gets the same sums.
  column_reduce<kVecWidth<__nv_bfloat16>>(
      GeluBackwardRecomputeColumnSumTerms{pre, dact, act}, N, C, partial, outs,
      aligned16(pre) && aligned16(dact) && aligned16(act), stream,
      "gelu_backward_recompute_column_sum(bf16)");
}

namespace {

struct VectorAdds {
  VectorAdd s[kMaxVectorAdds];
};

// Block row y = segment y; x covers its elements.  One thread per element: no order to fix.
__global__ void add_vectors_kernel(VectorAdds adds) {
  pdl_wait();
  pdl_launch_dependents();
  const VectorAdd& a = adds.s[blockIdx.y];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += gridDim.x * blockDim.x) {
    const float v = a.src_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(a.src)[i])
                               : static_cast<const float*>(a.src)[i];
    a.dst[i] += v;
  }
}

}  // namespace

void add_vectors_accumulate(const VectorAdd* adds, int count, cudaStream_t stream) {
  if (count <= 0) return;
  if (count > kMaxVectorAdds)
    throw DeviceError("add_vectors_accumulate: " + std::to_string(count) + " segments (at most " +
                      std::to_string(kMaxVectorAdds) + ")");
  VectorAdds a;
  int longest = 0;
  for (int s = 0; s < count; ++s) {
    a.s[s] = adds[s];
    longest = std::max(longest, adds[s].n);
  }
  if (longest <= 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(longest, threads), 1024));
  launch_pdl(add_vectors_kernel, dim3(blocks, count), threads, 0, stream, a);
  BLM_CHECK_LAUNCH("add_vectors_accumulate");
}

void reduce_sum(const float* x, int64_t n, double* partials, double* out, cudaStream_t stream) {
  reduce_sum_impl(LoadValue<float>{x}, n, partials, out, stream, "reduce_sum(float)");
}

void reduce_sum(const int32_t* x, int64_t n, double* partials, double* out, cudaStream_t stream) {
  reduce_sum_impl(LoadValue<int32_t>{x}, n, partials, out, stream, "reduce_sum(int)");
}

void reduce_sum_squares(const float* x, int64_t n, double* partials, double* out,
                        cudaStream_t stream) {
  reduce_sum_impl(LoadSquare{x}, n, partials, out, stream, "reduce_sum_squares");
}

void barrier_reduce(const float* phi, const float* logdet, const uint8_t* mask, int Lb, int B,
                    int H, int T, double* partials, float* min_partials, double* out_sum,
                    float* out_min, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(Lb) * B * H * T;
  const int g = reduce_blocks(n);
  barrier_stage1_kernel<<<g, kReduceThreads, 0, stream>>>(phi, logdet, mask, B, H, T, n, partials,
                                                          min_partials);
  BLM_CHECK_LAUNCH("barrier_reduce");
  barrier_stage2_kernel<<<1, 1024, 0, stream>>>(partials, min_partials, g, out_sum, out_min);
  BLM_CHECK_LAUNCH("barrier_reduce");
}

}  // namespace cuda
}  // namespace blm
