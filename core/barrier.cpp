// The barrier of barrier-spec.md sections 2-5 for one (sequence, layer, head): the strict-causal
// attention pi, the per-position Jacobian J_t = I - C_t of the head's generator, the smooth
// log-barrier phi(det J_t), its gradient into q and k (all four paths of spec section 4), and the
// margins sigma_min(J_t), log det J_t.
//
// Cost is O(T^2 dh^2) per head, done as BLAS GEMMs (spec section 7):
//   P[s]  = vec(q'_s k'_s^T)                    [T, dh*dh]   (q' = q - mean q, k' = k - mean k)
//   S_t   = sum_s pi_ts P[s]        = pi @ P     [T, dh*dh]
//   C_t   = (S_t - qbar'_t kbar'_t^T) / sqrt(dh)               (sum_s pi_ts = 1)
//   backward: A = Gvec @ P^T [T, T] (the bilinear part of g_ts), M = pi^T @ Gvec [T, dh*dh]
//   (the direct terms).  Everything else is O(T^2 dh) GEMMs or O(T dh^3) per-position LU work.
// pi is strictly lower triangular, so the GEMMs run over row blocks and skip the zero half.
// With a mask (the sampled estimator, barrier.positions = K) only the K counted query positions
// get a row of pi, S, Gvec and an LU, so the cost falls to ~K/T of the exact one (see "the head
// computation" below).  The per-position determinant and inverse are computed in double
// whatever Real is.
#include "core/barrier.h"
#include "core/barrier_fused.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/blas.h"

namespace blm {

// ------------------------------------------------------------------ phi (spec section 3)

double barrier_phi(double x, double eps) {
  if (x >= eps) return -std::log(x);
  const double d = x - eps;
  return -std::log(eps) - d / eps + d * d / (2 * eps * eps);
}

double barrier_phi_prime(double x, double eps) {
  if (x >= eps) return -1.0 / x;
  return -1.0 / eps + (x - eps) / (eps * eps);
}

// ------------------------------------------------------------------ dense helpers (double)

// The per-position kernels below are O(dh^3) and, at dh = 32, cost as much as the GEMMs.  The
// default build targets baseline x86-64 (SSE2), so on x86-64 GCC they also get an AVX2+FMA clone
// that the loader picks when the CPU has it (GCC function multi-versioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BLM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define BLM_SIMD_CLONES
#endif

namespace {

constexpr int kMaxInlineDim = 256;  // head dims up to this use stack scratch for permutations

// y[0:n] -= f * x[0:n]: the LU's inner loop.
inline void row_axpy(double* __restrict y, const double* __restrict x, double f, int n) {
  for (int j = 0; j < n; ++j) y[j] -= f * x[j];
}

// In-place LU with partial pivoting of the n x n row-major a (PA = LU, L unit lower); piv[c] is
// the row swapped with row c at step c.  Returns sign(det) (0 when a pivot is exactly zero) and
// writes log|det| to *logabs.
//
// An exactly zero pivot is replaced by a stand-in 1e-150 times the pivots' scale, i.e. the
// factors are those of a matrix 1e-150 (relatively) away.  The barrier's gradient needs
// delta * J^{-T} = adj(J)^T, which is continuous: from these factors, det * inverse (each
// ~1e-150 and ~1e+150, both representable) gives it to ~1e-150 relative.  *sign_factors and
// *logabs_factors (optional) receive the sign and log|.| of the determinant of the factors
// actually used: the return value and *logabs unless a stand-in was used.
BLM_SIMD_CLONES
int lu_factor(double* a, int n, int* piv, double* logabs, int* sign_factors = nullptr,
              double* logabs_factors = nullptr) {
  double largest_pivot = 0;  // sets the scale of the stand-in for an exactly zero pivot
  int sign = 1;
  bool singular = false;
  double mant = 1;
  long expo = 0;
  for (int c = 0; c < n; ++c) {
    int p = c;
    double best = std::fabs(a[c * n + c]);
    for (int r = c + 1; r < n; ++r) {
      const double v = std::fabs(a[r * n + c]);
      if (v > best) best = v, p = r;
    }
    piv[c] = p;
    if (p != c) {
      for (int j = 0; j < n; ++j) std::swap(a[c * n + j], a[p * n + j]);
      sign = -sign;
    }
    double pv = a[c * n + c];
    if (pv == 0) {
      singular = true;
      pv = a[c * n + c] = (largest_pivot > 0 ? largest_pivot : 1.0) * 1e-150;
    }
    largest_pivot = std::max(largest_pivot, std::fabs(pv));
    if (pv < 0) sign = -sign;
    int e = 0;  // log|det| = log(mantissa product) + exponent sum * log 2: one log per matrix
    mant = std::frexp(mant * std::fabs(pv), &e);
    expo += e;
    const double inv = 1.0 / pv;
    for (int r = c + 1; r < n; ++r) {
      const double f = a[r * n + c] *= inv;
      if (f != 0) row_axpy(a + r * n + c + 1, a + c * n + c + 1, f, n - c - 1);
    }
  }
  const double la = std::log(mant) + static_cast<double>(expo) * std::log(2.0);
  if (sign_factors) *sign_factors = sign;
  if (logabs_factors) *logabs_factors = la;
  *logabs = singular ? -std::numeric_limits<double>::infinity() : la;
  return singular ? 0 : sign;
}

// y[0:n] -= sum_{j in [j0, j1)} coef[j] * X[j][0:n]  (X rows ld apart).  Sixteen columns at a
// time are kept in registers across the whole sum, so y is loaded and stored once instead of
// once per j (the loop is load/store-bound otherwise).
inline void row_combination(double* __restrict y, const double* __restrict X, int ld,
                            const double* __restrict coef, int j0, int j1, int n) {
  // GCC/Clang vector extension: four 4-wide accumulators (AVX registers in the AVX2 clone,
  // register pairs in the baseline one).  memcpy is the portable unaligned load/store.
  typedef double v4 __attribute__((vector_size(32)));
  int c = 0;
  for (; c + 16 <= n; c += 16) {
    v4 a0, a1, a2, a3;
    std::memcpy(&a0, y + c, 32), std::memcpy(&a1, y + c + 4, 32);
    std::memcpy(&a2, y + c + 8, 32), std::memcpy(&a3, y + c + 12, 32);
    for (int j = j0; j < j1; ++j) {
      const double* xr = X + static_cast<size_t>(j) * ld + c;
      v4 x0, x1, x2, x3;
      std::memcpy(&x0, xr, 32), std::memcpy(&x1, xr + 4, 32);
      std::memcpy(&x2, xr + 8, 32), std::memcpy(&x3, xr + 12, 32);
      const double f = coef[j];
      a0 -= f * x0, a1 -= f * x1, a2 -= f * x2, a3 -= f * x3;
    }
    std::memcpy(y + c, &a0, 32), std::memcpy(y + c + 4, &a1, 32);
    std::memcpy(y + c + 8, &a2, 32), std::memcpy(y + c + 12, &a3, 32);
  }
  for (int j = j0; j < j1 && c < n; ++j)
    row_axpy(y + c, X + static_cast<size_t>(j) * ld + c, coef[j], n - c);
}

// Given the LU factors of J (lu_factor: PJ = LU), writes J^{-T} (n x n row-major) to out.
// J^{-1} = U^{-1} L^{-1} P.  Y = L^{-1} and Z = U^{-1} Y are built row by row so every inner loop
// is a contiguous axpy; Y is lower triangular, so its rows are short.  x: n*n scratch (Y, then Z).
BLM_SIMD_CLONES
void lu_inverse_transpose(const double* lu, const int* piv, int n, double* out, double* x) {
  for (int i = 0; i < n * n; ++i) x[i] = 0;
  for (int i = 0; i < n; ++i) {  // Y_i = e_i - sum_{j<i} L_ij Y_j  (Y_j is zero past column j)
    x[i * n + i] = 1;
    row_combination(x + i * n, x, n, lu + i * n, 0, i, i);
  }
  for (int i = n - 1; i >= 0; --i) {  // Z_i = (Y_i - sum_{j>i} U_ij Z_j) / U_ii
    row_combination(x + i * n, x, n, lu + i * n, i + 1, n, n);
    const double inv = 1.0 / lu[i * n + i];
    for (int j = 0; j < n; ++j) x[i * n + j] *= inv;
  }
  // (PJ)[i] = J[perm[i]], so J^{-1}[b][perm[i]] = Z[b][i] and J^{-T}[perm[i]][b] = Z[b][i].
  int perm[kMaxInlineDim];
  std::vector<int> perm_heap;
  int* pm = perm;
  if (n > kMaxInlineDim) perm_heap.resize(n), pm = perm_heap.data();
  for (int i = 0; i < n; ++i) pm[i] = i;
  for (int i = 0; i < n; ++i) std::swap(pm[i], pm[piv[i]]);
  for (int i = 0; i < n; ++i)
    for (int b = 0; b < n; ++b) out[pm[i] * n + b] = x[b * n + i];
}

// One-sided Jacobi (Hestenes) on the rows of w (n x n row-major, overwritten): plane rotations
// from the left make the rows mutually orthogonal; their norms are then the singular values
// (of w^T, which are those of w).  Rows are contiguous, so every loop is a dot or an axpy.
BLM_SIMD_CLONES
double jacobi_smallest_singular_value(double* w, int n) {
  const double tol = 1e-15;
  for (int sweep = 0; sweep < 80; ++sweep) {
    bool rotated = false;
    for (int i = 0; i < n - 1; ++i) {
      double* wi = w + i * n;
      for (int j = i + 1; j < n; ++j) {
        double* wj = w + j * n;
        double alpha = 0, beta = 0, gamma = 0;
#pragma omp simd reduction(+ : alpha, beta, gamma)
        for (int r = 0; r < n; ++r) alpha += wi[r] * wi[r], beta += wj[r] * wj[r], gamma += wi[r] * wj[r];
        if (gamma == 0 || std::fabs(gamma) <= tol * std::sqrt(alpha * beta)) continue;
        rotated = true;
        // The rotation that diagonalises the 2x2 Gram matrix [[alpha, gamma], [gamma, beta]].
        const double zeta = (beta - alpha) / (2 * gamma);
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (std::fabs(zeta) + std::sqrt(1 + zeta * zeta));
        const double c = 1 / std::sqrt(1 + t * t), s = c * t;
        for (int r = 0; r < n; ++r) {
          const double x = wi[r], y = wj[r];
          wi[r] = c * x - s * y;
          wj[r] = s * x + c * y;
        }
      }
    }
    if (!rotated) break;
  }
  double smin = std::numeric_limits<double>::infinity();
  for (int i = 0; i < n; ++i) {
    double nn = 0;
#pragma omp simd reduction(+ : nn)
    for (int r = 0; r < n; ++r) nn += w[i * n + r] * w[i * n + r];
    smin = std::min(smin, std::sqrt(nn));
  }
  return smin;
}

// Smallest eigenvalue of a symmetric n x n row-major matrix (a is destroyed): Householder
// reduction to tridiagonal form (4/3 n^3), then Sturm-sequence bisection (O(n) per step) to an
// absolute accuracy of a few ulps of the matrix norm.  v: n doubles of scratch, p: n doubles.
BLM_SIMD_CLONES
double symmetric_min_eigenvalue(double* a, int n, double* v, double* p) {
  for (int k = 0; k + 2 < n; ++k) {
    // Householder vector v (entries k+1..n-1) that maps column k below the diagonal to alpha e.
    double norm2 = 0;
    for (int i = k + 1; i < n; ++i) norm2 += a[i * n + k] * a[i * n + k];
    if (norm2 == 0) continue;
    const double x0 = a[(k + 1) * n + k];
    const double alpha = x0 >= 0 ? -std::sqrt(norm2) : std::sqrt(norm2);
    for (int i = k + 1; i < n; ++i) v[i] = a[i * n + k];
    v[k + 1] -= alpha;
    const double vv = norm2 - 2 * alpha * x0 + alpha * alpha;  // |v|^2
    const double beta = 2 / vv;
    // Trailing block B = a[k+1:, k+1:]:  B <- H B H with H = I - beta v v^T, as the symmetric
    // rank-2 update B -= v w^T + w v^T,  p = beta B v,  w = p - (beta/2)(p.v) v.
    for (int i = k + 1; i < n; ++i) {
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int j = k + 1; j < n; ++j) s += a[i * n + j] * v[j];
      p[i] = beta * s;
    }
    double pv = 0;
    for (int i = k + 1; i < n; ++i) pv += p[i] * v[i];
    for (int i = k + 1; i < n; ++i) p[i] -= 0.5 * beta * pv * v[i];  // p is now w
    for (int i = k + 1; i < n; ++i) {
      const double vi = v[i], wi = p[i];
#pragma omp simd
      for (int j = k + 1; j < n; ++j) a[i * n + j] -= vi * p[j] + wi * v[j];
    }
    a[(k + 1) * n + k] = a[k * n + k + 1] = alpha;
  }
  // Tridiagonal: d = diagonal, e[i] = entry (i+1, i).  Gershgorin bounds, then bisection on the
  // Sturm count "how many eigenvalues are < x".
  double lo = std::numeric_limits<double>::infinity(), hi = -lo, scale = 0;
  for (int i = 0; i < n; ++i) {
    const double d = a[i * n + i];
    const double r = (i > 0 ? std::fabs(a[i * n + i - 1]) : 0.0) +
                     (i + 1 < n ? std::fabs(a[(i + 1) * n + i]) : 0.0);
    lo = std::min(lo, d - r), hi = std::max(hi, d + r);
    scale = std::max(scale, std::fabs(d) + r);
  }
  auto count_below = [&](double x) {
    int count = 0;
    double q = a[0] - x;
    const double tiny = std::numeric_limits<double>::min() + 1e-300 * scale;
    for (int i = 0;; ++i) {
      if (q == 0) q = -tiny;
      if (q < 0) ++count;
      if (i + 1 == n) break;
      const double e = a[(i + 1) * n + i];
      q = a[(i + 1) * n + i + 1] - x - e * e / q;
    }
    return count;
  };
  for (int it = 0; it < 200 && hi - lo > 4 * std::numeric_limits<double>::epsilon() * scale; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi) break;
    (count_below(mid) >= 1 ? hi : lo) = mid;
  }
  return 0.5 * (lo + hi);
}

}  // namespace

// sigma_min(J) for the margins.  sigma_min^2 is the smallest eigenvalue of J^T J, whose rounding
// error is ~eps_mach |J|^2 absolute: for sigma_min >= 1e-4 |J|_F that is <= ~1e-8 relative in
// sigma_min, and the eigenvalue route costs ~3 n^3 instead of one-sided Jacobi's ~8 sweeps of
// 3.5 n^3.  Closer to singular, the squaring would lose too much: Jacobi on J itself.
// j: the n x n matrix (kept); g: n*n scratch; v, p: n scratch each.
double margin_sigma_min(const double* j, int n, double* g, double* v, double* p) {
  double fro2 = 0;
  for (int i = 0; i < n * n; ++i) fro2 += j[i] * j[i];
  for (int r = 0; r < n; ++r)  // G = J^T J, row r = sum_i J[i][r] J[i][:]
    for (int c = 0; c < n; ++c) g[r * n + c] = 0;
  for (int i = 0; i < n; ++i)
    for (int r = 0; r < n; ++r) {
      const double f = j[i * n + r];
#pragma omp simd
      for (int c = 0; c < n; ++c) g[r * n + c] += f * j[i * n + c];
    }
  const double lambda = symmetric_min_eigenvalue(g, n, v, p);
  if (lambda >= 1e-8 * fro2) return std::sqrt(lambda);
  for (int i = 0; i < n * n; ++i) g[i] = j[i];
  return jacobi_smallest_singular_value(g, n);
}

int log_abs_det(const double* a, int n, double* logabs) {
  std::vector<double> lu(a, a + static_cast<size_t>(n) * n);
  std::vector<int> piv(n);
  return lu_factor(lu.data(), n, piv.data(), logabs);
}

double smallest_singular_value(const double* a, int n) {
  if (n <= 0) return 0;
  std::vector<double> w(a, a + static_cast<size_t>(n) * n);
  return jacobi_smallest_singular_value(w.data(), n);
}

// ------------------------------------------------------------------ the head computation
//
// Which query positions are computed.  With barrier.positions = K > 0 (spec section 7's
// unbiased sampled estimator) a training step counts only K positions per sequence, so every
// factor that belongs to a query position t is computed only for the "rows"
//   R = {t_0 < t_1 < ... < t_{nR-1}},  all >= 2:
// the counted positions, or every t >= 2 when the caller asks for per-position logdet/margin
// outputs (those are defined for every position).  pi, S, qbar', kbar', the LUs, G, U, W and A
// have one row per element of R, and the products contract over the attended positions s < t_i
// only (s < Ts = t_{nR-1} for the whole head).  With no mask R = {2, ..., T-1} and the cost is
// the exact barrier's; with K counted positions the O(T^2 dh^2) products and the O(T dh^3) LUs
// shrink to O(K T dh^2) and O(K dh^3), leaving O(T dh) for the centring.
//
// The products, per row i (t = t_i) and attended position s < t, in BLAS form (row blocks of
// row_block(nR) rows i, each contracting over s < the block's last t only):
//   forward   S_t = sum_s pi_ts q'_s k'_s^T:   S [nR*dh, dh] = piQ^T @ K',
//             piQ [Ts, nR*dh], piQ[s][i*dh + a] = pi_ts q'_sa
//   backward  Y = K' @ Gt [Ts, nR*dh], Y[s][i*dh + a] = (G_t k'_s)_a      (Gt[b][i*dh + a] = G_t[a][b])
//             X = Q' @ G  [Ts, nR*dh], X[s][i*dh + b] = (G_t^T q'_s)_b    (G[a][i*dh + b] = G_t[a][b])
//   and then, elementwise over the pairs (i, s):
//     g_ts sqrt(dh)  = q'_s . (G_t k'_s) - u_t . k'_s - w_t . q'_s             (paths 1, 2: softmax)
//     dq_s sqrt(dh) += pi_ts (G_t k'_s - w_t),  dk_s sqrt(dh) += pi_ts (G_t^T q'_s - u_t)  (paths 3, 4)
// with u_t = G_t^T qbar'_t, w_t = G_t kbar'_t (q_s - qbar_t = q'_s - qbar'_t: the centring cancels).
// Each product costs 2 dh^2 per pair (i, s), as pi @ vec(q' k'^T) would, but nothing of size
// T x dh^2 independent of nR is built, which is what a few sampled rows need.

namespace {

// Row-block height of the products for nR rows.  A block contracts over s < its last row's t,
// so every other row of the block wastes the gap to that t (rows are ~T/nR apart): with 1 + nR/5
// rows the waste averages ~T/10 per row, a fifth of the ~T/2 a row needs.  At most 16 (the
// exact barrier: large enough for BLAS to run near peak), at least 2.  For a few sampled rows the blocks are then also small
// enough for OpenBLAS to run them on the calling thread: with its two-thread pool, 16-row blocks
// of 8 sampled rows measured 1.8x slower (handing out tiny products costs more than it saves).
int row_block(int nR) { return std::min(16, std::max(2, 1 + nR / 5)); }

inline bool counted(int t, const uint8_t* mask) { return t >= 2 && (mask == nullptr || mask[t]); }

// R (ascending) into rows: every t >= 2 when every_position, else the counted positions.
// rows keeps its capacity across calls, so this allocates only on a thread's first, longest T.
void select_rows(int T, const uint8_t* mask, bool every_position, std::vector<int>& rows) {
  rows.clear();
  for (int t = 2; t < T; ++t)
    if (every_position || counted(t, mask)) rows.push_back(t);
}

// C[nR, N] = pi_R @ B for strict-causal rows: row i of pi_R [nR, ld] is zero from column R[i]
// on, so a block of rows [i0, i1) contracts over s < R[i1 - 1] only (R ascending, R[i] >= 2).
// B: [>= R[nR-1], N].
template <class Real>
void rows_lower_gemm(const Real* piR, int ld, const int* R, int nR, const Real* B, int N, Real* C) {
  const int rb = row_block(nR);
  for (int i0 = 0; i0 < nR; i0 += rb) {
    const int i1 = std::min(nR, i0 + rb);
    gemm(false, false, i1 - i0, N, R[i1 - 1], Real(1), piR + static_cast<size_t>(i0) * ld, ld, B,
         N, Real(0), C + static_cast<size_t>(i0) * N, N);
  }
}

// Scratch for one head, reused across calls on the same thread (no allocation once a thread
// has seen its largest shape).  nR = |R|, Ts = R[nR-1], W = nR*dh.
template <class Real>
struct HeadWork {
  std::vector<int> rows;     // [nR]  R, ascending
  std::vector<Real> qr;      // [nR, dh]  q at the rows (the queries of pi_R)
  std::vector<Real> pi;      // [nR, T]  strict-causal attention of the rows (zero for s >= R[i])
  std::vector<Real> qc, kc;  // [T, dh]  q, k minus their mean over all T positions
  std::vector<Real> piQ;     // [Ts, W]  pi_ts q'_s, row block i*dh (zero for s >= R[i])
  std::vector<Real> S;       // [nR, dh, dh]  S_t = sum_s pi_ts q'_s k'_s^T
  std::vector<Real> qbar, kbar;  // [nR, dh]  pi_R @ q', pi_R @ k'
  std::vector<double> det_sign, det_logabs;  // [nR]
  std::vector<double> mean;  // [2, dh]  mean of q, of k over positions
  // Backward only.
  std::vector<Real> G, Gt;   // [dh, W]  G_t and G_t^T side by side (zero for uncounted rows)
  std::vector<Real> U, Wv;   // [nR, dh]  u_t = G_t^T qbar'_t, w_t = G_t kbar'_t
  std::vector<Real> X, Y;    // [Ts, W]  G_t^T q'_s and G_t k'_s
  std::vector<Real> A;       // [nR, T]  g_ts, then dL/dz_ts
  std::vector<Real> dqr;     // [nR, dh]  dL/dz @ k / sqrt(dh), scattered into dq's rows R
};

template <class Real>
HeadWork<Real>& head_work() {
  thread_local HeadWork<Real> w;
  return w;
}

template <class T>
void resize(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// pi_R[i][s] = softmax_{s<t}(q_t . k_s / sqrt(dh)), t = R[i]: one GEMM of the rows' queries
// qr [nR, dh] against the keys s < Ts, then a normalisation per row.  pi_R: [nR, T].
template <class Real>
void rows_causal_softmax(const Real* qr, const Real* k, const int* R, int nR, int T, int dh,
                         Real* pi) {
  const Real inv_sqrt = Real(1.0 / std::sqrt(static_cast<double>(dh)));
  gemm(false, true, nR, R[nR - 1], dh, inv_sqrt, qr, dh, k, dh, Real(0), pi, T);
  for (int i = 0; i < nR; ++i) {
    const int t = R[i];
    Real* row = pi + static_cast<size_t>(i) * T;
    Real m = -std::numeric_limits<Real>::infinity();
    for (int s = 0; s < t; ++s) m = std::max(m, row[s]);
    double l = 0;  // exp in Real (float's exp is accurate to float), the sum in double
    for (int s = 0; s < t; ++s) l += (row[s] = std::exp(row[s] - m));
    const Real inv_l = Real(1.0 / l);
    for (int s = 0; s < t; ++s) row[s] *= inv_l;
    std::fill(row + t, row + T, Real(0));
  }
}

// Everything both directions need, for the rows w.rows (non-empty): pi_R, the centred q', k',
// piQ, S, qbar', kbar'.
//
// Why the uncentred form S_t - qbar'_t kbar'_t^T is accurate enough: C_t enters det(I - C_t), so
// what matters is the absolute error of C_t's entries relative to 1.  The rounding error of the
// difference is about u * sum_s pi_ts |q'_s| |k'_s| / sqrt(dh), i.e. u times the size of the
// attention logits of the centred vectors (u = 6e-8 in float).  Subtracting the mean over all
// positions first removes the part of q, k shared by every token (biases, LayerNorm offsets),
// which is the part that would otherwise make |q_s| |k_s| much larger than the covariance.
// (C_t does not depend on the shift, so a masked call sees the same J_t as an unmasked one.)
template <class Real>
void head_prepare(const Real* q, const Real* k, int T, int dh, HeadWork<Real>& w) {
  const int* R = w.rows.data();
  const int nR = static_cast<int>(w.rows.size()), Ts = R[nR - 1], W = nR * dh;
  const size_t n2 = static_cast<size_t>(dh) * dh;
  resize(w.qr, static_cast<size_t>(W));
  resize(w.pi, static_cast<size_t>(nR) * T);
  resize(w.qc, static_cast<size_t>(T) * dh);
  resize(w.kc, static_cast<size_t>(T) * dh);
  resize(w.piQ, static_cast<size_t>(Ts) * W);
  resize(w.S, nR * n2);
  resize(w.qbar, static_cast<size_t>(W));
  resize(w.kbar, static_cast<size_t>(W));
  resize(w.det_sign, nR);
  resize(w.det_logabs, nR);

  for (int i = 0; i < nR; ++i)
    std::copy(q + static_cast<size_t>(R[i]) * dh, q + static_cast<size_t>(R[i] + 1) * dh,
              w.qr.data() + static_cast<size_t>(i) * dh);
  rows_causal_softmax(w.qr.data(), k, R, nR, T, dh, w.pi.data());

  // Means over positions, accumulated in double row by row (contiguous loops).
  std::vector<double>& mean = w.mean;
  resize(mean, static_cast<size_t>(2) * dh);
  std::fill(mean.begin(), mean.begin() + 2 * dh, 0.0);
  for (int s = 0; s < T; ++s)
    for (int a = 0; a < dh; ++a) mean[a] += q[s * dh + a], mean[dh + a] += k[s * dh + a];
  for (int a = 0; a < 2 * dh; ++a) mean[a] /= T;
  for (int s = 0; s < T; ++s)
    for (int a = 0; a < dh; ++a) {
      w.qc[s * dh + a] = Real(q[s * dh + a] - mean[a]);
      w.kc[s * dh + a] = Real(k[s * dh + a] - mean[dh + a]);
    }
  // piQ row s: pi_ts q'_s for every row i (zero where s >= t, which the blocked products below
  // partly read: a block contracts up to its last row's t).
  for (int s = 0; s < Ts; ++s) {
    const Real* qs = w.qc.data() + static_cast<size_t>(s) * dh;
    Real* out = w.piQ.data() + static_cast<size_t>(s) * W;
    for (int i = 0; i < nR; ++i) {
      const Real p = w.pi[static_cast<size_t>(i) * T + s];
      Real* o = out + static_cast<size_t>(i) * dh;
#pragma omp simd
      for (int a = 0; a < dh; ++a) o[a] = p * qs[a];
    }
  }
  // S [nR*dh, dh] = piQ^T @ K', row block [i0, i1) over s < R[i1 - 1].
  const int rb = row_block(nR);
  for (int i0 = 0; i0 < nR; i0 += rb) {
    const int i1 = std::min(nR, i0 + rb);
    gemm(true, false, (i1 - i0) * dh, dh, R[i1 - 1], Real(1), w.piQ.data() + i0 * dh, W,
         w.kc.data(), dh, Real(0), w.S.data() + i0 * n2, dh);
  }
  rows_lower_gemm(w.pi.data(), T, R, nR, w.qc.data(), dh, w.qbar.data());
  rows_lower_gemm(w.pi.data(), T, R, nR, w.kc.data(), dh, w.kbar.data());
}

// J_t = I - C_t in double (dh x dh row-major) for row i (t = R[i]),
// C_t = (S_t - qbar'_t kbar'_t^T) / sqrt(dh).
template <class Real>
void build_jacobian(const HeadWork<Real>& w, int i, int dh, double* J) {
  const double inv_sqrt = 1.0 / std::sqrt(static_cast<double>(dh));
  const size_t n2 = static_cast<size_t>(dh) * dh;
  const Real* S = w.S.data() + i * n2;
  const Real* qb = w.qbar.data() + static_cast<size_t>(i) * dh;
  const Real* kb = w.kbar.data() + static_cast<size_t>(i) * dh;
  for (int a = 0; a < dh; ++a)
    for (int b = 0; b < dh; ++b) {
      const double c =
          (static_cast<double>(S[a * dh + b]) - static_cast<double>(qb[a]) * kb[b]) * inv_sqrt;
      J[a * dh + b] = (a == b ? 1.0 : 0.0) - c;
    }
}

// phi(delta) from the LU's sign and log|det|: -log(delta) is taken as -logabs directly so a
// large determinant neither overflows nor loses digits.
double phi_from_det(int sign, double logabs, double eps) {
  if (sign > 0 && logabs >= std::log(eps)) return -logabs;
  const double delta = sign == 0 ? 0.0 : sign * std::exp(logabs);
  return barrier_phi(delta, eps);
}

// -phi'(delta) * delta: exactly 1 on the log branch.
double grad_coefficient(int sign, double logabs, double eps) {
  if (sign > 0 && logabs >= std::log(eps)) return 1.0;
  const double delta = sign == 0 ? 0.0 : sign * std::exp(logabs);
  return -barrier_phi_prime(delta, eps) * delta;
}

// Per-thread scratch of position_compute (dh x dh doubles), kept across calls: the OpenMP
// threads persist, so after the first call nothing is allocated.
struct PositionScratch {
  std::vector<double> J, inv, x, svd;
  std::vector<int> piv;
  int sign_factors = 1;       // sign and log|.| of the LU's pivot product (see lu_factor)
  double logabs_factors = 0;
};

PositionScratch& position_scratch(int dh) {
  thread_local PositionScratch ps;
  const size_t n2 = static_cast<size_t>(dh) * dh;
  resize(ps.J, n2), resize(ps.inv, n2), resize(ps.x, n2), resize(ps.svd, n2);
  resize(ps.piv, static_cast<size_t>(dh));
  return ps;
}

// Per row i, t = R[i] (no BLAS, so it may run in an OpenMP region): J_t, its LU, log det,
// optionally sigma_min, and, when the gradient is wanted and t is counted, G_t and G_t^T (into
// column block i of w.G, w.Gt), u_t, w_t:
//   G_t = scale * (-phi'(delta_t) delta_t) J_t^{-T},  u_t = G_t^T qbar'_t,  w_t = G_t kbar'_t.
// logdet, margin: [T] indexed by position (null to skip).
template <class Real>
void position_compute(HeadWork<Real>& w, int i, int dh, double eps, bool is_counted,
                      const Real* scale, Real* logdet, Real* margin, PositionScratch& ps) {
  const int t = w.rows[i];
  build_jacobian(w, i, dh, ps.J.data());
  if (margin)
    margin[t] = Real(margin_sigma_min(ps.J.data(), dh, ps.svd.data(), ps.x.data(), ps.inv.data()));
  double la = 0;
  const int sign =
      lu_factor(ps.J.data(), dh, ps.piv.data(), &la, &ps.sign_factors, &ps.logabs_factors);
  w.det_sign[i] = sign, w.det_logabs[i] = la;
  if (logdet) logdet[t] = sign > 0 ? Real(la) : -std::numeric_limits<Real>::infinity();

  if (!scale) return;
  const size_t W = w.rows.size() * static_cast<size_t>(dh);
  Real* G = w.G.data() + static_cast<size_t>(i) * dh;    // G_t[a][b] at G[a * W + b]
  Real* Gt = w.Gt.data() + static_cast<size_t>(i) * dh;  // G_t[a][b] at Gt[b * W + a]
  Real* u = w.U.data() + static_cast<size_t>(i) * dh;
  Real* wv = w.Wv.data() + static_cast<size_t>(i) * dh;
  if (!is_counted) {  // a row computed only for the per-position outputs adds no gradient
    for (int a = 0; a < dh; ++a) {
      std::fill(G + a * W, G + a * W + dh, Real(0));
      std::fill(Gt + a * W, Gt + a * W + dh, Real(0));
    }
    std::fill(u, u + dh, Real(0));
    std::fill(wv, wv + dh, Real(0));
    return;
  }
  lu_inverse_transpose(ps.J.data(), ps.piv.data(), dh, ps.inv.data(), ps.x.data());
  // On an exactly singular J_t the factors carry a stand-in pivot (lu_factor): their own
  // determinant times their inverse is the adjugate, which is what G needs there.
  const double c =
      static_cast<double>(*scale) *
      (sign == 0 ? grad_coefficient(ps.sign_factors, ps.logabs_factors, eps)
                 : grad_coefficient(sign, la, eps));
  const double* inv = ps.inv.data();  // J_t^{-T}, so G_t = c inv
  for (int a = 0; a < dh; ++a)
    for (int b = 0; b < dh; ++b) {
      const Real g = Real(c * inv[a * dh + b]);
      G[a * W + b] = g;
      Gt[b * W + a] = g;
    }
  // In contiguous loops over inv's rows:
  //   u_a = sum_b G_ba qbar'_b  (an axpy per row b),  w_a = sum_b G_ab kbar'_b  (a dot per row a).
  const Real* qb = w.qbar.data() + static_cast<size_t>(i) * dh;
  const Real* kb = w.kbar.data() + static_cast<size_t>(i) * dh;
  double* acc = ps.x.data();  // dh doubles of scratch (x is free again)
  std::fill(acc, acc + dh, 0.0);
  for (int b = 0; b < dh; ++b) {
    const double f = c * static_cast<double>(qb[b]);
    const double* row = inv + static_cast<size_t>(b) * dh;
#pragma omp simd
    for (int a = 0; a < dh; ++a) acc[a] += f * row[a];
  }
  for (int a = 0; a < dh; ++a) {
    const double* row = inv + static_cast<size_t>(a) * dh;
    double wa = 0;
#pragma omp simd reduction(+ : wa)
    for (int b = 0; b < dh; ++b) wa += row[b] * static_cast<double>(kb[b]);
    u[a] = Real(acc[a]), wv[a] = Real(c * wa);
  }
}

// The gradient, given G, Gt, U, W from position_compute; adds into dq, dk [T, dh].
template <class Real>
void head_backward(HeadWork<Real>& w, const Real* k, int T, int dh, const uint8_t* mask, Real* dq,
                   Real* dk) {
  const int* R = w.rows.data();
  const int nR = static_cast<int>(w.rows.size()), Ts = R[nR - 1], W = nR * dh;
  const Real inv_sqrt = Real(1.0 / std::sqrt(static_cast<double>(dh)));

  // Y = K' @ Gt, X = Q' @ G  [Ts, W], column block [i0, i1) over rows s < R[i1 - 1] (the rest of
  // the block is never read).
  const int rb = row_block(nR);
  for (int i0 = 0; i0 < nR; i0 += rb) {
    const int i1 = std::min(nR, i0 + rb), rows = R[i1 - 1];
    gemm(false, false, rows, (i1 - i0) * dh, dh, Real(1), w.kc.data(), dh, w.Gt.data() + i0 * dh,
         W, Real(0), w.Y.data() + i0 * dh, W);
    gemm(false, false, rows, (i1 - i0) * dh, dh, Real(1), w.qc.data(), dh, w.G.data() + i0 * dh,
         W, Real(0), w.X.data() + i0 * dh, W);
  }
  // Per pair (i, s < t_i), t = t_i, with y = G_t k'_s - w_t and x = G_t^T q'_s - u_t:
  //   g_ts sqrt(dh) = q'_s . y - u_t . k'_s   (the constant -qbar'^T G kbar' is left out: it
  //                                            cancels in the softmax)
  //   dq_s += pi_ts y / sqrt(dh),  dk_s += pi_ts x / sqrt(dh)       (paths 3, 4).
  // Row s of X, Y is contiguous over i, so the loop runs over s outside.  Uncounted rows have
  // G_t = 0, u_t = w_t = 0 and add nothing.
  Real* A = w.A.data();
  int i_first = 0;  // the first row i with t_i > s
  for (int s = 0; s < Ts; ++s) {
    while (R[i_first] <= s) ++i_first;
    const Real* qs = w.qc.data() + static_cast<size_t>(s) * dh;
    const Real* ks = w.kc.data() + static_cast<size_t>(s) * dh;
    Real* dqs = dq + static_cast<size_t>(s) * dh;
    Real* dks = dk + static_cast<size_t>(s) * dh;
    for (int i = i_first; i < nR; ++i) {
      const Real* y = w.Y.data() + static_cast<size_t>(s) * W + i * dh;
      const Real* x = w.X.data() + static_cast<size_t>(s) * W + i * dh;
      const Real* u = w.U.data() + static_cast<size_t>(i) * dh;
      const Real* wt = w.Wv.data() + static_cast<size_t>(i) * dh;
      const Real f = w.pi[static_cast<size_t>(i) * T + s] * inv_sqrt;
      Real g = 0;
#pragma omp simd reduction(+ : g)
      for (int a = 0; a < dh; ++a) {
        const Real ya = y[a] - wt[a];
        g += qs[a] * ya - u[a] * ks[a];
        dqs[a] += f * ya;
        dks[a] += f * (x[a] - u[a]);
      }
      A[static_cast<size_t>(i) * T + s] = g * inv_sqrt;
    }
  }
  // dL/dz_ts = pi_ts (g_ts - sum_r pi_tr g_tr), zero for s >= t and for uncounted t.
  for (int i = 0; i < nR; ++i) {
    const int t = R[i];
    Real* row = A + static_cast<size_t>(i) * T;
    const Real* p = w.pi.data() + static_cast<size_t>(i) * T;
    if (!counted(t, mask)) {
      std::fill(row, row + T, Real(0));
      continue;
    }
    double mean = 0;
    for (int s = 0; s < t; ++s) mean += static_cast<double>(p[s]) * row[s];
    for (int s = 0; s < t; ++s) row[s] = Real(p[s] * (row[s] - mean));
    std::fill(row + t, row + T, Real(0));
  }
  // z_ts = q_t . k_s / sqrt(dh):  dq_t += dz_t @ k / sqrt(dh) for t in R (through dqr, then
  // scattered to the rows R),  dk += dz^T @ q_R / sqrt(dh) (columns s >= Ts of dz are zero).
  gemm(false, false, nR, dh, Ts, inv_sqrt, A, T, k, dh, Real(0), w.dqr.data(), dh);
  for (int i = 0; i < nR; ++i) {
    Real* dst = dq + static_cast<size_t>(R[i]) * dh;
    const Real* src = w.dqr.data() + static_cast<size_t>(i) * dh;
    for (int a = 0; a < dh; ++a) dst[a] += src[a];
  }
  gemm(true, false, Ts, dh, nR, inv_sqrt, A, T, w.qr.data(), dh, Real(1), dk, dh);
}

// Forward, and the backward when scale != null, sharing one set of products and LUs.
template <class Real>
BarrierHeadOutput<Real> head_compute(const Real* q, const Real* k, int T, int dh, double eps,
                                     const uint8_t* mask, const Real* scale, Real* dq, Real* dk,
                                     Real* logdet, Real* margin) {
  BarrierHeadOutput<Real> out;
  if (T <= 0 || dh <= 0) return out;
  for (int t = 0; t < std::min(T, 2); ++t) {  // fewer than two predecessors: C_t = 0
    if (logdet) logdet[t] = Real(0);
    if (margin) margin[t] = Real(1);
  }
  HeadWork<Real>& w = head_work<Real>();
  select_rows(T, mask, logdet != nullptr || margin != nullptr, w.rows);
  const int nR = static_cast<int>(w.rows.size());
  if (nR == 0) return out;  // nothing counted and no per-position output asked for
  head_prepare(q, k, T, dh, w);
  if (scale) {
    const size_t W = static_cast<size_t>(nR) * dh, Ts = w.rows[nR - 1];
    resize(w.G, dh * W);
    resize(w.Gt, dh * W);
    resize(w.U, W);
    resize(w.Wv, W);
    resize(w.X, Ts * W);
    resize(w.Y, Ts * W);
    resize(w.A, static_cast<size_t>(nR) * T);
    resize(w.dqr, W);
  }
  // One OpenMP region per call (each region's fork/join costs more when the cores are shared),
  // only when the O(nR dh^3) work is worth it, and not beside OpenBLAS's own pthread pool
  // (core/blas.h, blas_runs_own_pool): its workers spin for a while after each GEMM, and an
  // OpenMP team started next to them fights them for the cores (several times slower on 2 cores).
  const bool parallel = static_cast<double>(nR) * dh * dh * dh >= 2e5 && !blas_runs_own_pool();
#pragma omp parallel if (parallel)
  {
    PositionScratch& ps = position_scratch(dh);
#pragma omp for schedule(dynamic, 4)
    for (int i = 0; i < nR; ++i)
      position_compute(w, i, dh, eps, counted(w.rows[i], mask), scale, logdet, margin, ps);
  }

  double sum = 0, min_ld = std::numeric_limits<double>::infinity();
  for (int i = 0; i < nR; ++i) {
    if (!counted(w.rows[i], mask)) continue;
    const int sign = static_cast<int>(w.det_sign[i]);
    sum += phi_from_det(sign, w.det_logabs[i], eps);
    min_ld = std::min(min_ld, sign > 0 ? w.det_logabs[i] : -std::numeric_limits<double>::infinity());
    ++out.count;
  }
  out.sum_phi = Real(sum);
  out.min_logdet = out.count > 0 ? Real(min_ld) : Real(0);
  if (scale && out.count > 0) head_backward(w, k, T, dh, mask, dq, dk);
  return out;
}

}  // namespace

template <class Real>
BarrierHeadOutput<Real> barrier_head_forward(const Real* q, const Real* k, int T, int dh,
                                             double eps, const uint8_t* mask, Real* logdet,
                                             Real* margin) {
  return head_compute<Real>(q, k, T, dh, eps, mask, nullptr, nullptr, nullptr, logdet, margin);
}

template <class Real>
void barrier_head_backward(const Real* q, const Real* k, int T, int dh, double eps,
                           const uint8_t* mask, Real scale, Real* dq, Real* dk) {
  head_compute<Real>(q, k, T, dh, eps, mask, &scale, dq, dk, nullptr, nullptr);
}

template <class Real>
BarrierHeadOutput<Real> barrier_head_forward_backward(const Real* q, const Real* k, int T, int dh,
                                                      double eps, const uint8_t* mask, Real scale,
                                                      Real* dq, Real* dk, Real* logdet,
                                                      Real* margin) {
  return head_compute<Real>(q, k, T, dh, eps, mask, &scale, dq, dk, logdet, margin);
}

#define BLM_INSTANTIATE_BARRIER(Real)                                                          \
  template BarrierHeadOutput<Real> barrier_head_forward<Real>(                                 \
      const Real*, const Real*, int, int, double, const uint8_t*, Real*, Real*);               \
  template void barrier_head_backward<Real>(const Real*, const Real*, int, int, double,         \
                                            const uint8_t*, Real, Real*, Real*);                \
  template BarrierHeadOutput<Real> barrier_head_forward_backward<Real>(                        \
      const Real*, const Real*, int, int, double, const uint8_t*, Real, Real*, Real*, Real*,   \
      Real*);
BLM_INSTANTIATE_BARRIER(float)
BLM_INSTANTIATE_BARRIER(double)
#undef BLM_INSTANTIATE_BARRIER

}  // namespace blm
