// The whole CUDA backend against the CPU reference model in float64 (core/reference.h): loss, CE,
// barrier term, top-1 hits, every gradient tensor, margins, last-position logits, evaluation
// noise, gradient scaling/accumulation, ten AdamW steps, bit-identical reruns, and the errors a
// bad request gets.
//
// Error measure: ||gpu - ref|| / ||ref|| per tensor, tolerance 1e-4 (fp32 through a few layers
// against fp64).  Scalars: |gpu - ref| <= 1e-4 * max(|ref|, floor), with floor 1e-2 for the
// barrier term and min log det (they can be near 0, where a relative bound alone would demand
// more than fp32 log-determinants carry) and 1e-3 for CE.
//
// The random models are not GPT-2's 0.02-std initialisation: biases and LayerNorm parameters are
// random (never 0 / 1), and the qkv weights are scaled so the heads' Jacobians J_t = I - C_t are
// well away from I (spectral radius of C ~ 0.2), so the barrier and its gradient are large enough
// to be tested; a check per case asserts that the barrier changes the qkv gradient.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/optim.h"
#include "core/params.h"
#include "core/reference.h"
#include "core/rng.h"
#include "cuda/cuda_backend.h"
#include "tests/catch.h"
#include "tests/gpu/backend_test_util.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

constexpr double kTol = 1e-4;

std::vector<ModelCase> model_cases() {
  return {
      {"dh 32, 2 layers", model_config(67, 64, 2, 2, 16), 3, 13, {}, false},
      {"dh 32, barrier on layer 1 only, masked, T = seq_len", model_config(67, 64, 2, 2, 16), 2, 16, {1}, true},
      {"dh 64, T 33", model_config(50, 128, 2, 1, 40), 2, 33, {}, false},
      {"dh 128, T 17", model_config(50, 128, 1, 1, 20), 2, 17, {}, false},
      {"T 1 (no barrier terms)", model_config(29, 32, 1, 2, 8), 2, 1, {}, false},
      {"T 2 (no barrier terms)", model_config(29, 32, 1, 2, 8), 3, 2, {}, false},
  };
}

// Reference loss and gradients (fp64) for one batch.
struct RefResult {
  LossTerms terms;
  std::vector<double> grads;
};
RefResult reference(const ModelCase& c, double lambda, const std::vector<float>& params,
                    const HostBatch& hb, const ForwardOptions& opts) {
  BarrierConfig bc;
  bc.lambda = lambda;
  bc.layers = c.barrier_layers;
  ReferenceModel<double> ref(c.model, bc);
  const std::vector<double> P = to_double(params);
  RefResult r;
  r.terms = ref.forward(P.data(), hb.view(), opts);
  r.grads.assign(P.size(), 0.0);
  ref.backward(P.data(), r.grads.data());
  return r;
}

void check_terms(const LossTerms& g, const LossTerms& r) {
  GPU_CHECK_SCALAR("ce", g.ce, r.ce, kTol, 1e-3);
  GPU_CHECK_SCALAR("loss", g.loss, r.loss, kTol, 1e-3);
  GPU_CHECK_SCALAR("barrier", g.barrier, r.barrier, kTol, 1e-2);
  GPU_CHECK_SCALAR("min_logdet", g.min_logdet, r.min_logdet, kTol, 1e-2);
  CHECK(g.tokens == r.tokens);
  CHECK(g.correct == r.correct);
  CHECK(g.barrier_terms == r.barrier_terms);
}

void check_tensors(const ParamLayout& layout, const std::vector<float>& got,
                   const std::vector<double>& ref, const char* what) {
  REQUIRE(got.size() == layout.total());
  REQUIRE(ref.size() == layout.total());
  for (const TensorSpec& t : layout.tensors()) {
    const Comparison c = compare(got.data() + t.offset, ref.data() + t.offset, t.size);
    INFO(describe(std::string(what) + " " + t.name, c, kTol));
    CHECK(c.rel <= kTol);
  }
}

std::unique_ptr<Backend> gpu_backend(const ModelCase& c, double lambda,
                                     const std::vector<float>& params,
                                     const char* precision = "fp32") {
  std::unique_ptr<Backend> b = make_cuda_backend(cuda_config(c, lambda, precision), 0);
  b->set_parameters(params);
  return b;
}

}  // namespace

TEST_CASE("cuda backend: loss, barrier and every gradient match the fp64 reference", "[gpu][backend]") {
  uint64_t seed = 1;
  for (const ModelCase& c : model_cases()) {
    const ParamLayout layout(c.model);
    const std::vector<float> params = test_params(layout, ++seed);
    const HostBatch hb = make_batch(c.B, c.T, c.model.vocab_size, ++seed, c.mask);
    const ForwardOptions opts = options_for(hb);
    std::vector<double> ref_grad_lambda0;
    for (double lambda : {0.0, 0.05, 0.5}) {
      INFO("case '" << c.name << "', lambda " << lambda);
      const RefResult ref = reference(c, lambda, params, hb, opts);
      std::unique_ptr<Backend> gpu = gpu_backend(c, lambda, params);
      const LossTerms got = gpu->forward_backward(hb.view(), opts);
      check_terms(got, ref.terms);
      std::vector<float> grads;
      gpu->get_gradients(grads);
      check_tensors(layout, grads, ref.grads, "gradient");
      // forward() alone gives the same terms as forward_backward.
      check_terms(gpu->forward(hb.view(), opts), ref.terms);
      if (lambda == 0.0) ref_grad_lambda0 = ref.grads;
      // The comparison above is only meaningful if the barrier changes the gradient.
      if (lambda == 0.5 && ref.terms.barrier_terms > 0) {
        const int l = c.barrier_layers.empty() ? 0 : c.barrier_layers[0];
        const TensorSpec& qkv = layout.find("h" + std::to_string(l) + ".attn.qkv.w");
        const Comparison diff = compare(ref.grads.data() + qkv.offset,
                                        ref_grad_lambda0.data() + qkv.offset, qkv.size);
        INFO("reference qkv.w gradient, lambda 0.5 vs 0: relative change " << diff.rel);
        CHECK(diff.rel > 10 * kTol);
      }
    }
  }
}

TEST_CASE("cuda backend: the barrier in groups of sequences (BLM_BARRIER_WORKSPACE_MB) gives the same loss and gradients", "[gpu][backend]") {
  // dh 64, T 33, H 2: one sequence's barrier workspace is just over 1 MiB in every
  // implementation (flash: with its G), so a 1 MiB cap runs the barrier one sequence per call.
  // Every (sequence, head) is computed on its own: the per-position kernels give the same bits;
  // the matrix-product forms ("gemm", and "flash" for its dz k~ product) may see cuBLAS pick
  // another kernel for a smaller batch count (bound 1e-6 relative).  "flash" also in bf16, where
  // it reads the bf16 qkv by default (BLM_BARRIER_QKV) and writes bf16 dq, dk: the groups' row
  // offsets into both (bound 1e-3: a 1e-6 difference may move a bf16 rounding).
  const ModelCase c = model_cases()[2];
  REQUIRE(c.model.head_dim() == 64);
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 77);
  const HostBatch hb = make_batch(c.B, c.T, c.model.vocab_size, 78, true);
  const ForwardOptions opts = options_for(hb);
  for (const char* impl : {"kernels", "gemm", "flash", "flash bf16"}) {
    const bool bf16 = std::string(impl) == "flash bf16";
    ScopedEnv barrier("BLM_BARRIER", bf16 ? "flash" : impl);
    auto run = [&](const char* cap_mb, std::vector<float>& grads) {
      ScopedEnv cap("BLM_BARRIER_WORKSPACE_MB", cap_mb);  // null: unset (no cap)
      std::unique_ptr<Backend> gpu = gpu_backend(c, 0.5, params, bf16 ? "bf16" : "fp32");
      const LossTerms t = gpu->forward_backward(hb.view(), opts);
      gpu->get_gradients(grads);
      return t;
    };
    std::vector<float> g_all, g_groups;
    const LossTerms all = run(nullptr, g_all);
    // (flash: the workspace holds the G of its sequences, about 1 MiB each here, so the 1 MiB
    // cap runs one sequence per call.)
    const LossTerms groups = run("1", g_groups);
    INFO("BLM_BARRIER=" << impl);
    REQUIRE(all.barrier_terms > 0);
    CHECK(groups.barrier_terms == all.barrier_terms);
    const double tol = std::string(impl) == "kernels" ? 0.0 : bf16 ? 1e-3 : 1e-6;
    CHECK(std::fabs(groups.loss - all.loss) <= tol * std::fabs(all.loss));
    CHECK(std::fabs(groups.barrier - all.barrier) <= tol * std::max(1.0, std::fabs(all.barrier)));
    const Comparison cmp = compare(g_groups.data(), g_all.data(), g_all.size());
    INFO(describe("gradients, groups vs all", cmp, tol));
    CHECK(cmp.rel <= tol);
  }
  // A cap of 0 MiB is refused (BLM_BARRIER unset: the default barrier).
  ScopedEnv barrier("BLM_BARRIER", nullptr), cap("BLM_BARRIER_WORKSPACE_MB", "0");
  CHECK_THROWS_AS(gpu_backend(c, 0.5, params), ConfigError);
}

TEST_CASE("cuda backend: report_barrier with lambda 0 reports R but adds no gradient", "[gpu][backend]") {
  const ModelCase c = model_cases()[1];  // masked, barrier on layer 1 only
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 41);
  const HostBatch hb = make_batch(c.B, c.T, c.model.vocab_size, 42, true);
  ForwardOptions opts = options_for(hb);
  opts.report_barrier = true;
  const RefResult ref = reference(c, 0.0, params, hb, opts);
  REQUIRE(ref.terms.barrier_terms > 0);
  std::unique_ptr<Backend> gpu = gpu_backend(c, 0.0, params);
  check_terms(gpu->forward_backward(hb.view(), opts), ref.terms);
  std::vector<float> grads;
  gpu->get_gradients(grads);
  check_tensors(layout, grads, ref.grads, "gradient");
}

TEST_CASE("cuda backend: grad_scale and accumulation across batches of growing size", "[gpu][backend]") {
  const ModelCase c = model_cases()[0];
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 51);
  const double lambda = 0.05;
  const HostBatch b1 = make_batch(2, 9, c.model.vocab_size, 52, false);
  const HostBatch b2 = make_batch(5, 16, c.model.vocab_size, 53, false);  // larger: arena re-plan
  ForwardOptions o1, o2;
  o1.grad_scale = 0.5f;
  o2.grad_scale = 0.25f;
  o2.accumulate = true;
  BarrierConfig bc;
  bc.lambda = lambda;
  ReferenceModel<double> ref(c.model, bc);
  const std::vector<double> P = to_double(params);
  std::vector<double> G(P.size(), 0.0);
  ref.forward(P.data(), b1.view(), o1);
  ref.backward(P.data(), G.data());
  const LossTerms r2 = ref.forward(P.data(), b2.view(), o2);
  ref.backward(P.data(), G.data());
  std::unique_ptr<Backend> gpu = gpu_backend(c, lambda, params);
  gpu->forward_backward(b1.view(), o1);
  const LossTerms g2 = gpu->forward_backward(b2.view(), o2);
  check_terms(g2, r2);
  std::vector<float> grads;
  gpu->get_gradients(grads);
  check_tensors(layout, grads, G, "accumulated gradient");
  // And the global norm of that gradient.
  double sq = 0;
  for (double g : G) sq += g * g;
  GPU_CHECK_SCALAR("grad_norm", gpu->grad_norm(), std::sqrt(sq), kTol, 0.0);
  // A smaller batch after the larger one reuses the arena and is still right.
  const RefResult r1 = reference(c, lambda, params, b1, ForwardOptions());
  check_terms(gpu->forward_backward(b1.view(), ForwardOptions()), r1.terms);
}

TEST_CASE("cuda backend: evaluation noise is the reference's counter-based noise", "[gpu][backend]") {
  const ModelCase c = model_cases()[0];
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 61);
  const HostBatch hb = make_batch(c.B, c.T, c.model.vocab_size, 62, false);
  ForwardOptions noisy;
  noisy.noise_std = 0.5;
  noisy.noise_seed = 9;
  BarrierConfig bc;
  bc.lambda = 0.05;
  ReferenceModel<double> ref(c.model, bc);
  const std::vector<double> P = to_double(params);
  const LossTerms r_noisy = ref.forward(P.data(), hb.view(), noisy);
  const LossTerms r_clean = ref.forward(P.data(), hb.view(), ForwardOptions());
  std::unique_ptr<Backend> gpu = gpu_backend(c, 0.05, params);
  check_terms(gpu->forward(hb.view(), noisy), r_noisy);
  check_terms(gpu->forward(hb.view(), ForwardOptions()), r_clean);
  INFO("clean ce " << r_clean.ce << ", noisy ce " << r_noisy.ce);
  CHECK(std::fabs(r_noisy.ce - r_clean.ce) > 1e-3);  // the noise is large enough to matter
}

TEST_CASE("cuda backend: margins and last-position logits match the reference", "[gpu][backend]") {
  uint64_t seed = 70;
  for (const ModelCase& c : model_cases()) {
    INFO("case '" << c.name << "'");
    const ParamLayout layout(c.model);
    const std::vector<float> params = test_params(layout, ++seed);
    HostBatch hb = make_batch(c.B, c.T, c.model.vocab_size, ++seed, false);
    Batch no_targets = hb.view();
    no_targets.targets = nullptr;
    ReferenceModel<double> ref(c.model, BarrierConfig());
    const std::vector<double> P = to_double(params);
    const Margins rm = ref.margins(P.data(), no_targets);
    std::unique_ptr<Backend> gpu = gpu_backend(c, 0.0, params);
    const Margins gm = gpu->margins(no_targets);
    REQUIRE(gm.B == rm.B);
    REQUIRE(gm.L == rm.L);
    REQUIRE(gm.H == rm.H);
    REQUIRE(gm.T == rm.T);
    GPU_CHECK_REL("sigma_min", gm.sigma_min, rm.sigma_min, kTol);
    GPU_CHECK_REL("logdet", gm.logdet, rm.logdet, kTol);

    ref.forward(P.data(), no_targets, ForwardOptions());
    const std::vector<double>& all = ref.logits();  // [B, T, V]
    const int V = c.model.vocab_size;
    std::vector<double> last(static_cast<size_t>(c.B) * V);
    for (int b = 0; b < c.B; ++b)
      std::copy_n(all.begin() + (static_cast<size_t>(b) * c.T + c.T - 1) * V, V,
                  last.begin() + static_cast<size_t>(b) * V);
    std::vector<float> logits;
    gpu->last_logits(no_targets, logits);
    GPU_CHECK_REL("last_logits", logits, last, kTol);
  }
}

TEST_CASE("cuda backend: ten AdamW steps track the fp64 CPU backend", "[gpu][backend]") {
  const ModelCase c = model_cases()[0];
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 81);
  const double lambda = 0.05;
  Config cfg = cuda_config(c, lambda);
  std::unique_ptr<Backend> gpu = gpu_backend(c, lambda, params);
  std::unique_ptr<Backend> cpu = make_cpu_backend(cfg.model, cfg.barrier, "fp64", 0);
  cpu->set_parameters(params);
  AdamWHyper hyper;  // torch defaults of this project: betas (0.9, 0.95), eps 1e-8, wd 0.1
  for (int step = 0; step < 10; ++step) {
    INFO("step " << step);
    const HostBatch hb = make_batch(c.B, c.T, c.model.vocab_size, 1000 + step, false);
    const LossTerms gt = gpu->forward_backward(hb.view(), ForwardOptions());
    const LossTerms rt = cpu->forward_backward(hb.view(), ForwardOptions());
    check_terms(gt, rt);
    const double gn = gpu->grad_norm(), rn = cpu->grad_norm();
    GPU_CHECK_SCALAR("grad_norm", gn, rn, kTol, 0.0);
    const double lr = 3e-3;
    // Each backend clips with its own norm, as the trainer does.
    gpu->adamw_step(hyper, lr, clip_scale(gn, 1.0));
    cpu->adamw_step(hyper, lr, clip_scale(rn, 1.0));
  }
  std::vector<float> gp, rp;
  gpu->get_parameters(gp);
  cpu->get_parameters(rp);
  // The key biases have an exactly zero gradient (attention and the barrier are invariant to a
  // shift of every key), so Adam turns each backend's rounding noise into +-lr steps of
  // arbitrary sign: excluded from the parameter comparison, and their gradient checked tiny.
  std::vector<double> rp_d = to_double(rp);
  std::vector<float> gg;
  gpu->get_gradients(gg);
  const int d = c.model.d_model;
  for (int l = 0; l < c.model.n_layer; ++l) {
    const TensorSpec& qb = layout.find("h" + std::to_string(l) + ".attn.qkv.b");
    double q2 = 0, k2 = 0;
    for (int i = 0; i < d; ++i) {
      q2 += static_cast<double>(gg[qb.offset + i]) * gg[qb.offset + i];
      k2 += static_cast<double>(gg[qb.offset + d + i]) * gg[qb.offset + d + i];
      gp[qb.offset + d + i] = rp[qb.offset + d + i];
    }
    INFO("layer " << l << ": |grad b_K| " << std::sqrt(k2) << " vs |grad b_Q| " << std::sqrt(q2));
    CHECK(std::sqrt(k2) <= 1e-3 * std::sqrt(q2));
  }
  check_tensors(layout, gp, rp_d, "parameters after 10 steps");
  // The optimizer state round-trips, with its step count.
  std::vector<float> m, v;
  int64_t t = 0;
  gpu->get_optimizer_state(m, v, t);
  CHECK(t == 10);
  std::unique_ptr<Backend> other = gpu_backend(c, lambda, gp);
  other->set_optimizer_state(m, v, t);
  std::vector<float> m2, v2;
  int64_t t2 = 0;
  other->get_optimizer_state(m2, v2, t2);
  CHECK(m2 == m);
  CHECK(v2 == v);
  CHECK(t2 == 10);
}

TEST_CASE("cuda backend: two runs are bit-identical", "[gpu][backend]") {
  const ModelCase c = model_cases()[2];  // dh 64
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 91);
  const HostBatch hb = make_batch(c.B, c.T, c.model.vocab_size, 92, false);
  std::vector<float> first_grads, first_params;
  LossTerms first{};
  for (int run = 0; run < 2; ++run) {
    std::unique_ptr<Backend> gpu = gpu_backend(c, 0.5, params);
    LossTerms t{};
    for (int rep = 0; rep < 2; ++rep) {  // the same backend twice as well
      t = gpu->forward_backward(hb.view(), ForwardOptions());
      std::vector<float> g;
      gpu->get_gradients(g);
      if (run == 0 && rep == 0) {
        first = t;
        first_grads = g;
      } else {
        INFO("run " << run << ", repetition " << rep);
        CHECK(std::memcmp(&t.loss, &first.loss, sizeof(double)) == 0);
        CHECK(std::memcmp(&t.barrier, &first.barrier, sizeof(double)) == 0);
        REQUIRE(g.size() == first_grads.size());
        CHECK(std::memcmp(g.data(), first_grads.data(), g.size() * sizeof(float)) == 0);
      }
    }
    gpu->adamw_step(AdamWHyper(), 1e-3, clip_scale(gpu->grad_norm(), 1.0));
    std::vector<float> p;
    gpu->get_parameters(p);
    if (run == 0) first_params = p;
    else CHECK(std::memcmp(p.data(), first_params.data(), p.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("cuda backend: bad requests get errors that name the problem", "[gpu][backend][errors]") {
  const ModelCase c = model_cases()[0];
  // An absurd model: a 2^24 x 2^16 embedding and one layer, 4.2 TiB of parameters.
  {
    ModelCase huge = c;
    huge.model = model_config(1 << 24, 1 << 16, 2048, 1, 8);  // head size 32: passes the shape checks
    try {
      make_cuda_backend(cuda_config(huge, 0.0), 0);
      FAIL("a 4 TiB model was allocated");
    } catch (const DeviceError& e) {
      const std::string msg = e.what();
      INFO(msg);
      CHECK(msg.find("cudaMalloc of 4.2 TiB for the parameters failed") != std::string::npos);
    }
  }
  {
    Config cfg = cuda_config(c, 0.0);
    cfg.device.precision = "bf16";  // tested in tests/gpu/test_bf16.cpp
    CHECK(make_cuda_backend(cfg, 0)->name().rfind("cuda-bf16 (", 0) == 0);
    cfg.device.precision = "fp64";
    try {
      make_cuda_backend(cfg, 0);
      FAIL("fp64 accepted");
    } catch (const DeviceError& e) {
      CHECK(std::string(e.what()).find("fp64 runs on the CPU backend only") != std::string::npos);
    }
    cfg.device.precision = "auto";  // bf16 on the GPU
    CHECK(make_cuda_backend(cfg, 0)->name().rfind("cuda-bf16 (", 0) == 0);
    Config small_heads = cfg;
    small_heads.model.n_head = 4;  // d_model 64 / 4 = 16
    try {
      make_cuda_backend(small_heads, 0);
      FAIL("head size 16 accepted");
    } catch (const DeviceError& e) {
      CHECK(std::string(e.what()).find("model.d_model / model.n_head = 16") != std::string::npos);
    }
    try {
      make_cuda_backend(cfg, 1 << 20);
      FAIL("device 2^20 accepted");
    } catch (const DeviceError& e) {
      CHECK(std::string(e.what()).find("does not exist") != std::string::npos);
    }
  }
  const ParamLayout layout(c.model);
  std::unique_ptr<Backend> gpu = gpu_backend(c, 0.0, test_params(layout, 3));
  INFO(gpu->name());
  CHECK(gpu->name().find(")") != std::string::npos);
  CHECK_THROWS_AS(gpu->set_parameters(std::vector<float>(5)), Error);
  HostBatch hb = make_batch(2, 4, c.model.vocab_size, 5, false);
  hb.inputs[3] = c.model.vocab_size;  // out of the vocabulary
  try {
    gpu->forward(hb.view(), ForwardOptions());
    FAIL("an out-of-vocabulary token was accepted");
  } catch (const Error& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find("token id 67 at (sequence 0, position 3)") != std::string::npos);
  }
  const HostBatch too_long = make_batch(1, c.model.seq_len + 1, c.model.vocab_size, 6, false);
  CHECK_THROWS_AS(gpu->forward(too_long.view(), ForwardOptions()), Error);
  // The backend still works after refusing those.
  const HostBatch ok = make_batch(2, 4, c.model.vocab_size, 7, false);
  CHECK(std::isfinite(gpu->forward(ok.view(), ForwardOptions()).loss));
  // Parameters round-trip exactly.
  const std::vector<float> p = test_params(layout, 8);
  gpu->set_parameters(p);
  std::vector<float> back;
  gpu->get_parameters(back);
  CHECK(back == p);
}
