// Tests of the CPU ops (core/ops_cpu.h), each on its own, in float64: forwards against naive
// formulas written out here, backwards against finite differences of the scalar objective
// L = sum(out .* R) with a random R (so dout = R).
// Gradient tolerance: max relative error <= 1e-6 with floor 1e-6 (core/ops_gradcheck.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/ops_cpu.h"
#include "core/ops_gradcheck.h"
#include "core/rng.h"
#include "tests/catch.h"

using namespace blm;

namespace {

constexpr double kTol = 1e-6;
constexpr double kFloor = 1e-6;

std::vector<double> randn(Rng& rng, size_t n, double sd = 1.0, double mean = 0.0) {
  std::vector<double> v(n);
  for (auto& x : v) x = mean + sd * rng.normal();
  return v;
}

std::vector<int32_t> rand_tokens(Rng& rng, size_t n, int V) {
  std::vector<int32_t> v(n);
  for (auto& x : v) x = static_cast<int32_t>(rng.below(V));
  return v;
}

double weighted_sum(const std::vector<double>& out, const std::vector<double>& R) {
  double s = 0;
  for (size_t i = 0; i < out.size(); ++i) s += out[i] * R[i];
  return s;
}

void expect_grad(const gradcheck::Report& r, const char* what) {
  INFO(r.describe(what));
  CHECK(r.checked > 0);
  CHECK(r.max_rel <= kTol);
}

}  // namespace

TEST_CASE("exp_fast and tanh_fast: float accuracy", "[ops]") {
  double worst_exp = 0, worst_tanh = 0;
  for (int i = -80000; i <= 80000; ++i) {
    const float x = static_cast<float>(i * 1e-3);
    const double e = std::exp(static_cast<double>(x));
    worst_exp = std::max(worst_exp, std::fabs(ops::exp_fast(x) - e) / e);
    const float u = x / 8;
    worst_tanh = std::max(worst_tanh, std::fabs(ops::tanh_fast(u) - std::tanh(static_cast<double>(u))));
  }
  INFO("exp rel err " << worst_exp << ", tanh abs err " << worst_tanh);
  CHECK(worst_exp < 3e-7);
  CHECK(worst_tanh < 3e-7);
  // Clamped ends: no overflow to inf, tiny but positive far below; NaN stays NaN.
  CHECK(std::isfinite(ops::exp_fast(200.0f)));
  CHECK(ops::exp_fast(200.0f) > 1e38f);
  CHECK(ops::exp_fast(-1000.0f) > 0.0f);
  CHECK(ops::exp_fast(-1e30f) < 1e-37f);
  CHECK(std::isnan(ops::exp_fast(std::nanf(""))));
  CHECK(std::isnan(ops::tanh_fast(std::nanf(""))));
  CHECK(ops::tanh_fast(60.0f) == 1.0f);
  CHECK(ops::tanh_fast(-60.0f) == -1.0f);
  CHECK(ops::exp_fast(0.0f) == 1.0f);
  // The double versions are libm's.
  CHECK(ops::exp_fast(1.5) == std::exp(1.5));
  CHECK(ops::tanh_fast(0.3) == std::tanh(0.3));
}

TEST_CASE("embedding: forward, noise and gradients", "[ops]") {
  Rng rng(11);
  const int B = 2, T = 5, d = 6, V = 4, Tmax = 8;  // V < B*T: tokens repeat
  auto tokens = rand_tokens(rng, B * T, V);
  auto wte = randn(rng, V * d), wpe = randn(rng, Tmax * d), R = randn(rng, B * T * d);
  std::vector<double> out(B * T * d);

  ops::embedding_forward(tokens.data(), B, T, d, wte.data(), wpe.data(), 0.0, 0, out.data());
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < d; ++i)
        REQUIRE(out[(b * T + t) * d + i] == wte[tokens[b * T + t] * d + i] + wpe[t * d + i]);

  // Noise: exactly noise_std * normal01(seed, (b*T+t)*d + i), the draw every backend makes.
  std::vector<double> noisy(out.size());
  ops::embedding_forward(tokens.data(), B, T, d, wte.data(), wpe.data(), 0.3, 77, noisy.data());
  for (size_t j = 0; j < out.size(); ++j)
    REQUIRE(noisy[j] - out[j] == Approx(0.3 * normal01(77, j)).epsilon(1e-12).margin(1e-12));
  CHECK(noisy != out);

  std::vector<double> dwte(V * d, 0.0), dwpe(Tmax * d, 0.0);
  ops::embedding_backward(tokens.data(), B, T, d, R.data(), dwte.data(), dwpe.data());
  auto f = [&] {
    ops::embedding_forward(tokens.data(), B, T, d, wte.data(), wpe.data(), 0.0, 0, out.data());
    return weighted_sum(out, R);
  };
  expect_grad(gradcheck::check(f, wte, dwte, kFloor), "dwte");
  expect_grad(gradcheck::check(f, wpe, dwpe, kFloor), "dwpe");
  for (int i = T * d; i < Tmax * d; ++i) CHECK(dwpe[i] == 0.0);  // unused positions
}

TEST_CASE("layernorm: forward statistics and gradients", "[ops]") {
  Rng rng(12);
  const int N = 5, d = 7;
  auto x = randn(rng, N * d, 2.0, 3.0), w = randn(rng, d), b = randn(rng, d), R = randn(rng, N * d);
  std::vector<double> y(N * d), mean(N), rstd(N);

  // With w = 1, b = 0 each row has mean 0 and biased variance var / (var + 1e-5).
  std::vector<double> ones(d, 1.0), zeros(d, 0.0);
  ops::layernorm_forward(x.data(), ones.data(), zeros.data(), N, d, y.data(), mean.data(), rstd.data());
  for (int n = 0; n < N; ++n) {
    double mu = 0, var = 0, ym = 0, yv = 0;
    for (int i = 0; i < d; ++i) mu += x[n * d + i] / d;
    for (int i = 0; i < d; ++i) var += (x[n * d + i] - mu) * (x[n * d + i] - mu) / d;
    for (int i = 0; i < d; ++i) ym += y[n * d + i] / d;
    for (int i = 0; i < d; ++i) yv += y[n * d + i] * y[n * d + i] / d;
    CHECK(mean[n] == Approx(mu).epsilon(1e-13));
    CHECK(rstd[n] == Approx(1 / std::sqrt(var + 1e-5)).epsilon(1e-13));
    CHECK(std::fabs(ym) < 1e-13);
    CHECK(yv == Approx(var / (var + 1e-5)).epsilon(1e-12));
  }

  // Gradients; dx is added to, so start it from a random value and subtract that afterwards.
  ops::layernorm_forward(x.data(), w.data(), b.data(), N, d, y.data(), mean.data(), rstd.data());
  auto dx0 = randn(rng, N * d);
  std::vector<double> dx = dx0, dw(d, 0.0), db(d, 0.0);
  ops::layernorm_backward(x.data(), w.data(), mean.data(), rstd.data(), R.data(), N, d, dx.data(),
                          dw.data(), db.data());
  for (size_t i = 0; i < dx.size(); ++i) dx[i] -= dx0[i];
  auto f = [&] {
    ops::layernorm_forward(x.data(), w.data(), b.data(), N, d, y.data(), mean.data(), rstd.data());
    return weighted_sum(y, R);
  };
  expect_grad(gradcheck::check(f, x, dx, kFloor), "dx");
  expect_grad(gradcheck::check(f, w, dw, kFloor), "dw");
  expect_grad(gradcheck::check(f, b, db, kFloor), "db");
}

TEST_CASE("linear: forward against a naive loop, gradients", "[ops]") {
  Rng rng(13);
  const int N = 6, in = 5, out = 3;
  auto x = randn(rng, N * in), W = randn(rng, out * in), b = randn(rng, out), R = randn(rng, N * out);
  std::vector<double> y(N * out);
  ops::linear_forward(x.data(), W.data(), b.data(), N, in, out, y.data());
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < out; ++o) {
      double s = b[o];
      for (int i = 0; i < in; ++i) s += x[n * in + i] * W[o * in + i];
      CHECK(y[n * out + o] == Approx(s).epsilon(1e-13));
    }

  std::vector<double> dx(N * in, 5.0), dW(out * in, 0.0), db(out, 0.0);
  ops::linear_backward(x.data(), W.data(), R.data(), N, in, out, dx.data(), dW.data(), db.data());
  auto f = [&] {
    ops::linear_forward(x.data(), W.data(), b.data(), N, in, out, y.data());
    return weighted_sum(y, R);
  };
  expect_grad(gradcheck::check(f, x, dx, kFloor), "dx");  // dx was written over the 5.0s
  expect_grad(gradcheck::check(f, W, dW, kFloor), "dW");
  expect_grad(gradcheck::check(f, b, db, kFloor), "db");

  // accumulate_dx adds; parameter gradients always add.
  std::vector<double> dx2 = dx, dW2 = dW;
  ops::linear_backward(x.data(), W.data(), R.data(), N, in, out, dx2.data(), dW2.data(),
                       static_cast<double*>(nullptr), true);
  for (size_t i = 0; i < dx.size(); ++i) CHECK(dx2[i] == Approx(2 * dx[i]).epsilon(1e-13));
  for (size_t i = 0; i < dW.size(); ++i) CHECK(dW2[i] == Approx(2 * dW[i]).epsilon(1e-13));
}

// Naive causal attention for one (b, h): the full T x T score matrix, masked, softmaxed.
static void naive_attention(const std::vector<double>& qkv, int B, int T, int H, int dh,
                            std::vector<double>& out) {
  const int d = H * dh;
  out.assign(B * T * d, 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < T; ++t) {
        std::vector<double> z(T, -INFINITY);
        double mx = -INFINITY, sum = 0;
        for (int s = 0; s <= t; ++s) {
          double dotp = 0;
          for (int i = 0; i < dh; ++i)
            dotp += qkv[(b * T + t) * 3 * d + h * dh + i] * qkv[(b * T + s) * 3 * d + d + h * dh + i];
          z[s] = dotp / std::sqrt(double(dh));
          mx = std::max(mx, z[s]);
        }
        for (int s = 0; s <= t; ++s) sum += std::exp(z[s] - mx);
        for (int s = 0; s <= t; ++s)
          for (int i = 0; i < dh; ++i)
            out[(b * T + t) * d + h * dh + i] +=
                std::exp(z[s] - mx) / sum * qkv[(b * T + s) * 3 * d + 2 * d + h * dh + i];
      }
}

TEST_CASE("attention: causal forward against a naive version, gradients", "[ops]") {
  Rng rng(14);
  const ops::AttentionShape sh{2, 7, 2, 3};
  const int d = sh.d();
  auto qkv = randn(rng, sh.B * sh.T * 3 * d, 1.5), R = randn(rng, sh.B * sh.T * d);
  std::vector<double> att(sh.B * sh.H * sh.T * sh.T), out(sh.B * sh.T * d), ref;
  ops::attention_forward(sh, qkv.data(), att.data(), out.data());
  naive_attention(qkv, sh.B, sh.T, sh.H, sh.dh, ref);
  for (size_t i = 0; i < out.size(); ++i) REQUIRE(out[i] == Approx(ref[i]).epsilon(1e-12).margin(1e-14));

  // Causal: changing the last position's k and v leaves every earlier output unchanged.
  auto qkv2 = qkv;
  for (int b = 0; b < sh.B; ++b)
    for (int c = d; c < 3 * d; ++c) qkv2[(b * sh.T + sh.T - 1) * 3 * d + c] += 1.0;
  std::vector<double> out2(out.size());
  ops::attention_forward(sh, qkv2.data(), att.data(), out2.data());
  for (int b = 0; b < sh.B; ++b)
    for (int t = 0; t < sh.T; ++t)
      for (int c = 0; c < d; ++c) {
        const size_t j = (b * sh.T + t) * d + c;
        if (t < sh.T - 1) CHECK(out2[j] == out[j]);
        else CHECK(out2[j] != out[j]);
      }

  ops::attention_forward(sh, qkv.data(), att.data(), out.data());
  std::vector<double> dqkv(qkv.size(), 3.0), scratch;
  ops::attention_backward(sh, qkv.data(), att.data(), R.data(), dqkv.data(), scratch);
  auto f = [&] {
    ops::attention_forward(sh, qkv.data(), att.data(), out.data());
    return weighted_sum(out, R);
  };
  expect_grad(gradcheck::check(f, qkv, dqkv, kFloor), "dqkv");
}

TEST_CASE("gelu: tanh approximation values and gradient", "[ops]") {
  // torch.nn.functional.gelu(x, approximate="tanh") at -1, 0, 1, 2.
  std::vector<double> x{-1.0, 0.0, 1.0, 2.0}, y(4);
  ops::gelu_forward(x.data(), x.size(), y.data());
  CHECK(y[0] == Approx(-0.15880800939172324).epsilon(1e-12));
  CHECK(y[1] == 0.0);
  CHECK(y[2] == Approx(0.8411919906082768).epsilon(1e-12));
  CHECK(y[3] == Approx(1.954597694087775).epsilon(1e-12));

  Rng rng(15);
  auto xs = randn(rng, 40, 2.0), R = randn(rng, 40);
  std::vector<double> ys(40), dx(40);
  ops::gelu_backward(xs.data(), R.data(), xs.size(), dx.data());
  auto f = [&] {
    ops::gelu_forward(xs.data(), xs.size(), ys.data());
    return weighted_sum(ys, R);
  };
  expect_grad(gradcheck::check(f, xs, dx, kFloor), "gelu dx");
  // In place (dx aliasing dy) gives the same.
  auto inplace = R;
  ops::gelu_backward(xs.data(), inplace.data(), xs.size(), inplace.data());
  CHECK(inplace == dx);
}

TEST_CASE("gelu: the AVX2 build of the float loops agrees with the plain one", "[ops]") {
#if BLM_GELU_AVX2
  if (!ops::cpu_has_avx2_fma()) {
    WARN("no AVX2+FMA on this CPU: only the plain loops run here");
    return;
  }
  Rng rng(25);
  const size_t n = 1001;  // not a multiple of any vector width
  std::vector<float> x(n), dy(n), y1(n), y2(n), g1(n), g2(n);
  for (size_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(3 * rng.normal());
    dy[i] = static_cast<float>(rng.normal());
  }
  ops::gelu_forward_span(x.data(), 0, n, y1.data());
  ops::gelu_forward_span_avx2(x.data(), 0, n, y2.data());
  ops::gelu_backward_span(x.data(), dy.data(), 0, n, g1.data());
  ops::gelu_backward_span_avx2(x.data(), dy.data(), 0, n, g2.data());
  for (size_t i = 0; i < n; ++i) {
    REQUIRE(y2[i] == Approx(y1[i]).epsilon(1e-6).margin(1e-6));
    REQUIRE(g2[i] == Approx(g1[i]).epsilon(1e-6).margin(1e-6));
  }
  // And both agree with the double formula.
  for (size_t i = 0; i < n; ++i) {
    double yd;
    const double xd = x[i];
    ops::gelu_forward(&xd, 1, &yd);
    REQUIRE(y2[i] == Approx(yd).epsilon(1e-6).margin(1e-6));
  }
#else
  WARN("not an x86-64 GCC build: no AVX2 variant");
#endif
}

TEST_CASE("residual add: sum and gradient", "[ops]") {
  Rng rng(16);
  auto a = randn(rng, 30), b = randn(rng, 30), R = randn(rng, 30);
  std::vector<double> out(30);
  auto f = [&] {
    ops::residual_forward(a.data(), b.data(), a.size(), out.data());
    return weighted_sum(out, R);
  };
  f();
  for (size_t i = 0; i < out.size(); ++i) CHECK(out[i] == a[i] + b[i]);
  // The backward passes dout to both inputs unchanged: the gradient of each is R.
  expect_grad(gradcheck::check(f, a, R, kFloor), "da");
  expect_grad(gradcheck::check(f, b, R, kFloor), "db");
}

TEST_CASE("tied output projection: logits = x wte^T, gradients", "[ops]") {
  Rng rng(17);
  const int N = 5, d = 4, V = 6;
  auto x = randn(rng, N * d), wte = randn(rng, V * d), R = randn(rng, N * V);
  std::vector<double> logits(N * V);
  ops::logits_forward(x.data(), wte.data(), N, d, V, logits.data());
  for (int n = 0; n < N; ++n)
    for (int v = 0; v < V; ++v) {
      double s = 0;
      for (int i = 0; i < d; ++i) s += x[n * d + i] * wte[v * d + i];
      CHECK(logits[n * V + v] == Approx(s).epsilon(1e-13));
    }
  std::vector<double> dx(N * d), dwte(V * d, 0.0);
  ops::logits_backward(x.data(), wte.data(), R.data(), N, d, V, dx.data(), dwte.data());
  auto f = [&] {
    ops::logits_forward(x.data(), wte.data(), N, d, V, logits.data());
    return weighted_sum(logits, R);
  };
  expect_grad(gradcheck::check(f, x, dx, kFloor), "dx");
  expect_grad(gradcheck::check(f, wte, dwte, kFloor), "dwte");
}

TEST_CASE("cross-entropy: mean loss, top-1 counts, gradient", "[ops]") {
  Rng rng(18);
  const int N = 6, V = 5;
  auto logits = randn(rng, N * V, 2.0);
  auto targets = rand_tokens(rng, N, V);
  // Row 0: a tie for the maximum between classes 1 and 3; the first (1) is the argmax.
  for (int v = 0; v < V; ++v) logits[v] = -1.0;
  logits[1] = logits[3] = 2.0;
  targets[0] = 3;
  targets[1] = 0;
  logits[1 * V + 0] = 10.0;  // row 1 is certainly correct
  std::vector<double> lse(N), row_loss(N);
  const int64_t correct =
      ops::cross_entropy_forward(logits.data(), targets.data(), N, V, lse.data(), row_loss.data());

  int64_t naive_correct = 0;
  for (int n = 0; n < N; ++n) {
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(logits[n * V + v]);
    CHECK(row_loss[n] == Approx(std::log(sum) - logits[n * V + targets[n]]).epsilon(1e-13));
    int arg = 0;
    for (int v = 1; v < V; ++v)
      if (logits[n * V + v] > logits[n * V + arg]) arg = v;
    naive_correct += arg == targets[n];
  }
  CHECK(correct == naive_correct);
  CHECK(correct >= 1);

  // Mean CE: gradient scale 1/N.
  std::vector<double> dlogits(N * V);
  ops::cross_entropy_backward(logits.data(), lse.data(), targets.data(), N, V, 1.0 / N, dlogits.data());
  auto f = [&] {
    ops::cross_entropy_forward(logits.data(), targets.data(), N, V, lse.data(), row_loss.data());
    double s = 0;
    for (double l : row_loss) s += l;
    return s / N;
  };
  expect_grad(gradcheck::check(f, logits, dlogits, kFloor), "dlogits");
}

TEST_CASE("ops agree in float and double", "[ops]") {
  // The attention, the op with the most arithmetic per value, in both precisions.
  Rng rng(19);
  const ops::AttentionShape sh{2, 9, 2, 4};
  auto qkv = randn(rng, sh.B * sh.T * 3 * sh.d()), R = randn(rng, sh.B * sh.T * sh.d());
  std::vector<double> att(sh.B * sh.H * sh.T * sh.T), out(sh.B * sh.T * sh.d()), dqkv(qkv.size()), sd;
  ops::attention_forward(sh, qkv.data(), att.data(), out.data());
  ops::attention_backward(sh, qkv.data(), att.data(), R.data(), dqkv.data(), sd);
  std::vector<float> qkvf(qkv.begin(), qkv.end()), Rf(R.begin(), R.end());
  std::vector<float> attf(att.size()), outf(out.size()), dqkvf(dqkv.size()), sf;
  ops::attention_forward(sh, qkvf.data(), attf.data(), outf.data());
  ops::attention_backward(sh, qkvf.data(), attf.data(), Rf.data(), dqkvf.data(), sf);
  for (size_t i = 0; i < out.size(); ++i) CHECK(outf[i] == Approx(out[i]).margin(1e-5));
  for (size_t i = 0; i < dqkv.size(); ++i) CHECK(dqkvf[i] == Approx(dqkv[i]).margin(1e-5));
}
