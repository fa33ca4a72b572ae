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
// The per-position determinant and inverse are computed in double whatever Real is.
#include "core/barrier.h"

#include <algorithm>
#include <cmath>
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

namespace {

// In-place LU with partial pivoting of the n x n row-major a; piv[i] = row swapped into i.
// Returns the permutation sign times the sign of the product of pivots (0 when a pivot is
// exactly zero) and writes log|det| to *logabs.  A zero pivot is replaced by a tiny value
// (relative to the matrix scale) so the factors stay usable for delta * J^{-1} (the adjugate),
// which is what the barrier's gradient needs near the boundary.
int lu_factor(double* a, int n, int* piv, double* logabs) {
  double scale = 0;
  for (int i = 0; i < n * n; ++i) scale = std::max(scale, std::fabs(a[i]));
  const double tiny = (scale > 0 ? scale : 1.0) * 1e-300;
  int sign = 1;
  bool singular = false;
  double la = 0;
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
      pv = a[c * n + c] = tiny;
    }
    if (pv < 0) sign = -sign;
    la += std::log(std::fabs(pv));
    const double inv = 1.0 / pv;
    for (int r = c + 1; r < n; ++r) {
      const double f = a[r * n + c] *= inv;
      if (f == 0) continue;
      for (int j = c + 1; j < n; ++j) a[r * n + j] -= f * a[c * n + j];
    }
  }
  *logabs = singular ? -std::numeric_limits<double>::infinity() : la;
  return singular ? 0 : sign;
}

// Given the LU factors of J (lu_factor), writes J^{-T} (n x n row-major) to out.
// Solves J x = e_c for each column c; column c of J^{-1} is row c of J^{-T}.
void lu_inverse_transpose(const double* lu, const int* piv, int n, double* out, double* x) {
  for (int c = 0; c < n; ++c) {
    for (int i = 0; i < n; ++i) x[i] = (i == c) ? 1.0 : 0.0;
    for (int i = 0; i < n; ++i) std::swap(x[i], x[piv[i]]);  // apply P in factor order
    for (int i = 0; i < n; ++i) {                             // L y = P e_c (unit diagonal)
      double s = x[i];
      for (int j = 0; j < i; ++j) s -= lu[i * n + j] * x[j];
      x[i] = s;
    }
    for (int i = n - 1; i >= 0; --i) {  // U x = y
      double s = x[i];
      for (int j = i + 1; j < n; ++j) s -= lu[i * n + j] * x[j];
      x[i] = s / lu[i * n + i];
    }
    for (int i = 0; i < n; ++i) out[c * n + i] = x[i];
  }
}

}  // namespace

int log_abs_det(const double* a, int n, double* logabs) {
  std::vector<double> lu(a, a + static_cast<size_t>(n) * n);
  std::vector<int> piv(n);
  return lu_factor(lu.data(), n, piv.data(), logabs);
}

// One-sided Jacobi (Hestenes): orthogonalise the columns of a copy of A by plane rotations
// applied from the right; the column norms are then the singular values.
double smallest_singular_value(const double* a, int n) {
  if (n <= 0) return 0;
  std::vector<double> w(a, a + static_cast<size_t>(n) * n);  // row-major, columns rotated
  const double tol = 1e-15;
  for (int sweep = 0; sweep < 80; ++sweep) {
    bool rotated = false;
    for (int i = 0; i < n - 1; ++i) {
      for (int j = i + 1; j < n; ++j) {
        double alpha = 0, beta = 0, gamma = 0;
        for (int r = 0; r < n; ++r) {
          const double x = w[r * n + i], y = w[r * n + j];
          alpha += x * x, beta += y * y, gamma += x * y;
        }
        if (gamma == 0 || std::fabs(gamma) <= tol * std::sqrt(alpha * beta)) continue;
        rotated = true;
        // Rotation that zeroes the (i, j) entry of the 2x2 Gram matrix [[alpha, gamma], [gamma, beta]].
        const double zeta = (beta - alpha) / (2 * gamma);
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (std::fabs(zeta) + std::sqrt(1 + zeta * zeta));
        const double c = 1 / std::sqrt(1 + t * t), s = c * t;
        for (int r = 0; r < n; ++r) {
          const double x = w[r * n + i], y = w[r * n + j];
          w[r * n + i] = c * x - s * y;
          w[r * n + j] = s * x + c * y;
        }
      }
    }
    if (!rotated) break;
  }
  double smin = std::numeric_limits<double>::infinity();
  for (int j = 0; j < n; ++j) {
    double nn = 0;
    for (int r = 0; r < n; ++r) nn += w[r * n + j] * w[r * n + j];
    smin = std::min(smin, std::sqrt(nn));
  }
  return smin;
}

// ------------------------------------------------------------------ the head computation

namespace {

// Row-block height for the triangular GEMMs: small enough to skip most of pi's zero upper
// triangle, large enough for BLAS to run near peak.
constexpr int kRowBlock = 16;

inline bool counted(int t, const uint8_t* mask) { return t >= 2 && (mask == nullptr || mask[t]); }

// C[T, N] = L @ B for strictly lower-triangular L [T, T] (row t uses columns s < t).
template <class Real>
void strict_lower_gemm(const Real* L, int T, const Real* B, int N, Real* C) {
  for (int r0 = 0; r0 < T; r0 += kRowBlock) {
    const int r1 = std::min(T, r0 + kRowBlock);
    const int K = r1 - 1;  // the last row of the block uses columns s <= r1 - 2
    if (K <= 0) {
      std::fill(C + static_cast<size_t>(r0) * N, C + static_cast<size_t>(r1) * N, Real(0));
      continue;
    }
    gemm(false, false, r1 - r0, N, K, Real(1), L + static_cast<size_t>(r0) * T, T, B, N, Real(0),
         C + static_cast<size_t>(r0) * N, N);
  }
}

// C[T, N] = L^T @ B for strictly lower-triangular L [T, T] (row s of L^T uses t > s).
template <class Real>
void strict_lower_transposed_gemm(const Real* L, int T, const Real* B, int N, Real* C) {
  for (int r0 = 0; r0 < T; r0 += kRowBlock) {
    const int r1 = std::min(T, r0 + kRowBlock);
    const int t0 = r0 + 1, K = T - t0;  // rows s in [r0, r1) need t in [r0 + 1, T)
    if (K <= 0) {
      std::fill(C + static_cast<size_t>(r0) * N, C + static_cast<size_t>(r1) * N, Real(0));
      continue;
    }
    gemm(true, false, r1 - r0, N, K, Real(1), L + static_cast<size_t>(t0) * T + r0, T,
         B + static_cast<size_t>(t0) * N, N, Real(0), C + static_cast<size_t>(r0) * N, N);
  }
}

// Scratch for one head, reused across calls on the same thread.
template <class Real>
struct HeadWork {
  std::vector<Real> pi;     // [T, T]  strict-causal attention (zero for s >= t)
  std::vector<Real> qc, kc; // [T, dh] q, k minus their mean over positions
  std::vector<Real> P;      // [T, dh*dh]  vec(q'_s k'_s^T)
  std::vector<Real> S;      // [T, dh*dh]  pi @ P; reused as M = pi^T @ Gvec in the backward
  std::vector<Real> qbar, kbar;  // [T, dh]  pi @ q', pi @ k'
  std::vector<Real> Gvec;   // [T, dh*dh]  G_t = dphi/dC_t * scale (zero rows when not counted)
  std::vector<Real> A;      // [T, T]  g_ts, then dL/dz_ts
  std::vector<Real> U, W;   // [T, dh]  u_t = G_t^T qbar'_t, w_t = G_t kbar'_t
  std::vector<Real> piU, piW;  // [T, dh]  pi^T @ U, pi^T @ W
  std::vector<double> det_sign, det_logabs;  // [T]
};

template <class Real>
HeadWork<Real>& head_work() {
  thread_local HeadWork<Real> w;
  return w;
}

template <class Real>
void resize(std::vector<Real>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// pi_ts = softmax_{s<t}(q_t . k_s / sqrt(dh)); rows 0 (no predecessors) is all zero.
// pi: [T, T], computed over the full square by one GEMM, then normalised per row in double.
template <class Real>
void strict_causal_softmax(const Real* q, const Real* k, int T, int dh, Real* pi) {
  const Real inv_sqrt = Real(1.0 / std::sqrt(static_cast<double>(dh)));
  gemm(false, true, T, T, dh, inv_sqrt, q, dh, k, dh, Real(0), pi, T);
  for (int t = 0; t < T; ++t) {
    Real* row = pi + static_cast<size_t>(t) * T;
    double m = -std::numeric_limits<double>::infinity();
    for (int s = 0; s < t; ++s) m = std::max(m, static_cast<double>(row[s]));
    double l = 0;
    for (int s = 0; s < t; ++s) l += std::exp(static_cast<double>(row[s]) - m);
    for (int s = 0; s < t; ++s) row[s] = Real(std::exp(static_cast<double>(row[s]) - m) / l);
    std::fill(row + t, row + T, Real(0));
  }
}

// Everything both directions need: pi, the centred q', k', P, S, qbar', kbar'.
//
// Why the uncentred form S_t - qbar'_t kbar'_t^T is accurate enough: C_t enters det(I - C_t), so
// what matters is the absolute error of C_t's entries relative to 1.  The rounding error of the
// difference is about u * sum_s pi_ts |q'_s| |k'_s| / sqrt(dh), i.e. u times the size of the
// attention logits of the centred vectors (u = 6e-8 in float).  Subtracting the mean over all
// positions first removes the part of q, k shared by every token (biases, LayerNorm offsets),
// which is the part that would otherwise make |q_s| |k_s| much larger than the covariance.
template <class Real>
void head_prepare(const Real* q, const Real* k, int T, int dh, HeadWork<Real>& w) {
  const size_t n2 = static_cast<size_t>(dh) * dh;
  resize(w.pi, static_cast<size_t>(T) * T);
  resize(w.qc, static_cast<size_t>(T) * dh);
  resize(w.kc, static_cast<size_t>(T) * dh);
  resize(w.P, T * n2);
  resize(w.S, T * n2);
  resize(w.qbar, static_cast<size_t>(T) * dh);
  resize(w.kbar, static_cast<size_t>(T) * dh);
  resize(w.det_sign, T);
  resize(w.det_logabs, T);

  strict_causal_softmax(q, k, T, dh, w.pi.data());

  for (int a = 0; a < dh; ++a) {  // mean over positions, in double
    double mq = 0, mk = 0;
    for (int s = 0; s < T; ++s) mq += q[s * dh + a], mk += k[s * dh + a];
    mq /= T, mk /= T;
    for (int s = 0; s < T; ++s) {
      w.qc[s * dh + a] = Real(q[s * dh + a] - mq);
      w.kc[s * dh + a] = Real(k[s * dh + a] - mk);
    }
  }
  for (int s = 0; s < T; ++s) {
    Real* p = w.P.data() + s * n2;
    const Real* qs = w.qc.data() + static_cast<size_t>(s) * dh;
    const Real* ks = w.kc.data() + static_cast<size_t>(s) * dh;
    for (int a = 0; a < dh; ++a)
      for (int b = 0; b < dh; ++b) p[a * dh + b] = qs[a] * ks[b];
  }
  strict_lower_gemm(w.pi.data(), T, w.P.data(), static_cast<int>(n2), w.S.data());
  strict_lower_gemm(w.pi.data(), T, w.qc.data(), dh, w.qbar.data());
  strict_lower_gemm(w.pi.data(), T, w.kc.data(), dh, w.kbar.data());
}

// J_t = I - C_t in double (dh x dh row-major), C_t = (S_t - qbar'_t kbar'_t^T) / sqrt(dh).
template <class Real>
void build_jacobian(const HeadWork<Real>& w, int t, int dh, double* J) {
  const double inv_sqrt = 1.0 / std::sqrt(static_cast<double>(dh));
  const size_t n2 = static_cast<size_t>(dh) * dh;
  const Real* S = w.S.data() + t * n2;
  const Real* qb = w.qbar.data() + static_cast<size_t>(t) * dh;
  const Real* kb = w.kbar.data() + static_cast<size_t>(t) * dh;
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

}  // namespace

template <class Real>
BarrierHeadOutput<Real> barrier_head_forward(const Real* q, const Real* k, int T, int dh,
                                             double eps, const uint8_t* mask, Real* logdet,
                                             Real* margin) {
  BarrierHeadOutput<Real> out;
  if (T <= 0 || dh <= 0) return out;
  HeadWork<Real>& w = head_work<Real>();
  head_prepare(q, k, T, dh, w);

  // Per position: LU of J_t (and sigma_min when asked).  No BLAS inside.
#pragma omp parallel
  {
    std::vector<double> J(static_cast<size_t>(dh) * dh);
    std::vector<int> piv(dh);
#pragma omp for schedule(dynamic, 4)
    for (int t = 0; t < T; ++t) {
      if (t < 2) {
        w.det_sign[t] = 1, w.det_logabs[t] = 0;
        if (logdet) logdet[t] = Real(0);
        if (margin) margin[t] = Real(1);
        continue;
      }
      build_jacobian(w, t, dh, J.data());
      if (margin) margin[t] = Real(smallest_singular_value(J.data(), dh));
      double la = 0;
      const int sign = lu_factor(J.data(), dh, piv.data(), &la);
      w.det_sign[t] = sign, w.det_logabs[t] = la;
      if (logdet) logdet[t] = sign > 0 ? Real(la) : -std::numeric_limits<Real>::infinity();
    }
  }

  double sum = 0, min_ld = std::numeric_limits<double>::infinity();
  for (int t = 0; t < T; ++t) {
    if (!counted(t, mask)) continue;
    const int sign = static_cast<int>(w.det_sign[t]);
    sum += phi_from_det(sign, w.det_logabs[t], eps);
    min_ld = std::min(min_ld, sign > 0 ? w.det_logabs[t] : -std::numeric_limits<double>::infinity());
    ++out.count;
  }
  out.sum_phi = Real(sum);
  out.min_logdet = out.count > 0 ? Real(min_ld) : Real(0);
  return out;
}

template <class Real>
void barrier_head_backward(const Real* q, const Real* k, int T, int dh, double eps,
                           const uint8_t* mask, Real scale, Real* dq, Real* dk) {
  if (T <= 2 || dh <= 0) return;
  HeadWork<Real>& w = head_work<Real>();
  head_prepare(q, k, T, dh, w);
  const size_t n2 = static_cast<size_t>(dh) * dh;
  const Real inv_sqrt = Real(1.0 / std::sqrt(static_cast<double>(dh)));
  resize(w.Gvec, T * n2);
  resize(w.A, static_cast<size_t>(T) * T);
  resize(w.U, static_cast<size_t>(T) * dh);
  resize(w.W, static_cast<size_t>(T) * dh);
  resize(w.piU, static_cast<size_t>(T) * dh);
  resize(w.piW, static_cast<size_t>(T) * dh);

  // G_t = scale * (-phi'(delta_t) delta_t) J_t^{-T};  u_t = G_t^T qbar'_t,  w_t = G_t kbar'_t.
#pragma omp parallel
  {
    std::vector<double> J(n2), inv(n2), x(dh);
    std::vector<int> piv(dh);
#pragma omp for schedule(dynamic, 4)
    for (int t = 0; t < T; ++t) {
      Real* G = w.Gvec.data() + t * n2;
      Real* u = w.U.data() + static_cast<size_t>(t) * dh;
      Real* wv = w.W.data() + static_cast<size_t>(t) * dh;
      if (!counted(t, mask)) {
        std::fill(G, G + n2, Real(0));
        std::fill(u, u + dh, Real(0));
        std::fill(wv, wv + dh, Real(0));
        continue;
      }
      build_jacobian(w, t, dh, J.data());
      double la = 0;
      const int sign = lu_factor(J.data(), dh, piv.data(), &la);
      lu_inverse_transpose(J.data(), piv.data(), dh, inv.data(), x.data());
      const double c = static_cast<double>(scale) * grad_coefficient(sign, la, eps);
      for (size_t i = 0; i < n2; ++i) G[i] = Real(c * inv[i]);
      const Real* qb = w.qbar.data() + static_cast<size_t>(t) * dh;
      const Real* kb = w.kbar.data() + static_cast<size_t>(t) * dh;
      for (int a = 0; a < dh; ++a) {
        double ua = 0, wa = 0;
        for (int b = 0; b < dh; ++b) {
          ua += static_cast<double>(G[b * dh + a]) * qb[b];
          wa += static_cast<double>(G[a * dh + b]) * kb[b];
        }
        u[a] = Real(ua), wv[a] = Real(wa);
      }
    }
  }

  // Path 1 and 2 (through the softmax).  A_ts = <G_t, q'_s k'_s^T>, restricted to s < t;
  // g_ts = (A_ts - u_t . k'_s - w_t . q'_s) / sqrt(dh)  (the constant qbar'^T G kbar' is dropped:
  // it cancels in the softmax).
  Real* A = w.A.data();
  for (int r0 = 0; r0 < T; r0 += kRowBlock) {
    const int r1 = std::min(T, r0 + kRowBlock);
    Real* Ab = A + static_cast<size_t>(r0) * T;
    std::fill(Ab, A + static_cast<size_t>(r1) * T, Real(0));
    if (r1 - 1 > 0)
      gemm(false, true, r1 - r0, r1 - 1, static_cast<int>(n2), Real(1),
           w.Gvec.data() + r0 * n2, static_cast<int>(n2), w.P.data(), static_cast<int>(n2),
           Real(0), Ab, T);
  }
  gemm(false, true, T, T, dh, Real(-1), w.U.data(), dh, w.kc.data(), dh, Real(1), A, T);
  gemm(false, true, T, T, dh, Real(-1), w.W.data(), dh, w.qc.data(), dh, Real(1), A, T);
  // dL/dz_ts = pi_ts (g_ts - sum_r pi_tr g_tr), zero for s >= t.
  for (int t = 0; t < T; ++t) {
    Real* row = A + static_cast<size_t>(t) * T;
    const Real* p = w.pi.data() + static_cast<size_t>(t) * T;
    if (!counted(t, mask)) {
      std::fill(row, row + T, Real(0));
      continue;
    }
    double mean = 0;
    for (int s = 0; s < t; ++s) mean += static_cast<double>(p[s]) * row[s];
    for (int s = 0; s < t; ++s) row[s] = Real(p[s] * (inv_sqrt * (row[s] - mean)));
    std::fill(row + t, row + T, Real(0));
  }
  // z_ts = q_t . k_s / sqrt(dh):  dq += dz @ k / sqrt(dh),  dk += dz^T @ q / sqrt(dh).
  gemm(false, false, T, dh, T, inv_sqrt, A, T, k, dh, Real(1), dq, dh);
  gemm(true, false, T, dh, T, inv_sqrt, A, T, q, dh, Real(1), dk, dh);

  // Paths 3 and 4 (direct): with M_s = sum_{t>s} pi_ts G_t,
  //   dq_s += (M_s k'_s - sum_t pi_ts w_t) / sqrt(dh),  dk_s += (M_s^T q'_s - sum_t pi_ts u_t) / sqrt(dh).
  Real* M = w.S.data();  // S is no longer needed
  strict_lower_transposed_gemm(w.pi.data(), T, w.Gvec.data(), static_cast<int>(n2), M);
  strict_lower_transposed_gemm(w.pi.data(), T, w.U.data(), dh, w.piU.data());
  strict_lower_transposed_gemm(w.pi.data(), T, w.W.data(), dh, w.piW.data());
#pragma omp parallel for schedule(static)
  for (int s = 0; s < T; ++s) {
    const Real* Ms = M + s * n2;
    const Real* qs = w.qc.data() + static_cast<size_t>(s) * dh;
    const Real* ks = w.kc.data() + static_cast<size_t>(s) * dh;
    for (int a = 0; a < dh; ++a) {
      double mq = 0, mk = 0;
      for (int b = 0; b < dh; ++b) {
        mq += static_cast<double>(Ms[a * dh + b]) * ks[b];
        mk += static_cast<double>(Ms[b * dh + a]) * qs[b];
      }
      dq[s * dh + a] += Real((mq - w.piW[s * dh + a]) * inv_sqrt);
      dk[s * dh + a] += Real((mk - w.piU[s * dh + a]) * inv_sqrt);
    }
  }
}

template BarrierHeadOutput<float> barrier_head_forward<float>(const float*, const float*, int, int,
                                                              double, const uint8_t*, float*, float*);
template BarrierHeadOutput<double> barrier_head_forward<double>(const double*, const double*, int,
                                                                int, double, const uint8_t*,
                                                                double*, double*);
template void barrier_head_backward<float>(const float*, const float*, int, int, double,
                                           const uint8_t*, float, float*, float*);
template void barrier_head_backward<double>(const double*, const double*, int, int, double,
                                            const uint8_t*, double, double*, double*);

}  // namespace blm
