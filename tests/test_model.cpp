// Tests of the whole CPU reference model (core/reference.cpp) and the CPU backend
// (core/cpu_backend.cpp): the gradient of CE + lambda R against float64 finite differences for
// every parameter, lambda = 0 costing nothing and changing nothing, float vs double, margins
// consistent with the barrier term, and the backend's contract.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/backend.h"
#include "core/barrier.h"
#include "core/error.h"
#include "core/ops_gradcheck.h"
#include "core/params.h"
#include "core/reference.h"
#include "core/rng.h"
#include "tests/catch.h"
#include "tests/error_of.h"
#include "tests/model_config.h"

using namespace blm;

namespace {

ModelConfig tiny_model() { return model_config(13, 16, 2, 2, 12); }

// Random parameters, not the training init: matrices N(0, sd) so that attention is far from
// uniform and the barrier's C_t is far from 0; biases and LayerNorm shifts N(0, 0.1), LayerNorm
// gains 1 + N(0, 0.1), so every parameter has a gradient worth checking.
std::vector<double> random_params(const ParamLayout& layout, uint64_t seed, double sd) {
  Rng rng(seed);
  std::vector<double> p(layout.total());
  for (const TensorSpec& t : layout.tensors()) {
    const bool gain = t.name.size() > 2 && t.name.compare(t.name.size() - 2, 2, ".w") == 0 && t.shape.size() == 1;
    for (size_t i = 0; i < t.size; ++i) {
      double& x = p[t.offset + i];
      if (t.shape.size() == 2) x = sd * rng.normal();
      else x = (gain ? 1.0 : 0.0) + 0.1 * rng.normal();
    }
  }
  return p;
}

struct Tokens {
  int B, T;
  std::vector<int32_t> inputs, targets;
  Batch batch() const { return Batch{B, T, inputs.data(), targets.data()}; }
};

// Runs a scope on one OpenMP thread: the tiny models of the gradient checks gain nothing from
// threads, and on a loaded 2-core machine every parallel region can wait for a descheduled thread.
struct OneThread {
  int saved = omp_get_max_threads();
  OneThread() { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(saved); }
};

Tokens random_tokens(uint64_t seed, int B, int T, int V) {
  Rng rng(seed);
  Tokens k{B, T, std::vector<int32_t>(B * T), std::vector<int32_t>(B * T)};
  for (auto& x : k.inputs) x = static_cast<int32_t>(rng.below(V));
  for (auto& x : k.targets) x = static_cast<int32_t>(rng.below(V));
  return k;
}

// Checks every parameter's gradient of the full objective against finite differences.
void check_model_gradient(const BarrierConfig& bc, const ForwardOptions& opts, uint64_t seed) {
  OneThread one;
  const ModelConfig mc = tiny_model();
  ReferenceModel<double> model(mc, bc);
  std::vector<double> params = random_params(model.layout(), seed, 0.3);
  const Tokens tok = random_tokens(seed + 1, 2, mc.seq_len, mc.vocab_size);
  const Batch batch = tok.batch();

  const LossTerms terms = model.forward(params.data(), batch, opts);
  std::vector<double> grad(params.size());
  model.backward(params.data(), grad.data());
  {  // forward_backward (the barrier's gradient computed in the forward): the same bits
    std::vector<double> fused(params.size(), 7.0);
    const LossTerms t2 = model.forward_backward(params.data(), batch, opts, fused.data());
    CHECK(std::memcmp(&t2.loss, &terms.loss, sizeof(double)) == 0);
    CHECK(t2.barrier_terms == terms.barrier_terms);
    CHECK(std::memcmp(fused.data(), grad.data(), grad.size() * sizeof(double)) == 0);
  }
  for (double& g : grad) g /= opts.grad_scale;  // the backward returns d(loss * grad_scale)
  INFO("ce " << terms.ce << " R " << terms.barrier << " N_R " << terms.barrier_terms
             << " min logdet " << terms.min_logdet);
  CHECK(terms.barrier_terms > 0);
  CHECK(terms.loss == Approx(terms.ce + bc.lambda * terms.barrier).epsilon(1e-15));

  auto f = [&] { return model.forward(params.data(), batch, opts).loss; };
  // Floor 1e-5: the finite differences' rounding noise is ~3e-12 absolute (measured over every
  // tensor: the Richardson estimate at h = 1e-3 is rounding-limited), and the K biases have an
  // exactly zero gradient (softmax is shift invariant, so is the barrier's k - kbar).
  const gradcheck::Report r = gradcheck::check(f, params, grad, 1e-5);
  // Name the worst tensor for the failure message.
  std::string where;
  for (const TensorSpec& t : model.layout().tensors())
    if (r.worst >= t.offset && r.worst < t.offset + t.size) where = t.name;
  INFO(r.describe("CE + lambda R, worst in " + where));
  CHECK(r.checked == params.size());
  CHECK(r.max_rel <= 1e-6);
}

}  // namespace

TEST_CASE("model gradient: CE + lambda R, every layer", "[model][gradcheck]") {
  BarrierConfig bc;
  bc.lambda = 0.5;
  check_model_gradient(bc, ForwardOptions(), 100);
}

TEST_CASE("model gradient: sampled barrier positions (barrier_mask)", "[model][gradcheck]") {
  BarrierConfig bc;
  bc.lambda = 0.5;
  bc.positions = 4;
  const int B = 2, T = tiny_model().seq_len;
  std::vector<uint8_t> mask(B * T, 0);
  Rng rng(7);
  for (auto& m : mask) m = rng.uniform() < 0.4 ? 1 : 0;
  mask[5] = 1;  // at least one counted position (t >= 2) in sequence 0
  ForwardOptions opts;
  opts.barrier_mask = mask.data();
  check_model_gradient(bc, opts, 200);
}

TEST_CASE("model gradient: barrier on layer 1 only, grad_scale", "[model][gradcheck]") {
  BarrierConfig bc;
  bc.lambda = 0.5;
  bc.layers = {1};
  ForwardOptions opts;
  opts.grad_scale = 0.5f;  // a power of two: dividing it out again is exact
  check_model_gradient(bc, opts, 300);
}

namespace {

template <class Real>
struct Run {
  LossTerms terms;
  std::vector<Real> grad;
};

template <class Real>
Run<Real> run_model(const ModelConfig& mc, const BarrierConfig& bc, const std::vector<double>& p64,
                    const Batch& batch, const ForwardOptions& opts) {
  ReferenceModel<Real> model(mc, bc);
  std::vector<Real> p(p64.begin(), p64.end());
  Run<Real> r;
  r.terms = model.forward(p.data(), batch, opts);
  r.grad.assign(p.size(), Real(0));
  model.backward(p.data(), r.grad.data());
  return r;
}

template <class Real>
bool bitwise_equal(const std::vector<Real>& a, const std::vector<Real>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(Real)) == 0;
}

bool bitwise_equal(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

}  // namespace

TEST_CASE("lambda = 0: the barrier is never computed and changes nothing", "[model]") {
  const ModelConfig mc = tiny_model();
  const ParamLayout layout(mc);
  const std::vector<double> params = random_params(layout, 400, 0.3);
  const Tokens tok = random_tokens(401, 3, mc.seq_len, mc.vocab_size);
  std::vector<uint8_t> mask(3 * mc.seq_len, 1);

  BarrierConfig off;  // the defaults: lambda = 0
  BarrierConfig zero;
  zero.lambda = 0.0;
  zero.eps = 1e-2;
  zero.layers = {1};
  zero.positions = 5;
  ForwardOptions plain, masked;
  masked.barrier_mask = mask.data();

  const Run<float> a = run_model<float>(mc, off, params, tok.batch(), plain);
  const Run<float> b = run_model<float>(mc, zero, params, tok.batch(), masked);
  CHECK(a.terms.barrier_terms == 0);  // never evaluated
  CHECK(b.terms.barrier_terms == 0);
  CHECK(a.terms.barrier == 0.0);
  CHECK(bitwise_equal(a.terms.loss, b.terms.loss));
  CHECK(bitwise_equal(a.terms.loss, a.terms.ce));
  CHECK(bitwise_equal(a.grad, b.grad));

  // Reporting the barrier at lambda = 0 evaluates it but adds no gradient.
  ForwardOptions report = masked;
  report.report_barrier = true;
  const Run<float> c = run_model<float>(mc, zero, params, tok.batch(), report);
  CHECK(c.terms.barrier_terms == 3 * (mc.seq_len - 2) * mc.n_head);  // layer 1 only
  CHECK(c.terms.barrier != 0.0);
  CHECK(bitwise_equal(c.terms.loss, a.terms.loss));
  CHECK(bitwise_equal(c.grad, a.grad));

  // The comparison can fail: a small lambda changes both.
  BarrierConfig on = zero;
  on.lambda = 1e-3;
  const Run<float> d = run_model<float>(mc, on, params, tok.batch(), masked);
  CHECK(d.terms.barrier_terms > 0);
  CHECK(!bitwise_equal(d.terms.loss, a.terms.loss));
  CHECK(!bitwise_equal(d.grad, a.grad));
}

TEST_CASE("float and double agree", "[model]") {
  const ModelConfig mc = model_config(40, 32, 2, 2, 24);
  BarrierConfig bc;
  bc.lambda = 0.5;
  const ParamLayout layout(mc);
  std::vector<double> params = random_params(layout, 500, 0.15);
  for (auto& x : params) x = static_cast<float>(x);  // the same values in both precisions
  const Tokens tok = random_tokens(501, 4, mc.seq_len, mc.vocab_size);
  const Run<double> d = run_model<double>(mc, bc, params, tok.batch(), ForwardOptions());
  const Run<float> f = run_model<float>(mc, bc, params, tok.batch(), ForwardOptions());
  INFO("ce " << d.terms.ce << " vs " << f.terms.ce << ", R " << d.terms.barrier << " vs " << f.terms.barrier);
  CHECK(f.terms.ce == Approx(d.terms.ce).epsilon(1e-5));
  CHECK(f.terms.barrier == Approx(d.terms.barrier).epsilon(1e-4).margin(1e-5));
  CHECK(f.terms.correct == d.terms.correct);
  double gmax = 0, diff = 0;
  for (size_t i = 0; i < d.grad.size(); ++i) {
    gmax = std::max(gmax, std::fabs(d.grad[i]));
    diff = std::max(diff, std::fabs(d.grad[i] - f.grad[i]));
  }
  INFO("max |g32 - g64| = " << diff << ", max |g64| = " << gmax);
  CHECK(gmax > 0);
  CHECK(diff <= 1e-5 * gmax);  // measured 7e-8 vs 0.11
}

TEST_CASE("embedding noise is deterministic in its seed", "[model]") {
  const ModelConfig mc = tiny_model();
  ReferenceModel<double> model(mc, BarrierConfig());
  const std::vector<double> params = random_params(model.layout(), 600, 0.3);
  const Tokens tok = random_tokens(601, 2, mc.seq_len, mc.vocab_size);
  ForwardOptions o;
  const double clean = model.forward(params.data(), tok.batch(), o).ce;
  o.noise_std = 0.5;
  o.noise_seed = 1;
  const double n1 = model.forward(params.data(), tok.batch(), o).ce;
  const double n1b = model.forward(params.data(), tok.batch(), o).ce;
  o.noise_seed = 2;
  const double n2 = model.forward(params.data(), tok.batch(), o).ce;
  o.noise_std = 0.0;
  const double clean_b = model.forward(params.data(), tok.batch(), o).ce;
  CHECK(n1 == n1b);
  CHECK(n1 != n2);
  CHECK(n1 != clean);
  CHECK(clean == clean_b);
}

TEST_CASE("margins: shape, trivial positions, consistent with the barrier term", "[model]") {
  const ModelConfig mc = tiny_model();
  BarrierConfig bc;
  bc.lambda = 0.1;  // every layer
  ReferenceModel<double> model(mc, bc);
  const std::vector<double> params = random_params(model.layout(), 700, 0.15);
  const Tokens tok = random_tokens(701, 2, 9, mc.vocab_size);  // T = 9 < seq_len
  const LossTerms terms = model.forward(params.data(), tok.batch(), ForwardOptions());
  const Margins M = model.margins(params.data(), tok.batch());
  REQUIRE(M.B == 2);
  REQUIRE(M.L == mc.n_layer);
  REQUIRE(M.H == mc.n_head);
  REQUIRE(M.T == 9);
  REQUIRE(M.sigma_min.size() == size_t(2 * mc.n_layer * mc.n_head * 9));
  double sum_phi = 0, min_logdet = INFINITY;
  int count = 0;
  for (int b = 0; b < M.B; ++b)
    for (int l = 0; l < M.L; ++l)
      for (int h = 0; h < M.H; ++h)
        for (int t = 0; t < M.T; ++t) {
          const double ld = M.at(M.logdet, b, l, h, t), sm = M.at(M.sigma_min, b, l, h, t);
          if (t < 2) {  // no predecessors to mix: J = I
            CHECK(ld == 0.0);
            CHECK(sm == Approx(1.0).epsilon(1e-6));
            continue;
          }
          REQUIRE(std::isfinite(ld));
          CHECK(sm > 0);
          // The smallest singular value is at most the geometric mean |det|^(1/dh).
          CHECK(sm <= std::exp(ld / mc.head_dim()) * (1 + 1e-5));
          sum_phi += barrier_phi(std::exp(ld), bc.eps);
          min_logdet = std::min(min_logdet, ld);
          ++count;
        }
  CHECK(count == terms.barrier_terms);
  // Margins are stored as float: agreement to float precision.
  CHECK(sum_phi / count == Approx(terms.barrier).epsilon(1e-5).margin(1e-6));
  CHECK(min_logdet == Approx(terms.min_logdet).epsilon(1e-5).margin(1e-6));
}

TEST_CASE("evaluate: the forward's values bit for bit, with no backward after it", "[model]") {
  const ModelConfig mc = model_config(31, 24, 3, 3, 12);
  BarrierConfig bc;
  bc.lambda = 0.1;  // the barrier (as the margins) reads every layer's q, k after the network
  const ParamLayout layout(mc);
  const std::vector<double> p = random_params(layout, 820, 0.3);
  const Tokens tok = random_tokens(821, 2, mc.seq_len, mc.vocab_size);
  ForwardOptions noisy;
  noisy.noise_std = 0.1;
  noisy.noise_seed = 5;
  ReferenceModel<double> full(mc, bc), lean(mc, bc);
  const LossTerms a = full.forward(p.data(), tok.batch(), noisy);
  const LossTerms b = lean.evaluate(p.data(), tok.batch(), noisy);
  CHECK(a.ce == b.ce);
  CHECK(a.barrier == b.barrier);
  CHECK(a.min_logdet == b.min_logdet);
  CHECK(a.correct == b.correct);
  CHECK(full.logits() == lean.logits());
  std::vector<double> grads(layout.total());
  CHECK(test::error_of<Error>([&] { lean.backward(p.data(), grads.data()); })
            .find("keeps no activations") != std::string::npos);
  // A forward after it keeps everything again: the backward is the forward_backward's.
  full.forward(p.data(), tok.batch(), noisy);
  lean.evaluate(p.data(), tok.batch(), noisy);
  lean.forward(p.data(), tok.batch(), noisy);
  std::vector<double> ga(layout.total()), gb(layout.total());
  full.backward(p.data(), ga.data());
  lean.backward(p.data(), gb.data());
  CHECK(ga == gb);
}

TEST_CASE("cpu backend: next_logits decodes incrementally as the whole forward",
          "[model][backend]") {
  const ModelConfig mc = model_config(29, 24, 3, 2, 16);
  const ParamLayout layout(mc);
  const std::vector<double> p64 = random_params(layout, 810, 0.3),
                            q64 = random_params(layout, 812, 0.3);
  const std::vector<float> p(p64.begin(), p64.end()), q(q64.begin(), q64.end());
  const Tokens tok = random_tokens(811, 1, mc.seq_len, mc.vocab_size);
  const std::vector<int32_t> seq(tok.inputs.begin(), tok.inputs.end());
  // The whole forward's logits of the last of tokens, in double.
  const auto full_logits = [&](const std::vector<double>& params,
                               const std::vector<int32_t>& tokens) {
    ReferenceModel<double> ref(mc, BarrierConfig());
    ref.forward(params.data(), Batch{1, static_cast<int>(tokens.size()), tokens.data(), nullptr},
                ForwardOptions());
    return std::vector<double>(ref.logits().end() - mc.vocab_size, ref.logits().end());
  };
  for (const char* precision : {"fp64", "fp32"}) {
    INFO(precision);
    const double tol = std::string(precision) == "fp64" ? 1e-6 : 2e-5;  // fp64: float logits
    auto be = make_cpu_backend(mc, BarrierConfig(), precision, 1);
    be->set_parameters(p);
    std::vector<float> got;
    const auto check = [&](const std::vector<double>& params, const std::vector<int32_t>& tokens) {
      be->next_logits(tokens, got);
      const std::vector<double> want = full_logits(params, tokens);
      REQUIRE(got.size() == want.size());
      double worst = 0, scale = 0;
      for (size_t v = 0; v < want.size(); ++v) {
        worst = std::max(worst, std::abs(got[v] - want[v]));
        scale = std::max(scale, std::abs(want[v]));
      }
      INFO(tokens.size() << " tokens: largest difference " << worst << " of " << scale);
      CHECK(worst <= tol * scale);
    };
    const auto first = [&](size_t n) {
      return std::vector<int32_t>(seq.begin(), seq.begin() + static_cast<std::ptrdiff_t>(n));
    };
    // A prompt of 3, then a token at a time (each call extends the last: its keys and values are
    // reused), a block of 4 at once, up to seq_len; then a window that does not extend the last
    // (decoded from the start).
    for (size_t n : {3, 4, 5, 6, 7, 11, 12, 16}) check(p64, first(n));
    check(p64, std::vector<int32_t>(seq.begin() + 1, seq.end()));
    // New parameters drop the cache: a call that extends the last is decoded afresh with them.
    check(p64, first(5));
    be->set_parameters(q);
    check(q64, first(6));
    // Bad input is named, as the whole forward names it.
    std::vector<int32_t> bad = first(7);
    bad[6] = mc.vocab_size;
    const auto error_with = [&](const std::vector<int32_t>& tokens) {
      return test::error_of<Error>([&] { be->next_logits(tokens, got); });
    };
    CHECK(error_with(bad).find("token 29 at row 0, position 6 is outside") != std::string::npos);
    CHECK(error_with(std::vector<int32_t>(17, 0)).find("exceeds model.seq_len 16") !=
          std::string::npos);
    CHECK(error_with({}).find("batch: empty") != std::string::npos);
  }
}

TEST_CASE("cpu backend: contract", "[model][backend]") {
  ModelConfig mc = tiny_model();
  BarrierConfig bc;
  bc.lambda = 0.05;
  CHECK_THROWS_AS(make_cpu_backend(mc, bc, "bf16", 0), ConfigError);
  CHECK_THROWS_AS(make_cpu_backend(mc, bc, "fp32", -1), ConfigError);
  auto be = make_cpu_backend(mc, bc, "fp32", 0);
  CHECK(be->name() == "cpu-fp32");
  CHECK(make_cpu_backend(mc, bc, "fp64", 0)->name() == "cpu-fp64");

  const ParamLayout layout(mc);
  const std::vector<double> p64 = random_params(layout, 800, 0.2);
  std::vector<float> p(p64.begin(), p64.end()), back;
  CHECK_THROWS_AS(be->set_parameters(std::vector<float>(3, 0.f)), Error);
  be->set_parameters(p);
  be->get_parameters(back);
  CHECK(back == p);

  const Tokens tok = random_tokens(801, 2, 10, mc.vocab_size);
  Batch no_targets = tok.batch();
  no_targets.targets = nullptr;
  CHECK_THROWS_AS(be->forward(no_targets, ForwardOptions()), Error);
  Tokens bad = tok;
  bad.inputs[3] = mc.vocab_size;
  CHECK_THROWS_AS(be->forward(bad.batch(), ForwardOptions()), Error);
  const Tokens too_long = random_tokens(802, 1, mc.seq_len + 1, mc.vocab_size);
  CHECK_THROWS_AS(be->forward(too_long.batch(), ForwardOptions()), Error);

  // forward_backward = the reference model's forward and backward.
  const Run<float> ref = run_model<float>(mc, bc, p64, tok.batch(), ForwardOptions());
  const LossTerms t = be->forward_backward(tok.batch(), ForwardOptions());
  std::vector<float> g;
  be->get_gradients(g);
  CHECK(t.loss == ref.terms.loss);
  CHECK(g == ref.grad);
  double sq = 0;
  for (float x : g) sq += double(x) * x;
  CHECK(be->grad_norm() == Approx(std::sqrt(sq)).epsilon(1e-12));

  // grad_scale scales; accumulate adds.
  ForwardOptions half;
  half.grad_scale = 0.5f;
  be->forward_backward(tok.batch(), half);
  half.accumulate = true;
  be->forward_backward(tok.batch(), half);
  std::vector<float> g2;
  be->get_gradients(g2);
  for (size_t i = 0; i < g.size(); ++i) REQUIRE(g2[i] == Approx(g[i]).epsilon(1e-5).margin(1e-9));

  // last_logits: the last position's row of the full logits.
  ReferenceModel<float> model(mc, bc);
  model.forward(p.data(), tok.batch(), ForwardOptions());
  std::vector<float> last;
  be->last_logits(no_targets, last);
  REQUIRE(last.size() == size_t(2 * mc.vocab_size));
  for (int b = 0; b < 2; ++b)
    for (int v = 0; v < mc.vocab_size; ++v)
      CHECK(last[b * mc.vocab_size + v] == model.logits()[(b * 10 + 9) * mc.vocab_size + v]);

  // adamw_step moves the parameters and counts steps; optimizer state round-trips.
  std::vector<float> m, v;
  int64_t step = -1;
  be->adamw_step(AdamWHyper(), 1e-2, 1.0);
  be->get_optimizer_state(m, v, step);
  CHECK(step == 1);
  be->get_parameters(back);
  CHECK(back != p);
  be->set_optimizer_state(m, v, 7);
  std::vector<float> m2, v2;
  be->get_optimizer_state(m2, v2, step);
  CHECK(step == 7);
  CHECK(m2 == m);
  CHECK(v2 == v);
  CHECK_THROWS_AS(be->set_optimizer_state(std::vector<float>(2), v, 1), Error);

  // Margins through the backend.
  const Margins M = be->margins(no_targets);
  CHECK(M.T == 10);
  CHECK(M.sigma_min.size() == size_t(2 * mc.n_layer * mc.n_head * 10));
}
