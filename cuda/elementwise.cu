// Elementwise kernels: bias add, bias + GELU (tanh approximation) forward, GELU backward, the
// residual add, and for the bf16 precision GELU forward / backward on bf16 storage and the fp32 ->
// bf16 conversion.  Shapes: [N, C] row-major, column c = index % C.
//
// gelu(x), gelu'(x): cuda/gelu.cuh (GELU with the tanh approximation).
//
// Bandwidth: every kernel moves 16-byte vectors (4 floats or 8 bf16 per thread per iteration) in a
// grid-stride loop over vectors; the column of a vector is advanced incrementally (no 64-bit
// division per element).  The vector path needs every pointer 16-byte aligned and, for the kernels
// with a per-column bias, C a multiple of the vector width (so a vector never spans two rows);
// otherwise the same kernel runs with vectors of one element.  n % width trailing elements are
// done one by one.
#include <initializer_list>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/gelu.cuh"
#include "cuda/launch.cuh"
#include "cuda/pdl.cuh"
#include "cuda/vector_io.cuh"

namespace blm {
namespace cuda {

namespace {

using bf16 = __nv_bfloat16;

// Runs op.apply<K>(i, col) over elements [0, n): vectors of W elements (i = v * W) in a
// grid-stride loop, then the n % W tail with K = 1.  col = i % C, the column of element i in an
// [*, C] layout, kept incrementally (C % W == 0 when W > 1, so col + W <= C).  Ops without a
// column pass C = 1.
template <int W, class Op>
__global__ void __launch_bounds__(kThreads) map_kernel(Op op, int64_t n, int C) {
  pdl_wait();
  pdl_launch_dependents();
  const int64_t nv = n / W;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int col = static_cast<int>((first * W) % C);       // once per thread
  const int step = static_cast<int>((stride * W) % C);  // columns advanced per iteration
  for (int64_t v = first; v < nv; v += stride) {
    op.template apply<W>(v * W, col);
    col += step;
    if (col >= C) col -= C;
  }
  if (W > 1 && first < n - nv * W) {
    const int64_t i = nv * W + first;
    op.template apply<1>(i, static_cast<int>(i % C));
  }
}

// Launches map_kernel with width W when `vector_ok` (alignment and C checked by the caller),
// else with width 1.  The grid depends on n only.
template <int W, class Op>
void launch_map(const Op& op, int64_t n, int C, bool vector_ok, cudaStream_t stream,
                const char* name) {
  if (n == 0) return;
  if (vector_ok)
    launch_pdl(map_kernel<W, Op>, grid_for(ceil_div(n, W)), kThreads, 0, stream, op, n, C);
  else
    launch_pdl(map_kernel<1, Op>, grid_for(n), kThreads, 0, stream, op, n, C);
  BLM_CHECK_LAUNCH(name);
}

// y[i] += b[col]
struct AddBias {
  float* __restrict__ y;
  const float* __restrict__ b;
  template <int K>
  __device__ void apply(int64_t i, int col) const {
    float v[K], bb[K];
    load_vec<K>(y + i, v);
    load_vec<K>(b + col, bb);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] += bb[j];
    store_vec<K>(y + i, v);
  }
};

// pre[i] += b[col]; out[i] = gelu(pre[i])
struct BiasGelu {
  float* __restrict__ pre;
  const float* __restrict__ b;
  float* __restrict__ out;
  template <int K>
  __device__ void apply(int64_t i, int col) const {
    float x[K], bb[K], g[K];
    load_vec<K>(pre + i, x);
    load_vec<K>(b + col, bb);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      x[j] += bb[j];
      g[j] = gelu(x[j]);
    }
    store_vec<K>(pre + i, x);
    store_vec<K>(out + i, g);
  }
};

// dact[i] *= gelu'(pre[i]); T float or bf16 (math in float).
template <class T>
struct GeluBackward {
  const T* __restrict__ pre;
  T* __restrict__ dact;
  template <int K>
  __device__ void apply(int64_t i, int) const {
    float x[K], d[K];
    load_vec<K>(pre + i, x);
    load_vec<K>(dact + i, d);
#pragma unroll
    for (int j = 0; j < K; ++j) d[j] *= gelu_grad(x[j]);
    store_vec<K>(dact + i, d);
  }
};

struct GeluForwardBf16 {
  const bf16* __restrict__ pre;
  bf16* __restrict__ out;
  template <int K>
  __device__ void apply(int64_t i, int) const {
    float x[K];
    load_vec<K>(pre + i, x);
#pragma unroll
    for (int j = 0; j < K; ++j) x[j] = gelu(x[j]);
    store_vec<K>(out + i, x);
  }
};

struct ConvertBf16 {
  const float* __restrict__ x;
  bf16* __restrict__ y;
  template <int K>
  __device__ void apply(int64_t i, int) const {
    float v[K];
    load_vec<K>(x + i, v);
    store_vec<K>(y + i, v);
  }
};

// out[i] = resid[i] + (y[i] + bias[col]).  No __restrict__: out may alias resid or y; each
// thread reads its whole vector before writing it, and vectors are disjoint.
struct ResidualBiasAdd {
  const float* resid;
  const float* y;
  const float* __restrict__ bias;
  float* out;
  template <int K>
  __device__ void apply(int64_t i, int col) const {
    float r[K], v[K], bb[K];
    load_vec<K>(resid + i, r);
    load_vec<K>(y + i, v);
    load_vec<K>(bias + col, bb);
#pragma unroll
    for (int j = 0; j < K; ++j) r[j] = r[j] + (v[j] + bb[j]);
    store_vec<K>(out + i, r);
  }
};

bool all_aligned(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (!aligned16(p)) return false;
  return true;
}

}  // namespace

void add_bias(float* y, const float* b, int64_t N, int C, cudaStream_t stream) {
  constexpr int W = kVecWidth<float>;
  launch_map<W>(AddBias{y, b}, N * C, C, C % W == 0 && all_aligned({y, b}), stream, "add_bias");
}

void bias_gelu_forward(float* pre, const float* b, float* out, int64_t N, int C,
                       cudaStream_t stream) {
  constexpr int W = kVecWidth<float>;
  launch_map<W>(BiasGelu{pre, b, out}, N * C, C, C % W == 0 && all_aligned({pre, b, out}), stream,
                "bias_gelu_forward");
}

void gelu_backward_inplace(const float* pre, float* dact, int64_t n, cudaStream_t stream) {
  launch_map<kVecWidth<float>>(GeluBackward<float>{pre, dact}, n, 1, all_aligned({pre, dact}),
                               stream, "gelu_backward");
}

void gelu_backward_inplace(const bf16* pre, bf16* dact, int64_t n, cudaStream_t stream) {
  launch_map<kVecWidth<bf16>>(GeluBackward<bf16>{pre, dact}, n, 1, all_aligned({pre, dact}),
                              stream, "gelu_backward(bf16)");
}

void gelu_forward(const bf16* pre, bf16* out, int64_t n, cudaStream_t stream) {
  launch_map<kVecWidth<bf16>>(GeluForwardBf16{pre, out}, n, 1, all_aligned({pre, out}), stream,
                              "gelu_forward(bf16)");
}

void convert_to_bf16(const float* x, bf16* y, int64_t n, cudaStream_t stream) {
  // 8 per vector: 16 bytes of bf16 out, two float4 in.
  launch_map<kVecWidth<bf16>>(ConvertBf16{x, y}, n, 1, all_aligned({x, y}), stream,
                              "convert_to_bf16");
}

void residual_bias_add(const float* resid, const float* y, const float* bias, float* out,
                       int64_t N, int C, cudaStream_t stream) {
  constexpr int W = kVecWidth<float>;
  launch_map<W>(ResidualBiasAdd{resid, y, bias, out}, N * C, C,
                C % W == 0 && all_aligned({resid, y, bias, out}), stream, "residual_bias_add");
}

}  // namespace cuda
}  // namespace blm
