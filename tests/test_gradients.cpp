// Tests of `barrierlm gradients` (cmd/cmd_gradients.cpp), the developer tool that feeds the PyTorch
// cross-check.  They run the built binary ($BLM_BINARY) on a small checkpoint whose q/k weights
// are scaled up (so det J_t is far from 1 and the barrier's gradient is a large part of the
// whole) and a generated text, and check on the CPU that
//   - batch.bin holds the first B windows of the text (inputs, then targets shifted by one);
//   - grads.bin equals ReferenceModel<float> forward_backward of that batch (lambda from
//     --lambda), result.json's loss terms equal the reference's, its layout is ParamLayout's;
//   - --lambda changes the gradient (and not the reported barrier), --seq-len changes T;
//   - with --precision fp64 a central finite difference of the loss (ReferenceModel<double>)
//     along a random direction equals grads . direction, for a direction over all parameters and
//     one over layer 0's q/k/v projection (where the barrier's gradient enters);
//   - bad input gives one line "barrierlm: error: ..." naming the problem and writes nothing.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cmd/json.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/params.h"
#include "core/reference.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "tests/catch.h"
#include "tests/cli_util.h"

namespace fs = std::filesystem;
using namespace blm;
using namespace blm::test;

namespace {

constexpr double kLambda = 0.7;

Config small_config() {
  Config c;
  c.model.n_layer = 2;
  c.model.n_head = 2;
  c.model.d_model = 16;
  c.model.seq_len = 12;
  c.model.vocab_size = 256;
  c.barrier.lambda = 0.03;  // the checkpoint's; the tests override it with --lambda
  c.barrier.eps = 1e-4;
  return c;
}

// GPT-2 init with the q/k/v rows of every layer scaled 12x (std 0.24): det J_t moves well away
// from 1, so the barrier term and its gradient are not negligible next to the cross-entropy.
std::vector<float> strong_attention_params(const ParamLayout& layout) {
  std::vector<float> p = init_parameters(layout, 4242);
  for (int l = 0; l < layout.config().n_layer; ++l) {
    const TensorSpec& w = layout.find("h" + std::to_string(l) + ".attn.qkv.w");
    for (size_t i = 0; i < w.size; ++i) p[w.offset + i] *= 12.0f;
    const TensorSpec& b = layout.find("h" + std::to_string(l) + ".attn.qkv.b");
    Rng rng(77 + l);
    for (size_t i = 0; i < b.size; ++i) p[b.offset + i] = static_cast<float>(0.1 * rng.normal());
  }
  return p;
}

// A checkpoint and a text file in dir: "ck.bin", "text.txt" (printable pseudo-random bytes).
struct Fixture {
  TempDir dir;
  Checkpoint ck;
  std::string text;
  Fixture() {
    ck.config = small_config();
    ck.tokenizer = make_byte_tokenizer()->serialize();
    ck.params = strong_attention_params(ParamLayout(ck.config.model));
    ck.step = 3;
    save_checkpoint(dir / "ck.bin", ck);
    Rng rng(99);
    for (int i = 0; i < 300; ++i) text.push_back(static_cast<char>(' ' + rng.below(95)));
    std::ofstream(dir / "text.txt", std::ios::binary) << text;
  }
};

std::vector<float> read_floats(const std::string& path) {
  const std::string raw = slurp_required(path);
  REQUIRE(raw.size() % 4 == 0);
  std::vector<float> v(raw.size() / 4);
  std::memcpy(v.data(), raw.data(), raw.size());  // little-endian host (x86, arm64)
  return v;
}

std::vector<int32_t> read_ints(const std::string& path) {
  const std::string raw = slurp_required(path);
  REQUIRE(raw.size() % 4 == 0);
  std::vector<int32_t> v(raw.size() / 4);
  std::memcpy(v.data(), raw.data(), raw.size());
  return v;
}

double norm(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

// ||a - b|| / ||b|| over one tensor.
template <class A, class B>
double tensor_rel_error(const std::vector<A>& a, const std::vector<B>& b, const TensorSpec& t) {
  double diff = 0, ref = 0;
  for (size_t i = t.offset; i < t.offset + t.size; ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    diff += d * d;
    ref += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff);
}

std::vector<std::string> gradients_args(const Fixture& f, const std::string& out, double lambda,
                                        const std::string& precision) {
  return {"gradients", f.dir / "ck.bin", "--data", f.dir / "text.txt", "--batch", "3",
          "--lambda", std::to_string(lambda), "--backend", "cpu", "--precision", precision,
          "--threads", "1", "--out", out};
}

BarrierConfig barrier_with(const Config& c, double lambda) {
  BarrierConfig b = c.barrier;
  b.lambda = lambda;
  return b;
}

}  // namespace

TEST_CASE("gradients: batch, grads and result.json equal ReferenceModel<float>", "[gradients]") {
  Fixture f;
  const std::string out = f.dir / "out";
  const Run r = run(f.dir.path, gradients_args(f, out, kLambda, "fp32"));
  INFO(r.err);
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("wrote") != std::string::npos);

  const int B = 3, T = f.ck.config.model.seq_len;
  const std::vector<int32_t> batch = read_ints(out + "/batch.bin");
  REQUIRE(batch.size() == static_cast<size_t>(2 * B * T));
  for (int i = 0; i < B * T; ++i) {
    // Window b is text[b*T .. b*T + T]; i = b*T + t, so the input is text[i], the target text[i+1].
    CHECK(batch[i] == static_cast<unsigned char>(f.text[i]));
    CHECK(batch[B * T + i] == static_cast<unsigned char>(f.text[i + 1]));
  }

  // The reference, independently: same parameters, batch, lambda; the exact barrier.
  ReferenceModel<float> ref(f.ck.config.model, barrier_with(f.ck.config, kLambda));
  ForwardOptions opts;
  opts.report_barrier = true;
  const Batch b{B, T, batch.data(), batch.data() + B * T};
  const LossTerms terms = ref.forward(f.ck.params.data(), b, opts);
  std::vector<float> want(ref.layout().total());
  ref.backward(f.ck.params.data(), want.data());

  const std::vector<float> grads = read_floats(out + "/grads.bin");
  REQUIRE(grads.size() == ref.layout().total());
  for (const TensorSpec& t : ref.layout().tensors()) {
    INFO("tensor " << t.name);
    CHECK(tensor_rel_error(grads, want, t) <= 1e-6);  // same code; only thread counts may differ
  }

  const std::string json = slurp_required(out + "/result.json");
  CHECK(number(json, "B") == B);
  CHECK(number(json, "T") == T);
  CHECK(number(json, "loss") == Approx(terms.loss).epsilon(1e-6));
  CHECK(number(json, "ce") == Approx(terms.ce).epsilon(1e-6));
  CHECK(number(json, "barrier") == Approx(terms.barrier).epsilon(1e-6));
  CHECK(number(json, "min_logdet") == Approx(terms.min_logdet).epsilon(1e-5));
  CHECK(number(json, "barrier_terms") == terms.barrier_terms);
  CHECK(terms.barrier_terms == 2 * 2 * B * (T - 2));  // layers x heads x sequences x (t >= 2)
  CHECK(number(json, "lambda") == kLambda);
  CHECK(number(json, "eps") == f.ck.config.barrier.eps);
  CHECK(json.find("\"barrier_layers\": [0,1]") != std::string::npos);
  CHECK(json.find("\"backend\": \"cpu-fp32\"") != std::string::npos);
  CHECK(number(json, "d_model") == 16);
  CHECK(number(json, "num_params") == ref.layout().total());
  // The barrier must matter in this fixture, or the comparisons above say little about it.
  CHECK(terms.min_logdet < -1);  // some det J_t below 1/e
  for (const TensorSpec& t : ref.layout().tensors()) {
    const size_t at = json.find("\"name\": \"" + t.name + "\"");
    INFO("layout entry " << t.name);
    REQUIRE(at != std::string::npos);
    CHECK(number(json.substr(at), "offset") == t.offset);
    CHECK(json.find("\"shape\": [" + std::to_string(t.shape[0]), at) != std::string::npos);
  }
}

TEST_CASE("gradients: --lambda changes the gradient, not the reported barrier; --seq-len sets T",
          "[gradients]") {
  Fixture f;
  const std::string a = f.dir / "a", z = f.dir / "z", s = f.dir / "s";
  REQUIRE(run(f.dir.path, gradients_args(f, a, kLambda, "fp32")).rc == 0);
  REQUIRE(run(f.dir.path, gradients_args(f, z, 0.0, "fp32")).rc == 0);
  const std::string ja = slurp_required(a + "/result.json"), jz = slurp_required(z + "/result.json");
  CHECK(number(jz, "lambda") == 0);
  CHECK(number(jz, "barrier") == Approx(number(ja, "barrier")).epsilon(1e-6));  // reported at 0
  CHECK(number(jz, "loss") == Approx(number(jz, "ce")).epsilon(1e-12));
  // Loss terms are consistent: loss = ce + lambda * barrier.
  CHECK(number(ja, "loss") ==
        Approx(number(ja, "ce") + kLambda * number(ja, "barrier")).epsilon(1e-6));
  const std::vector<float> ga = read_floats(a + "/grads.bin"), gz = read_floats(z + "/grads.bin");
  const ParamLayout layout(f.ck.config.model);
  const TensorSpec& qkv0 = layout.find("h0.attn.qkv.w");
  // The barrier's part of layer 0's q/k gradient is large with these weights.
  CHECK(tensor_rel_error(ga, gz, qkv0) > 0.1);
  // Layer 1's MLP comes after every barrier term: the barrier cannot reach it.
  CHECK(tensor_rel_error(ga, gz, layout.find("h1.mlp.fc.w")) <= 1e-6);

  std::vector<std::string> args = gradients_args(f, s, kLambda, "fp32");
  args.insert(args.end(), {"--seq-len", "5"});
  const Run r = run(f.dir.path, args);
  INFO(r.err);
  REQUIRE(r.rc == 0);
  CHECK(number(slurp_required(s + "/result.json"), "T") == 5);
  const std::vector<int32_t> batch = read_ints(s + "/batch.bin");
  REQUIRE(batch.size() == 2u * 3 * 5);
  CHECK(batch[5] == static_cast<unsigned char>(f.text[5]));       // window 1 starts at 5
  CHECK(batch[15 + 14] == static_cast<unsigned char>(f.text[15]));  // last target: text[15]

  // T = 2 has no barrier term: no smallest log det either (null, as in metrics.jsonl).
  const std::string two = f.dir / "two";
  args = gradients_args(f, two, kLambda, "fp32");
  args.insert(args.end(), {"--seq-len", "2"});
  REQUIRE(run(f.dir.path, args).rc == 0);
  const std::string j2 = slurp_required(two + "/result.json");
  CHECK(j2.find("\"min_logdet\": null") != std::string::npos);
  CHECK(number(j2, "barrier_terms") == 0);
}

TEST_CASE("gradients: fp64 gradient matches a finite difference of the loss", "[gradients]") {
  Fixture f;
  const std::string out = f.dir / "out";
  const Run r = run(f.dir.path, gradients_args(f, out, kLambda, "fp64"));
  INFO(r.err);
  REQUIRE(r.rc == 0);
  const std::string json = slurp_required(out + "/result.json");
  CHECK(json.find("\"backend\": \"cpu-fp64\"") != std::string::npos);
  const std::vector<int32_t> batch = read_ints(out + "/batch.bin");
  const std::vector<float> grads = read_floats(out + "/grads.bin");
  const int B = 3, T = f.ck.config.model.seq_len;
  const Batch b{B, T, batch.data(), batch.data() + B * T};

  ReferenceModel<double> ref(f.ck.config.model, barrier_with(f.ck.config, kLambda));
  const std::vector<double> p0(f.ck.params.begin(), f.ck.params.end());
  const double loss0 = reference_loss(ref, p0, b, ForwardOptions());
  CHECK(number(json, "loss") == Approx(loss0).epsilon(1e-12));

  const ParamLayout& layout = ref.layout();
  const TensorSpec& qkv0 = layout.find("h0.attn.qkv.w");
  Rng rng(2024);
  for (const bool only_qkv0 : {false, true}) {
    // A random unit direction: over every parameter, or over layer 0's q/k/v weights only.
    std::vector<double> dir(p0.size(), 0.0);
    for (size_t i = 0; i < dir.size(); ++i)
      if (!only_qkv0 || (i >= qkv0.offset && i < qkv0.offset + qkv0.size)) dir[i] = rng.normal();
    const double n = norm(dir);
    for (double& x : dir) x /= n;
    // h = 1e-5: truncation ~h^2 |L'''| ~ 1e-9, rounding ~1e-16 |L| / h ~ 1e-11 (in double).
    const double h = 1e-5;
    std::vector<double> plus(p0), minus(p0);
    for (size_t i = 0; i < p0.size(); ++i) {
      plus[i] += h * dir[i];
      minus[i] -= h * dir[i];
    }
    const double fd = (reference_loss(ref, plus, b, ForwardOptions()) -
                       reference_loss(ref, minus, b, ForwardOptions())) / (2 * h);
    double dot = 0;
    for (size_t i = 0; i < dir.size(); ++i) dot += static_cast<double>(grads[i]) * dir[i];
    INFO("direction over " << (only_qkv0 ? "h0.attn.qkv.w" : "all parameters") << ": fd " << fd
                           << ", grads . dir " << dot);
    CHECK(std::abs(dot) > 1e-4);  // not an accidental near-zero
    // grads.bin is float32: the dot product carries ~1e-7 relative rounding (measured 5e-8).
    CHECK(std::abs(fd - dot) <= 1e-6 * std::abs(dot));
  }
}

TEST_CASE("gradients: bad input is one line naming the problem, and writes nothing", "[gradients]") {
  Fixture f;
  const std::string out = f.dir / "never";
  struct Case {
    std::vector<std::string> extra;
    int rc;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {{"--seq-len", "13"}, 2, "--seq-len 13 exceeds the model's seq_len 12"},
      {{"--batch", "40"}, 1, "text.txt' holds 24 windows"},
      {{"--lambda", "-1"}, 2, "--lambda must be a finite number >= 0"},
      {{"--precision", "bf16"}, 2, "--precision"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> args = {"gradients", f.dir / "ck.bin", "--data", f.dir / "text.txt",
                                     "--backend", "cpu", "--out", out};
    args.insert(args.end(), c.extra.begin(), c.extra.end());
    const Run r = run(f.dir.path, args);
    INFO("args: " << c.extra[0] << " " << c.extra[1] << "; stderr: " << r.err);
    CHECK(r.rc == c.rc);
    CHECK(r.err.find(c.needle) != std::string::npos);
    if (c.extra[0] != "--precision")  // CLI11's own message for a value outside the choices
      CHECK(r.err.rfind("barrierlm: error: ", 0) == 0);
    CHECK(!fs::exists(out));
  }
  const Run missing = run(f.dir.path, {"gradients", f.dir / "nope.bin", "--data",
                                       f.dir / "text.txt", "--out", out});
  CHECK(missing.rc == 1);
  CHECK(missing.err.find("nope.bin' does not exist") != std::string::npos);
  const Run no_out = run(f.dir.path, {"gradients", f.dir / "ck.bin", "--data", f.dir / "text.txt"});
  CHECK(no_out.rc == 2);
  CHECK(no_out.err.find("--out") != std::string::npos);
  const Run help = run(f.dir.path, {"gradients", "--help"});
  CHECK(help.rc == 0);
  CHECK(help.out.find("Developer tool for cross-checks") != std::string::npos);
}
