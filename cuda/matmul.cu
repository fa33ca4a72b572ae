// Matrix products of the CUDA backend through cuBLAS, fp32 with TF32 off.
//
// Activations are row-major, cuBLAS is column-major.  A row-major matrix X [r, c] with row stride
// ld is, read column-major, X^T [c, r] with leading dimension ld.  So the row-major product
//   C[M,N] = op(A)[M,K] op(B)[K,N]
// is the column-major product C^T[N,M] = op(B)^T op(A)^T, and since each operand's column-major
// view is already the transpose of what it stores, op(B)^T needs CUBLAS_OP_N exactly when B is
// used untransposed (and likewise A).  Hence: cublasGemmEx(opB, opA, N, M, K, B, ldb, A, lda,
// C, ldc).  Examples used by the backend (x [n, in], W [out, in], dy [n, out]):
//   y  = x W^T   gemm(false, true,  n, out, in,  x, in,  W, in,  y, out)
//   dx = dy W    gemm(false, false, n, in,  out, dy, out, W, in, dx, in)
//   dW += dy^T x gemm(true,  false, out, in, n,  dy, out, x, in, dW, in)   (beta = 1)
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace blm {
namespace cuda {

cublasHandle_t create_cublas(cudaStream_t stream) {
  cublasHandle_t h = nullptr;
  CUBLAS_CHECK(cublasCreate(&h));
  try {
    CUBLAS_CHECK(cublasSetStream(h, stream));
    // Default math mode with CUBLAS_COMPUTE_32F below: true fp32 products, never TF32 (TF32 needs
    // CUBLAS_TF32_TENSOR_OP_MATH or CUBLAS_COMPUTE_32F_FAST_TF32, neither of which is used).
    CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  } catch (...) {
    cublasDestroy(h);
    throw;
  }
  return h;
}

void destroy_cublas(cublasHandle_t h) noexcept {
  if (h) cublasDestroy(h);
}

void gemm(cublasHandle_t h, bool trans_a, bool trans_b, int M, int N, int K, float alpha,
          const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasGemmEx(h, op_b, op_a, N, M, K, &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F,
                            lda, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

void gemm_strided_batched(cublasHandle_t h, bool trans_a, bool trans_b, int M, int N, int K,
                          float alpha, const float* A, int lda, long long stride_a, const float* B,
                          int ldb, long long stride_b, float beta, float* C, int ldc,
                          long long stride_c, int batch, bool tf32) {
  if (M <= 0 || N <= 0 || batch <= 0) return;
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha,
      B, CUDA_R_32F, ldb, stride_b, A, CUDA_R_32F, lda, stride_a, &beta, C, CUDA_R_32F, ldc,
      stride_c, batch, tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
}

}  // namespace cuda
}  // namespace blm
