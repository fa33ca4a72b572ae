// Tests of `barrierlm bench` (cmd/cmd_bench.cpp) on the CPU backend with a tiny model: the JSON
// it writes is complete and self-consistent (median within [min, max], tokens/s = tokens per
// step / median, FLOPs per token = 6N + 6LdT with N the layout's parameter count, one loss per
// timed step, the first loss near ln V as random tokens on a fresh model give), grad_accum and
// the sampled barrier run, and bad input is an error naming the problem (in process, and through
// the binary for the exit status).

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cmd/commands_bench.h"
#include "cmd/json.h"
#include "cmd/util.h"
#include "core/config.h"
#include "core/error.h"
#include "core/params.h"
#include "tests/catch.h"
#include "tests/cli_util.h"
#include "tests/model_config.h"

namespace fs = std::filesystem;
using namespace blm;
using namespace blm::test;

namespace {

// A tiny model on the CPU: 2 layers, 2 heads of 16, T = 24, V = 97 (not a power of two).
const char* kConfig =
    "model: {n_layer: 2, n_head: 2, d_model: 32, seq_len: 24, vocab_size: 97}\n"
    "barrier: {lambda: 0.0}\n"
    "train: {batch_size: 4, lr: 1.0e-3}\n"
    "device: {backend: cpu, precision: fp32, threads: 1}\n";

// The numbers of a one-line array "key": [a, b, ...] in JSON we wrote.
std::vector<double> numbers(const std::string& json, const std::string& key) {
  const std::string k = "\"" + key + "\": [";
  const size_t p = json.find(k);
  INFO("array " << key);
  REQUIRE(p != std::string::npos);
  const size_t end = json.find(']', p);
  std::vector<double> out;
  std::string item;
  std::istringstream in(json.substr(p + k.size(), end - p - k.size()));
  while (std::getline(in, item, ',')) out.push_back(std::stod(item));
  return out;
}

// The message of the blm::Error run_bench throws ("" when it throws none).
std::string error_of(const BenchOptions& o) {
  try {
    run_bench(o);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

BenchOptions options(const TempDir& d, int steps, int warmup) {
  BenchOptions o;
  o.config_path = d / "bench.yaml";
  o.steps = steps;
  o.warmup = warmup;
  o.out = d / "bench.json";
  return o;
}

}  // namespace

TEST_CASE("bench writes complete, self-consistent timings", "[bench]") {
  TempDir d;
  write_file(d / "bench.yaml", kConfig);
  BenchOptions o = options(d, 5, 2);
  o.peak_tflops = 0.5;
  REQUIRE(run_bench(o) == 0);
  const std::string j = slurp(d / "bench.json");
  REQUIRE(!j.empty());

  CHECK(number(j, "steps") == 5);
  CHECK(number(j, "warmup_steps") == 2);
  const double med = number(j, "step_ms_median"), lo = number(j, "step_ms_min"),
               hi = number(j, "step_ms_max");
  CHECK(lo > 0);
  CHECK(lo <= med);
  CHECK(med <= hi);
  const std::vector<double> ms = numbers(j, "step_ms");
  REQUIRE(ms.size() == 5);
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted[2] == Approx(med).epsilon(1e-12));  // median of 5 = the third

  const double tokens = number(j, "tokens_per_step");
  CHECK(tokens == 4 * 24);
  CHECK(number(j, "tokens_per_s") == Approx(tokens / (med * 1e-3)).epsilon(1e-9));

  const double N = static_cast<double>(ParamLayout(model_config(97, 32, 2, 2, 24)).total());
  CHECK(number(j, "params") == N);
  CHECK(number(j, "flops_per_token") == 6 * N + 6.0 * 2 * 32 * 24);
  const double tflops = number(j, "tflops");
  CHECK(tflops == Approx(number(j, "flops_per_token") * number(j, "tokens_per_s") / 1e12).epsilon(1e-9));
  CHECK(number(j, "mfu") == Approx(tflops / 0.5).epsilon(1e-9));

  // Random tokens on a fresh model (weights N(0, 0.02)): the loss starts near ln V.
  const std::vector<double> loss = numbers(j, "loss");
  REQUIRE(loss.size() == 5);
  for (double l : loss) CHECK(std::isfinite(l));
  CHECK(std::fabs(loss[0] - std::log(97.0)) < 0.1);
  // The CPU backend holds no device memory: reported as null.
  CHECK(j.find("\"peak_memory_bytes\": null") != std::string::npos);
}

TEST_CASE("bench runs grad_accum and the sampled barrier", "[bench]") {
  TempDir d;
  write_file(d / "bench.yaml", kConfig);
  BenchOptions o = options(d, 2, 0);
  o.overrides = {"train.grad_accum=2", "barrier.lambda=0.03", "barrier.positions=5"};
  REQUIRE(run_bench(o) == 0);
  const std::string j = slurp(d / "bench.json");
  CHECK(number(j, "grad_accum") == 2);
  CHECK(number(j, "positions") == 5);
  const std::vector<double> barrier = numbers(j, "barrier");
  REQUIRE(barrier.size() == 2);
  // R = mean of phi(det J) near det J = 1: small, finite, and not exactly 0 on random tokens.
  for (double r : barrier) {
    CHECK(std::isfinite(r));
    CHECK(r != 0.0);
  }
}

TEST_CASE("bench: bad input is an error naming the problem", "[bench]") {
  TempDir d;
  write_file(d / "bench.yaml", kConfig);
  BenchOptions o = options(d, 1, 0);
  o.steps = 0;
  CHECK_THROWS_AS(run_bench(o), UsageError);
  o.steps = 1;
  o.overrides = {"model.n_hed=2"};
  CHECK(error_of(o).find("n_hed") != std::string::npos);
  o.overrides = {"train.batch_size=3", "train.grad_accum=2"};
  CHECK_THROWS_AS(run_bench(o), ConfigError);
  o.overrides = {"model.vocab_size=0", "data.tokenizer=char"};
  CHECK(error_of(o).find("model.vocab_size") != std::string::npos);
  o.overrides = {"model.vocab_size=0", "data.tokenizer=gpt2", "data.vocab=v"};
  CHECK(error_of(o).find("--set model.vocab_size=50257") != std::string::npos);
  o.overrides = {};
  o.config_path = d / "missing.yaml";
  CHECK(error_of(o).find("missing.yaml") != std::string::npos);
  CHECK(!fs::exists(d / "bench.json"));  // nothing written on failure

  // Through the program: one "barrierlm: error:" line and exit status 1.
  const Run r = run(d.path, {"bench", d / "missing.yaml"});
  REQUIRE(r.rc >= 0);  // exited, not killed by a signal
  CHECK(r.rc == 1);
  CHECK(r.err.rfind("barrierlm: error: ", 0) == 0);
  CHECK(r.err.find("missing.yaml") != std::string::npos);
}

TEST_CASE("bench --out that is its config is refused before the steps, by any name", "[bench]") {
  TempDir d;
  write_file(d / "bench.yaml", kConfig);
  fs::create_symlink("bench.yaml", d / "link.yaml");
  // Before, the JSON replaced the config and bench exited 0.
  for (const std::string& out : {"bench.yaml", "./bench.yaml", "link.yaml"}) {
    INFO("--out " << out);
    const Run r = run(d.path, {"bench", "bench.yaml", "--steps", "1", "--warmup", "0", "--out",
                               out});
    check_error(r, 1, {"--out '" + out + "' is the config 'bench.yaml'", "choose another --out"});
    CHECK(r.out.empty());  // refused before the timed steps and their summary
    CHECK(slurp(d / "bench.yaml") == kConfig);
  }
}
