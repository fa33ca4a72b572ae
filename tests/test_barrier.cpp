// Tests of core/barrier.cpp against barrier-spec.md sections 2-5:
//  - det J_t equals the determinant of the generator's diagonal Jacobian block d eps_t / d y_t
//    taken by finite differences in the full d-dimensional input space (Sylvester's identity);
//  - the backward equals fp64 central finite differences of sum_phi in every q and k element;
//  - the quadratic branch of phi near/over the degeneracy boundary (value and gradient);
//  - phi's C^2 continuity, the dense helpers (sigma_min, log|det|) on matrices with known answers;
//  - float32 against float64 at the quickstart shape, and the speed of that shape;
//  - a mask (the sampled estimator) gives the unmasked computation restricted to its positions.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <limits>
#include <random>
#include <vector>

#include "core/barrier.h"
#include "core/barrier_fused.h"
#include "tests/catch.h"

namespace {

using Vec = std::vector<double>;

Vec randn(size_t n, std::mt19937_64& rng, double sd = 1.0, double mean = 0.0) {
  std::normal_distribution<double> nd(mean, sd);
  Vec v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// Determinant by plain Gaussian elimination with partial pivoting: the tests' own, independent
// of the library's log_abs_det.
double det_ge(Vec a, int n) {
  double det = 1;
  for (int c = 0; c < n; ++c) {
    int p = c;
    for (int r = c + 1; r < n; ++r)
      if (std::fabs(a[r * n + c]) > std::fabs(a[p * n + c])) p = r;
    if (a[p * n + c] == 0) return 0;
    if (p != c) {
      for (int j = 0; j < n; ++j) std::swap(a[c * n + j], a[p * n + j]);
      det = -det;
    }
    det *= a[c * n + c];
    for (int r = c + 1; r < n; ++r) {
      const double f = a[r * n + c] / a[c * n + c];
      for (int j = c; j < n; ++j) a[r * n + j] -= f * a[c * n + j];
    }
  }
  return det;
}

// Literal per-position C_t of spec section 2 in the centred form: the test's own reference.
// q, k: [T, dh].  Returns J_t = I - C_t (dh x dh).
Vec literal_jacobian(const Vec& q, const Vec& k, int T, int dh, int t) {
  const double isq = 1 / std::sqrt(double(dh));
  Vec z(t), pi(t);
  double m = -1e300;
  for (int s = 0; s < t; ++s) {
    z[s] = 0;
    for (int a = 0; a < dh; ++a) z[s] += q[t * dh + a] * k[s * dh + a] * isq;
    m = std::max(m, z[s]);
  }
  double l = 0;
  for (int s = 0; s < t; ++s) l += (pi[s] = std::exp(z[s] - m));
  for (int s = 0; s < t; ++s) pi[s] /= l;
  Vec qb(dh, 0.0), kb(dh, 0.0);
  for (int s = 0; s < t; ++s)
    for (int a = 0; a < dh; ++a) qb[a] += pi[s] * q[s * dh + a], kb[a] += pi[s] * k[s * dh + a];
  Vec J(dh * dh, 0.0);
  for (int a = 0; a < dh; ++a) J[a * dh + a] = 1;
  for (int s = 0; s < t; ++s)
    for (int a = 0; a < dh; ++a)
      for (int b = 0; b < dh; ++b)
        J[a * dh + b] -= isq * pi[s] * (q[s * dh + a] - qb[a]) * (k[s * dh + b] - kb[b]);
  return J;
}

double literal_det(const Vec& q, const Vec& k, int T, int dh, int t) {
  if (t < 2) return 1;
  return det_ge(literal_jacobian(q, k, T, dh, t), dh);
}

double sum_phi(const Vec& q, const Vec& k, int T, int dh, double eps, const uint8_t* mask) {
  return blm::barrier_head_forward<double>(q.data(), k.data(), T, dh, eps, mask, nullptr, nullptr)
      .sum_phi;
}

// Max over elements of |fd - an| / max(|fd|, |an|, floor); floor = 1e-3 * max |an| keeps
// elements that are zero up to rounding from dominating.
double max_rel_err(const Vec& fd, const Vec& an) {
  double mx = 0;
  for (double x : an) mx = std::max(mx, std::fabs(x));
  const double floor = 1e-3 * mx + 1e-300;
  double err = 0;
  for (size_t i = 0; i < fd.size(); ++i)
    err = std::max(err, std::fabs(fd[i] - an[i]) /
                            std::max({std::fabs(fd[i]), std::fabs(an[i]), floor}));
  return err;
}

// Analytic gradient of scale * sum_phi (the backward adds into random initial dq, dk; the test
// subtracts them back out, which checks "adds") and central differences of sum_phi.
struct GradCheck {
  double err_q, err_k, max_grad;
};
GradCheck check_gradient(const Vec& q0, const Vec& k0, int T, int dh, double eps,
                         const uint8_t* mask, double h, std::mt19937_64& rng) {
  const double scale = 0.7;
  Vec dq0 = randn(q0.size(), rng), dk0 = randn(k0.size(), rng);
  Vec dq = dq0, dk = dk0;
  blm::barrier_head_backward<double>(q0.data(), k0.data(), T, dh, eps, mask, scale, dq.data(),
                                     dk.data());
  Vec an_q(q0.size()), an_k(k0.size()), fd_q(q0.size()), fd_k(k0.size());
  for (size_t i = 0; i < q0.size(); ++i) an_q[i] = (dq[i] - dq0[i]) / scale;
  for (size_t i = 0; i < k0.size(); ++i) an_k[i] = (dk[i] - dk0[i]) / scale;
  // Five-point central stencil: O(h^4) truncation, so a step large enough to keep rounding
  // small is still accurate where phi's curvature is 1/eps^2.
  Vec q = q0, k = k0;
  auto stencil = [&](double& x, double x0) {
    double f[4];
    const double off[4] = {2 * h, h, -h, -2 * h};
    for (int j = 0; j < 4; ++j) {
      x = x0 + off[j];
      f[j] = sum_phi(q, k, T, dh, eps, mask);
    }
    x = x0;
    return (-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * h);
  };
  for (size_t i = 0; i < q.size(); ++i) fd_q[i] = stencil(q[i], q0[i]);
  for (size_t i = 0; i < k.size(); ++i) fd_k[i] = stencil(k[i], k0[i]);
  double mg = 0;
  for (double x : an_q) mg = std::max(mg, std::fabs(x));
  for (double x : an_k) mg = std::max(mg, std::fabs(x));
  return {max_rel_err(fd_q, an_q), max_rel_err(fd_k, an_k), mg};
}

}  // namespace

// ---------------------------------------------------------------- phi

TEST_CASE("phi is C^2 at eps, finite everywhere, and pushes delta up", "[barrier]") {
  for (double eps : {1e-4, 1e-2, 0.5}) {
    // Value and first two derivatives agree from both sides of eps.
    const double a = eps * (1 - 1e-10), b = eps * (1 + 1e-10);
    CHECK(blm::barrier_phi(a, eps) == Approx(blm::barrier_phi(b, eps)).epsilon(1e-9));
    CHECK(blm::barrier_phi(eps, eps) == Approx(-std::log(eps)).epsilon(1e-14));
    CHECK(blm::barrier_phi_prime(a, eps) == Approx(blm::barrier_phi_prime(b, eps)).epsilon(1e-9));
    CHECK(blm::barrier_phi_prime(eps, eps) == Approx(-1 / eps).epsilon(1e-14));
    const double h = eps * 1e-6;
    const double left2 =
        (blm::barrier_phi_prime(eps - h, eps) - blm::barrier_phi_prime(eps - 2 * h, eps)) / h;
    const double right2 =
        (blm::barrier_phi_prime(eps + 2 * h, eps) - blm::barrier_phi_prime(eps + h, eps)) / h;
    CHECK(left2 == Approx(1 / (eps * eps)).epsilon(1e-5));
    CHECK(right2 == Approx(1 / (eps * eps)).epsilon(1e-5));
    // phi' is the derivative of phi on both branches (central differences).
    for (double x : {-3.0, -eps, 0.0, 0.3 * eps, 0.9 * eps, 1.5 * eps, 10 * eps, 2.0, 7.5}) {
      const double hx = 1e-6 * std::max(eps, std::fabs(x));
      const double fd = (blm::barrier_phi(x + hx, eps) - blm::barrier_phi(x - hx, eps)) / (2 * hx);
      CHECK(fd == Approx(blm::barrier_phi_prime(x, eps)).epsilon(1e-6));
      // Finite everywhere, and its gradient points into the admissible region (phi' < 0).
      CHECK(std::isfinite(blm::barrier_phi(x, eps)));
      CHECK(blm::barrier_phi_prime(x, eps) < 0);
    }
    // The quadratic branch literally: -log eps - (x - eps)/eps + (x - eps)^2 / (2 eps^2).
    const double x = -0.7 * eps;
    CHECK(blm::barrier_phi(x, eps) ==
          Approx(-std::log(eps) + 1.7 + 0.5 * 1.7 * 1.7).epsilon(1e-13));
    CHECK(blm::barrier_phi(-1e6, eps) > blm::barrier_phi(0.0, eps));
  }
}

// ---------------------------------------------------------------- dense helpers

namespace {
// Row-major n x n product.
Vec matmul(const Vec& a, const Vec& b, int n) {
  Vec c(n * n, 0.0);
  for (int i = 0; i < n; ++i)
    for (int l = 0; l < n; ++l)
      for (int j = 0; j < n; ++j) c[i * n + j] += a[i * n + l] * b[l * n + j];
  return c;
}
// A random rotation (det +1) as a product of Givens rotations with random angles.
Vec random_rotation(int n, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> ang(0, 2 * std::acos(-1.0));
  Vec r(n * n, 0.0);
  for (int i = 0; i < n; ++i) r[i * n + i] = 1;
  for (int rep = 0; rep < 3; ++rep)
    for (int i = 0; i < n; ++i)
      for (int j = i + 1; j < n; ++j) {
        Vec g(n * n, 0.0);
        for (int l = 0; l < n; ++l) g[l * n + l] = 1;
        const double th = ang(rng);
        g[i * n + i] = std::cos(th), g[j * n + j] = std::cos(th);
        g[i * n + j] = -std::sin(th), g[j * n + i] = std::sin(th);
        r = matmul(r, g, n);
      }
  return r;
}
}  // namespace

TEST_CASE("sigma_min and log|det| on matrices with known answers", "[barrier]") {
  std::mt19937_64 rng(11);
  double la = 0;
  // The margins' sigma_min: the eigenvalues of J^T J, or Jacobi on J close to singular.
  auto margin_sigma = [](const Vec& a, int n) {
    Vec g(static_cast<size_t>(n) * n), v(n), p(n);
    return blm::margin_sigma_min(a.data(), n, g.data(), v.data(), p.data());
  };
  SECTION("diagonal") {
    const Vec d = {3, 0, 0, 0, /**/ 0, -0.5, 0, 0, /**/ 0, 0, 2, 0, /**/ 0, 0, 0, 0.1};
    CHECK(blm::smallest_singular_value(d.data(), 4) == Approx(0.1).epsilon(1e-14));
    CHECK(blm::log_abs_det(d.data(), 4, &la) == -1);
    CHECK(la == Approx(std::log(0.3)).epsilon(1e-14));
  }
  SECTION("rotation") {
    for (int n : {2, 5, 9}) {
      const Vec r = random_rotation(n, rng);
      CHECK(blm::smallest_singular_value(r.data(), n) == Approx(1).epsilon(1e-12));
      CHECK(blm::log_abs_det(r.data(), n, &la) == 1);
      CHECK(std::fabs(la) < 1e-12);
    }
  }
  SECTION("U diag(s) V^T with known singular values, also ill-conditioned") {
    for (int n : {3, 8, 32}) {
      for (double smallest : {0.37, 1e-9}) {
        std::uniform_real_distribution<double> u(0.5, 3.0);
        Vec s(n);
        for (auto& x : s) x = u(rng);
        s[n / 2] = smallest;
        Vec U = random_rotation(n, rng), V = random_rotation(n, rng);
        Vec SVt(n * n);
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < n; ++j) SVt[i * n + j] = s[i] * V[j * n + i];
        Vec a = matmul(U, SVt, n);
        // Swap two rows: det flips sign, singular values do not change.
        for (int j = 0; j < n; ++j) std::swap(a[0 * n + j], a[1 * n + j]);
        double want_la = 0;
        for (double x : s) want_la += std::log(x);
        // Building a rounds its entries (~1e-16 absolute), which moves a singular value of 1e-9
        // by ~1e-7 relative: the tolerances for that case allow for it.
        const double rel = smallest < 1e-6 ? 1e-5 : 1e-12;
        CHECK(blm::smallest_singular_value(a.data(), n) == Approx(smallest).epsilon(rel));
        // The eigenvalue route is good to ~1e-8 relative where it is taken (sigma_min >= 1e-4
        // |J|_F); at 1e-9 the margins take Jacobi on J: the same value as above.
        if (smallest < 1e-6)
          CHECK(margin_sigma(a, n) == blm::smallest_singular_value(a.data(), n));
        else
          CHECK(margin_sigma(a, n) == Approx(smallest).epsilon(1e-8));
        CHECK(blm::log_abs_det(a.data(), n, &la) == -1);
        CHECK(la == Approx(want_la).epsilon(0).margin(rel));
      }
    }
  }
  SECTION("exactly singular") {
    Vec a = randn(16, rng);
    for (int j = 0; j < 4; ++j) a[3 * 4 + j] = 0;  // a zero row
    CHECK(blm::smallest_singular_value(a.data(), 4) < 1e-14);
    CHECK(margin_sigma(a, 4) < 1e-14);
    CHECK(blm::log_abs_det(a.data(), 4, &la) == 0);
    CHECK(la == -std::numeric_limits<double>::infinity());
  }
}

// ---------------------------------------------------------------- det J_t vs the generator

namespace {
// eps_t(y) = y_t - sum_{s<t} pi_ts(y) y_s of spec section 2, for one position t.
// y: [T, d]; Wq, Wk: [dh, d]; q_t = Wq y_t + bq, k_s = Wk y_s + bk.
Vec generator_residual(const Vec& y, int T, int d, int dh, const Vec& Wq, const Vec& bq,
                       const Vec& Wk, const Vec& bk, int t) {
  const double isq = 1 / std::sqrt(double(dh));
  Vec qt(dh);
  for (int a = 0; a < dh; ++a) {
    qt[a] = bq[a];
    for (int c = 0; c < d; ++c) qt[a] += Wq[a * d + c] * y[t * d + c];
  }
  Vec z(t);
  double m = -1e300;
  for (int s = 0; s < t; ++s) {
    double zs = 0;
    for (int a = 0; a < dh; ++a) {
      double ks = bk[a];
      for (int c = 0; c < d; ++c) ks += Wk[a * d + c] * y[s * d + c];
      zs += qt[a] * ks * isq;
    }
    z[s] = zs, m = std::max(m, zs);
  }
  double l = 0;
  for (int s = 0; s < t; ++s) l += std::exp(z[s] - m);
  Vec e(y.begin() + t * d, y.begin() + (t + 1) * d);
  for (int s = 0; s < t; ++s)
    for (int c = 0; c < d; ++c) e[c] -= std::exp(z[s] - m) / l * y[s * d + c];
  return e;
}
}  // namespace

TEST_CASE("det J_t equals det of the generator's diagonal Jacobian block", "[barrier]") {
  std::mt19937_64 rng(2024);
  struct Shape { int T, d, dh; double wsd; };
  for (Shape sh : {Shape{6, 7, 3, 0.45}, Shape{9, 10, 4, 0.4}, Shape{20, 12, 5, 0.35}}) {
    for (int rep = 0; rep < 2; ++rep) {
      const int T = sh.T, d = sh.d, dh = sh.dh;
      Vec y = randn(T * d, rng), Wq = randn(dh * d, rng, sh.wsd), Wk = randn(dh * d, rng, sh.wsd);
      Vec bq = randn(dh, rng, 0.3), bk = randn(dh, rng, 0.3);
      Vec q(T * dh), k(T * dh);
      for (int t = 0; t < T; ++t)
        for (int a = 0; a < dh; ++a) {
          q[t * dh + a] = bq[a], k[t * dh + a] = bk[a];
          for (int c = 0; c < d; ++c)
            q[t * dh + a] += Wq[a * d + c] * y[t * d + c], k[t * dh + a] += Wk[a * d + c] * y[t * d + c];
        }
      Vec logdet(T), margin(T);
      blm::barrier_head_forward<double>(q.data(), k.data(), T, dh, 1e-4, nullptr, logdet.data(),
                                        margin.data());
      CHECK(logdet[0] == 0);
      CHECK(logdet[1] == 0);
      CHECK(margin[0] == 1);
      CHECK(margin[1] == 1);
      double min_det = 1e300, max_det = -1e300;
      for (int t = 2; t < T; ++t) {
        // d eps_t / d y_t by central differences, column c = derivative in y_t[c].
        const double h = 1e-5;
        Vec jac(d * d);
        for (int c = 0; c < d; ++c) {
          Vec yp = y, ym = y;
          yp[t * d + c] += h, ym[t * d + c] -= h;
          const Vec ep = generator_residual(yp, T, d, dh, Wq, bq, Wk, bk, t);
          const Vec em = generator_residual(ym, T, d, dh, Wq, bq, Wk, bk, t);
          for (int r = 0; r < d; ++r) jac[r * d + c] = (ep[r] - em[r]) / (2 * h);
        }
        const double det_fd = det_ge(jac, d);
        min_det = std::min(min_det, det_fd), max_det = std::max(max_det, det_fd);
        INFO("T=" << T << " d=" << d << " dh=" << dh << " t=" << t << " det_fd=" << det_fd);
        if (det_fd > 0) {
          CHECK(std::fabs(std::exp(logdet[t]) - det_fd) <= 1e-7 * std::fabs(det_fd));
        } else {
          CHECK(logdet[t] == -std::numeric_limits<double>::infinity());
        }
        // sigma_min(J_t) against the test's own J_t: it is a singular value, so it is at most
        // the smallest column norm and at least |det| / prod of the other column norms' bound.
        const Vec J = literal_jacobian(q, k, T, dh, t);
        double min_col = 1e300;
        for (int b = 0; b < dh; ++b) {
          double nn = 0;
          for (int a = 0; a < dh; ++a) nn += J[a * dh + b] * J[a * dh + b];
          min_col = std::min(min_col, std::sqrt(nn));
        }
        CHECK(margin[t] <= min_col * (1 + 1e-12));
        CHECK(margin[t] > 0);
      }
      // The inputs must actually exercise the map: dets away from 1 (strong coupling).
      INFO("det range " << min_det << " .. " << max_det);
      CHECK(std::max(std::fabs(min_det - 1), std::fabs(max_det - 1)) > 0.05);
    }
  }
}

// ---------------------------------------------------------------- gradients

TEST_CASE("backward equals finite differences of sum_phi (fp64)", "[barrier]") {
  std::mt19937_64 rng(7);
  for (int dh : {4, 8}) {
    for (int T : {3, 7, 12, 37}) {  // 37 spans several of the GEMMs' row blocks
      for (bool use_mask : {false, true}) {
        const double sd = 0.9;
        Vec q = randn(T * dh, rng, sd, 0.2), k = randn(T * dh, rng, sd, -0.1);
        std::vector<uint8_t> mask(T, 1);
        if (use_mask) {
          std::bernoulli_distribution keep(0.6);
          for (auto& m : mask) m = keep(rng);
          mask[T - 1] = 1;  // at least one counted position
          if (T > 3) mask[2] = 0;
        }
        const uint8_t* mp = use_mask ? mask.data() : nullptr;
        const GradCheck g = check_gradient(q, k, T, dh, 1e-4, mp, 1e-5, rng);
        INFO("dh=" << dh << " T=" << T << " mask=" << use_mask << " err_q=" << g.err_q
                   << " err_k=" << g.err_k << " max|grad|=" << g.max_grad);
        CHECK(g.max_grad > 1e-3);  // the check is not vacuous
        CHECK(g.err_q <= 1e-6);
        CHECK(g.err_k <= 1e-6);
      }
    }
  }
}

TEST_CASE("forward value and count against the literal per-position reference", "[barrier]") {
  std::mt19937_64 rng(99);
  for (int T : {1, 2, 3, 17, 50}) {
    const int dh = 6;
    Vec q = randn(T * dh, rng, 1.0, 0.5), k = randn(T * dh, rng, 1.0, 0.3);
    std::vector<uint8_t> mask(T);
    for (int t = 0; t < T; ++t) mask[t] = (t % 3) != 1;
    for (const uint8_t* mp : {static_cast<const uint8_t*>(nullptr), (const uint8_t*)mask.data()}) {
      Vec logdet(T), margin(T);
      const auto out = blm::barrier_head_forward<double>(q.data(), k.data(), T, dh, 1e-4, mp,
                                                         logdet.data(), margin.data());
      double want = 0, min_ld = std::numeric_limits<double>::infinity();
      int count = 0;
      for (int t = 2; t < T; ++t) {
        const double det = literal_det(q, k, T, dh, t);
        const double ld = det > 0 ? std::log(det) : -std::numeric_limits<double>::infinity();
        // Per-position outputs are filled for every position, counted or not.
        if (det > 0)
          CHECK(logdet[t] == Approx(ld).epsilon(1e-10).margin(1e-12));
        else
          CHECK(logdet[t] == ld);
        // The margin (an eigenvalue route for well-conditioned J_t) against one-sided Jacobi.
        const Vec J = literal_jacobian(q, k, T, dh, t);
        CHECK(margin[t] == Approx(blm::smallest_singular_value(J.data(), dh)).epsilon(1e-8));
        if (mp && !mp[t]) continue;
        want += blm::barrier_phi(det, 1e-4), ++count;
        min_ld = std::min(min_ld, ld);
      }
      CHECK(out.count == count);
      CHECK(out.sum_phi == Approx(want).epsilon(1e-10).margin(1e-12));
      if (count > 0) CHECK(out.min_logdet == Approx(min_ld).epsilon(1e-10));
    }
  }
}

// ---------------------------------------------------------------- near the boundary

namespace {
// Smallest det over counted positions for inputs (alpha q, alpha k).
double min_det_scaled(const Vec& q, const Vec& k, int T, int dh, double alpha) {
  Vec qa = q, ka = k;
  for (auto& x : qa) x *= alpha;
  for (auto& x : ka) x *= alpha;
  double m = 1e300;
  for (int t = 2; t < T; ++t) m = std::min(m, literal_det(qa, ka, T, dh, t));
  return m;
}
}  // namespace

TEST_CASE("quadratic branch of phi at and beyond the degeneracy boundary", "[barrier]") {
  // q and k aligned (k = q + small noise): C_t is then close to a positive semidefinite
  // covariance / sqrt(dh), and scaling q, k up drives its largest eigenvalue through 1.  The
  // scale is bisected until the smallest det J_t lies in a chosen target below eps.
  std::mt19937_64 rng(5);
  const int T = 9, dh = 4;
  for (double eps : {1e-4, 1e-2}) {
    for (double target : {0.3 * eps, -0.5 * eps}) {
      Vec q = randn(T * dh, rng, 1.0), k = q;
      Vec noise = randn(T * dh, rng, 0.1);
      for (size_t i = 0; i < k.size(); ++i) k[i] += noise[i];
      double lo = 0, hi = 1;
      while (min_det_scaled(q, k, T, dh, hi) > target) hi *= 1.5;
      REQUIRE(hi < 1e3);
      for (int it = 0; it < 200 && min_det_scaled(q, k, T, dh, lo) - target > 0.1 * std::fabs(target);
           ++it) {
        const double mid = 0.5 * (lo + hi);
        (min_det_scaled(q, k, T, dh, mid) > target ? lo : hi) = mid;
      }
      for (auto& x : q) x *= lo;
      for (auto& x : k) x *= lo;

      // The quadratic branch is taken at some position: det < eps there.
      Vec logdet(T), margin(T);
      const auto out = blm::barrier_head_forward<double>(q.data(), k.data(), T, dh, eps, nullptr,
                                                         logdet.data(), margin.data());
      double want = 0, min_det = 1e300;
      int in_quadratic = 0;
      for (int t = 2; t < T; ++t) {
        const double det = literal_det(q, k, T, dh, t);
        min_det = std::min(min_det, det);
        // Margins near the boundary (sigma_min small: the Jacobi fallback) and away from it.
        const Vec J = literal_jacobian(q, k, T, dh, t);
        CHECK(margin[t] == Approx(blm::smallest_singular_value(J.data(), dh)).epsilon(1e-8));
        if (det < eps) {
          ++in_quadratic;
          CHECK(logdet[t] < std::log(eps));
          // phi literally, from the reference det: -log eps - (x-eps)/eps + (x-eps)^2/(2eps^2)
          const double x = det - eps;
          want += -std::log(eps) - x / eps + x * x / (2 * eps * eps);
        } else {
          want += -std::log(det);
        }
      }
      INFO("eps=" << eps << " target=" << target << " min det=" << min_det);
      REQUIRE(in_quadratic > 0);
      CHECK(out.sum_phi == Approx(want).epsilon(1e-8));

      // Gradient against finite differences (h = 1e-5 keeps every step inside the quadratic branch).
      const GradCheck g = check_gradient(q, k, T, dh, eps, nullptr, 1e-5, rng);
      INFO("err_q=" << g.err_q << " err_k=" << g.err_k << " max|grad|=" << g.max_grad);
      CHECK(g.err_q <= 1e-6);
      CHECK(g.err_k <= 1e-6);

      // A small step against the gradient raises the smallest determinant: phi pushes back
      // into the admissible region.
      Vec dq(T * dh, 0.0), dk(T * dh, 0.0);
      blm::barrier_head_backward<double>(q.data(), k.data(), T, dh, eps, nullptr, 1.0, dq.data(),
                                         dk.data());
      const double step = 1e-3 * eps / g.max_grad;
      for (size_t i = 0; i < q.size(); ++i) q[i] -= step * dq[i], k[i] -= step * dk[i];
      CHECK(min_det_scaled(q, k, T, dh, 1.0) > min_det);
    }
  }
}

// ---------------------------------------------------------------- float vs double, speed

TEST_CASE("float32 matches float64 at the quickstart shape (T=128, dh=32)", "[barrier]") {
  // Realistic inputs: attention logits O(1) plus a common offset shared by every token (as
  // biases give), which is what would cancel in S_t - qbar_t kbar_t^T.
  std::mt19937_64 rng(31);
  const int T = 128, dh = 32;
  const double sd = 0.45;
  Vec q = randn(T * dh, rng, sd), k = randn(T * dh, rng, sd);
  Vec oq = randn(dh, rng, 1.0), ok = randn(dh, rng, 1.0);
  // Correlate k with q so C_t is far from 0 (dets well away from 1).
  for (int t = 0; t < T; ++t)
    for (int a = 0; a < dh; ++a) k[t * dh + a] += 0.8 * q[t * dh + a];
  for (int t = 0; t < T; ++t)
    for (int a = 0; a < dh; ++a) q[t * dh + a] += oq[a], k[t * dh + a] += ok[a];
  std::vector<float> qf(q.begin(), q.end()), kf(k.begin(), k.end());
  // Round-trip so both precisions see identical inputs.
  for (size_t i = 0; i < q.size(); ++i) q[i] = qf[i], k[i] = kf[i];

  Vec ld(T), mg(T);
  std::vector<float> ldf(T), mgf(T);
  const auto od = blm::barrier_head_forward<double>(q.data(), k.data(), T, dh, 1e-4, nullptr,
                                                    ld.data(), mg.data());
  const auto of = blm::barrier_head_forward<float>(qf.data(), kf.data(), T, dh, 1e-4, nullptr,
                                                   ldf.data(), mgf.data());
  double ld_err = 0, mg_err = 0, ld_min = 1e300, ld_max = -1e300;
  for (int t = 0; t < T; ++t) {
    ld_err = std::max(ld_err, std::fabs(ld[t] - ldf[t]));
    mg_err = std::max(mg_err, std::fabs(mg[t] - mgf[t]) / mg[t]);
    ld_min = std::min(ld_min, ld[t]), ld_max = std::max(ld_max, ld[t]);
  }
  Vec dq(T * dh, 0.0), dk(T * dh, 0.0);
  std::vector<float> dqf(T * dh, 0.f), dkf(T * dh, 0.f);
  blm::barrier_head_backward<double>(q.data(), k.data(), T, dh, 1e-4, nullptr, 1.0, dq.data(),
                                     dk.data());
  blm::barrier_head_backward<float>(qf.data(), kf.data(), T, dh, 1e-4, nullptr, 1.0f, dqf.data(),
                                    dkf.data());
  double gmax = 0, gerr = 0;
  for (size_t i = 0; i < dq.size(); ++i) {
    gmax = std::max({gmax, std::fabs(dq[i]), std::fabs(dk[i])});
    gerr = std::max({gerr, std::fabs(dq[i] - dqf[i]), std::fabs(dk[i] - dkf[i])});
  }
  std::printf("float vs double (T=%d, dh=%d): log det range [%.3f, %.3f], max |dlogdet| %.2e, "
              "max rel dmargin %.2e, sum_phi %.6f vs %.6f, max |dgrad| / max |grad| %.2e\n",
              T, dh, ld_min, ld_max, ld_err, mg_err, od.sum_phi, double(of.sum_phi), gerr / gmax);
  CHECK(ld_max - ld_min > 0.5);  // the inputs exercise the barrier
  // Tolerances: float's unit roundoff is 6e-8; a log det goes through S_t (sums of up to 127
  // products of O(1) terms, then a difference) and a 32x32 LU in double.  Measured errors are
  // ~1e-7 (log det, absolute), ~1e-7 (margin, relative), ~3e-7 (gradient relative to its max);
  // the bounds leave a factor ~30-100 for other BLAS kernels and inputs.
  CHECK(ld_err <= 1e-5);
  CHECK(mg_err <= 1e-5);
  CHECK(of.sum_phi == Approx(od.sum_phi).epsilon(1e-6));
  CHECK(gerr <= 1e-5 * gmax);
}

TEST_CASE("timing: forward+backward, 64 heads, T=128, dh=32, float32", "[barrier][timing]") {
  // Prints the best of a few repetitions (the machine may be shared); asserts only finiteness.
  std::mt19937_64 rng(1);
  const int heads = 64, T = 128, dh = 32;
  std::normal_distribution<float> nd(0.f, 0.45f);
  std::vector<float> q(size_t(heads) * T * dh), k(q.size()), dq(q.size(), 0.f), dk(q.size(), 0.f);
  for (auto& x : q) x = nd(rng);
  for (auto& x : k) x = nd(rng);
  double total = 0;
  auto separate = [&] {
    for (int h = 0; h < heads; ++h) {
      const size_t o = size_t(h) * T * dh;
      total += blm::barrier_head_forward<float>(q.data() + o, k.data() + o, T, dh, 1e-4, nullptr,
                                                nullptr, nullptr)
                   .sum_phi;
      blm::barrier_head_backward<float>(q.data() + o, k.data() + o, T, dh, 1e-4, nullptr, 1.f,
                                        dq.data() + o, dk.data() + o);
    }
  };
  auto fused = [&] {
    for (int h = 0; h < heads; ++h) {
      const size_t o = size_t(h) * T * dh;
      total += blm::barrier_head_forward_backward<float>(q.data() + o, k.data() + o, T, dh, 1e-4,
                                                         nullptr, 1.f, dq.data() + o,
                                                         dk.data() + o, nullptr, nullptr)
                   .sum_phi;
    }
  };
  auto forward_only = [&] {
    for (int h = 0; h < heads; ++h) {
      const size_t o = size_t(h) * T * dh;
      total += blm::barrier_head_forward<float>(q.data() + o, k.data() + o, T, dh, 1e-4, nullptr,
                                                nullptr, nullptr)
                   .sum_phi;
    }
  };
  // Wall time, and process CPU time (all threads): on a shared machine the CPU time is the
  // steadier figure for the work done.
  struct Ms { double wall, cpu; };
  auto best_ms = [](auto&& fn) {
    fn();  // warm-up (thread_local scratch, BLAS threads)
    Ms best{1e300, 1e300};
    for (int r = 0; r < 3; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      const std::clock_t c0 = std::clock();
      fn();
      const double cpu = double(std::clock() - c0) / CLOCKS_PER_SEC;
      const double wall =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (wall < best.wall) best = {wall * 1e3, cpu * 1e3};
    }
    return best;
  };
  const Ms fwd = best_ms(forward_only), sep = best_ms(separate), fus = best_ms(fused);
  std::printf("barrier, %d heads, T=%d, dh=%d, float32, ms wall/cpu (best of 3): forward "
              "%.0f/%.0f, forward+backward %.0f/%.0f, fused forward_backward %.0f/%.0f\n",
              heads, T, dh, fwd.wall, fwd.cpu, sep.wall, sep.cpu, fus.wall, fus.cpu);
  // The sampled estimator (barrier.positions = K): K counted positions per sequence, drawn
  // without replacement from [2, T).  Separate forward and backward calls, as the reference
  // model makes them.
  for (int K : {4, 8}) {
    std::vector<uint8_t> masks(size_t(heads) * T, 0);
    std::vector<int> pos;
    for (int t = 2; t < T; ++t) pos.push_back(t);
    for (int h = 0; h < heads; ++h) {
      std::shuffle(pos.begin(), pos.end(), rng);
      for (int j = 0; j < K; ++j) masks[size_t(h) * T + pos[j]] = 1;
    }
    auto sampled = [&] {
      for (int h = 0; h < heads; ++h) {
        const size_t o = size_t(h) * T * dh;
        const uint8_t* m = masks.data() + size_t(h) * T;
        total += blm::barrier_head_forward<float>(q.data() + o, k.data() + o, T, dh, 1e-4, m,
                                                  nullptr, nullptr)
                     .sum_phi;
        blm::barrier_head_backward<float>(q.data() + o, k.data() + o, T, dh, 1e-4, m, 1.f,
                                          dq.data() + o, dk.data() + o);
      }
    };
    const Ms smp = best_ms(sampled);
    std::printf("  sampled K=%d positions/sequence: forward+backward %.1f/%.1f ms wall/cpu "
                "(%.1fx faster than exact)\n", K, smp.wall, smp.cpu, sep.wall / smp.wall);
  }
  CHECK(std::isfinite(total));
  for (float x : dq) REQUIRE(std::isfinite(x));
}

TEST_CASE("fused forward_backward equals separate forward and backward", "[barrier]") {
  std::mt19937_64 rng(77);
  for (int T : {2, 5, 40}) {
    const int dh = 8;
    Vec q = randn(T * dh, rng, 0.8, 0.3), k = randn(T * dh, rng, 0.8, -0.2);
    std::vector<uint8_t> mask(T);
    for (int t = 0; t < T; ++t) mask[t] = (t % 4) != 3;
    Vec ld1(T), mg1(T), ld2(T), mg2(T);
    Vec dq1 = randn(T * dh, rng), dk1 = randn(T * dh, rng), dq2 = dq1, dk2 = dk1;
    const auto o1 = blm::barrier_head_forward<double>(q.data(), k.data(), T, dh, 1e-4, mask.data(),
                                                      ld1.data(), mg1.data());
    blm::barrier_head_backward<double>(q.data(), k.data(), T, dh, 1e-4, mask.data(), 0.3,
                                       dq1.data(), dk1.data());
    const auto o2 = blm::barrier_head_forward_backward<double>(
        q.data(), k.data(), T, dh, 1e-4, mask.data(), 0.3, dq2.data(), dk2.data(), ld2.data(),
        mg2.data());
    CHECK(o1.count == o2.count);
    CHECK(o1.sum_phi == Approx(o2.sum_phi).epsilon(1e-14).margin(1e-14));
    CHECK(o1.min_logdet == Approx(o2.min_logdet).epsilon(1e-14).margin(1e-14));
    for (int t = 0; t < T; ++t) {
      CHECK(ld1[t] == Approx(ld2[t]).epsilon(1e-14).margin(1e-14));
      CHECK(mg1[t] == Approx(mg2[t]).epsilon(1e-14));
    }
    for (int i = 0; i < T * dh; ++i) {
      CHECK(dq1[i] == Approx(dq2[i]).epsilon(1e-13).margin(1e-13));
      CHECK(dk1[i] == Approx(dk2[i]).epsilon(1e-13).margin(1e-13));
    }
  }
}

// ---------------------------------------------------------------- the sampled estimator's mask

namespace {
// Gradient of scale * (sum of counted phi) from barrier_head_backward, starting from zero.
void masked_gradient(const Vec& q, const Vec& k, int T, int dh, const uint8_t* mask, Vec& dq,
                     Vec& dk) {
  dq.assign(q.size(), 0.0), dk.assign(k.size(), 0.0);
  blm::barrier_head_backward<double>(q.data(), k.data(), T, dh, 1e-4, mask, 1.0, dq.data(),
                                     dk.data());
}
}  // namespace

TEST_CASE("a mask restricts the exact computation to its positions (values and gradients)",
          "[barrier]") {
  // With a mask only the counted positions are computed (their rows of pi, S, G and their LUs).
  // The result must be the unmasked computation restricted to the mask:
  //  - value: sum_phi over the mask = sum of -logdet[t] of the unmasked per-position outputs;
  //  - gradient: the barrier's gradient is a sum over positions, so the gradients of the masks
  //    of a partition of {2..T-1} must add up to the unmasked gradient;
  //  - the same mask computed with per-position outputs (every row computed, uncounted rows
  //    carrying no gradient) gives the same gradient as without (counted rows only).
  // Shapes: several GEMM row blocks, and masks whose last counted position is < T-1 (the
  // attended range Ts then ends early).  Double; tolerances 1e-12 relative (rounding only: the
  // masked GEMMs sum the same products in other blockings).
  std::mt19937_64 rng(4242);
  for (auto shape : {std::pair<int, int>{37, 8}, std::pair<int, int>{128, 32}}) {
    const int T = shape.first, dh = shape.second;
    const double sd = dh == 8 ? 0.6 : 0.4;
    Vec q = randn(T * dh, rng, sd, 0.3), k = randn(T * dh, rng, sd, -0.2);
    for (int i = 0; i < T * dh; ++i) k[i] += 0.5 * q[i];  // C_t far from 0
    Vec logdet(T), margin(T);
    const auto full = blm::barrier_head_forward<double>(q.data(), k.data(), T, dh, 1e-4, nullptr,
                                                        logdet.data(), margin.data());
    REQUIRE(full.count == T - 2);
    for (int t = 2; t < T; ++t) REQUIRE(logdet[t] > std::log(1e-4));  // phi's log branch
    Vec dq_full, dk_full;
    masked_gradient(q, k, T, dh, nullptr, dq_full, dk_full);
    double gmax = 0;
    for (size_t i = 0; i < dq_full.size(); ++i)
      gmax = std::max({gmax, std::fabs(dq_full[i]), std::fabs(dk_full[i])});
    REQUIRE(gmax > 1e-3);

    // A random partition of {2..T-1} into three masks; the first avoids the last position.
    std::vector<std::vector<uint8_t>> parts(3, std::vector<uint8_t>(T, 0));
    std::uniform_int_distribution<int> pick(0, 2);
    for (int t = 2; t < T; ++t) parts[t == T - 1 ? 1 + pick(rng) % 2 : pick(rng)][t] = 1;
    Vec dq_sum(q.size(), 0.0), dk_sum(k.size(), 0.0);
    for (const auto& mask : parts) {
      double want = 0, min_ld = std::numeric_limits<double>::infinity();
      int count = 0;
      for (int t = 2; t < T; ++t)
        if (mask[t]) want += -logdet[t], min_ld = std::min(min_ld, logdet[t]), ++count;
      REQUIRE(count > 0);
      const auto out = blm::barrier_head_forward<double>(q.data(), k.data(), T, dh, 1e-4,
                                                         mask.data(), nullptr, nullptr);
      INFO("T=" << T << " dh=" << dh << " counted=" << count);
      CHECK(out.count == count);
      CHECK(out.sum_phi == Approx(want).epsilon(1e-12));
      CHECK(out.min_logdet == Approx(min_ld).epsilon(1e-12));

      Vec dq, dk;
      masked_gradient(q, k, T, dh, mask.data(), dq, dk);
      // Same mask, but every row computed because per-position outputs are asked for.
      Vec dq2(q.size(), 0.0), dk2(k.size(), 0.0), ld2(T), mg2(T);
      const auto out2 = blm::barrier_head_forward_backward<double>(
          q.data(), k.data(), T, dh, 1e-4, mask.data(), 1.0, dq2.data(), dk2.data(), ld2.data(),
          mg2.data());
      CHECK(out2.count == count);
      CHECK(out2.sum_phi == Approx(want).epsilon(1e-12));
      double rows_err = 0, out_err = 0;
      for (size_t i = 0; i < dq.size(); ++i) {
        rows_err = std::max({rows_err, std::fabs(dq[i] - dq2[i]), std::fabs(dk[i] - dk2[i])});
        dq_sum[i] += dq[i], dk_sum[i] += dk[i];
      }
      for (int t = 0; t < T; ++t)
        out_err = std::max({out_err, std::fabs(ld2[t] - logdet[t]), std::fabs(mg2[t] - margin[t])});
      CHECK(rows_err <= 1e-12 * gmax);
      CHECK(out_err <= 1e-12);
    }
    double sum_err = 0;
    for (size_t i = 0; i < dq_full.size(); ++i)
      sum_err = std::max({sum_err, std::fabs(dq_sum[i] - dq_full[i]), std::fabs(dk_sum[i] - dk_full[i])});
    INFO("T=" << T << " dh=" << dh << " max |sum of masked grads - unmasked| / max|grad| = "
              << sum_err / gmax);
    CHECK(sum_err <= 1e-12 * gmax);
  }
}

TEST_CASE("a mask with no counted position computes nothing and adds no gradient", "[barrier]") {
  std::mt19937_64 rng(5);
  const int T = 20, dh = 4;
  const Vec q = randn(T * dh, rng), k = randn(T * dh, rng);
  std::vector<uint8_t> mask(T, 0);
  mask[0] = mask[1] = 1;  // positions 0 and 1 never count
  const Vec dq0 = randn(T * dh, rng), dk0 = randn(T * dh, rng);
  Vec dq = dq0, dk = dk0;
  const auto out = blm::barrier_head_forward_backward<double>(
      q.data(), k.data(), T, dh, 1e-4, mask.data(), 1.0, dq.data(), dk.data(), nullptr, nullptr);
  CHECK(out.count == 0);
  CHECK(out.sum_phi == 0.0);
  CHECK(dq == dq0);
  CHECK(dk == dk0);
}

TEST_CASE("exactly singular J_t: finite value, margin 0, gradient = adjugate path", "[barrier]") {
  // dh = 1, T = 4.  q_2 = 0 makes pi_2. = (1/2, 1/2); with q = (2, 0, 0, 2), k = (2, 0, 1, 1)
  // every intermediate is exact in binary (means 1 and 1, q' = (1,-1,-1,1), k' = (1,-1,0,0)), so
  // C_2 = (1/2)(1)(1) + (1/2)(-1)(-1) = 1 exactly and J_2 = 0: the LU meets an exactly zero pivot.
  const int T = 4, dh = 1;
  const double eps = 1e-2;
  const Vec q = {2, 0, 0, 2}, k = {2, 0, 1, 1};
  REQUIRE(literal_det(q, k, T, dh, 2) == 0.0);
  Vec logdet(T), margin(T);
  const auto out = blm::barrier_head_forward<double>(q.data(), k.data(), T, dh, eps, nullptr,
                                                     logdet.data(), margin.data());
  CHECK(logdet[2] == -std::numeric_limits<double>::infinity());
  CHECK(margin[2] == 0.0);
  CHECK(out.min_logdet == -std::numeric_limits<double>::infinity());
  const double want = blm::barrier_phi(0.0, eps) + blm::barrier_phi(literal_det(q, k, T, dh, 3), eps);
  CHECK(out.sum_phi == Approx(want).epsilon(1e-12));
  std::mt19937_64 rng(3);
  const GradCheck g = check_gradient(q, k, T, dh, eps, nullptr, 1e-5, rng);
  INFO("err_q=" << g.err_q << " err_k=" << g.err_k << " max|grad|=" << g.max_grad);
  CHECK(g.max_grad > 1);  // -phi'(0) = 1/eps = 100 times a nonzero adjugate
  CHECK(g.err_q <= 1e-6);
  CHECK(g.err_k <= 1e-6);
}
