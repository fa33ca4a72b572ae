// Host-callable launchers of the CUDA backend's kernels (everything but attention and the
// barrier, which are in attention.h).  Plain C++: the GPU tests call these directly.
//
// Conventions: device pointers, row-major, fp32 (bf16 overloads, for device.precision bf16, take
// bf16 activations and compute in fp32: loads widen, stores round to nearest even); N = B*T rows (positions), C columns; every
// launch goes on `stream` and is checked.  Functions named *_accumulate ADD into their output
// (gradients are zeroed once per step and then only accumulated); the others overwrite.
// No kernel uses floating-point atomics: every reduction has a fixed order, so two runs are
// bit-identical.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/optim.h"

namespace blm {
namespace cuda {

// ------------------------------------------------------------------ matmul (matmul.cu)
// A cuBLAS handle bound to `stream`, fp32 math with TF32 off.
cublasHandle_t create_cublas(cudaStream_t stream);
void destroy_cublas(cublasHandle_t h) noexcept;
// Row-major C[M,N] = alpha * op(A)[M,K] op(B)[K,N] + beta * C; lda/ldb/ldc are row strides.
// op(A) = A^T when trans_a (A stored [K, M]), likewise B.  fp32 in, fp32 accumulate, no TF32.
void gemm(cublasHandle_t h, bool trans_a, bool trans_b, int M, int N, int K, float alpha,
          const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc);
// The same product for `batch` matrices at element strides stride_a, stride_b, stride_c; with
// tf32 the products run on TF32 tensor cores (about 1e-3 relative error), else true fp32.
void gemm_strided_batched(cublasHandle_t h, bool trans_a, bool trans_b, int M, int N, int K,
                          float alpha, const float* A, int lda, long long stride_a, const float* B,
                          int ldb, long long stride_b, float beta, float* C, int ldc,
                          long long stride_c, int batch, bool tf32);

// ------------------------------------------------------------------ embedding (embedding.cu)
// out[b,t,i] = wte[tokens[b,t], i] + wpe[t, i] + noise_std * normal01(noise_seed, (b*T+t)*d+i)
//   tokens [B, T], wte [V, d], wpe [>=T, d], out [B, T, d].  noise_std = 0 adds nothing.
void embedding_forward(const int32_t* tokens, const float* wte, const float* wpe, int B, int T,
                       int d, double noise_std, uint64_t noise_seed, float* out,
                       cudaStream_t stream);
// dwte[used[u], :] += sum over positions[offsets[u] .. offsets[u+1]) of dout[pos, :]
//   (positions grouped by token id on the host, ascending within a group: a fixed sum order.)
//   dout [N, d], used [n_used], offsets [n_used + 1], positions [N], dwte [V, d].
void embedding_backward_wte_accumulate(const float* dout, const int32_t* used,
                                       const int32_t* offsets, const int32_t* positions,
                                       int n_used, int d, float* dwte, cudaStream_t stream);
// Host side of the wte backward: groups positions 0..N-1 by token id (a counting sort), so that
// used = the distinct ids ascending, positions[offsets[u] .. offsets[u+1]) = the positions
// holding used[u], ascending.  count is scratch (resized to V).
void group_positions_by_token(const int32_t* tokens, int N, int V, std::vector<int32_t>& count,
                              std::vector<int32_t>& used, std::vector<int32_t>& offsets,
                              std::vector<int32_t>& positions);
// dwpe[t, :] += sum_b dout[b, t, :]   (b ascending).  dout [B, T, d], dwpe [>=T, d].
void embedding_backward_wpe_accumulate(const float* dout, int B, int T, int d, float* dwpe,
                                       cudaStream_t stream);

// ------------------------------------------------------------------ layernorm (layernorm.cu)
constexpr float kLayerNormEps = 1e-5f;
// y = (x - mean) * rstd * w + b per row; mean, rstd [N] saved for the backward.
//   x, y [N, C]; w, b [C].  Biased variance, eps 1e-5, two passes over the row.
void layernorm_forward(const float* x, const float* w, const float* b, int N, int C, float* y,
                       float* mean, float* rstd, cudaStream_t stream);
// The same with y stored in bf16 (x, w, b, mean, rstd fp32).
void layernorm_forward(const float* x, const float* w, const float* b, int N, int C,
                       __nv_bfloat16* y, float* mean, float* rstd, cudaStream_t stream);
// The residual add fused with the LayerNorm after it (the bf16 step's projections write their
// output in bf16):  sum = x + delta (fp32 adds), then y = LayerNorm(sum) as above, bit for bit
// layernorm_forward of that sum.  x, sum [N, C] fp32 (distinct); delta [N, C] bf16.
void residual_layernorm_forward(const float* x, const __nv_bfloat16* delta, float* sum,
                                const float* w, const float* b, int N, int C, float* y,
                                float* mean, float* rstd, cudaStream_t stream);
void residual_layernorm_forward(const float* x, const __nv_bfloat16* delta, float* sum,
                                const float* w, const float* b, int N, int C, __nv_bfloat16* y,
                                float* mean, float* rstd, cudaStream_t stream);
// dx += rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w,  xhat = (x - mean) * rstd.
//   Adds into dx (the residual stream's gradient).  dy, x, dx [N, C].
void layernorm_backward_dx_accumulate(const float* dy, const float* x, const float* mean,
                                      const float* rstd, const float* w, int N, int C,
                                      float* dx, cudaStream_t stream);
// dw[c] += sum_n dy[n,c] * xhat[n,c],  db[c] += sum_n dy[n,c].
//   partial: column_partial_floats(N, C, 2) floats of scratch.
void layernorm_backward_params_accumulate(const float* dy, const float* x, const float* mean,
                                          const float* rstd, int N, int C, float* partial,
                                          float* dw, float* db, cudaStream_t stream);
// Both of the above in one pass over dy and x (dx, and the column partials of dw, db written
// by the same blocks; then one small kernel adds the partials):
//   partial: column_partial_floats(N, C, 2) floats of scratch.
void layernorm_backward_accumulate(const float* dy, const float* x, const float* mean,
                                   const float* rstd, const float* w, int N, int C, float* dx,
                                   float* partial, float* dw, float* db, cudaStream_t stream);
// The same, also writing dx16 = bf16(dx) (the accumulated dx, rounded to nearest even): the bf16
// precision's copy of the residual gradient for the products that read it, without a separate
// conversion pass.  dx16 [N, C]; null: as above.
void layernorm_backward_accumulate(const float* dy, const float* x, const float* mean,
                                   const float* rstd, const float* w, int N, int C, float* dx,
                                   __nv_bfloat16* dx16, float* partial, float* dw, float* db,
                                   cudaStream_t stream);
// The same with dy in bf16 (the bf16 precision's product output: half the bytes of the pass's
// largest input; the arithmetic is the same fp32), and optionally the column sums of the new dx:
//   dx_column_sum[c] += sum_n dx[n, c]   (after the add; null: not computed)
// dx is the residual stream's gradient, so these are the bias gradient of the product whose
// output was added into that stream, computed without another read of dx.
//   partial: column_partial_floats(N, C, 3) floats with dx_column_sum, else (N, C, 2).
void layernorm_backward_accumulate(const __nv_bfloat16* dy, const float* x, const float* mean,
                                   const float* rstd, const float* w, int N, int C, float* dx,
                                   __nv_bfloat16* dx16, float* partial, float* dw, float* db,
                                   float* dx_column_sum, cudaStream_t stream);

// ------------------------------------------------------------------ column sums (reduce.cu)
// Scratch (floats) for the two-stage column reductions of an [N, C] matrix with `outputs`
// result rows.
size_t column_partial_floats(int N, int C, int outputs);
// out[c] += sum_n x[n, c]   (bias gradients).  x [N, C]; partial: column_partial_floats(N, C, 1).
void column_sum_accumulate(const float* x, int N, int C, float* partial, float* out,
                           cudaStream_t stream);
void column_sum_accumulate(const __nv_bfloat16* x, int N, int C, float* partial, float* out,
                           cudaStream_t stream);
// The column sum fused with the bf16 copy of x (one read of x instead of two), with an optional
// addend in the first addend_cols columns (the flash barrier's dq, dk on the attention's dqkv):
//   y[n, c] = x[n, c] + (c < addend_cols ? addend[n, c] : 0)   (addend null: y = x)
//   out[c] += sum_n y[n, c];  x16[n, c] = bf16(y[n, c]).  x, x16 [N, C], addend [N, addend_cols].
// Replaces adding the addend into x, column_sum_accumulate(x, ...) and convert_to_bf16(x, x16).
// The addend is fp32 or bf16 (the bf16 precision keeps the barrier's dq, dk in bf16), widened
// before the fp32 add.
void column_sum_convert_accumulate(const float* x, const float* addend, int addend_cols, int N,
                                   int C, float* partial, float* out, __nv_bfloat16* x16,
                                   cudaStream_t stream);
void column_sum_convert_accumulate(const float* x, const __nv_bfloat16* addend, int addend_cols,
                                   int N, int C, float* partial, float* out, __nv_bfloat16* x16,
                                   cudaStream_t stream);
// (A literal nullptr addend: no addend, without an ambiguous overload.)
inline void column_sum_convert_accumulate(const float* x, std::nullptr_t, int addend_cols, int N,
                                          int C, float* partial, float* out, __nv_bfloat16* x16,
                                          cudaStream_t stream) {
  column_sum_convert_accumulate(x, static_cast<const float*>(nullptr), addend_cols, N, C, partial,
                                out, x16, stream);
}
// The same on a bf16 x, in place (the flash barrier's dq, dk on cuDNN's bf16 dqkv):
//   y[n, c] = x[n, c] + (c < addend_cols ? addend[n, c] : 0);  out[c] += sum_n y[n, c];
//   x[n, c] = bf16(y[n, c]).  x [N, C] bf16, addend [N, addend_cols] fp32 or bf16.  The same sums
// and bits as column_sum_convert_accumulate on x widened to fp32.
void column_sum_add_accumulate(__nv_bfloat16* x, const float* addend, int addend_cols, int N, int C,
                               float* partial, float* out, cudaStream_t stream);
void column_sum_add_accumulate(__nv_bfloat16* x, const __nv_bfloat16* addend, int addend_cols,
                               int N, int C, float* partial, float* out, cudaStream_t stream);
// The GELU backward fused with the bias gradient of its result:
//   dact[n, c] *= gelu_tanh'(pre[n, c]);  out[c] += sum_n dact[n, c] (the stored, new values).
// Replaces gelu_backward_inplace(pre, dact, N * C) followed by column_sum_accumulate(dact, ...).
void gelu_backward_column_sum_accumulate(const float* pre, float* dact, int N, int C,
                                         float* partial, float* out, cudaStream_t stream);
void gelu_backward_column_sum_accumulate(const __nv_bfloat16* pre, __nv_bfloat16* dact, int N,
                                         int C, float* partial, float* out, cudaStream_t stream);
// dst[s][i] += src[s][i] for i < n[s], s < count <= kMaxVectorAdds, in one launch: the bias
// gradients that cuBLASLt's epilogues write (they overwrite; the gradients accumulate).  src is
// fp32 or bf16 (src_bf16), dst fp32; segments must not overlap.
constexpr int kMaxVectorAdds = 4;
struct VectorAdd {
  const void* src = nullptr;
  bool src_bf16 = false;
  float* dst = nullptr;
  int n = 0;
};
void add_vectors_accumulate(const VectorAdd* adds, int count, cudaStream_t stream);

// ------------------------------------------------------------------ elementwise (elementwise.cu)
// y[n, c] += b[c].  y [N, C].
void add_bias(float* y, const float* b, int64_t N, int C, cudaStream_t stream);
// pre[n, c] += b[c]; out = gelu_tanh(pre).  pre, out [N, C].
void bias_gelu_forward(float* pre, const float* b, float* out, int64_t N, int C,
                       cudaStream_t stream);
// dact[i] *= gelu_tanh'(pre[i]): the gradient through the GELU, in place.  [n] each.
void gelu_backward_inplace(const float* pre, float* dact, int64_t n, cudaStream_t stream);
void gelu_backward_inplace(const __nv_bfloat16* pre, __nv_bfloat16* dact, int64_t n,
                           cudaStream_t stream);
// out[i] = gelu_tanh(pre[i]) (the bias was added by the matmul's epilogue).  [n] each.
void gelu_forward(const __nv_bfloat16* pre, __nv_bfloat16* out, int64_t n, cudaStream_t stream);
// y[i] = bf16(x[i]), round to nearest even.  [n] each.
void convert_to_bf16(const float* x, __nv_bfloat16* y, int64_t n, cudaStream_t stream);
// out[n, c] = resid[n, c] + y[n, c] + bias[c].  out may alias resid or y.
void residual_bias_add(const float* resid, const float* y, const float* bias, float* out,
                       int64_t N, int C, cudaStream_t stream);

// ------------------------------------------------------------------ cross-entropy (cross_entropy.cu)
// Per row n of logits [N, V] with target y = targets[n] in [0, V):
//   row_loss[n] = logsumexp(logits[n]) - logits[n, y]
//   row_hit[n]  = 1 when y is the argmax of logits[n] (the first index among equal maxima)
//   when write_grad: logits[n, :] = (softmax(logits[n]) - onehot(y)) * grad_scale
// (the caller passes grad_scale = loss scale / number of targets).
void cross_entropy(float* logits, const int32_t* targets, int N, int V, bool write_grad,
                   float grad_scale, float* row_loss, int32_t* row_hit, cudaStream_t stream);
// The same on bf16 logits (math in fp32), the gradient written over them in bf16.
void cross_entropy(__nv_bfloat16* logits, const int32_t* targets, int N, int V, bool write_grad,
                   float grad_scale, float* row_loss, int32_t* row_hit, cudaStream_t stream);

// ------------------------------------------------------------------ reductions (reduce.cu)
// Two-stage deterministic reductions in double: stage 1 uses a grid that depends only on n (not
// on the device), stage 2 one block; the summation order is fixed.  `partials` holds
// kReducePartials doubles; the result is written to the device scalar *out.
constexpr int kReducePartials = 1024;
void reduce_sum(const float* x, int64_t n, double* partials, double* out, cudaStream_t stream);
void reduce_sum(const int32_t* x, int64_t n, double* partials, double* out, cudaStream_t stream);
void reduce_sum_squares(const float* x, int64_t n, double* partials, double* out,
                        cudaStream_t stream);
// The barrier's terms of Lb layers: phi, logdet [Lb, B, H, T] (as barrier_forward writes them).
// A term counts when t >= 2 and (mask null or mask[b*T + t]).  Writes out_sum = sum of counted
// phi (double) and out_min = min of counted logdet (+inf when none counts).
//   partials: kReducePartials doubles; min_partials: kReducePartials floats.
void barrier_reduce(const float* phi, const float* logdet, const uint8_t* mask, int Lb, int B,
                    int H, int T, double* partials, float* min_partials, double* out_sum,
                    float* out_min, cudaStream_t stream);

// ------------------------------------------------------------------ AdamW (adamw.cu)
// Which elements get weight decay: tensors [seg_start[s], seg_start[s+1]) with decay[s] != 0,
// s < n_seg; seg_start has n_seg + 1 entries, ascending, seg_start[n_seg] = total.
struct DecayTable {
  const int64_t* seg_start = nullptr;  // device [n_seg + 1]
  const uint8_t* decay = nullptr;      // device [n_seg]
  int n_seg = 0;
};
// torch.optim.AdamW, one step, per element (in double, stored in fp32), with the scalars of
// blm::adamw_scalars (core/optim.h) for step t:  g = grad * grad_scale (the clip scale)
//   p *= decay_factor (decay elements only);  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
void adamw_update(float* params, const float* grads, float* m, float* v, int64_t n,
                  const DecayTable& decay, const AdamWScalars& s, cudaStream_t stream);
// The same, also writing params16[i] = bf16(new params[i]) (the bf16 weights of the bf16
// precision, refreshed from the fp32 master weights in the same pass).  params16 may be null.
void adamw_update(float* params, const float* grads, float* m, float* v, int64_t n,
                  const DecayTable& decay, const AdamWScalars& s, __nv_bfloat16* params16,
                  cudaStream_t stream);

}  // namespace cuda
}  // namespace blm
