// Tests of core/config.cpp: YAML parsing and its error messages (each checked by content:
// source:line, key, value, suggestion), range checks of every key, --set overrides, the exact
// round trip of config_to_yaml on random configs, the shipped configs/*.yaml, and that
// configs/README.md documents every key with its true default.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/rng.h"
#include "tests/catch.h"
#include "tests/error_of.h"

using namespace blm;

namespace {

using test::error_of;

std::string parse_error(const std::string& yaml) {
  INFO("yaml:\n" << yaml);
  return error_of<ConfigError>([&] { parse_config(yaml, "cfg.yaml"); });
}

std::string override_error(const std::string& assignment) {
  Config c;
  const std::string before = config_to_yaml(c);
  const std::string msg = error_of<ConfigError>([&] { apply_override(c, assignment); });
  CHECK(config_to_yaml(c) == before);  // a rejected override changes nothing
  return msg;
}

std::string source_dir() {
  if (const char* env = std::getenv("BLM_SOURCE_DIR")) return env;
  std::string file = __FILE__;  // <root>/tests/test_config.cpp
  return file.substr(0, file.rfind("/tests/"));
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// Field-by-field equality, doubles bit for bit.
void require_equal(const Config& a, const Config& b) {
  CHECK(a.model == b.model);
  CHECK(same_bits(a.barrier.lambda, b.barrier.lambda));
  CHECK(same_bits(a.barrier.eps, b.barrier.eps));
  CHECK(a.barrier.layers == b.barrier.layers);
  CHECK(a.barrier.positions == b.barrier.positions);
  CHECK(a.data.train == b.data.train);
  CHECK(a.data.val == b.data.val);
  CHECK(a.data.format == b.data.format);
  CHECK(a.data.tokenizer == b.data.tokenizer);
  CHECK(a.data.vocab == b.data.vocab);
  CHECK(same_bits(a.data.val_fraction, b.data.val_fraction));
  const TrainConfig &s = a.train, &t = b.train;
  CHECK(s.batch_size == t.batch_size);
  CHECK(s.grad_accum == t.grad_accum);
  CHECK(s.steps == t.steps);
  CHECK(same_bits(s.lr, t.lr));
  CHECK(same_bits(s.min_lr_ratio, t.min_lr_ratio));
  CHECK(s.warmup == t.warmup);
  CHECK(s.schedule == t.schedule);
  CHECK(same_bits(s.weight_decay, t.weight_decay));
  CHECK(same_bits(s.beta1, t.beta1));
  CHECK(same_bits(s.beta2, t.beta2));
  CHECK(same_bits(s.adam_eps, t.adam_eps));
  CHECK(same_bits(s.grad_clip, t.grad_clip));
  CHECK(s.seed == t.seed);
  CHECK(s.log_interval == t.log_interval);
  CHECK(s.eval_interval == t.eval_interval);
  CHECK(s.eval_batches == t.eval_batches);
  CHECK(s.checkpoint_interval == t.checkpoint_interval);
  CHECK(s.out_dir == t.out_dir);
  CHECK(s.run_name == t.run_name);
  CHECK(a.device.backend == b.device.backend);
  CHECK(a.device.precision == b.device.precision);
  CHECK(a.device.threads == b.device.threads);
  CHECK(a.device.gpus == b.device.gpus);
}

// ---------------------------------------------------------------- random configs

// A positive finite double from random bits (any exponent, any mantissa).
double random_positive(Rng& rng) {
  for (;;) {
    uint64_t bits = rng.next() & 0x7fffffffffffffffull;
    double x;
    std::memcpy(&x, &bits, sizeof x);
    if (std::isfinite(x) && x > 0) return x;
  }
}

double random_unit_open(Rng& rng) {
  for (;;) {
    const double x = rng.uniform() * (rng.below(2) ? 1.0 : 1e-6);
    if (x > 0 && x < 1) return x;
  }
}

std::string random_string(Rng& rng) {
  static const std::vector<std::string> awkward = {
      "", "null", "~", "true", "123", "1e5", "all", " leading space", "trailing space ",
      "a: b", "#comment", "quote\"d", "back\\slash", "multi\nline", "tab\there", "'single'",
      "- dash", "[list]", "{map}", "&anchor", "*alias", "!tag", "%percent", "@at", "`tick`",
      "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "ctrl\x01\x1f\x7f", "runs/2024-01-01/x.bin", "C:\\path"};
  if (rng.below(2)) return awkward[rng.below(awkward.size())];
  std::string s;
  const size_t n = rng.below(24);
  for (size_t i = 0; i < n; ++i) s += static_cast<char>(1 + rng.below(127));  // ASCII, no NUL
  return s;
}

Config random_config(Rng& rng) {
  Config c;
  c.model.n_layer = 1 + static_cast<int>(rng.below(12));
  c.model.n_head = 1 + static_cast<int>(rng.below(8));
  c.model.d_model = c.model.n_head * (1 + static_cast<int>(rng.below(64)));
  c.model.seq_len = 1 + static_cast<int>(rng.below(4096));
  c.model.vocab_size = rng.below(4) == 0 ? 0 : 2 + static_cast<int>(rng.below(100000));
  c.barrier.lambda = rng.below(4) == 0 ? 0.0 : random_positive(rng);
  c.barrier.eps = random_positive(rng);
  c.barrier.layers.clear();
  if (rng.below(2)) {
    for (int l = 0; l < c.model.n_layer; ++l)
      if (rng.below(2)) c.barrier.layers.push_back(l);
    for (size_t i = c.barrier.layers.size(); i > 1; --i)  // any order survives the round trip
      std::swap(c.barrier.layers[i - 1], c.barrier.layers[rng.below(i)]);
  }
  c.barrier.positions = static_cast<int>(rng.below(300));
  c.data.train = random_string(rng);
  c.data.val = random_string(rng);
  c.data.format = std::vector<std::string>{"auto", "text", "bin"}[rng.below(3)];
  c.data.tokenizer = std::vector<std::string>{"byte", "char", "gpt2"}[rng.below(3)];
  c.data.vocab = random_string(rng);
  if (c.data.tokenizer == "gpt2" && c.data.vocab.empty()) c.data.vocab = "data/gpt2";
  c.data.val_fraction = rng.below(5) == 0 ? 0.0 : random_unit_open(rng);
  c.train.grad_accum = 1 + static_cast<int>(rng.below(8));
  c.train.batch_size = c.train.grad_accum * (1 + static_cast<int>(rng.below(64)));
  c.train.steps = static_cast<int>(rng.below(1000000));
  c.train.lr = random_positive(rng);
  c.train.min_lr_ratio = rng.uniform();
  c.train.warmup = static_cast<int>(rng.below(10000));
  c.train.schedule = std::vector<std::string>{"cosine", "linear", "constant"}[rng.below(3)];
  c.train.weight_decay = rng.below(4) == 0 ? 0.0 : random_positive(rng);
  c.train.beta1 = random_unit_open(rng);
  c.train.beta2 = random_unit_open(rng);
  c.train.adam_eps = random_positive(rng);
  c.train.grad_clip = rng.below(4) == 0 ? 0.0 : random_positive(rng);
  c.train.seed = rng.next();  // the full 64-bit range
  c.train.log_interval = 1 + static_cast<int>(rng.below(1000));
  c.train.eval_interval = static_cast<int>(rng.below(1000));
  c.train.eval_batches = 1 + static_cast<int>(rng.below(100));
  c.train.checkpoint_interval = static_cast<int>(rng.below(5000));
  do c.train.out_dir = random_string(rng);
  while (c.train.out_dir.empty());
  c.train.run_name = random_string(rng);  // a name, not a path (validate's rule)
  std::replace(c.train.run_name.begin(), c.train.run_name.end(), '/', '_');
  if (c.train.run_name == "." || c.train.run_name == ".." || c.train.run_name == "latest")
    c.train.run_name = "x";
  c.device.backend = std::vector<std::string>{"cpu", "cuda", "auto"}[rng.below(3)];
  c.device.precision = std::vector<std::string>{"fp32", "bf16", "auto"}[rng.below(3)];
  c.device.threads = static_cast<int>(rng.below(256));
  c.device.gpus = 1;
  return c;
}

}  // namespace

// ---------------------------------------------------------------- parsing

TEST_CASE("an empty config is every default", "[config]") {
  const Config c = parse_config("", "empty.yaml");
  require_equal(c, Config{});
  require_equal(parse_config("# only a comment\n", "c.yaml"), Config{});
  require_equal(parse_config("model:\ntrain:\n", "c.yaml"), Config{});  // empty sections
}

TEST_CASE("a full config sets every section", "[config]") {
  const Config c = parse_config(R"(
model: {n_layer: 6, n_head: 6, d_model: 384, seq_len: 256, vocab_size: 0}
barrier:
  lambda: 0.03
  eps: 1e-5
  layers: [0, 2]
  positions: 16
data:
  train: "a b.txt"
  val: v.txt
  format: text
  tokenizer: char
  val_fraction: 0.05
train:
  batch_size: 64
  grad_accum: 4
  steps: 2e3
  lr: 3e-4
  schedule: linear
  seed: 18446744073709551615
  run_name:
device: {backend: cpu, precision: fp64, threads: 2, gpus: 1}
)",
                                  "full.yaml");
  CHECK(c.model.n_layer == 6);
  CHECK(c.model.d_model == 384);
  CHECK(c.model.vocab_size == 0);
  CHECK(c.barrier.lambda == 0.03);
  CHECK(c.barrier.eps == 1e-5);
  CHECK(c.barrier.layers == std::vector<int>{0, 2});
  CHECK(c.barrier.positions == 16);
  CHECK(c.data.train == "a b.txt");
  CHECK(c.data.tokenizer == "char");
  CHECK(c.data.val_fraction == 0.05);
  CHECK(c.train.grad_accum == 4);
  CHECK(c.train.steps == 2000);  // 2e3 is an exact integer
  CHECK(c.train.lr == 3e-4);
  CHECK(c.train.seed == 18446744073709551615ull);
  CHECK(c.train.run_name.empty());
  CHECK(c.train.warmup == TrainConfig{}.warmup);  // missing keys keep their defaults
  CHECK(c.device.precision == "fp64");
  CHECK(c.device.threads == 2);
}

TEST_CASE("barrier.layers accepts a list, one index or 'all'", "[config]") {
  CHECK(parse_config("barrier: {layers: [3, 1]}", "c").barrier.layers == std::vector<int>{3, 1});
  CHECK(parse_config("barrier: {layers: 2}", "c").barrier.layers == std::vector<int>{2});
  CHECK(parse_config("barrier: {layers: all}", "c").barrier.layers.empty());
  CHECK(parse_config("barrier:\n  layers:\n    - 0\n    - 3\n", "c").barrier.layers == std::vector<int>{0, 3});
  CHECK(parse_error("barrier:\n  layers: [0, 4]\n") ==
        "cfg.yaml:2: barrier.layers: layer 4 is outside [0, 4) (model.n_layer is 4)");
  CHECK(parse_error("barrier:\n  layers: [1, 1]\n").find("cfg.yaml:2: barrier.layers: layer 1 is listed twice") == 0);
  CHECK(parse_error("barrier:\n  layers: [-1]\n").find("cfg.yaml:2: barrier.layers: layer -1 is negative") == 0);
  CHECK(parse_error("barrier:\n  layers: []\n").find("cfg.yaml:2: barrier.layers: the list is empty") == 0);
  CHECK(parse_error("barrier:\n  layers: some\n") ==
        "cfg.yaml:2: barrier.layers: expected a list of layer indices or 'all', got 'some'");
  CHECK(parse_error("barrier:\n  layers: [0, x]\n") == "cfg.yaml:2: barrier.layers[1]: expected an integer, got 'x'");
  // The range depends on n_layer, wherever in the file it is set.
  CHECK(parse_config("barrier: {layers: [5]}\nmodel: {n_layer: 6}\n", "c").barrier.layers == std::vector<int>{5});
}

// ---------------------------------------------------------------- error messages

TEST_CASE("malformed YAML names the file and line", "[config]") {
  CHECK(parse_error("model:\n  n_layer: 4\n  n_head: : 3\n") == "cfg.yaml:3:11: invalid YAML: illegal map value");
  const std::string unclosed = parse_error("model:\n  n_layer: [1, 2\n");
  CHECK(unclosed.find("cfg.yaml:3:") == 0);
  CHECK(unclosed.find("invalid YAML: end of sequence flow not found") != std::string::npos);
  CHECK(parse_error("model:\n  n_layer: 4\n\tn_head: 2\n").find("cfg.yaml:3:1: invalid YAML:") == 0);
  CHECK(parse_error("data: {train: \"abc\n").find("cfg.yaml:") == 0);
  // A quote left open would swallow the lines after it into one value (yaml-cpp accepts it).
  CHECK(parse_error("train:\n  run_name: 'q\ndevice:\n  backend: cpu\n") ==
        "cfg.yaml:2: the quoted value 'q is not closed on this line (a config value is one line)");
  const std::string open_double = parse_error("data:\n  train: \"a.txt\n  val: b.txt\n");
  CHECK(open_double.find("cfg.yaml:2: the quoted value") == 0);
  const Config escaped =
      parse_config("train: {run_name: 'it''s'}\ndata: {train: \"a\\\"b\"}\n", "c");
  CHECK(escaped.train.run_name == "it's");
  CHECK(escaped.data.train == "a\"b");
  // Keys after a document separator would be ignored.
  CHECK(parse_error("model: {n_layer: 2}\n---\ntrain: {steps: 5}\n") ==
        "cfg.yaml:3: a second YAML document (after '---' or '...'): a config is one document; "
        "remove the separator");
  const std::string after_end = parse_error("model: {n_layer: 2}\n...\ntrain: {steps: 5}\n");
  CHECK(after_end.find("cfg.yaml:3: a second") == 0);
  CHECK(parse_config("---\nmodel: {n_layer: 2}\n...\n", "c").model.n_layer == 2);
  // A glob read as an anchor reference gets a hint.
  const std::string glob = parse_error("data:\n  train: *.txt\n");
  CHECK(glob.find("quote it, e.g. \"*.txt\"") != std::string::npos);
}

TEST_CASE("unknown sections and keys are errors with their line and a suggestion", "[config]") {
  CHECK(parse_error("train:\n  steps: 10\n  lrr: 0.1\n") ==
        "cfg.yaml:3: unknown key 'train.lrr' (did you mean 'train.lr'?)");
  CHECK(parse_error("model:\n  n_layers: 2\n") == "cfg.yaml:2: unknown key 'model.n_layers' (did you mean 'model.n_layer'?)");
  CHECK(parse_error("\n\ntrain:\n  lambda: 0.1\n") ==
        "cfg.yaml:4: unknown key 'train.lambda' (did you mean 'barrier.lambda'?)");
  CHECK(parse_error("train:\n  frobnicate: 1\n") == "cfg.yaml:2: unknown key 'train.frobnicate'");
  CHECK(parse_error("trian:\n  lr: 1\n") == "cfg.yaml:1: unknown section 'trian' (did you mean 'train'?)");
  CHECK(parse_error("model: {}\nlr: 1\n") == "cfg.yaml:2: unknown section 'lr' ('train.lr' is a key: write it under 'train:')");
  CHECK(parse_error("widgets: 1\n") ==
        "cfg.yaml:1: unknown section 'widgets'; the sections are model, barrier, data, train, device");
  CHECK(parse_error("train:\n  lr: 1\n  lr: 2\n") == "cfg.yaml:3: duplicate key 'train.lr' (first given at line 2)");
  CHECK(parse_error("train: {}\ntrain: {}\n") == "cfg.yaml:2: duplicate section 'train' (first given at line 1)");
  CHECK(parse_error("- model\n") ==
        "cfg.yaml:1: expected sections (model, barrier, data, train, device) at the top level, got a list");
  CHECK(parse_error("model: 3\n") == "cfg.yaml:1: section 'model' must be a mapping of keys, got '3'");
  CHECK(parse_error("model: {[1]: 2}\n") == "cfg.yaml:1: expected a key name, got a list");
}

TEST_CASE("values of the wrong type name the key, the line and the value", "[config]") {
  CHECK(parse_error("train:\n  steps: abc\n") == "cfg.yaml:2: train.steps: expected an integer, got 'abc'");
  CHECK(parse_error("train:\n  steps: 1.5\n") == "cfg.yaml:2: train.steps: expected an integer, got '1.5'");
  CHECK(parse_error("train:\n  steps: 99999999999\n") ==
        "cfg.yaml:2: train.steps: 99999999999 is out of range for an integer");
  CHECK(parse_error("train:\n  steps:\n") == "cfg.yaml:2: train.steps: expected an integer, got an empty value");
  CHECK(parse_error("train:\n  steps: \"12\\0\"\n") == "cfg.yaml:2: train.steps: expected an integer, got '12\\x00'");
  CHECK(parse_error("train:\n  lr: fast\n") == "cfg.yaml:2: train.lr: expected a number, got 'fast'");
  CHECK(parse_error("train:\n  lr: .inf\n") == "cfg.yaml:2: train.lr: expected a number, got '.inf'");
  CHECK(parse_error("train:\n  lr: 1e999\n") == "cfg.yaml:2: train.lr: expected a finite number, got '1e999'");
  CHECK(parse_error("train:\n  lr: nan\n") == "cfg.yaml:2: train.lr: expected a number, got 'nan'");
  CHECK(parse_error("train:\n  lr: [1]\n") == "cfg.yaml:2: train.lr: expected a number, got a list");
  CHECK(parse_error("train:\n  seed: -1\n") == "cfg.yaml:2: train.seed: expected an integer in [0, 2^64), got '-1'");
  CHECK(parse_error("train:\n  seed: 18446744073709551616\n") ==
        "cfg.yaml:2: train.seed: expected an integer in [0, 2^64), got '18446744073709551616'");
  CHECK(parse_error("data:\n  train: {a: 1}\n") == "cfg.yaml:2: data.train: expected a string, got a mapping");
  // Values quoted in messages stay on one line.
  CHECK(parse_error("train:\n  lr: \"1\\n2\"\n") == "cfg.yaml:2: train.lr: expected a number, got '1\\n2'");
}

TEST_CASE("out-of-range values name the key, the limit and the value", "[config]") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"model:\n  n_layer: 0\n", "cfg.yaml:2: model.n_layer: must be in [1, 4096], got 0"},
      {"model:\n  n_head: 0\n", "cfg.yaml:2: model.n_head: must be in [1, 65536], got 0"},
      {"model:\n  d_model: -8\n", "cfg.yaml:2: model.d_model: must be in [1, 1048576], got -8"},
      {"model:\n  seq_len: 0\n", "cfg.yaml:2: model.seq_len: must be in [1, 16777216], got 0"},
      {"model:\n  vocab_size: 1\n", "cfg.yaml:2: model.vocab_size: must be 0 (from the tokenizer) or in [2, 16777216], got 1"},
      {"barrier:\n  lambda: -0.5\n", "cfg.yaml:2: barrier.lambda: must be >= 0, got -0.5"},
      {"barrier:\n  eps: 0\n", "cfg.yaml:2: barrier.eps: must be > 0, got 0"},
      {"barrier:\n  positions: -1\n", "cfg.yaml:2: barrier.positions: must be >= 0, got -1"},
      {"data:\n  format: csv\n", "cfg.yaml:2: data.format: must be one of auto, text, bin; got 'csv'"},
      {"data:\n  tokenizer: bpe\n",
       "cfg.yaml:2: data.tokenizer: must be one of byte, char, gpt2; got 'bpe'"},
      {"data:\n  val_fraction: 1\n", "cfg.yaml:2: data.val_fraction: must be in [0, 1), got 1"},
      {"data:\n  val_fraction: -0.1\n", "cfg.yaml:2: data.val_fraction: must be in [0, 1), got -0.1"},
      {"train:\n  batch_size: 0\n", "cfg.yaml:2: train.batch_size: must be >= 1, got 0"},
      {"train:\n  grad_accum: 0\n", "cfg.yaml:2: train.grad_accum: must be >= 1, got 0"},
      {"train:\n  steps: -1\n", "cfg.yaml:2: train.steps: must be >= 0, got -1"},
      {"train:\n  lr: 0\n", "cfg.yaml:2: train.lr: must be > 0, got 0"},
      {"train:\n  min_lr_ratio: 1.5\n", "cfg.yaml:2: train.min_lr_ratio: must be in [0, 1], got 1.5"},
      {"train:\n  warmup: -3\n", "cfg.yaml:2: train.warmup: must be >= 0, got -3"},
      {"train:\n  schedule: step\n", "cfg.yaml:2: train.schedule: must be one of cosine, linear, constant; got 'step'"},
      {"train:\n  weight_decay: -1e-3\n", "cfg.yaml:2: train.weight_decay: must be >= 0, got -0.001"},
      {"train:\n  beta1: 1\n", "cfg.yaml:2: train.beta1: must be in (0, 1), got 1"},
      {"train:\n  beta2: 0\n", "cfg.yaml:2: train.beta2: must be in (0, 1), got 0"},
      {"train:\n  adam_eps: -1e-8\n", "cfg.yaml:2: train.adam_eps: must be > 0, got -1e-8"},
      {"train:\n  grad_clip: -1\n", "cfg.yaml:2: train.grad_clip: must be >= 0, got -1"},
      {"train:\n  log_interval: 0\n", "cfg.yaml:2: train.log_interval: must be >= 1, got 0"},
      {"train:\n  eval_interval: -1\n", "cfg.yaml:2: train.eval_interval: must be >= 0, got -1"},
      {"train:\n  eval_batches: 0\n", "cfg.yaml:2: train.eval_batches: must be >= 1, got 0"},
      {"train:\n  checkpoint_interval: -5\n", "cfg.yaml:2: train.checkpoint_interval: must be >= 0, got -5"},
      {"train:\n  out_dir: \"\"\n", "cfg.yaml:2: train.out_dir: must not be empty"},
      {"device:\n  backend: gpu\n", "cfg.yaml:2: device.backend: must be one of cpu, cuda, auto; got 'gpu'"},
      {"device:\n  precision: fp16\n", "cfg.yaml:2: device.precision: must be one of fp32, bf16, fp64, auto; got 'fp16'"},
      {"device:\n  threads: -1\n", "cfg.yaml:2: device.threads: must be >= 0, got -1"},
      {"device:\n  gpus: 0\n", "cfg.yaml:2: device.gpus: must be in [1, 1024], got 0"},
  };
  for (const auto& [yaml, expected] : cases) {
    INFO(yaml);
    CHECK(parse_error(yaml) == expected);
  }
}

TEST_CASE("train.run_name is one directory name inside out_dir", "[config]") {
  CHECK(parse_error("train: {run_name: ../x}\n") ==
        "cfg.yaml:1: train.run_name: must be a name, not a path, got '../x'");
  CHECK(parse_error("train: {run_name: a/b}\n") ==
        "cfg.yaml:1: train.run_name: must be a name, not a path, got 'a/b'");
  CHECK(parse_error("train: {run_name: ..}\n") ==
        "cfg.yaml:1: train.run_name: must be a directory name, got '..'");
  const std::string latest = parse_error("train: {run_name: latest}\n");
  CHECK(latest.find("'latest' is the link") != std::string::npos);
  CHECK(parse_config("train: {run_name: my-run.2}\n", "c").train.run_name == "my-run.2");
}

TEST_CASE("checks across keys name both keys and both numbers", "[config]") {
  CHECK(parse_error("model:\n  d_model: 100\n  n_head: 3\n") ==
        "cfg.yaml:2: model.d_model (100) must be divisible by model.n_head (3)");
  // Only n_head given: the line points at it.
  CHECK(parse_error("train: {}\nmodel:\n  n_head: 3\n") ==
        "cfg.yaml:3: model.d_model (128) must be divisible by model.n_head (3)");
  CHECK(parse_error("train:\n  batch_size: 10\n  grad_accum: 4\n") ==
        "cfg.yaml:3: train.batch_size (10) must be divisible by train.grad_accum (4)");
  CHECK(parse_error("train:\n  batch_size: 12\n  grad_accum: 2\ndevice:\n  gpus: 4\n") ==
        "cfg.yaml:3: train.batch_size (12) must be divisible by train.grad_accum x device.gpus (2 x 4 = 8)");
  CHECK(parse_error("device:\n  backend: cuda\n  precision: fp64\n") ==
        "cfg.yaml:3: device.precision: fp64 runs on the cpu backend only (device.backend is cuda)");
  // The gpt2 tokenizer needs its files: the line of data.vocab when given empty, else of the
  // tokenizer.
  const std::string no_vocab =
      "data.vocab is empty: data.tokenizer gpt2 needs it, the directory holding GPT-2's "
      "encoder.json and vocab.bpe (scripts/get-data.sh --gpt2-vocab downloads them)";
  CHECK(parse_error("data:\n  train: t.txt\n  tokenizer: gpt2\n") == "cfg.yaml:3: " + no_vocab);
  CHECK(parse_error("data:\n  vocab:\n  tokenizer: gpt2\n") == "cfg.yaml:2: " + no_vocab);
  Config gpt2;
  apply_override(gpt2, "data.tokenizer=gpt2");  // checked with the other keys, by validate
  CHECK(error_of<ConfigError>([&] { validate(gpt2); }) == no_vocab);
  apply_override(gpt2, "data.vocab=data/gpt2");
  CHECK_NOTHROW(validate(gpt2));
  // Valid neighbours of the failing cases.
  CHECK_NOTHROW(parse_config("model: {d_model: 96, n_head: 3}\ntrain: {batch_size: 16, grad_accum: 2}\n"
                             "device: {gpus: 8, backend: cpu, precision: fp64}\n",
                             "c"));
}

// configs/README.md: checks involving two keys run once the overrides are applied, so a --set
// can mend a pair the file gets wrong; a pair a --set breaks names that --set.
TEST_CASE("overrides apply before the checks across keys, which name the --set", "[config]") {
  const std::string heads = "model:\n  d_model: 16\n  n_head: 3\n";
  CHECK(parse_config(heads, "c", {"model.d_model=24"}).model.d_model == 24);
  CHECK(parse_config(heads, "c", {"model.n_head=4"}).model.n_head == 4);
  const std::string accum = "train:\n  batch_size: 6\n  grad_accum: 4\n";
  CHECK(parse_config(accum, "c", {" train.batch_size = 8"}).train.batch_size == 8);
  CHECK(error_of<ConfigError>([&] { parse_config(accum, "c", {"train.grad_accum=5"}); }) ==
        "--set 'train.grad_accum=5': train.batch_size (6) must be divisible by "
        "train.grad_accum (5)");
  CHECK(error_of<ConfigError>([&] { parse_config(heads, "c", {"model.n_head=5"}); }) ==
        "--set 'model.n_head=5': model.d_model (16) must be divisible by model.n_head (5)");
  CHECK(error_of<ConfigError>([&] { parse_config("model: {}\n", "c", {"model.n_head=3"}); }) ==
        "--set 'model.n_head=3': model.d_model (128) must be divisible by model.n_head (3)");
}

TEST_CASE("validate names the key without a file", "[config]") {
  Config c;
  CHECK_NOTHROW(validate(c));
  c.train.lr = -1;
  CHECK(error_of<ConfigError>([&] { validate(c); }) == "train.lr: must be > 0, got -1");
  c = Config{};
  c.model.n_head = 5;
  const std::string indivisible = "model.d_model (128) must be divisible by model.n_head (5)";
  CHECK(error_of<ConfigError>([&] { validate(c); }) == indivisible);
  CHECK(error_of<ConfigError>([&] { validate(c.model); }) == indivisible);
  c = Config{};
  c.train.lr = -1;  // validate(ModelConfig) checks the model only
  CHECK_NOTHROW(validate(c.model));
  c.barrier.layers = {0, 9};
  c.train.lr = 1;
  CHECK(error_of<ConfigError>([&] { validate(c); }) ==
        "barrier.layers: layer 9 is outside [0, 4) (model.n_layer is 4)");
}

TEST_CASE("load_config reads a file and names it in errors", "[config]") {
  CHECK(error_of<ConfigError>([] { load_config("/nonexistent/x.yaml"); }) ==
        "cannot read config '/nonexistent/x.yaml': No such file or directory");
  const std::string here = source_dir() + "/configs";
  CHECK(error_of<ConfigError>([&] { load_config(here); }) ==
        "cannot read config '" + here + "': Is a directory");
  const std::string path = "test_config_tmp.yaml";
  {
    std::ofstream out(path);
    out << "model:\n  n_layer: 2\ntrain:\n  lr: -2\n";
  }
  CHECK(error_of<ConfigError>([&] { load_config(path); }) ==
        path + ":4: train.lr: must be > 0, got -2");
  {
    std::ofstream out(path);
    out << "model:\n  n_layer: 2\n";
  }
  CHECK(load_config(path).model.n_layer == 2);
  std::remove(path.c_str());
}

// ---------------------------------------------------------------- overrides

TEST_CASE("apply_override sets one key, its value parsed as YAML", "[config]") {
  Config c;
  apply_override(c, "train.lr=3e-4");
  CHECK(c.train.lr == 3e-4);
  apply_override(c, "barrier.layers=[0, 2]");
  CHECK(c.barrier.layers == std::vector<int>{0, 2});
  apply_override(c, "barrier.layers=all");
  CHECK(c.barrier.layers.empty());
  apply_override(c, "data.train=some file.txt");
  CHECK(c.data.train == "some file.txt");
  apply_override(c, "data.val=");
  CHECK(c.data.val.empty());
  apply_override(c, " train.seed = 42");  // spaces around the key are ignored
  CHECK(c.train.seed == 42u);
  apply_override(c, "train.run_name=a=b");  // only the first '=' separates
  CHECK(c.train.run_name == "a=b");
  // Overrides are checked one by one; a combination is checked by validate.
  apply_override(c, "model.n_head=3");
  CHECK_THROWS_AS(validate(c), ConfigError);
  apply_override(c, "model.d_model=96");
  CHECK_NOTHROW(validate(c));
}

TEST_CASE("a bad override names the override", "[config]") {
  CHECK(override_error("train.lrr=3e-4") == "--set 'train.lrr=3e-4': unknown key 'train.lrr' (did you mean 'train.lr'?)");
  CHECK(override_error("train.lr=abc") == "--set 'train.lr=abc': train.lr: expected a number, got 'abc'");
  CHECK(override_error("train.lr=-1") == "--set 'train.lr=-1': train.lr: must be > 0, got -1");
  CHECK(override_error("train.lr") == "--set 'train.lr': expected section.key=value");
  CHECK(override_error("lr=1") == "--set 'lr=1': expected section.key=value (did you mean 'train.lr'?)");
  CHECK(override_error("trian.lr=1") == "--set 'trian.lr=1': unknown section 'trian' (did you mean 'train'?)");
  CHECK(override_error("train.lr=[") .find("--set 'train.lr=[': invalid value:") == 0);
  CHECK(override_error("train.steps=") == "--set 'train.steps=': train.steps: expected an integer, got an empty value");
  CHECK(override_error("device.backend=gpu") ==
        "--set 'device.backend=gpu': device.backend: must be one of cpu, cuda, auto; got 'gpu'");
  CHECK(override_error("barrier.layers=[1,1]") == "--set 'barrier.layers=[1,1]': barrier.layers: layer 1 is listed twice");
  CHECK(override_error("train.lr=1\n2") == "--set 'train.lr=1\\n2': train.lr: expected a number, got '1 2'");
  CHECK(override_error("train.run_name='abc").find("--set 'train.run_name='abc': invalid") == 0);
  CHECK(override_error("data.train=*.bin").find("quote it, e.g. \"*.bin\"") != std::string::npos);
}

// ---------------------------------------------------------------- round trip

TEST_CASE("config_to_yaml round-trips exactly", "[config]") {
  require_equal(parse_config(config_to_yaml(Config{}), "rt"), Config{});
  Rng rng(20240601);
  for (int i = 0; i < 300; ++i) {
    const Config c = random_config(rng);
    const std::string yaml = config_to_yaml(c);
    INFO("iteration " << i << "\n" << yaml);
    const Config back = parse_config(yaml, "rt");
    require_equal(back, c);
    CHECK(config_to_yaml(back) == yaml);
  }
}

TEST_CASE("config_to_yaml prints short, exact numbers", "[config]") {
  Config c;
  c.train.lr = 3e-4;
  c.train.adam_eps = 1e-8;
  c.barrier.lambda = 0.1 + 0.2;  // 0.30000000000000004 needs 17 digits
  const std::string yaml = config_to_yaml(c);
  CHECK(yaml.find("  lr: 0.0003\n") != std::string::npos);
  CHECK(yaml.find("  adam_eps: 1e-8\n") != std::string::npos);
  CHECK(yaml.find("  lambda: 0.30000000000000004\n") != std::string::npos);
  CHECK(yaml.find("  layers: all\n") != std::string::npos);
  CHECK(yaml.find("  schedule: \"cosine\"\n") != std::string::npos);
}

// ---------------------------------------------------------------- shipped configs and docs

TEST_CASE("the shipped configs load", "[config]") {
  const std::string dir = source_dir() + "/configs/";
  for (const char* name : {"quickstart.yaml", "tiny.yaml", "gpt2-small.yaml", "paper-size.yaml",
                           "gpt2-finetune.yaml"}) {
    INFO(name);
    CHECK_NOTHROW(load_config(dir + name));
  }
  const Config q = load_config(dir + "quickstart.yaml");
  CHECK(q.model.n_layer == 4);
  CHECK(q.model.n_head == 4);
  CHECK(q.model.d_model == 128);
  CHECK(q.model.seq_len == 128);
  CHECK(q.model.vocab_size == 256);
  CHECK(q.train.batch_size == 16);
  CHECK(q.barrier.lambda == 0.01);  // configs/quickstart.yaml says why not 0.03
  CHECK(q.barrier.positions == 8);
  CHECK(q.data.tokenizer == "byte");
  CHECK(q.data.train == "data/corpus/brown/train.txt");
  CHECK(q.data.val == "data/corpus/brown/val.txt");
  CHECK(q.device.backend == "auto");
  const Config t = load_config(dir + "tiny.yaml");
  CHECK(t.model.n_layer == 2);
  CHECK(t.model.n_head == 2);
  CHECK(t.model.d_model == 32);
  CHECK(t.model.seq_len == 32);
  const Config g = load_config(dir + "gpt2-small.yaml");
  CHECK(g.model == ModelConfig{12, 12, 768, 1024, 50304});
  CHECK(g.train.batch_size == 16);
  CHECK(g.device.backend == "cuda");
  CHECK(g.device.precision == "bf16");
  CHECK(g.data.tokenizer == "gpt2");
  CHECK(g.data.vocab == "data/gpt2");
  const Config p = load_config(dir + "paper-size.yaml");
  CHECK(p.model == ModelConfig{6, 6, 384, 256, 256});
  CHECK(p.train.batch_size == 64);
  CHECK(p.barrier.lambda == 0.03);
}

// configs/README.md has, per section, a table "| `key` | `default` | meaning |" that must list
// every key with the default that Config{} really has.
TEST_CASE("configs/README.md documents every key and its default", "[config]") {
  const std::string readme = read_text(source_dir() + "/configs/README.md");
  std::map<std::string, std::string> documented;  // "train.lr" -> "0.001"
  std::string section;
  std::istringstream lines(readme);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("### `", 0) == 0) section = line.substr(5, line.find('`', 5) - 5);
    if (section.empty() || line.rfind("| `", 0) != 0) continue;
    std::vector<std::string> cells;
    std::istringstream row(line.substr(1));
    for (std::string cell; std::getline(row, cell, '|');) {
      const size_t a = cell.find_first_not_of(" `"), b = cell.find_last_not_of(" `");
      cells.push_back(a == std::string::npos ? "" : cell.substr(a, b - a + 1));
    }
    if (cells.size() >= 3) documented[section + "." + cells[0]] = cells[1];
  }
  std::istringstream yaml(config_to_yaml(Config{}));
  int keys = 0;
  for (std::string line; std::getline(yaml, line);) {
    if (line[0] != ' ') {
      section = line.substr(0, line.size() - 1);
      continue;
    }
    const size_t colon = line.find(':');
    const std::string key = section + "." + line.substr(2, colon - 2);
    std::string value = line.substr(colon + 2);
    if (value.size() >= 2 && value.front() == '"') value = value.size() == 2 ? "\"\"" : value.substr(1, value.size() - 2);
    INFO(key);
    REQUIRE(documented.count(key) == 1);
    CHECK(documented[key] == value);
    ++keys;
  }
  CHECK(keys == 40);
  CHECK(documented.size() == static_cast<size_t>(keys));  // and nothing that does not exist
}
