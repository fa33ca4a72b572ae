// Tests of core/optim.h: the learning-rate schedule at its defining points, clip_grad_norm_'s
// factor, AdamW against a closed form (step 1) and against an independent textbook
// implementation written here (m-hat / (sqrt(v-hat) + eps)) over many steps, weight decay only on
// decay tensors, and the deterministic global norm.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/blas.h"
#include "core/error.h"
#include "core/optim.h"
#include "core/params.h"
#include "core/rng.h"
#include "tests/catch.h"
#include "tests/model_config.h"

using namespace blm;

namespace {

TrainConfig schedule(const std::string& kind, int steps, int warmup) {
  TrainConfig tc;
  tc.schedule = kind;
  tc.steps = steps;
  tc.warmup = warmup;
  tc.lr = 3e-3;
  tc.min_lr_ratio = 0.1;
  return tc;
}

}  // namespace

TEST_CASE("lr schedule: warmup, cosine, linear, constant", "[optim]") {
  const TrainConfig cos = schedule("cosine", 110, 10);
  // Warmup: lr * (s+1) / warmup.
  CHECK(lr_at(0, cos) == Approx(3e-4).epsilon(1e-14));
  CHECK(lr_at(4, cos) == Approx(1.5e-3).epsilon(1e-14));
  CHECK(lr_at(9, cos) == Approx(3e-3).epsilon(1e-14));
  // Decay from lr at step = warmup to lr * min_lr_ratio at the last step (steps - 1).
  CHECK(lr_at(10, cos) == Approx(3e-3).epsilon(1e-14));
  CHECK(lr_at(109, cos) == Approx(3e-4).epsilon(1e-12));
  // With steps = 111, warmup = 10 the decay spans 100 steps: p = 0.5 at step 60, 0.25 at 35.
  const TrainConfig cos2 = schedule("cosine", 111, 10);
  CHECK(lr_at(60, cos2) == Approx(0.5 * (3e-3 + 3e-4)).epsilon(1e-12));
  CHECK(lr_at(35, cos2) == Approx(3e-4 + 2.7e-3 * 0.5 * (1 + std::cos(M_PI * 0.25))).epsilon(1e-12));
  for (int s = 10; s < 110; ++s) CHECK(lr_at(s + 1, cos2) < lr_at(s, cos2));
  // Past the end: stays at the minimum.
  CHECK(lr_at(500, cos2) == Approx(3e-4).epsilon(1e-12));

  const TrainConfig lin = schedule("linear", 111, 10);
  CHECK(lr_at(10, lin) == Approx(3e-3).epsilon(1e-14));
  CHECK(lr_at(35, lin) == Approx(3e-3 - 2.7e-3 * 0.25).epsilon(1e-12));
  CHECK(lr_at(110, lin) == Approx(3e-4).epsilon(1e-12));

  const TrainConfig con = schedule("constant", 111, 10);
  CHECK(lr_at(3, con) == Approx(1.2e-3).epsilon(1e-14));
  CHECK(lr_at(10, con) == 3e-3);
  CHECK(lr_at(110, con) == 3e-3);

  // No warmup: step 0 already at lr.
  CHECK(lr_at(0, schedule("cosine", 50, 0)) == Approx(3e-3).epsilon(1e-14));
  // A warmup as long as the run: the decay is already complete after it.
  CHECK(lr_at(10, schedule("cosine", 10, 10)) == Approx(3e-4).epsilon(1e-14));

  CHECK_THROWS_AS(lr_at(0, schedule("exponential", 10, 1)), ConfigError);
}

TEST_CASE("clip scale is torch's clip_grad_norm_ factor", "[optim]") {
  CHECK(clip_scale(2.0, 1.0) == Approx(1.0 / (2.0 + 1e-6)).epsilon(1e-15));
  CHECK(clip_scale(0.5, 1.0) == 1.0);
  CHECK(clip_scale(1e9, 0.0) == 1.0);  // disabled
}

TEST_CASE("AdamW: first step in closed form, decay only on decay tensors", "[optim]") {
  const ParamLayout layout(model_config(10, 8, 2, 1, 6));
  const size_t n = layout.total();
  Rng rng(21);
  std::vector<double> p(n), g(n), m(n, 0.0), v(n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    p[i] = rng.normal();
    g[i] = rng.normal();
  }
  const std::vector<double> p0 = p;
  AdamWHyper h;
  h.weight_decay = 0.1;
  const double lr = 0.01, clip = 0.5;
  int64_t t = 0;
  adamw_step(layout, p.data(), g.data(), m.data(), v.data(), t, h, lr, clip);
  CHECK(t == 1);
  // t = 1: m-hat = g', v-hat = g'^2 (g' = clip g), so p1 = p0 * (1 - lr wd [decay]) - lr g'/(|g'| + eps).
  int decayed = 0, plain = 0;
  for (const TensorSpec& ts : layout.tensors())
    for (size_t i = ts.offset; i < ts.offset + ts.size; ++i) {
      const double gc = clip * g[i];
      const double base = ts.decay ? p0[i] * (1 - lr * h.weight_decay) : p0[i];
      CHECK(p[i] == Approx(base - lr * gc / (std::fabs(gc) + h.eps)).epsilon(1e-13));
      CHECK(m[i] == Approx((1 - h.beta1) * gc).epsilon(1e-14));
      CHECK(v[i] == Approx((1 - h.beta2) * gc * gc).epsilon(1e-14));
      (ts.decay ? decayed : plain)++;
    }
  CHECK(decayed > 0);
  CHECK(plain > 0);
  CHECK(!layout.find("h0.ln1.w").decay);
  CHECK(!layout.find("h0.attn.qkv.b").decay);
  CHECK(layout.find("h0.attn.qkv.w").decay);
  CHECK(layout.find("wte").decay);
}

TEST_CASE("AdamW matches a textbook implementation over many steps", "[optim]") {
  const ParamLayout layout(model_config(5, 4, 1, 1, 3));
  const size_t n = layout.total();
  Rng rng(22);
  std::vector<double> p(n), m(n, 0.0), v(n, 0.0);
  for (auto& x : p) x = rng.normal();
  std::vector<double> rp = p, rm = m, rv = v;  // the reference copy
  AdamWHyper h;
  h.beta1 = 0.8;
  h.beta2 = 0.99;
  h.eps = 1e-6;
  h.weight_decay = 0.05;
  int64_t t = 0;
  for (int step = 1; step <= 25; ++step) {
    std::vector<double> g(n);
    for (auto& x : g) x = rng.normal() * (step % 3 + 0.1);
    const double lr = 0.02 / step, clip = step % 2 ? 1.0 : 0.3;
    adamw_step(layout, p.data(), g.data(), m.data(), v.data(), t, h, lr, clip);
    for (const TensorSpec& ts : layout.tensors())
      for (size_t i = ts.offset; i < ts.offset + ts.size; ++i) {
        const double gi = g[i] * clip;
        if (ts.decay) rp[i] -= lr * h.weight_decay * rp[i];
        rm[i] = h.beta1 * rm[i] + (1 - h.beta1) * gi;
        rv[i] = h.beta2 * rv[i] + (1 - h.beta2) * gi * gi;
        const double mhat = rm[i] / (1 - std::pow(h.beta1, step));
        const double vhat = rv[i] / (1 - std::pow(h.beta2, step));
        rp[i] -= lr * mhat / (std::sqrt(vhat) + h.eps);
      }
  }
  CHECK(t == 25);
  for (size_t i = 0; i < n; ++i) {
    REQUIRE(p[i] == Approx(rp[i]).epsilon(1e-11).margin(1e-13));
    REQUIRE(m[i] == Approx(rm[i]).epsilon(1e-12).margin(1e-15));
    REQUIRE(v[i] == Approx(rv[i]).epsilon(1e-12).margin(1e-15));
  }

  // The float update follows the double one to float precision over one step.
  std::vector<float> pf(p.begin(), p.end()), mf(m.begin(), m.end()), vf(v.begin(), v.end()), gf(n);
  std::vector<double> gd(n);
  for (size_t i = 0; i < n; ++i) gf[i] = static_cast<float>(gd[i] = rng.normal());
  int64_t tf = t, td = t;
  adamw_step(layout, pf.data(), gf.data(), mf.data(), vf.data(), tf, h, 1e-3, 1.0);
  adamw_step(layout, p.data(), gd.data(), m.data(), v.data(), td, h, 1e-3, 1.0);
  for (size_t i = 0; i < n; ++i) CHECK(pf[i] == Approx(p[i]).epsilon(1e-5).margin(1e-6));
}

TEST_CASE("AdamW minimises a quadratic", "[optim]") {
  // f(p) = 0.5 |p - c|^2 on a no-decay problem: the iterates approach c.
  const ParamLayout layout(model_config(5, 4, 1, 1, 3));
  const size_t n = layout.total();
  Rng rng(23);
  std::vector<double> c(n), p(n, 0.0), m(n, 0.0), v(n, 0.0), g(n);
  for (auto& x : c) x = rng.normal();
  AdamWHyper h;
  h.weight_decay = 0.0;
  int64_t t = 0;
  double start = 0, end = 0;
  for (size_t i = 0; i < n; ++i) start = std::max(start, std::fabs(p[i] - c[i]));
  for (int step = 0; step < 2000; ++step) {
    for (size_t i = 0; i < n; ++i) g[i] = p[i] - c[i];
    adamw_step(layout, p.data(), g.data(), m.data(), v.data(), t, h, 0.05 * (1.0 - step / 2000.0), 1.0);
  }
  for (size_t i = 0; i < n; ++i) end = std::max(end, std::fabs(p[i] - c[i]));
  INFO("max |p - c| from " << start << " to " << end);
  CHECK(end < 1e-2);
}

TEST_CASE("global norm: exact and independent of the thread count", "[optim]") {
  // Large enough for the parallel path, which runs when OpenBLAS has no pool of its own.
#if defined(OPENBLAS_VERSION)
  const int blas_threads = openblas_get_num_threads();
  openblas_set_num_threads(1);
#endif
  Rng rng(24);
  const size_t n = (size_t(1) << 21) + 3;
  std::vector<float> g(n);
  double naive = 0;
  for (auto& x : g) {
    x = static_cast<float>(rng.normal());
    naive += static_cast<double>(x) * x;
  }
  const int threads = omp_get_max_threads();
  const double a = global_norm(g.data(), n);
  omp_set_num_threads(1);
  const double b = global_norm(g.data(), n);
  omp_set_num_threads(threads);
  CHECK(a == Approx(std::sqrt(naive)).epsilon(1e-12));  // 2M terms summed in another order
  CHECK(a == b);
  CHECK(global_norm(g.data(), 1) == Approx(std::fabs(g[0])).epsilon(1e-15));
#if defined(OPENBLAS_VERSION)
  openblas_set_num_threads(blas_threads);
#endif
}
