// Block-cooperative dense linear algebra on one small n x n matrix held in shared memory, used by
// the barrier kernels (barrier.cu) once per (sequence, head, position):
//   block_lu_logdet   : LU with partial pivoting, in place  -> sign and log|det|
//   block_gj_inverse  : Gauss-Jordan inversion with partial pivoting, in place -> A^{-1}, sign,
//                       log|det|
// The matrix is row-major with leading dimension N + 1 (the padding puts the rows of one column
// in different banks).  All threads of the block call these (they contain __syncthreads); the
// results are identical in every thread.  Pivoting follows core/barrier.cpp: the largest |a_ik|
// of the column, the smallest row index among ties.
#pragma once
#include <cmath>

#include <cuda_runtime.h>

namespace blm {
namespace cuda {

// Row of the pivot for column k (rows k..N-1).  Warp 0 searches, the block waits; `slot` is one
// int of shared memory.  Every thread returns the same row.
template <int N, int NT, class Real>
__device__ int block_find_pivot(const Real* A, int k, int* slot) {
  constexpr int LD = N + 1;
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    Real best = Real(-1);
    int row = k;
    for (int i = k + lane; i < N; i += 32) {  // ascending: the first maximum is kept
      const Real v = fabs(A[i * LD + k]);
      if (v > best) best = v, row = i;
    }
    // Butterfly over the lanes on the total order (larger |a|, then smaller row): all lanes end
    // with the same winner.
    for (int o = 16; o > 0; o >>= 1) {
      const Real ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int orow = __shfl_xor_sync(0xffffffffu, row, o);
      if (ob > best || (ob == best && orow < row)) best = ob, row = orow;
    }
    if (lane == 0) *slot = row;
  }
  __syncthreads();
  return *slot;
}

// In-place LU with partial pivoting of A [N][N+1]; only the determinant is wanted, so only the
// trailing submatrix is updated.  sign = permutation sign times the pivots' signs (0 when a pivot
// is exactly zero), logabs = log|det A| accumulated in double (-inf when singular).
template <int N, int NT, class Real>
__device__ void block_lu_logdet(Real* A, int* slot, int* sign_out, double* logabs_out) {
  constexpr int LD = N + 1;
  int sign = 1;
  double logabs = 0;
  for (int k = 0; k < N; ++k) {
    const int p = block_find_pivot<N, NT>(A, k, slot);
    if (p != k) {
      for (int j = k + threadIdx.x; j < N; j += NT) {
        const Real tmp = A[k * LD + j];
        A[k * LD + j] = A[p * LD + j];
        A[p * LD + j] = tmp;
      }
      sign = -sign;
    }
    __syncthreads();
    const Real piv = A[k * LD + k];  // read by all threads after the same barrier: uniform
    if (piv == Real(0)) {
      sign = 0;
      break;
    }
    if (piv < Real(0)) sign = -sign;
    logabs += log(fabs(static_cast<double>(piv)));
    const Real rinv = Real(1) / piv;
    // a_ij -= (a_ik / a_kk) a_kj for i, j > k.  Column k and row k are only read here.
    const int n = N - k - 1;
    for (int idx = threadIdx.x; idx < n * n; idx += NT) {
      const int i = k + 1 + idx / n, j = k + 1 + idx % n;
      A[i * LD + j] -= (A[i * LD + k] * rinv) * A[k * LD + j];
    }
    __syncthreads();
  }
  *sign_out = sign;
  *logabs_out = sign == 0 ? -INFINITY : logabs;
}

// In-place Gauss-Jordan inversion with partial pivoting of A [N][N+1]: on return A holds A^{-1}
// (when sign != 0; otherwise A is garbage and the caller must not use it).  `fcol` is N values of
// shared scratch, `perm` N ints, `slot` one int.
//
// Step k: swap the pivot row into row k, scale row k by 1/pivot (its diagonal slot becomes
// 1/pivot: the k-th column of the inverse is built in place), then eliminate column k from every
// other row, a_ij -= a_ik a_kj with a_ik taken from the saved column (fcol) and the slot a_ik
// itself starting from 0.  Four barriers per step (pivot, swap, scale, eliminate).  Row swaps applied during the elimination permute the inverse's
// columns: they are undone at the end as column swaps in reverse order.
template <int N, int NT, class Real>
__device__ void block_gj_inverse(Real* A, Real* fcol, int* perm, int* slot, int* sign_out,
                                 double* logabs_out) {
  constexpr int LD = N + 1;
  int sign = 1;
  double logabs = 0;
  for (int k = 0; k < N; ++k) {
    const int p = block_find_pivot<N, NT>(A, k, slot);
    if (p != k) {
      for (int j = threadIdx.x; j < N; j += NT) {
        const Real tmp = A[k * LD + j];
        A[k * LD + j] = A[p * LD + j];
        A[p * LD + j] = tmp;
      }
      sign = -sign;
    }
    if (threadIdx.x == 0) perm[k] = p;
    __syncthreads();
    const Real piv = A[k * LD + k];
    if (piv == Real(0)) {
      sign = 0;
      break;
    }
    if (piv < Real(0)) sign = -sign;
    logabs += log(fabs(static_cast<double>(piv)));
    const Real rinv = Real(1) / piv;
    // Save the multipliers a_ik (i != k) and scale row k outside its diagonal.  The two touch
    // different entries (fcol reads column k outside row k, the scaling writes row k outside
    // column k), and a_kk itself is left alone: every thread has to read the pivot first.
    for (int i = threadIdx.x; i < N; i += NT) {
      fcol[i] = i == k ? Real(0) : A[i * LD + k];
      if (i != k) A[k * LD + i] *= rinv;
    }
    __syncthreads();
    // Eliminate column k from the other rows; column k receives -a_ik / pivot and a_kk becomes
    // 1 / pivot (the k-th column of the inverse so far).  Row k is only read, except a_kk, which
    // nobody reads in this phase (rinv is in registers).
    for (int idx = threadIdx.x; idx < N * N; idx += NT) {
      const int i = idx / N, j = idx % N;
      if (i == k) {
        if (j == k) A[k * LD + k] = rinv;
        continue;
      }
      A[i * LD + j] = j == k ? -fcol[i] * rinv : A[i * LD + j] - fcol[i] * A[k * LD + j];
    }
    __syncthreads();
  }
  if (sign != 0) {
    // Undo the row swaps as column swaps, last swap first; one thread per row.
    for (int i = threadIdx.x; i < N; i += NT) {
      for (int k = N - 1; k >= 0; --k) {
        const int p = perm[k];
        if (p == k) continue;
        const Real tmp = A[i * LD + k];
        A[i * LD + k] = A[i * LD + p];
        A[i * LD + p] = tmp;
      }
    }
    __syncthreads();
  }
  *sign_out = sign;
  *logabs_out = sign == 0 ? -INFINITY : logabs;
}

}  // namespace cuda
}  // namespace blm
