// Warp-per-matrix dense linear algebra for the barrier's small D x D matrices (D = 32 or 64),
// used by the matrix-product barrier (barrier_tc.cu) once per (sequence, head, counted position):
//   warp_lu_logdet   : LU with partial pivoting -> sign and log|det| (fp32 elimination, the
//                      pivots' product kept in double as mantissa x 2^exponent)
//   warp_gj_inverse  : Gauss-Jordan inversion with partial pivoting, in place -> J^{-1} in a
//                      permuted layout, sign and log|det|
//   warp_store_inverse_transposed : coef J^{-T} into a shared-memory tile, rows in pivot order
//
// Layout: one warp owns one matrix, held in registers.  Lane l owns the "storage rows"
// r = l + 32 m, m < R = D / 32: a[m][j] = A[r][j].  Every loop over columns is unrolled, so
// every register index is a compile-time constant (no local memory); dynamic row choices are
// made with selects over m.
//
// Pivoting never moves data.  Storage row r keeps its registers; cur[m] is the position row r
// would have in the physically swapped matrix (a row chosen at step k gets position k, and the
// row that sat at position k takes the pivot's old position: exactly the swap the textbook
// algorithm does, so the permutation's sign flips whenever the pivot was not already at k).
// Rows with cur < k are the used pivot rows.  perm[k] (per-warp shared memory) = the storage row
// chosen at step k.
//
// Gauss-Jordan without swaps (checked on random matrices against a textbook inverse in a
// simulation): with E the product of the row operations, E A = Q where Q has its 1 of column k
// in row perm[k], and the in-place scheme leaves column perm[k] of E in slot k, so
//   J^{-1}[cur(r)][perm[k]] = a_final[r][k].
//
// Pivot choice: the largest |a_rk| over the unused rows, ties to the smaller row.  The search
// runs on one 32-bit key per lane, (bits of |a| with the low 7 mantissa bits dropped) | (127 - r),
// reduced with one __reduce_max_sync: the chosen pivot is within a factor 1 + 2^-16 of the
// largest, which is all partial pivoting needs for stability.  A pivot of exactly 0 (all unused
// entries of the column are 0) means J is exactly singular: sign = 0, log|det| = -inf, and the
// register contents are then meaningless.
//
// All 32 lanes must call these functions together (no lane may have left); they contain no
// __syncthreads, only __syncwarp, so other warps of the block are independent.
#pragma once
#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

namespace blm {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Warp-wide max of an unsigned key (every lane gets it).
__device__ __forceinline__ unsigned warp_max_u32(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, v);
#else
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
#endif
}

// v[m_sel] for a register array indexed by a warp-uniform runtime m_sel (a chain of selects).
template <int R, class T>
__device__ __forceinline__ T select_row(const T (&v)[R], int m_sel) {
  T out = v[0];
#pragma unroll
  for (int m = 1; m < R; ++m) out = m_sel == m ? v[m] : out;
  return out;
}

// The product of |pivots| as mantissa x 2^exponent in double: no overflow for any D, one log at
// the end.  Products of floats in double lose at most D ulps of double.
struct PivotProduct {
  double mant = 1.0;
  int exp2 = 0;
  __device__ __forceinline__ void mul(float piv) {
    int e = 0;
    mant = frexp(mant * fabs(static_cast<double>(piv)), &e);
    exp2 += e;
  }
  __device__ __forceinline__ double log_abs() const {
    return log(mant) + static_cast<double>(exp2) * 0.69314718055994530942;
  }
};

// Step k's pivot among the rows with cur >= k: returns the storage row (warp-uniform).
template <int D, int R>
__device__ __forceinline__ int warp_pivot_row(const float (&col)[R], const int (&cur)[R], int k) {
  static_assert(D <= 64, "the pivot key keeps 7 bits for the row, and 127 - r > 0");
  const int lane = threadIdx.x & 31;
  unsigned key = 0;
#pragma unroll
  for (int m = 0; m < R; ++m) {
    const int r = lane + 32 * m;
    const unsigned mine = (__float_as_uint(fabsf(col[m])) & ~127u) | static_cast<unsigned>(127 - r);
    key = cur[m] >= k ? max(key, mine) : key;  // used rows have key 0: below any unused row
  }
  key = warp_max_u32(key);
  return 127 - static_cast<int>(key & 127u);
}

// Records step k's pivot p (storage row) in cur; returns -1 when the permutation's sign flips.
template <int R>
__device__ __forceinline__ int warp_record_pivot(int (&cur)[R], int p, int k) {
  const int lane = threadIdx.x & 31, lp = p & 31, mp = p >> 5;
  const int cp = __shfl_sync(kFullMask, select_row<R>(cur, mp), lp);
#pragma unroll
  for (int m = 0; m < R; ++m) {
    if (cur[m] == k) cur[m] = cp;               // the row at position k moves to the pivot's slot
    if (lane == lp && m == mp) cur[m] = k;      // the pivot takes position k
  }
  return cp != k ? -1 : 1;
}

// Sign and log|det| of the matrix in a[][] (destroyed).  sign = 0, logabs = -inf when a pivot is
// exactly zero.
template <int D>
__device__ __forceinline__ void warp_lu_logdet(float (&a)[D / 32][D], int* sign_out,
                                               double* logabs_out) {
  constexpr int R = D / 32;
  const int lane = threadIdx.x & 31;
  int cur[R];
#pragma unroll
  for (int m = 0; m < R; ++m) cur[m] = lane + 32 * m;
  int sign = 1;
  PivotProduct prod;
#pragma unroll
  for (int k = 0; k < D; ++k) {
    float col[R];
#pragma unroll
    for (int m = 0; m < R; ++m) col[m] = a[m][k];
    const int p = warp_pivot_row<D, R>(col, cur, k);
    const int lp = p & 31, mp = p >> 5;
    const float piv = __shfl_sync(kFullMask, select_row<R>(col, mp), lp);
    if (piv == 0.0f) {  // warp-uniform: piv came from one lane
      sign = 0;
      break;
    }
    sign *= warp_record_pivot<R>(cur, p, k);
    if (piv < 0.0f) sign = -sign;
    prod.mul(piv);
    const float rinv = 1.0f / piv;
    // Multipliers of the unused rows (the pivot row now has cur == k: used).  Used rows are
    // never read again, so they are left alone (multiplier 0).
    float f[R];
#pragma unroll
    for (int m = 0; m < R; ++m) f[m] = cur[m] > k ? col[m] * rinv : 0.0f;
#pragma unroll
    for (int j = k + 1; j < D; ++j) {
      float row[R];
#pragma unroll
      for (int m = 0; m < R; ++m) row[m] = a[m][j];
      const float pj = __shfl_sync(kFullMask, select_row<R>(row, mp), lp);
#pragma unroll
      for (int m = 0; m < R; ++m) a[m][j] = fmaf(-f[m], pj, a[m][j]);
    }
  }
  *sign_out = sign;
  *logabs_out = sign == 0 ? -INFINITY : prod.log_abs();
}

// In-place Gauss-Jordan inverse of the matrix in a[][].  On return (sign != 0)
// J^{-1}[cur[m]][perm[k]] = a[m][k] for this lane's storage rows r = lane + 32 m; perm is D ints
// of this warp's shared memory (valid after the call: it ends with __syncwarp).  When sign == 0,
// a, cur and perm are meaningless.
//
// The step loop is not unrolled (unrolled, its 64 x 64 steps make ptxas spill): instead the
// columns rotate by one each step, so the pivot column is always register column 0 and the
// finished inverse column goes to column D-1; after D steps every column is back in place.
template <int D>
__device__ __forceinline__ void warp_gj_inverse(float (&a)[D / 32][D], int (&cur)[D / 32],
                                                int* perm, int* sign_out, double* logabs_out) {
  constexpr int R = D / 32;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 0; m < R; ++m) cur[m] = lane + 32 * m;
  int sign = 1;
  PivotProduct prod;
#pragma unroll 1
  for (int k = 0; k < D; ++k) {
    float col[R];  // logical column k, in register column 0
#pragma unroll
    for (int m = 0; m < R; ++m) col[m] = a[m][0];
    const int p = warp_pivot_row<D, R>(col, cur, k);
    const int lp = p & 31, mp = p >> 5;
    const float piv = __shfl_sync(kFullMask, select_row<R>(col, mp), lp);
    if (piv == 0.0f) {  // warp-uniform
      sign = 0;
      break;
    }
    sign *= warp_record_pivot<R>(cur, p, k);
    if (piv < 0.0f) sign = -sign;
    prod.mul(piv);
    if (lane == 0) perm[k] = p;
    const float rinv = 1.0f / piv;
    bool is_piv[R];
#pragma unroll
    for (int m = 0; m < R; ++m) is_piv[m] = lane == lp && m == mp;
    // Pivot row: a_pj / piv (j != k), slot k -> 1 / piv.  Every other row (used ones too):
    // a_ij - a_ik (a_pj / piv), slot k -> -a_ik / piv.  col[] keeps the old column k.
    // Register column j moves to j - 1 as it is updated.
#pragma unroll
    for (int j = 1; j < D; ++j) {
      float row[R];
#pragma unroll
      for (int m = 0; m < R; ++m) row[m] = a[m][j];
      const float pj = __shfl_sync(kFullMask, select_row<R>(row, mp), lp) * rinv;
#pragma unroll
      for (int m = 0; m < R; ++m) a[m][j - 1] = is_piv[m] ? pj : fmaf(-col[m], pj, row[m]);
    }
#pragma unroll
    for (int m = 0; m < R; ++m) a[m][D - 1] = is_piv[m] ? rinv : -col[m] * rinv;
  }
  __syncwarp();
  *sign_out = sign;
  *logabs_out = sign == 0 ? -INFINITY : prod.log_abs();
}

// Loads the warp's rows from a shared-memory tile [D][D+1] (row r at tile + r (D+1)); the padded
// stride puts the 32 lanes' rows in 32 different banks.
template <int D>
__device__ __forceinline__ void warp_rows_from_tile(const float* tile, float (&a)[D / 32][D]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 0; m < D / 32; ++m)
#pragma unroll
    for (int j = 0; j < D; ++j) a[m][j] = tile[(lane + 32 * m) * (D + 1) + j];
}

// After warp_gj_inverse (sign != 0): tile[k][c] = coef (J^{-T})[perm[k]][c]
// = coef J^{-1}[c][perm[k]], i.e. row k of the tile is row perm[k] of coef J^{-T}.  Ends with
// __syncwarp, so the whole warp may read the tile.
template <int D>
__device__ __forceinline__ void warp_store_inverse_transposed(const float (&a)[D / 32][D],
                                                              const int (&cur)[D / 32], float coef,
                                                              float* tile) {
  __syncwarp();  // the tile may still be read by other lanes (warp_rows_from_tile)
#pragma unroll
  for (int m = 0; m < D / 32; ++m)
#pragma unroll
    for (int k = 0; k < D; ++k) tile[k * (D + 1) + cur[m]] = coef * a[m][k];
  __syncwarp();
}

}  // namespace cuda
}  // namespace blm
