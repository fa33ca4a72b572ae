// Row-major GEMM through CBLAS, overloaded for float and double so templated code can call one
// name.  C[M,N] = alpha * op(A)[M,K] op(B)[K,N] + beta * C.
// Call it from serial code only (never inside an OpenMP parallel region): the BLAS threads itself.
#pragma once
#include <cblas.h>

namespace blm {

inline void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A,
                 int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
inline void gemm(bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A,
                 int lda, const double* B, int ldb, double beta, double* C, int ldc) {
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// True while OpenBLAS runs its own pthread pool with more than one thread (the Debian/Ubuntu
// default flavour).  Its threads and OpenMP's spin while waiting for work; alternating between
// the two pools on few cores cost more than the hand-written loops' share of a step (measured on
// the 2-core machine: 2-3x slower steps), so the loops then stay on the calling thread and the
// GEMMs, the bulk of the work, use the cores.  With the OpenMP or sequential flavour there is
// one pool and the loops use it.  (The rule of every OpenMP loop of the CPU backend: ops_cpu.h's
// worth_parallel and the barrier's per-position loop.)
inline bool blas_runs_own_pool() {
#if defined(OPENBLAS_VERSION)
  return openblas_get_parallel() == 1 && openblas_get_num_threads() > 1;
#else
  return false;
#endif
}

}  // namespace blm
