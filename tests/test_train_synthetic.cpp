// End-to-end training on the CPU backend: a small model learns a fixed repeating token pattern in
// 200 AdamW steps (with lambda = 0 and with the barrier at lambda = 0.03), driven exactly as the
// trainer drives a backend (forward_backward, grad_norm, clip, adamw_step, lr_at).
//
// Hidden benchmark "[.bench]" (run: test_train_synthetic "[.bench]"): forward+backward tokens/s
// of the quickstart-size model and where the time goes, op by op (docs/PERFORMANCE.md).
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <time.h>

#include <chrono>
#include <utility>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/barrier.h"
#include "core/ops_cpu.h"
#include "core/optim.h"
#include "core/params.h"
#include "core/rng.h"
#include "tests/catch.h"
#include "tests/model_config.h"

using namespace blm;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Rows of a period-P pattern over the vocabulary, each starting at a random phase: the next token
// is determined by the previous one only within context, so the model must use attention.
struct PatternData {
  std::vector<int32_t> pattern;
  PatternData(int period, int V, uint64_t seed) {
    Rng rng(seed);
    for (int i = 0; i < period; ++i) pattern.push_back(static_cast<int32_t>(rng.below(V)));
  }
  void batch(Rng& rng, int B, int T, std::vector<int32_t>& in, std::vector<int32_t>& tgt) const {
    const size_t P = pattern.size();
    in.resize(B * T);
    tgt.resize(B * T);
    for (int b = 0; b < B; ++b) {
      const size_t phase = rng.below(P);
      for (int t = 0; t < T; ++t) {
        in[b * T + t] = pattern[(phase + t) % P];
        tgt[b * T + t] = pattern[(phase + t + 1) % P];
      }
    }
  }
};

struct TrainResult {
  double first_ce = 0, last_ce = 0, last_barrier = 0, seconds = 0;
};

TrainResult train_pattern(double lambda, int steps) {
  const ModelConfig mc = model_config(16, 32, 2, 2, 32);
  BarrierConfig bc;
  bc.lambda = lambda;
  TrainConfig tc;
  tc.steps = steps;
  tc.warmup = 20;
  tc.lr = 1e-2;
  tc.schedule = "cosine";
  tc.grad_clip = 1.0;
  AdamWHyper hyper;  // beta2 0.95, wd 0.1 as the defaults

  auto be = make_cpu_backend(mc, bc, "fp32", 0);
  be->set_parameters(init_parameters(ParamLayout(mc), 42));
  const PatternData data(12, mc.vocab_size, 5);
  Rng rng(9);
  std::vector<int32_t> in, tgt;
  TrainResult r;
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
    data.batch(rng, 8, mc.seq_len, in, tgt);
    const LossTerms terms = be->forward_backward(Batch{8, mc.seq_len, in.data(), tgt.data()}, ForwardOptions());
    REQUIRE(std::isfinite(terms.loss));
    if (s == 0) r.first_ce = terms.ce;
    r.last_ce = terms.ce;
    r.last_barrier = terms.barrier;
    be->adamw_step(hyper, lr_at(s, tc), clip_scale(be->grad_norm(), tc.grad_clip));
  }
  r.seconds = seconds_since(t0);
  return r;
}

}  // namespace

TEST_CASE("training learns a repeating pattern (lambda = 0)", "[train]") {
  const TrainResult r = train_pattern(0.0, 200);
  INFO("ce " << r.first_ce << " -> " << r.last_ce << " in " << r.seconds << " s");
  CHECK(r.first_ce > 2.0);  // about log(16) = 2.77 at init
  CHECK(r.last_ce < 0.05);
}

TEST_CASE("training learns a repeating pattern with the barrier (lambda = 0.03)", "[train]") {
  const TrainResult r = train_pattern(0.03, 200);
  INFO("ce " << r.first_ce << " -> " << r.last_ce << ", R " << r.last_barrier << " in " << r.seconds << " s");
  CHECK(r.first_ce > 2.0);
  CHECK(r.last_ce < 0.05);
  CHECK(std::isfinite(r.last_barrier));
}

// ------------------------------------------------------------------ no allocation per step

// Counts C++ heap allocations (operator new) while `counting` is set.  Replacing the global
// operator new is allowed in a program; this executable's other tests just pass through it.
namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
}  // namespace

void* operator new(std::size_t n) {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
// GCC cannot see that the replaced operator new above uses malloc: free is the right pair here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop

// At lambda 0 and with the barrier, exact or sampled: the model's buffers and the barrier's
// per-thread scratch (core/barrier.cpp) are sized by the first step and reused.
TEST_CASE("a steady-state training step allocates nothing", "[train]") {
  struct Case {
    double lambda;
    int positions;
  };
  for (const Case cs : {Case{0.0, 0}, Case{0.03, 0}, Case{0.03, 5}}) {
    const double lambda = cs.lambda;
    const ModelConfig mc = model_config(20, 32, 2, 2, 16);
    BarrierConfig bc;
    bc.lambda = lambda;
    bc.positions = cs.positions;
    auto be = make_cpu_backend(mc, bc, "fp32", 0);
    be->set_parameters(init_parameters(ParamLayout(mc), 3));
    const PatternData data(5, mc.vocab_size, 1);
    Rng rng(2);
    std::vector<int32_t> in, tgt;
    data.batch(rng, 4, mc.seq_len, in, tgt);
    const Batch batch{4, mc.seq_len, in.data(), tgt.data()};
    auto step = [&] {
      be->forward_backward(batch, ForwardOptions());
      be->adamw_step(AdamWHyper(), 1e-3, clip_scale(be->grad_norm(), 1.0));
      be->forward(batch, ForwardOptions());  // an evaluation in between reuses the buffers too
    };
    step();  // the first step sizes every buffer
    allocations = 0;
    counting = true;
    for (int i = 0; i < 3; ++i) step();
    counting = false;
    INFO("lambda " << lambda << ", positions " << cs.positions << ": " << allocations.load()
                   << " allocations in 3 steps");
    CHECK(allocations.load() == 0);
  }
}

// ------------------------------------------------------------------ benchmark (hidden)

namespace {

int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s ? std::atoi(s) : fallback;
}

double process_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// Times fn over reps calls (after one warm-up call); returns the process CPU milliseconds per call
// (all threads: on a loaded machine the wall time mostly measures the others).
template <class F>
double time_ms(F&& fn, int reps) {
  fn();
  const double c0 = process_cpu_seconds();
  for (int i = 0; i < reps; ++i) fn();
  return 1e3 * (process_cpu_seconds() - c0) / reps;
}

// Minimum and median of single-call times in ms: the minimum is what the code costs when the
// (shared) machine lets it run, the median what a user sees now.
template <class F>
std::pair<double, double> min_median_ms(F&& fn, int reps) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(1e3 * seconds_since(t0));
  }
  std::sort(t.begin(), t.end());
  return {t.front(), t[t.size() / 2]};
}

// Tokens/s of the quickstart model through the backend: forward+backward, and the full step
// (with grad_norm and AdamW).  BLM_THREADS sets device.threads; BLM_OMP_THREADS, when set,
// overrides the OpenMP thread count afterwards (to compare thread splits).
void bench_model(double lambda, int steps) {
  ModelConfig mc;  // the defaults are the quickstart size: L4 H4 d128 T128 V256
  const int B = 16, T = mc.seq_len;
  BarrierConfig bc;
  bc.lambda = lambda;
  auto be = make_cpu_backend(mc, bc, "fp32", env_int("BLM_THREADS", 0));
  if (std::getenv("BLM_OMP_THREADS")) omp_set_num_threads(env_int("BLM_OMP_THREADS", 1));
  be->set_parameters(init_parameters(ParamLayout(mc), 1));
  Rng rng(3);
  std::vector<int32_t> in(B * T), tgt(B * T);
  for (auto& x : in) x = static_cast<int32_t>(rng.below(mc.vocab_size));
  for (auto& x : tgt) x = static_cast<int32_t>(rng.below(mc.vocab_size));
  const Batch batch{B, T, in.data(), tgt.data()};
  const auto fb = min_median_ms([&] { be->forward_backward(batch, ForwardOptions()); }, steps);
  const auto step = min_median_ms([&] {
    be->forward_backward(batch, ForwardOptions());
    be->adamw_step(AdamWHyper(), 1e-3, clip_scale(be->grad_norm(), 1.0));
  }, steps);
  const double c0 = process_cpu_seconds();
  for (int i = 0; i < steps; ++i) be->forward_backward(batch, ForwardOptions());
  const double cpu = 1e3 * (process_cpu_seconds() - c0) / steps;
  const double tok = B * T;
  std::printf("lambda %-5g omp %d: forward+backward CPU time %7.1f ms (all threads)\n", lambda,
              omp_get_max_threads(), cpu);
  std::printf("lambda %-5g omp %d: forward+backward min %7.1f ms (%6.0f tok/s), median %7.1f ms "
              "(%6.0f tok/s); full step min %7.1f ms (%6.0f tok/s), median %7.1f ms\n",
              lambda, omp_get_max_threads(), fb.first, tok / (fb.first * 1e-3), fb.second,
              tok / (fb.second * 1e-3), step.first, tok / (step.first * 1e-3), step.second);
}

// Time of each op at the quickstart shapes, per training step (x n_layer where per layer).
void bench_ops(int reps) {
  const int B = 16, T = 128, d = 128, H = 4, dh = 32, V = 256, L = 4, N = B * T;
  Rng rng(4);
  auto randf = [&](size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = static_cast<float>(0.5 * rng.normal());
    return v;
  };
  std::vector<int32_t> tok(N);
  for (auto& x : tok) x = static_cast<int32_t>(rng.below(V));
  auto x = randf(N * d), y = randf(N * d), w = randf(d), b = randf(d), mean = randf(N), rstd = randf(N);
  auto Wqkv = randf(3 * d * d), bqkv = randf(3 * d), qkv = randf(N * 3 * d), dqkv = randf(N * 3 * d);
  auto att = randf(static_cast<size_t>(B) * H * T * T), atty = randf(N * d);
  auto Wfc = randf(4 * d * d), fc = randf(N * 4 * d), fca = randf(N * 4 * d), Wp = randf(d * 4 * d);
  auto gwte = randf(V * d), wte = randf(V * d), wpe = randf(T * d), logits = randf(N * V), lse = randf(N);
  auto gW = randf(4 * d * d), gb = randf(4 * d), dx = randf(N * d), dfc = randf(N * 4 * d);
  std::vector<double> row_loss(N);
  std::vector<float> scratch;
  const ops::AttentionShape sh{B, T, H, dh};
  ops::attention_forward(sh, qkv.data(), att.data(), atty.data());
  ops::cross_entropy_forward(logits.data(), tok.data(), N, V, lse.data(), row_loss.data());

  struct Row { const char* name; double ms; };
  std::vector<Row> rows;
  auto add = [&](const char* name, int per_step, double ms) { rows.push_back({name, per_step * ms}); };
  add("layernorm fwd (x2L+1)", 2 * L + 1, time_ms([&] { ops::layernorm_forward(x.data(), w.data(), b.data(), N, d, y.data(), mean.data(), rstd.data()); }, reps));
  add("layernorm bwd (x2L+1)", 2 * L + 1, time_ms([&] { ops::layernorm_backward(x.data(), w.data(), mean.data(), rstd.data(), y.data(), N, d, dx.data(), gW.data(), gb.data()); }, reps));
  add("qkv linear fwd (xL)", L, time_ms([&] { ops::linear_forward(x.data(), Wqkv.data(), bqkv.data(), N, d, 3 * d, qkv.data()); }, reps));
  add("qkv linear bwd (xL)", L, time_ms([&] { ops::linear_backward(x.data(), Wqkv.data(), dqkv.data(), N, d, 3 * d, dx.data(), gW.data(), gb.data()); }, reps));
  add("attention fwd (xL)", L, time_ms([&] { ops::attention_forward(sh, qkv.data(), att.data(), atty.data()); }, reps));
  add("attention bwd (xL)", L, time_ms([&] { ops::attention_backward(sh, qkv.data(), att.data(), atty.data(), dqkv.data(), scratch); }, reps));
  add("proj linear fwd (xL)", L, time_ms([&] { ops::linear_forward(atty.data(), Wqkv.data(), bqkv.data(), N, d, d, x.data()); }, reps));
  add("proj linear bwd (xL)", L, time_ms([&] { ops::linear_backward(atty.data(), Wqkv.data(), x.data(), N, d, d, dx.data(), gW.data(), gb.data()); }, reps));
  add("fc linear fwd (xL)", L, time_ms([&] { ops::linear_forward(x.data(), Wfc.data(), gb.data(), N, d, 4 * d, fc.data()); }, reps));
  add("fc linear bwd (xL)", L, time_ms([&] { ops::linear_backward(x.data(), Wfc.data(), dfc.data(), N, d, 4 * d, dx.data(), gW.data(), gb.data()); }, reps));
  add("gelu fwd (xL)", L, time_ms([&] { ops::gelu_forward(fc.data(), fc.size(), fca.data()); }, reps));
  add("gelu bwd (xL)", L, time_ms([&] { ops::gelu_backward(fc.data(), fca.data(), fc.size(), dfc.data()); }, reps));
  add("mlp proj linear fwd (xL)", L, time_ms([&] { ops::linear_forward(fca.data(), Wp.data(), b.data(), N, 4 * d, d, x.data()); }, reps));
  add("mlp proj linear bwd (xL)", L, time_ms([&] { ops::linear_backward(fca.data(), Wp.data(), y.data(), N, 4 * d, d, dfc.data(), gW.data(), gb.data()); }, reps));
  add("residual add (x2L)", 2 * L, time_ms([&] { ops::residual_forward(x.data(), y.data(), x.size(), dx.data()); }, reps));
  add("embedding fwd", 1, time_ms([&] { ops::embedding_forward(tok.data(), B, T, d, wte.data(), wpe.data(), 0.0, 0, x.data()); }, reps));
  add("embedding bwd", 1, time_ms([&] { ops::embedding_backward(tok.data(), B, T, d, x.data(), wte.data(), wpe.data()); }, reps));
  add("logits fwd", 1, time_ms([&] { ops::logits_forward(x.data(), wte.data(), N, d, V, logits.data()); }, reps));
  add("logits bwd", 1, time_ms([&] { ops::logits_backward(x.data(), wte.data(), logits.data(), N, d, V, dx.data(), gwte.data()); }, reps));
  add("cross-entropy fwd", 1, time_ms([&] { ops::cross_entropy_forward(logits.data(), tok.data(), N, V, lse.data(), row_loss.data()); }, reps));
  add("cross-entropy bwd", 1, time_ms([&] { ops::cross_entropy_backward(logits.data(), lse.data(), tok.data(), N, V, 1.0f / N, logits.data()); }, reps));
  // The barrier of one layer: B x H heads (q, k gathered [T, dh]).
  auto q = randf(T * dh), k = randf(T * dh), dq = randf(T * dh), dk = randf(T * dh);
  for (auto& v : q) v *= 0.3f;
  add("barrier fwd (xL, lambda>0)", L, time_ms([&] { for (int i = 0; i < B * H; ++i) barrier_head_forward<float>(q.data(), k.data(), T, dh, 1e-4, nullptr, nullptr, nullptr); }, std::max(1, reps / 4)));
  add("barrier bwd (xL, lambda>0)", L, time_ms([&] { for (int i = 0; i < B * H; ++i) barrier_head_backward<float>(q.data(), k.data(), T, dh, 1e-4, nullptr, 1e-3f, dq.data(), dk.data()); }, std::max(1, reps / 4)));
  double total = 0;
  for (const Row& r : rows)
    if (std::string(r.name).find("barrier") == std::string::npos) total += r.ms;
  std::printf("op breakdown per step, process CPU ms (B=%d T=%d, %d threads); sum without barrier %.1f ms\n", B, T,
              omp_get_max_threads(), total);
  for (const Row& r : rows) std::printf("  %-28s %8.2f ms  %5.1f%%\n", r.name, r.ms, 100 * r.ms / total);
}

}  // namespace

TEST_CASE("bench: quickstart-size forward+backward on the CPU", "[.bench]") {
  const int steps = env_int("BLM_BENCH_STEPS", 10);
  bench_model(0.0, steps);
  if (!std::getenv("BLM_BENCH_NO_BARRIER")) bench_model(0.03, steps);
  if (!std::getenv("BLM_BENCH_NO_OPS")) bench_ops(steps);
  SUCCEED();
}
