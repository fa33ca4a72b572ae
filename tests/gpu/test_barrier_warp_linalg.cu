// The barrier's per-position linear algebra against a float64 host LU with partial pivoting.
//
// 1. [barrier-linalg]: the launchers of cuda/barrier_tc_linalg.h (barrier_linalg_det, and
//    barrier_linalg_forward with and without training), D = 32 and 64.  J is chosen first,
//    with known conditioning, then Qb, Kb ~ N(0, 0.5^2) and S = (I - J) / c + Qb Kb^T (rounded to
//    float) are what the kernels get; the reference forms J from the same float S, Qb, Kb in
//    double, so the kernels' own fp32 rounding (forming J, eliminating) is what is measured.
//    Families (one per compact row, cycled), tolerances |d logdet| / max|dG| / max|G|:
//      well conditioned   I + 0.3 N(0,1)/sqrt(D) (kappa ~ 5)                      2e-5 / 1e-4
//      row-permuted       the same with its rows permuted (every step pivots)       2e-5 / 1e-4
//      negative det       the same with row 3 negated: det < 0, phi's quadratic branch, coef ~ -1e4
//      det 1e20           U diag(sigma) V^T, log sigma = 46 / D + a centred spread in
//                         [-0.5, 0.5] (kappa <= e)                                2e-5 / 1e-4
//      det 1e-3           the same around -6.9 / D: below eps = 1e-2, coef 0.19   2e-5 / 1e-4
//      kappa 1e3          sigma log-spaced 10^1.5 .. 10^-1.5 (det ~ 1)             1e-3 / 1e-3
//      kappa 1e5          sigma log-spaced 10^2.5 .. 10^-2.5 (det ~ 1)             2e-2 / 5e-2
//      exactly singular   a zero row (qb_i = 0, S_i = e_i / c, c a power of two so the kernels
//                         form the zero exactly): logdet -inf, phi(0), G = U = W = E = rowterm = 0
//    (errors of log det and of J^{-1} grow like kappa u: forming J in fp32 alone perturbs it by
//    ~1e-7 relative, so J^{-1} by ~kappa 1e-7: 1e-2 at kappa 1e5; the old kernels measured 8.5e-6
//    at kappa 1e3).
//    The 1e20, 1e-3 and kappa families are made positive (row 0 negated when det < 0) so G stays
//    finite.  U, W, E, rowterm are bounded through G's: |dU| <= tol max|G| |qb|_1, |dW| <= tol
//    max|G| |kb|_1, |dE| <= tol max|G| |qb|_1 |kb|_1, |d rowterm| <= tol max|G| D (rowterm against
//    its definition c (<G, S> - E)); phi within tol max(1, |coef|, 2 |phi|) (phi ~ x^2 on the
//    quadratic branch).  Padding slots: G, U, W, E, rowterm exactly 0, logdet / phi of uncounted
//    positions untouched (a sentinel); outputs NaN-poisoned first; a second run is bit-identical;
//    a run with the pivot search at every step (cuda::Pivots::search) is within the same bounds,
//    and is bit for bit the default diagonal-first Gauss-Jordan (D 64: two steps per sweep) on
//    the matrices the default hands to the search (the batch has matrices of both kinds, by a
//    host fp32 elimination), and everywhere for D 32 (which always searches); D = 48 is
//    refused.  Measured on an H200 (2026-11-28): |d logdet| <=
//    2.0e-6 (kappa <= 5), max|dG| / max|G| 3.1e-6 / 1.0e-5 / 5.1e-4 for kappa <= 5 / 1e3 / 1e5.
// 2. [.bench][barrier-linalg]: ms per call at shape (b)'s count (B 64, H 6, K 254: 97,536
//    matrices) and (a)'s (B 16, H 12, K 64: 12,288), D 64 (and D 32 at (b)'s count).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/barrier_tc_linalg.h"
#include "cuda/common.cuh"
#include "tests/catch.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

struct LuRef {
  int sign;
  double logabs;
  std::vector<double> inv;  // row-major, empty when singular
};

// float64 LU with partial pivoting (row swaps), then the inverse by forward/back substitution.
LuRef host_lu(const std::vector<double>& A0, int D) {
  std::vector<double> A = A0;
  std::vector<int> piv(D);
  std::iota(piv.begin(), piv.end(), 0);
  LuRef r{1, 0.0, {}};
  for (int k = 0; k < D; ++k) {
    int p = k;
    for (int i = k + 1; i < D; ++i)
      if (std::fabs(A[i * D + k]) > std::fabs(A[p * D + k])) p = i;
    if (A[p * D + k] == 0.0) return LuRef{0, -INFINITY, {}};
    if (p != k) {
      for (int j = 0; j < D; ++j) std::swap(A[k * D + j], A[p * D + j]);
      std::swap(piv[k], piv[p]);
      r.sign = -r.sign;
    }
    const double d = A[k * D + k];
    if (d < 0) r.sign = -r.sign;
    r.logabs += std::log(std::fabs(d));
    for (int i = k + 1; i < D; ++i) {
      const double l = A[i * D + k] / d;
      A[i * D + k] = l;
      for (int j = k + 1; j < D; ++j) A[i * D + j] -= l * A[k * D + j];
    }
  }
  // P A = L U; column c of A^{-1} solves L U x = P e_c.
  r.inv.assign(static_cast<size_t>(D) * D, 0.0);
  for (int c = 0; c < D; ++c) {
    std::vector<double> x(D);
    for (int i = 0; i < D; ++i) x[i] = piv[i] == c ? 1.0 : 0.0;
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < i; ++j) x[i] -= A[i * D + j] * x[j];
    for (int i = D - 1; i >= 0; --i) {
      for (int j = i + 1; j < D; ++j) x[i] -= A[i * D + j] * x[j];
      x[i] /= A[i * D + i];
    }
    for (int i = 0; i < D; ++i) r.inv[static_cast<size_t>(i) * D + c] = x[i];
  }
  return r;
}

std::vector<double> near_identity(int D, uint64_t seed) {
  std::vector<double> A(static_cast<size_t>(D) * D);
  for (int i = 0; i < D * D; ++i)
    A[i] = (i / D == i % D ? 1.0 : 0.0) + 0.3 * normal01(seed, i) / std::sqrt(static_cast<double>(D));
  return A;
}

// Random orthogonal D x D (Gram-Schmidt of a Gaussian matrix, rows orthonormal).
std::vector<double> orthogonal(int D, uint64_t seed) {
  std::vector<double> Q(static_cast<size_t>(D) * D);
  for (int i = 0; i < D * D; ++i) Q[i] = normal01(seed, i);
  for (int i = 0; i < D; ++i) {
    for (int pass = 0; pass < 2; ++pass)  // twice: orthogonal to working precision
      for (int j = 0; j < i; ++j) {
        double dot = 0;
        for (int k = 0; k < D; ++k) dot += Q[i * D + k] * Q[j * D + k];
        for (int k = 0; k < D; ++k) Q[i * D + k] -= dot * Q[j * D + k];
      }
    double nrm = 0;
    for (int k = 0; k < D; ++k) nrm += Q[i * D + k] * Q[i * D + k];
    nrm = std::sqrt(nrm);
    for (int k = 0; k < D; ++k) Q[i * D + k] /= nrm;
  }
  return Q;
}

}  // namespace

// ---- [barrier-linalg]: the launchers of cuda/barrier_tc_linalg.h ----------------------------------

namespace {

// phi(delta) and coef = -phi'(delta) delta of spec section 3 (log branch for delta >= eps, the
// quadratic continuation below), from sign and log|det| as the device code takes them.
double phi_ref(int sign, double logabs, double eps) {
  if (sign > 0 && logabs >= std::log(eps)) return -logabs;
  const double x = sign == 0 ? 0.0 : sign * std::exp(logabs), dx = x - eps;
  return -std::log(eps) - dx / eps + dx * dx / (2 * eps * eps);
}
double coef_ref(int sign, double logabs, double eps) {
  if (sign > 0 && logabs >= std::log(eps)) return 1.0;
  const double x = sign == 0 ? 0.0 : sign * std::exp(logabs);
  return -(-1.0 / eps + (x - eps) / (eps * eps)) * x;
}

enum class Family { kWell, kPermuted, kNegative, kBig, kSmall, kKappa3, kKappa5, kSingular };
constexpr int kFamilies = 8;

struct FamilySpec {
  const char* name;
  double tol_logdet, tol_g;
};
FamilySpec family_spec(Family f) {
  switch (f) {
    case Family::kWell: return {"well conditioned", 2e-5, 1e-4};
    case Family::kPermuted: return {"row-permuted", 2e-5, 1e-4};
    case Family::kNegative: return {"negative det", 2e-5, 1e-4};
    case Family::kBig: return {"det ~1e20", 2e-5, 1e-4};
    case Family::kSmall: return {"det ~1e-3", 2e-5, 1e-4};
    case Family::kKappa3: return {"kappa 1e3", 1e-3, 1e-3};
    case Family::kKappa5: return {"kappa 1e5", 2e-2, 5e-2};
    case Family::kSingular: return {"exactly singular", 0, 0};
  }
  return {"?", 0, 0};
}

// U diag(sigma) V^T with U, V random orthogonal.
std::vector<double> with_singular_values(const std::vector<double>& sigma, uint64_t seed) {
  const int D = static_cast<int>(sigma.size());
  const std::vector<double> U = orthogonal(D, seed), V = orthogonal(D, seed + 1);
  std::vector<double> A(static_cast<size_t>(D) * D, 0.0);
  for (int k = 0; k < D; ++k)
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j) A[i * D + j] += U[i * D + k] * sigma[k] * V[j * D + k];
  return A;
}

// Negates row 0 when det < 0 (so that G = scale coef J^{-T} stays in float range).
void make_positive(std::vector<double>& J, int D) {
  if (host_lu(J, D).sign < 0)
    for (int j = 0; j < D; ++j) J[j] = -J[j];
}

// The intended J of family f (D x D, double).  Singular: row `zero_row` is zero.
std::vector<double> family_matrix(Family f, int D, uint64_t seed, int zero_row) {
  std::vector<double> J;
  switch (f) {
    case Family::kWell:
    case Family::kSingular: J = near_identity(D, seed); break;
    case Family::kNegative:
      J = near_identity(D, seed);
      for (int j = 0; j < D; ++j) J[3 * D + j] = -J[3 * D + j];
      break;
    case Family::kPermuted: {
      const std::vector<double> B = near_identity(D, seed);
      std::vector<int> perm(D);
      std::iota(perm.begin(), perm.end(), 0);
      for (int i = D - 1; i > 0; --i) std::swap(perm[i], perm[hash2(seed + 4, i) % (i + 1)]);
      J.resize(B.size());
      for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j) J[i * D + j] = B[perm[i] * D + j];
      break;
    }
    case Family::kBig:
    case Family::kSmall: {
      // log sigma = mean + a centred spread in [-0.5, 0.5]: log det = 46 (1e20) or -6.9 (1e-3)
      // exactly, kappa <= e.
      const double mean = (f == Family::kBig ? 46.0 : -6.9) / D;
      std::vector<double> spread(D);
      double avg = 0;
      for (int k = 0; k < D; ++k) avg += (spread[k] = uniform01(seed + 7, k) - 0.5) / D;
      std::vector<double> sigma(D);
      for (int k = 0; k < D; ++k) sigma[k] = std::exp(mean + spread[k] - avg);
      J = with_singular_values(sigma, seed);
      make_positive(J, D);
      break;
    }
    case Family::kKappa3:
    case Family::kKappa5: {
      const double half = f == Family::kKappa3 ? 1.5 : 2.5;  // log10 sigma from +half to -half
      std::vector<double> sigma(D);
      for (int k = 0; k < D; ++k) sigma[k] = std::pow(10.0, half - 2.0 * half * k / (D - 1));
      J = with_singular_values(sigma, seed);
      make_positive(J, D);
      break;
    }
  }
  if (f == Family::kSingular)
    for (int j = 0; j < D; ++j) J[zero_row * D + j] = 0.0;
  return J;
}

// A batch of B sequences x H heads x K slots; sequence 1 has its last 3 slots padded.
struct Batch {
  int B = 2, H = 3, T = 16, K = 9, D = 0;
  float c = 0, scale = 0.37f;
  double eps = 1e-2;
  std::vector<int32_t> rows;         // [B, K]
  std::vector<float> S, Qb, Kb;      // [BH, K, D*D], [BH, K, D] x 2
  std::vector<Family> family;        // [BH*K]
  int nrows() const { return B * H * K; }
  bool padded(int rr) const { return rows[(rr / K / H) * K + rr % K] < 0; }
};

Batch make_batch(int D, uint64_t seed) {
  Batch b;
  b.D = D;
  // c = 1/sqrt(D) for D 64; for D 32 a power of two instead of 1/sqrt(32), so that the singular
  // family's zero row is formed exactly (the launchers take any c).
  b.c = D == 64 ? 0.125f : 0.25f;
  b.rows.assign(static_cast<size_t>(b.B) * b.K, -1);
  for (int k = 0; k < b.K; ++k) b.rows[k] = 2 + k;                        // sequence 0: t 2..10
  for (int k = 0; k < b.K - 3; ++k) b.rows[b.K + k] = 3 + 2 * k;         // sequence 1: t 3..13
  const int n = b.nrows(), DD = D * D;
  b.S.resize(static_cast<size_t>(n) * DD);
  b.Qb = randn(static_cast<size_t>(n) * D, seed + 1, 0.5);
  b.Kb = randn(static_cast<size_t>(n) * D, seed + 2, 0.5);
  b.family.resize(n);
  for (int rr = 0; rr < n; ++rr) {
    const Family f = static_cast<Family>(rr % kFamilies);
    b.family[rr] = f;
    const int zero_row = (rr * 7 + 5) % D;
    const std::vector<double> J = family_matrix(f, D, seed + 100 * rr, zero_row);
    float* qb = &b.Qb[static_cast<size_t>(rr) * D];
    const float* kb = &b.Kb[static_cast<size_t>(rr) * D];
    if (f == Family::kSingular) qb[zero_row] = 0.0f;
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j) {
        const double s = ((i == j ? 1.0 : 0.0) - J[i * D + j]) / b.c + double(qb[i]) * kb[j];
        b.S[static_cast<size_t>(rr) * DD + i * D + j] = static_cast<float>(s);
      }
  }
  return b;
}

struct RowRef {
  int sign;
  double logabs, phi, coef;
  std::vector<double> G, U, W;  // empty when singular
  double E = 0, rowterm = 0, max_g = 0;
};

RowRef reference(const Batch& b, int rr) {
  const int D = b.D;
  const float* S = &b.S[static_cast<size_t>(rr) * D * D];
  const float* qb = &b.Qb[static_cast<size_t>(rr) * D];
  const float* kb = &b.Kb[static_cast<size_t>(rr) * D];
  const double c = b.c;
  std::vector<double> J(static_cast<size_t>(D) * D);
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j)
      J[i * D + j] = (i == j ? 1.0 : 0.0) - c * (double(S[i * D + j]) - double(qb[i]) * kb[j]);
  const LuRef lu = host_lu(J, D);
  RowRef r{lu.sign, lu.logabs, phi_ref(lu.sign, lu.logabs, b.eps), coef_ref(lu.sign, lu.logabs, b.eps)};
  if (lu.sign == 0) return r;
  const double gs = b.scale * r.coef;
  r.G.resize(static_cast<size_t>(D) * D);
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j) {
      r.G[i * D + j] = gs * lu.inv[j * D + i];
      r.max_g = std::max(r.max_g, std::fabs(r.G[i * D + j]));
    }
  r.U.assign(D, 0.0);
  r.W.assign(D, 0.0);
  double gs_dot = 0;  // <G, S>
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j) {
      r.U[j] += r.G[i * D + j] * qb[i];
      r.W[i] += r.G[i * D + j] * kb[j];
      gs_dot += r.G[i * D + j] * S[i * D + j];
    }
  for (int j = 0; j < D; ++j) r.E += r.U[j] * kb[j];
  r.rowterm = c * (gs_dot - r.E);
  return r;
}

struct Outputs {
  std::vector<float> logdet, phi, G, U, W, E, rowterm;
};

constexpr float kSentinel = 7.0f;  // logdet / phi of positions the kernels must not write

Outputs run_forward(const Batch& b, cuda::GFormat g_format = cuda::GFormat::fp32,
                    cuda::Pivots pivots = cuda::Pivots::diagonal_first) {
  const int BH = b.B * b.H, n = b.nrows(), D = b.D;
  DeviceArray<float> S(b.S), Qb(b.Qb), Kb(b.Kb);
  DeviceArray<int32_t> rows(b.rows);
  DeviceArray<float> logdet(std::vector<float>(static_cast<size_t>(BH) * b.T, kSentinel));
  DeviceArray<float> phi(std::vector<float>(static_cast<size_t>(BH) * b.T, kSentinel));
  DeviceArray<float> U(static_cast<size_t>(n) * D), W(static_cast<size_t>(n) * D), E(n), rt(n);
  poison(U);
  poison(W);
  poison(E);
  poison(rt);
  cuda::barrier_linalg_forward(S.get(), Qb.get(), Kb.get(), rows.get(), BH, b.H, b.T, b.K, D, b.c,
                               b.eps, b.scale, true, logdet.get(), phi.get(), U.get(), W.get(),
                               E.get(), rt.get(), 0, g_format, pivots);
  CUDA_CHECK(cudaGetLastError());
  return Outputs{logdet.download(), phi.download(), S.download(), U.download(),
                 W.download(),      E.download(),   rt.download()};
}

// training: barrier_linalg_forward with training = false (which is the det launcher).
Outputs run_det(const Batch& b, bool through_forward,
                cuda::Pivots pivots = cuda::Pivots::diagonal_first) {
  const int BH = b.B * b.H;
  DeviceArray<float> S(b.S), Qb(b.Qb), Kb(b.Kb);
  DeviceArray<int32_t> rows(b.rows);
  DeviceArray<float> logdet(std::vector<float>(static_cast<size_t>(BH) * b.T, kSentinel));
  DeviceArray<float> phi(std::vector<float>(static_cast<size_t>(BH) * b.T, kSentinel));
  if (through_forward)
    cuda::barrier_linalg_forward(S.get(), Qb.get(), Kb.get(), rows.get(), BH, b.H, b.T, b.K, b.D,
                                 b.c, b.eps, b.scale, false, logdet.get(), phi.get(), nullptr,
                                 nullptr, nullptr, nullptr, 0, cuda::GFormat::fp32, pivots);
  else
    cuda::barrier_linalg_det(S.get(), Qb.get(), Kb.get(), rows.get(), BH, b.H, b.T, b.K, b.D, b.c,
                             b.eps, logdet.get(), phi.get(), 0, pivots);
  CUDA_CHECK(cudaGetLastError());
  Outputs o{logdet.download(), phi.download(), {}, {}, {}, {}, {}};
  CHECK(bit_identical(S.download(), b.S));  // det only reads S
  return o;
}

// logdet and phi at every position against the references (uncounted: the sentinel).
void check_logdet_phi(const Batch& b, const std::vector<RowRef>& refs, const Outputs& o,
                      const std::string& what, double* worst_ld) {
  const int D = b.D;
  std::vector<bool> counted(static_cast<size_t>(b.B) * b.H * b.T, false);
  for (int rr = 0; rr < b.nrows(); ++rr) {
    if (b.padded(rr)) continue;
    const int bh = rr / b.K, t = b.rows[(bh / b.H) * b.K + rr % b.K];
    const size_t pos = static_cast<size_t>(bh) * b.T + t;
    counted[pos] = true;
    const RowRef& r = refs[rr];
    const FamilySpec fs = family_spec(b.family[rr]);
    INFO(what << ", D " << D << ", row " << rr << " (" << fs.name << "), ref sign " << r.sign
              << " log|det| " << r.logabs << ", got logdet " << o.logdet[pos] << " phi " << o.phi[pos]);
    if (r.sign <= 0) {
      CHECK(std::isinf(o.logdet[pos]));
      CHECK(o.logdet[pos] < 0);
    } else {
      const double d = std::fabs(o.logdet[pos] - r.logabs);
      CHECK(d <= fs.tol_logdet);
      if (b.family[rr] <= Family::kSmall) *worst_ld = std::max(*worst_ld, d);
    }
    if (r.sign == 0) {
      CHECK(std::fabs(o.phi[pos] - r.phi) <= 1e-6 * std::fabs(r.phi));
    } else if (std::fabs(r.phi) > FLT_MAX) {
      CHECK(std::isinf(o.phi[pos]));
    } else {
      const double tol = fs.tol_logdet * std::max({1.0, std::fabs(r.coef), 2 * std::fabs(r.phi)});
      CHECK(std::fabs(o.phi[pos] - r.phi) <= tol);
    }
  }
  for (size_t pos = 0; pos < counted.size(); ++pos)
    if (!counted[pos]) {
      INFO(what << ": uncounted position " << pos);
      CHECK(o.logdet[pos] == kSentinel);
      CHECK(o.phi[pos] == kSentinel);
    }
}

// max |got - ref| over n values.
double max_abs_diff(const float* got, const std::vector<double>& ref) {
  double m = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = std::fabs(double(got[i]) - ref[i]);
    m = std::isnan(d) ? INFINITY : std::max(m, d);
  }
  return m;
}

void check_gradient(const Batch& b, const std::vector<RowRef>& refs, const Outputs& o,
                    const std::string& what) {
  const int D = b.D, DD = D * D;
  double worst_well = 0, worst_k3 = 0, worst_k5 = 0;
  for (int rr = 0; rr < b.nrows(); ++rr) {
    const RowRef& r = refs[rr];
    const FamilySpec fs = family_spec(b.family[rr]);
    const float* G = &o.G[static_cast<size_t>(rr) * DD];
    const float* U = &o.U[static_cast<size_t>(rr) * D];
    const float* W = &o.W[static_cast<size_t>(rr) * D];
    INFO(what << ", D " << D << ", row " << rr << " (" << fs.name << (b.padded(rr) ? ", padding" : "")
                       << "), max|G| " << r.max_g << ", coef " << r.coef);
    if (b.padded(rr) || r.sign == 0) {
      bool zero = o.E[rr] == 0.0f && o.rowterm[rr] == 0.0f;
      for (int i = 0; i < DD; ++i) zero = zero && G[i] == 0.0f;
      for (int i = 0; i < D; ++i) zero = zero && U[i] == 0.0f && W[i] == 0.0f;
      CHECK(zero);
      continue;
    }
    double qb1 = 0, kb1 = 0;
    for (int i = 0; i < D; ++i) {
      qb1 += std::fabs(b.Qb[static_cast<size_t>(rr) * D + i]);
      kb1 += std::fabs(b.Kb[static_cast<size_t>(rr) * D + i]);
    }
    const double tol = fs.tol_g * r.max_g;
    const double dg = max_abs_diff(G, r.G);
    CHECK(dg <= tol);
    CHECK(max_abs_diff(U, r.U) <= tol * qb1);
    CHECK(max_abs_diff(W, r.W) <= tol * kb1);
    INFO("E got " << o.E[rr] << " ref " << r.E << "; rowterm got " << o.rowterm[rr] << " ref " << r.rowterm);
    CHECK(std::fabs(o.E[rr] - r.E) <= tol * qb1 * kb1);
    CHECK(std::fabs(o.rowterm[rr] - r.rowterm) <= tol * D);
    double& worst = b.family[rr] == Family::kKappa3   ? worst_k3
                    : b.family[rr] == Family::kKappa5 ? worst_k5
                                                      : worst_well;
    worst = std::max(worst, dg / r.max_g);
  }
  std::printf("barrier-linalg D %d %-18s: max|dG| / max|G|: kappa <= 5: %.2e, kappa 1e3: %.2e, "
              "kappa 1e5: %.2e\n",
              D, what.c_str(), worst_well, worst_k3, worst_k5);
}

// Would partial pivoting keep the diagonal at every step of row rr's J (formed in fp32 as the
// kernels form it, eliminated in fp32 on the host)?  Says which rows the diagonal-first
// Gauss-Jordan should accept, so that the test can require both kinds.
bool keeps_diagonal(const Batch& b, int rr) {
  const int D = b.D;
  const float* S = &b.S[static_cast<size_t>(rr) * D * D];
  const float* qb = &b.Qb[static_cast<size_t>(rr) * D];
  const float* kb = &b.Kb[static_cast<size_t>(rr) * D];
  std::vector<float> a(static_cast<size_t>(D) * D);
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j)
      a[i * D + j] = std::fmaf(-b.c, std::fmaf(-qb[i], kb[j], S[i * D + j]), i == j ? 1.0f : 0.0f);
  for (int k = 0; k < D; ++k) {
    const float p = a[k * D + k];
    for (int r = k + 1; r < D; ++r)
      if (std::fabs(a[r * D + k]) > std::fabs(p)) return false;
    if (p == 0.0f) return true;
    for (int r = k + 1; r < D; ++r) {
      const float f = a[r * D + k] / p;
      for (int j = k; j < D; ++j) a[r * D + j] = std::fmaf(-f, a[k * D + j], a[r * D + j]);
    }
  }
  return true;
}

// logdet, phi, U, W, E and rowterm of two runs, bit for bit.
void check_same_bits_but_g(const Outputs& a, const Outputs& b) {
  CHECK(bit_identical(a.logdet, b.logdet));
  CHECK(bit_identical(a.phi, b.phi));
  CHECK(bit_identical(a.U, b.U));
  CHECK(bit_identical(a.W, b.W));
  CHECK(bit_identical(a.E, b.E));
  CHECK(bit_identical(a.rowterm, b.rowterm));
}

void run_linalg_cases(int D, uint64_t seed) {
  const Batch b = make_batch(D, seed);
  std::vector<RowRef> refs;
  for (int rr = 0; rr < b.nrows(); ++rr) refs.push_back(reference(b, rr));
  for (int rr = 0; rr < b.nrows(); ++rr)  // the families are what they claim
    if (!b.padded(rr)) {
      INFO("D " << D << " row " << rr << " " << family_spec(b.family[rr]).name);
      CHECK((refs[rr].sign == 0) == (b.family[rr] == Family::kSingular));
      if (b.family[rr] == Family::kNegative) CHECK(refs[rr].sign < 0);
      if (b.family[rr] == Family::kBig) CHECK(refs[rr].logabs > 40);
      if (b.family[rr] == Family::kSmall) CHECK(refs[rr].coef < 0.5);
    }
  const Outputs fwd = run_forward(b);
  double worst = 0;
  check_logdet_phi(b, refs, fwd, "forward", &worst);
  check_gradient(b, refs, fwd, "forward");
  std::printf("barrier-linalg D %d forward: max |d logdet| (kappa <= 5) %.2e\n", D, worst);
  const Outputs fwd2 = run_forward(b);  // determinism: the same bits
  check_same_bits_but_g(fwd, fwd2);
  CHECK(bit_identical(fwd.G, fwd2.G));
  // The default Gauss-Jordan tries the diagonal first (D 64, two steps per sweep): the float64
  // bounds above hold for it; the matrices it hands to the search (the row-permuted family,
  // among others) must be those of the pivot search at every step bit for bit; and D 32, which
  // always searches, is that kernel bit for bit.
  int diagonal = 0, counted = 0;
  for (int rr = 0; rr < b.nrows(); ++rr)
    if (!b.padded(rr)) ++counted, diagonal += keeps_diagonal(b, rr) ? 1 : 0;
  INFO("D " << D << ": " << diagonal << " of " << counted << " matrices keep the diagonal");
  CHECK(diagonal > 0);
  CHECK(diagonal < counted);
  const Outputs searched = run_forward(b, cuda::GFormat::fp32, cuda::Pivots::search);
  if (D == 32) {
    check_same_bits_but_g(fwd, searched);
    CHECK(bit_identical(fwd.G, searched.G));
  } else {
    double worst_searched = 0;
    check_logdet_phi(b, refs, searched, "forward, search", &worst_searched);
    check_gradient(b, refs, searched, "forward, search");
    const auto same = [](const std::vector<float>& x, const std::vector<float>& y, size_t at,
                         size_t n) {
      return std::memcmp(x.data() + at, y.data() + at, n * sizeof(float)) == 0;
    };
    int handed = 0, differ = 0;
    for (int rr = 0; rr < b.nrows(); ++rr) {
      if (b.padded(rr) || keeps_diagonal(b, rr)) continue;
      const size_t r = static_cast<size_t>(rr);
      ++handed;
      differ += !(same(fwd.G, searched.G, r * D * D, static_cast<size_t>(D) * D) &&
                  same(fwd.U, searched.U, r * D, D) && same(fwd.W, searched.W, r * D, D) &&
                  same(fwd.E, searched.E, r, 1) && same(fwd.rowterm, searched.rowterm, r, 1));
    }
    CHECK(handed > 0);
    CHECK(differ == 0);
    std::printf("barrier-linalg D %d forward, search at every step: max |d logdet| (kappa <= 5) "
                "%.2e\n", D, worst_searched);
  }
  // GFormat::bf16 (the flash backward's bf16 products): G as bf16 in the first half of each
  // slot, round to nearest even of the fp32 G bit for bit; everything else the same bits.
  const Outputs g16 = run_forward(b, cuda::GFormat::bf16);
  check_same_bits_but_g(fwd, g16);
  size_t g16_wrong = 0;
  for (int rr = 0; rr < b.nrows(); ++rr) {
    const size_t base = static_cast<size_t>(rr) * D * D;
    const uint16_t* half = reinterpret_cast<const uint16_t*>(g16.G.data() + base);
    for (int e = 0; e < D * D; ++e) g16_wrong += half[e] != bf16_bits(fwd.G[base + e]);
  }
  CHECK(g16_wrong == 0);
  const Outputs det = run_det(b, false);
  worst = 0;
  check_logdet_phi(b, refs, det, "det", &worst);
  std::printf("barrier-linalg D %d det: max |d logdet| (kappa <= 5) %.2e\n", D, worst);
  const Outputs det2 = run_det(b, true);  // the forward without training: the same kernel
  CHECK(bit_identical(det.logdet, det2.logdet));
  CHECK(bit_identical(det.phi, det2.phi));
  // The det's LU tries the diagonal first as well (D 64, two steps per sweep): the search at every
  // step is within the same bounds, and bit for bit the default on the matrices the default
  // hands to the search (D 32, which always searches: everywhere).
  const Outputs det_searched = run_det(b, false, cuda::Pivots::search);
  double worst_det_searched = 0;
  check_logdet_phi(b, refs, det_searched, "det, search", &worst_det_searched);
  CHECK(bit_identical(det_searched.logdet, run_det(b, true, cuda::Pivots::search).logdet));
  int det_handed = 0, det_differ = 0, det_accepted_differ = 0;
  for (int rr = 0; rr < b.nrows(); ++rr) {
    if (b.padded(rr)) continue;
    const int bh = rr / b.K, t = b.rows[(bh / b.H) * b.K + rr % b.K];
    const size_t pos = static_cast<size_t>(bh) * b.T + t;
    const bool same =
        std::memcmp(&det.logdet[pos], &det_searched.logdet[pos], sizeof(float)) == 0 &&
        std::memcmp(&det.phi[pos], &det_searched.phi[pos], sizeof(float)) == 0;
    if (D == 32 || !keeps_diagonal(b, rr)) {
      ++det_handed;
      det_differ += same ? 0 : 1;
    } else {
      det_accepted_differ += same ? 0 : 1;
    }
  }
  CHECK(det_handed > 0);
  CHECK(det_differ == 0);
  // (D 64: the accepted matrices' log det comes from the pairs' rank-2 updates, the search's from
  // rank-1 updates: usually a few ulps apart.)
  std::printf("barrier-linalg D %d det, search at every step: max |d logdet| (kappa <= 5) %.2e; "
              "%d of the diagonal path's log dets differ from the search's in the last bits\n",
              D, worst_det_searched, det_accepted_differ);
}

}  // namespace

TEST_CASE("barrier linalg: det and training forward match a float64 LU", "[gpu][barrier-linalg]") {
  run_linalg_cases(32, 5100);
  run_linalg_cases(64, 5200);
  CHECK_THROWS_AS(cuda::barrier_linalg_det(nullptr, nullptr, nullptr, nullptr, 1, 1, 4, 2, 48,
                                           0.1f, 1e-2, nullptr, nullptr, 0),
                  blm::Error);
  CHECK_THROWS_AS(cuda::barrier_linalg_forward(nullptr, nullptr, nullptr, nullptr, 1, 1, 4, 2, 48,
                                               0.1f, 1e-2, 1.0f, true, nullptr, nullptr, nullptr,
                                               nullptr, nullptr, nullptr, 0),
                  blm::Error);
}

// ---- [.bench][barrier-linalg] ------------------------------------------------------------------

namespace {

// Times both launchers on n = BH * K well-conditioned random matrices (exact positions: K slots
// t = 2 .. K + 1 of T = K + 2).  S is a block of 256 distinct random matrices repeated; the
// training forward writes G over S, so later calls see S' = G (scale 1e-3: J' stays near
// I + c Qb Kb^T, well conditioned); the work does not depend on the values.
void bench_linalg(const char* label, int B, int H, int K, int D) {
  const int BH = B * H, T = K + 2;
  const int64_t n = static_cast<int64_t>(BH) * K, DD = D * D;
  const int kBase = 256;
  std::vector<float> base(static_cast<size_t>(kBase) * DD);
  const float c = 1.0f / std::sqrt(static_cast<float>(D));
  for (int m = 0; m < kBase; ++m)
    for (int i = 0; i < DD; ++i)  // J = I - c S + c qb kb^T, S ~ 0.3 N(0,1) / (c sqrt D)
      base[static_cast<size_t>(m) * DD + i] =
          static_cast<float>(0.3 * normal01(9000 + m, i) / (c * std::sqrt(double(D))));
  DeviceArray<float> S(static_cast<size_t>(n) * DD);
  for (int64_t m0 = 0; m0 < n; m0 += kBase) {
    const int64_t cnt = std::min<int64_t>(kBase, n - m0);
    CUDA_CHECK(cudaMemcpy(S.get() + m0 * DD, base.data(), cnt * DD * sizeof(float),
                          cudaMemcpyHostToDevice));
  }
  DeviceArray<float> Qb(randn(static_cast<size_t>(n) * D, 31, 0.3)),
      Kb(randn(static_cast<size_t>(n) * D, 32, 0.3));
  std::vector<int32_t> rows_h(static_cast<size_t>(B) * K);
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < K; ++k) rows_h[static_cast<size_t>(b) * K + k] = k + 2;
  DeviceArray<int32_t> rows(rows_h);
  DeviceArray<float> logdet(static_cast<size_t>(BH) * T), phi(static_cast<size_t>(BH) * T);
  DeviceArray<float> U(static_cast<size_t>(n) * D), W(static_cast<size_t>(n) * D), E(n), rt(n);
  const double eps = 1e-2;
  const double det = median_ms([&] {
    cuda::barrier_linalg_det(S.get(), Qb.get(), Kb.get(), rows.get(), BH, H, T, K, D, c, eps,
                             logdet.get(), phi.get(), 0);
  });
  const double det_search = median_ms([&] {
    cuda::barrier_linalg_det(S.get(), Qb.get(), Kb.get(), rows.get(), BH, H, T, K, D, c, eps,
                             logdet.get(), phi.get(), 0, cuda::Pivots::search);
  });
  const double fwd = median_ms([&] {
    cuda::barrier_linalg_forward(S.get(), Qb.get(), Kb.get(), rows.get(), BH, H, T, K, D, c, eps,
                                 1e-3f, true, logdet.get(), phi.get(), U.get(), W.get(), E.get(),
                                 rt.get(), 0);
  });
  const double gflop = 2.0 * n * DD * D / 1e9, gb = 2.0 * n * DD * 4 / 1e9;
  std::printf("barrier-linalg bench %s: %lld matrices D %d: det %.3f ms (searching at every step "
              "%.3f); forward (inverse, G, U, W, E, rowterm) %.3f ms (%.1f TFLOP/s at 2 D^3, "
              "%.0f GB/s of S + G)\n",
              label, static_cast<long long>(n), D, det, det_search, fwd, gflop / fwd,
              gb / (fwd * 1e-3));
}

}  // namespace

TEST_CASE("barrier linalg: time det and training forward", "[.bench][barrier-linalg]") {
  bench_linalg("(b) B64 H6 K254", 64, 6, 254, 64);
  bench_linalg("(a) B16 H12 K64", 16, 12, 64, 64);
  bench_linalg("(b) count, D 32", 64, 6, 254, 32);
}
