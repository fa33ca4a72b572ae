// LayerNorm forward and backward (eps 1e-5, biased variance), one warp per row.  The forward's
// output y is fp32 or bf16 (the bf16 precision's GEMM input); everything else is fp32.
//
//   forward:  mean = sum x / C,  var = sum (x - mean)^2 / C,  rstd = 1 / sqrt(var + eps)
//             y = (x - mean) * rstd * w + b          x, y [N, C]; w, b [C]; mean, rstd [N]
//   backward: xhat = (x - mean) * rstd,  g = dy * w
//             dx += rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
//             dw += sum_n dy * xhat,  db += sum_n dy      (two-stage column sums, no atomics)
// The variance uses a second pass over the row (not E[x^2] - mean^2) to avoid cancellation.
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/reduce_columns.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one row each

template <class TOut>
__global__ void layernorm_forward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ b, int N, int C,
                                         TOut* __restrict__ y, float* __restrict__ mean,
                                         float* __restrict__ rstd) {
  const int row = blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= N) return;  // a whole warp leaves together; no block-level barrier follows
  const float* xr = x + static_cast<int64_t>(row) * C;
  float s = 0.0f;
  for (int c = lane; c < C; c += 32) s += xr[c];
  const float mu = warp_sum(s) / C;
  float v = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float dx = xr[c] - mu;
    v += dx * dx;
  }
  const float rs = 1.0f / sqrtf(warp_sum(v) / C + kLayerNormEps);
  TOut* yr = y + static_cast<int64_t>(row) * C;
  for (int c = lane; c < C; c += 32) yr[c] = store_as<TOut>((xr[c] - mu) * rs * w[c] + b[c]);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

__global__ void layernorm_backward_dx_kernel(const float* __restrict__ dy,
                                             const float* __restrict__ x,
                                             const float* __restrict__ mean,
                                             const float* __restrict__ rstd,
                                             const float* __restrict__ w, int N, int C,
                                             float* __restrict__ dx) {
  const int row = blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  const int64_t off = static_cast<int64_t>(row) * C;
  const float mu = mean[row], rs = rstd[row];
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float g = dy[off + c] * w[c];
    sum_g += g;
    sum_gx += g * (x[off + c] - mu) * rs;
  }
  const float mean_g = warp_sum(sum_g) / C, mean_gx = warp_sum(sum_gx) / C;
  for (int c = lane; c < C; c += 32) {
    const float g = dy[off + c] * w[c];
    const float xhat = (x[off + c] - mu) * rs;
    dx[off + c] += rs * (g - mean_g - xhat * mean_gx);
  }
}

// Per-column partial sums of dy * xhat (output 0) and dy (output 1) over one chunk of rows.
struct LayerNormParamTerms {
  const float* dy;
  const float* x;
  const float* mean;
  const float* rstd;
  int C;
  __device__ void operator()(int64_t n, int c, float* acc) const {
    const int64_t i = n * C + c;
    const float g = dy[i];
    acc[0] += g * (x[i] - mean[n]) * rstd[n];
    acc[1] += g;
  }
};

}  // namespace

void layernorm_forward(const float* x, const float* w, const float* b, int N, int C, float* y,
                       float* mean, float* rstd, cudaStream_t stream) {
  if (N == 0) return;
  const unsigned grid = static_cast<unsigned>(ceil_div(N, kRowsPerBlock));
  layernorm_forward_kernel<float><<<grid, 32 * kRowsPerBlock, 0, stream>>>(x, w, b, N, C, y, mean,
                                                                           rstd);
  BLM_CHECK_LAUNCH("layernorm_forward");
}

void layernorm_forward(const float* x, const float* w, const float* b, int N, int C,
                       __nv_bfloat16* y, float* mean, float* rstd, cudaStream_t stream) {
  if (N == 0) return;
  const unsigned grid = static_cast<unsigned>(ceil_div(N, kRowsPerBlock));
  layernorm_forward_kernel<__nv_bfloat16><<<grid, 32 * kRowsPerBlock, 0, stream>>>(
      x, w, b, N, C, y, mean, rstd);
  BLM_CHECK_LAUNCH("layernorm_forward(bf16)");
}

void layernorm_backward_dx_accumulate(const float* dy, const float* x, const float* mean,
                                      const float* rstd, const float* w, int N, int C,
                                      float* dx, cudaStream_t stream) {
  if (N == 0) return;
  const unsigned grid = static_cast<unsigned>(ceil_div(N, kRowsPerBlock));
  layernorm_backward_dx_kernel<<<grid, 32 * kRowsPerBlock, 0, stream>>>(dy, x, mean, rstd, w, N,
                                                                       C, dx);
  BLM_CHECK_LAUNCH("layernorm_backward_dx");
}

void layernorm_backward_params_accumulate(const float* dy, const float* x, const float* mean,
                                          const float* rstd, int N, int C, float* partial,
                                          float* dw, float* db, cudaStream_t stream) {
  float* outs[2] = {dw, db};
  column_reduce<2>(LayerNormParamTerms{dy, x, mean, rstd, C}, N, C, partial, outs, stream,
                   "layernorm_backward_params");
}

}  // namespace cuda
}  // namespace blm
