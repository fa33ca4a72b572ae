// Tests of `barrierlm export` (cmd/cmd_export.cpp): the Hugging Face GPT-2 directory it writes is
// read back here as another program would, from the file formats alone: the safetensors header
// (names, shapes, offsets), the weights, and a GPT-2 forward written from GPT-2's own conventions
// (Conv1D y = x W + b, c_attn split into q, k, v, gelu_new, LayerNorm eps 1e-5, lm_head = wte)
// whose logits must equal the CPU reference's on the checkpoint's parameters; vocab.json and
// merges.txt must rebuild the checkpoint's tokenizer; bfloat16 is the nearest bf16 of each
// weight; bad options are named.  And train.init (cmd/hf_gpt2.h), which reads such a directory,
// a hub-style .safetensors file or a checkpoint back into barrierlm's parameters.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "cmd/hf_gpt2.h"
#include "core/checkpoint.h"
#include "core/reference.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "data/json_reader.h"
#include "tests/catch.h"
#include "tests/cli_util.h"
#include "tests/gpt2_vocab.h"

using namespace blm;
using namespace blm::test;
namespace fs = std::filesystem;

namespace {

// A safetensors file read back: each tensor's dtype, shape and values as doubles.
struct Tensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<double> values;
  double at(int64_t i, int64_t j) const { return values[static_cast<size_t>(i * shape[1] + j)]; }
};

std::map<std::string, Tensor> read_safetensors(const std::string& path) {
  const std::string bytes = slurp_required(path);
  REQUIRE(bytes.size() >= 8);
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = n << 8 | static_cast<unsigned char>(bytes[b]);
  REQUIRE(n % 8 == 0);  // the data starts 8-byte aligned
  const JsonValue header = parse_json(bytes.substr(8, n), path);
  const size_t data = 8 + n;
  std::map<std::string, Tensor> out;
  size_t expect_begin = 0;  // the tensors tile the data, in header order
  for (const auto& [name, v] : header.members()) {
    if (name == "__metadata__") continue;
    Tensor t;
    t.dtype = v.find("dtype")->as_string();
    const size_t elem = t.dtype == "F32" ? 4 : 2;
    size_t count = 1;
    for (const JsonValue& d : v.find("shape")->items()) {
      t.shape.push_back(static_cast<int64_t>(d.as_number()));
      count *= static_cast<size_t>(d.as_number());
    }
    const auto& off = v.find("data_offsets")->items();
    const size_t begin = static_cast<size_t>(off[0].as_number()),
                 end = static_cast<size_t>(off[1].as_number());
    REQUIRE(begin == expect_begin);
    REQUIRE(end - begin == count * elem);
    expect_begin = end;
    for (size_t i = 0; i < count; ++i) {
      uint32_t u = 0;
      for (size_t b = 0; b < elem; ++b)
        u |= static_cast<uint32_t>(static_cast<unsigned char>(bytes[data + begin + i * elem + b]))
             << (8 * b);
      if (elem == 2) u <<= 16;  // bfloat16: the high half of a float32
      float x;
      std::memcpy(&x, &u, 4);
      t.values.push_back(x);
    }
    out[name] = std::move(t);
  }
  CHECK(data + expect_begin == bytes.size());
  return out;
}

// GPT-2's forward (transformers' GPT2LMHeadModel, eval mode) on one sequence, from the exported
// tensors: logits [T, V].
std::vector<double> gpt2_logits(const std::map<std::string, Tensor>& w, const std::vector<int>& x,
                                int n_layer, int n_head) {
  const auto& W = [&](const std::string& name) -> const Tensor& {
    const auto it = w.find("transformer." + name);
    REQUIRE(it != w.end());
    return it->second;
  };
  const int T = static_cast<int>(x.size()), d = static_cast<int>(W("wte.weight").shape[1]);
  const int V = static_cast<int>(W("wte.weight").shape[0]), dh = d / n_head;
  using Rows = std::vector<std::vector<double>>;
  const auto layer_norm = [&](const Rows& h, const std::string& p) {
    Rows y = h;
    for (auto& row : y) {
      double mean = 0, var = 0;
      for (double v : row) mean += v / d;
      for (double v : row) var += (v - mean) * (v - mean) / d;
      for (int i = 0; i < d; ++i)
        row[i] = (row[i] - mean) / std::sqrt(var + 1e-5) * W(p + ".weight").values[i] +
                 W(p + ".bias").values[i];
    }
    return y;
  };
  const auto conv1d = [&](const Rows& in, const std::string& p) {  // y = x W + b, W [in, out]
    const Tensor& m = W(p + ".weight");
    Rows y(in.size(), std::vector<double>(m.shape[1]));
    for (size_t t = 0; t < in.size(); ++t)
      for (int64_t o = 0; o < m.shape[1]; ++o) {
        double s = W(p + ".bias").values[o];
        for (int64_t i = 0; i < m.shape[0]; ++i) s += in[t][i] * m.at(i, o);
        y[t][o] = s;
      }
    return y;
  };
  Rows h(T, std::vector<double>(d));
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < d; ++i) h[t][i] = W("wte.weight").at(x[t], i) + W("wpe.weight").at(t, i);
  for (int l = 0; l < n_layer; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    const Rows qkv = conv1d(layer_norm(h, p + "ln_1"), p + "attn.c_attn");
    Rows o(T, std::vector<double>(d, 0.0));
    for (int j = 0; j < n_head; ++j)
      for (int t = 0; t < T; ++t) {
        std::vector<double> a(t + 1);
        double top = -1e300, sum = 0;
        for (int s = 0; s <= t; ++s) {
          double z = 0;
          for (int i = 0; i < dh; ++i) z += qkv[t][j * dh + i] * qkv[s][d + j * dh + i];
          a[s] = z / std::sqrt(static_cast<double>(dh));
          top = std::max(top, a[s]);
        }
        for (double& v : a) sum += (v = std::exp(v - top));
        for (int s = 0; s <= t; ++s)
          for (int i = 0; i < dh; ++i) o[t][j * dh + i] += a[s] / sum * qkv[s][2 * d + j * dh + i];
      }
    const Rows attn = conv1d(o, p + "attn.c_proj");
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < d; ++i) h[t][i] += attn[t][i];
    Rows f = conv1d(layer_norm(h, p + "ln_2"), p + "mlp.c_fc");
    for (auto& row : f)
      for (double& v : row)  // gelu_new
        v = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    const Rows mlp = conv1d(f, p + "mlp.c_proj");
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < d; ++i) h[t][i] += mlp[t][i];
  }
  const Rows hf = layer_norm(h, "ln_f");
  std::vector<double> logits(static_cast<size_t>(T) * V);
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < V; ++v) {
      double s = 0;
      for (int i = 0; i < d; ++i) s += hf[t][i] * W("wte.weight").at(v, i);
      logits[static_cast<size_t>(t) * V + v] = s;
    }
  return logits;
}

// A tiny trained gpt2-tokenizer run in d (runs/r), and random.bin: its checkpoint with every
// parameter random (trained biases and gains are still near 0 and 1, so a tensor put in
// another's place could go unseen).
Checkpoint random_checkpoint(const TempDir& d) {
  write_word_vocab(d / "vocab");
  write_file(d / "text.txt", generated_text(3, 20000));
  write_file(d / "cfg.yaml",
             "model: {n_layer: 2, n_head: 2, d_model: 16, seq_len: 12, vocab_size: 0}\n"
             "barrier: {lambda: 0.05, positions: 4}\n"
             "data: {train: text.txt, tokenizer: gpt2, vocab: vocab}\n"
             "train: {batch_size: 2, steps: 2, eval_interval: 0}\n"
             "device: {backend: cpu, threads: 1}\n");
  const Run tr = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "-q"});
  INFO(tr.out << tr.err);
  REQUIRE(tr.rc == 0);
  Checkpoint ck = load_checkpoint(d / "runs/r/checkpoint.bin");
  Rng rng(5);
  for (float& p : ck.params) p = static_cast<float>(0.3 * rng.normal());
  save_checkpoint(d / "random.bin", ck);
  return ck;
}

// Sets the float32 at flat index i of tensor `name` in the safetensors file at path to x.
void poke_float(const std::string& path, const std::string& name, size_t i, float x) {
  std::string bytes = slurp_required(path);
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = n << 8 | static_cast<unsigned char>(bytes[b]);
  const JsonValue header = parse_json(bytes.substr(8, n), path);
  const JsonValue* t = header.find(name);
  REQUIRE(t != nullptr);
  REQUIRE(t->find("dtype")->as_string() == "F32");
  const size_t begin = static_cast<size_t>(t->find("data_offsets")->items()[0].as_number());
  uint32_t u;
  std::memcpy(&u, &x, 4);
  for (int b = 0; b < 4; ++b) bytes[8 + n + begin + 4 * i + b] = static_cast<char>(u >> (8 * b));
  write_file(path, bytes);
}

// text with its first `from` (which must be there) replaced by `to`.
std::string replaced(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  REQUIRE(at != std::string::npos);
  return text.replace(at, from.size(), to);
}

// What initial_weights (train.init) says of the source `from` for model m: its error, or
// "(no error)".
std::string init_error(const std::string& from, const ModelConfig& m) {
  try {
    initial_weights(from, m);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("export: a Hugging Face GPT-2 directory whose forward is barrierlm's", "[cli][export]") {
  TempDir d;
  const Checkpoint ck = random_checkpoint(d);
  Rng rng(6);

  const Run ex = run(d.path, {"export", "random.bin", "-o", "hf"});
  INFO(ex.out << ex.err);
  REQUIRE(ex.rc == 0);
  const auto w = read_safetensors(d / "hf/model.safetensors");
  const ModelConfig& m = ck.config.model;
  CHECK(w.size() == 4 + 12 * static_cast<size_t>(m.n_layer));
  for (const auto& [name, t] : w) CHECK(t.dtype == "F32");
  CHECK(w.at("transformer.h.1.attn.c_attn.weight").shape == std::vector<int64_t>{16, 48});
  CHECK(w.at("transformer.h.0.mlp.c_proj.weight").shape == std::vector<int64_t>{64, 16});
  CHECK(w.count("lm_head.weight") == 0);  // tied to wte

  // Logits of GPT-2's forward on the exported file equal the reference's on the checkpoint.
  std::vector<int> x(m.seq_len);
  for (int& t : x) t = static_cast<int>(rng.below(m.vocab_size));
  const std::vector<double> theirs = gpt2_logits(w, x, m.n_layer, m.n_head);
  ReferenceModel<double> ref(m, ck.config.barrier);
  const std::vector<double> params(ck.params.begin(), ck.params.end());
  std::vector<int32_t> inputs(x.begin(), x.end());
  ref.forward(params.data(), Batch{1, m.seq_len, inputs.data(), nullptr}, ForwardOptions{});
  const std::vector<double>& ours = ref.logits();
  REQUIRE(ours.size() == theirs.size());
  double worst = 0, scale = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    worst = std::max(worst, std::abs(ours[i] - theirs[i]));
    scale = std::max(scale, std::abs(ours[i]));
  }
  INFO("largest logit " << scale << ", largest difference " << worst);
  CHECK(scale > 1.0);
  CHECK(worst <= 1e-9 * scale);

  // config.json describes that model; the tokenizer files rebuild the checkpoint's tokenizer.
  const JsonValue config = parse_json(slurp_required(d / "hf/config.json"), "config.json");
  CHECK(config.find("model_type")->as_string() == "gpt2");
  CHECK(config.find("activation_function")->as_string() == "gelu_new");
  for (const auto& [key, value] : std::map<std::string, int>{{"vocab_size", m.vocab_size},
                                                             {"n_positions", m.seq_len},
                                                             {"n_embd", m.d_model},
                                                             {"n_layer", m.n_layer},
                                                             {"n_head", m.n_head}})
    CHECK(config.find(key)->as_number() == value);
  CHECK(config.find("eos_token_id")->as_number() == m.vocab_size - 1);  // <|endoftext|>
  fs::create_directories(d / "back");
  fs::copy_file(d / "hf/vocab.json", d / "back/encoder.json");
  fs::copy_file(d / "hf/merges.txt", d / "back/vocab.bpe");
  CHECK(make_gpt2_tokenizer(d / "back")->serialize() == ck.tokenizer);
  const JsonValue from = parse_json(slurp_required(d / "hf/barrierlm.json"), "barrierlm.json");
  CHECK(from.find("step")->as_number() == 2);
  CHECK(from.find("barrier")->find("lambda")->as_number() == 0.05);

  // bfloat16: each weight the nearest bf16 (within half of its ulp, 2^-9 relative).
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hf16", "--dtype", "bfloat16"}).rc == 0);
  const auto w16 = read_safetensors(d / "hf16/model.safetensors");
  CHECK(parse_json(slurp_required(d / "hf16/config.json"), "config.json")
            .find("torch_dtype")
            ->as_string() == "bfloat16");
  size_t exact = 0, count = 0;
  for (const auto& [name, t] : w16) {
    REQUIRE(t.dtype == "BF16");
    const Tensor& full = w.at(name);
    for (size_t i = 0; i < t.values.size(); ++i, ++count) {
      const double ulp = std::ldexp(1.0, std::ilogb(full.values[i]) - 7);
      REQUIRE(std::abs(t.values[i] - full.values[i]) <= 0.5 * ulp);
      exact += t.values[i] == full.values[i];
    }
  }
  CHECK(exact < count / 100);  // the values did get rounded

  // Bad options and inputs: named, nothing written.
  check_error(run(d.path, {"export", "random.bin", "-o", "x", "--dtype", "fp8"}), 2,
              {"--dtype: unknown type 'fp8'"});
  check_error(run(d.path, {"export", "missing.bin", "-o", "x"}), 1, {"missing.bin"});
  write_file(d / "file", "");
  check_error(run(d.path, {"export", "random.bin", "-o", "file"}), 1, {"file"});
  CHECK(!fs::exists(d / "x"));
}

TEST_CASE("train.init: weights from an export, a hub-style file or a checkpoint", "[cli][export]") {
  TempDir d;
  const Checkpoint ck = random_checkpoint(d);
  const ModelConfig& m = ck.config.model;
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hf"}).rc == 0);
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hf16", "--dtype", "bfloat16"}).rc == 0);

  // The export, its file, and the checkpoint itself give the checkpoint's parameters exactly.
  for (const std::string& from : {d / "hf", d / "hf/model.safetensors", d / "random.bin"})
    CHECK(initial_weights(from, m).params == ck.params);
  // bfloat16: each within its rounding.
  const std::vector<float> rounded = initial_weights(d / "hf16", m).params;
  REQUIRE(rounded.size() == ck.params.size());
  for (size_t i = 0; i < rounded.size(); ++i)
    REQUIRE(std::abs(rounded[i] - ck.params[i]) <= std::ldexp(std::abs(ck.params[i]), -8));

  // As the hub has OpenAI's GPT-2: names without "transformer.", the attention's mask buffers
  // and lm_head.weight beside them.
  std::string bytes = slurp_required(d / "hf/model.safetensors");
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = n << 8 | static_cast<unsigned char>(bytes[b]);
  std::string header = bytes.substr(8, n), data = bytes.substr(8 + n);
  for (size_t at; (at = header.find("\"transformer.")) != std::string::npos;)
    header.erase(at + 1, 12);
  while (header.back() == ' ') header.pop_back();
  header.pop_back();  // the closing brace
  header +=
      ",\"h.0.attn.bias\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
      "\"lm_head.weight\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string hub(8, '\0');
  for (int b = 0; b < 8; ++b) hub[b] = static_cast<char>(header.size() >> (8 * b));
  write_file(d / "hub.safetensors", hub + header + data);
  CHECK(initial_weights(d / "hub.safetensors", m).params == ck.params);

  // Fine-tuning's two shape changes: fewer positions (wpe's first rows), a padded vocabulary
  // (wte's extra rows zero).
  ModelConfig shorter = m, padded = m;
  shorter.seq_len = m.seq_len - 4;
  padded.vocab_size = m.vocab_size + 7;
  const ParamLayout full(m), cut(shorter), wide(padded);
  const std::vector<float> a = initial_weights(d / "hf", shorter).params,
                           b = initial_weights(d / "hf", padded).params;
  const auto same = [&](const std::vector<float>& x, const ParamLayout& lx, const std::string& name,
                        size_t count) {
    return std::equal(x.begin() + lx.find(name).offset, x.begin() + lx.find(name).offset + count,
                      ck.params.begin() + full.find(name).offset);
  };
  CHECK(same(a, cut, "wpe", cut.find("wpe").size));
  CHECK(same(a, cut, "h1.mlp.proj.w", cut.find("h1.mlp.proj.w").size));
  CHECK(same(b, wide, "wte", full.find("wte").size));
  const TensorSpec& wte = wide.find("wte");
  CHECK(std::all_of(b.begin() + wte.offset + full.find("wte").size,
                    b.begin() + wte.offset + wte.size, [](float x) { return x == 0.0f; }));
  CHECK(same(b, wide, "lnf.b", 16));

  // Other shapes are named with the config key to change.
  // A Hugging Face directory: its config.json must have the run's layers, heads and width (it
  // is checked as eval checks it); a .safetensors file alone is checked tensor by tensor.
  const std::string weights = d / "hf/model.safetensors";
  ModelConfig c = m;
  c.d_model = 32;
  CHECK(init_error(d / "hf", c).find("config.json: 'n_embd' is 16 but the run's model.d_model is "
                                    "32") != std::string::npos);
  CHECK(init_error(weights, c)
            .find("tensor wte is [" + std::to_string(m.vocab_size) +
                  ", 16], the config's model needs [" + std::to_string(m.vocab_size) + ", 32]") !=
        std::string::npos);
  c = m;
  c.seq_len = m.seq_len + 1;
  CHECK(init_error(d / "hf", c).find("model.seq_len") != std::string::npos);
  c = m;
  c.n_head = 1;
  CHECK(init_error(d / "hf", c).find("'n_head' is 2 but the run's model.n_head is 1") !=
        std::string::npos);
  c = m;
  c.n_layer = 3;
  CHECK(init_error(d / "hf", c).find("'n_layer' is 2 but the run's model.n_layer is 3") !=
        std::string::npos);
  CHECK(init_error(weights, c).find("has no tensor h2.ln1.w") != std::string::npos);
  CHECK(init_error(d / "random.bin", c).find("has no tensor h2.ln1.w") != std::string::npos);
  c.n_layer = 1;
  CHECK(init_error(weights, c).find("h.1.ln_1.weight' is not one of GPT-2's with model.n_layer "
                                    "1") != std::string::npos);
  CHECK(init_error(d / "random.bin", c).find("more layers than model.n_layer 1") !=
        std::string::npos);
  CHECK(init_error(d / "runs", m).find("holds neither checkpoint.bin nor a Hugging Face model") !=
        std::string::npos);
  CHECK(init_error(d / "cfg.yaml", m).find("not a safetensors file") != std::string::npos);

  // train: the same first loss from the export as from the checkpoint, another without init.
  const auto first_loss = [&](const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"train",         "cfg.yaml", "--set",
                                     "train.steps=1", "--set",    "train.log_interval=1"};
    args.insert(args.end(), extra.begin(), extra.end());
    const Run r = run(d.path, args);
    INFO(r.out << r.err);
    REQUIRE(r.rc == 0);
    if (!extra.empty()) CHECK(r.out.find("init      the weights of ") != std::string::npos);
    const std::string metrics = slurp_required(d / "runs/latest/metrics.jsonl");
    const size_t at = metrics.find("\"loss\":");
    REQUIRE(at != std::string::npos);
    return metrics.substr(at, metrics.find(',', at) - at);
  };
  const std::string from_export = first_loss({"--set", "train.init=hf"});
  CHECK(slurp_required(d / "runs/latest/config.yaml").find("  init: \"hf\"\n") !=
        std::string::npos);
  CHECK(from_export == first_loss({"--set", "train.init=random.bin"}));
  CHECK(from_export != first_loss({}));
  // The source's tokenizer: the checkpoint's, or vocab.json and merges.txt beside the weights.
  CHECK(initial_weights(d / "random.bin", m).tokenizer == ck.tokenizer);
  CHECK(initial_weights(d / "hf", m).tokenizer == ck.tokenizer);
  CHECK(initial_weights(d / "hub.safetensors", m).tokenizer.empty());  // no files beside it
  // data.vocab and tokenize's --vocab may be such a directory too.
  CHECK(make_gpt2_tokenizer(d / "hf")->serialize() == ck.tokenizer);
  REQUIRE(run(d.path, {"tokenize", "text.txt", "--vocab", "hf", "-o", "a.bin", "-q"}).rc == 0);
  REQUIRE(run(d.path, {"tokenize", "text.txt", "--vocab", "vocab", "-o", "b.bin", "-q"}).rc == 0);
  CHECK(slurp_required(d / "a.bin") == slurp_required(d / "b.bin"));
  // Another tokenizer than the data's is said (not refused).
  Checkpoint other = ck;
  other.tokenizer = "byte";
  save_checkpoint(d / "other.bin", other);
  const Run warned = run(d.path, {"train", "cfg.yaml", "--set", "train.init=other.bin", "--set",
                                  "train.steps=1", "-q"});
  CHECK(warned.rc == 0);
  CHECK(warned.err.find("warning: train.init 'other.bin' comes with another tokenizer (byte of "
                        "256 tokens) than the data's (gpt2 of " +
                        std::to_string(m.vocab_size) + " tokens)") != std::string::npos);
  CHECK(run(d.path, {"train", "cfg.yaml", "--set", "train.init=hf", "--set", "train.steps=1", "-q"})
            .err.find("warning") == std::string::npos);

  // train.steps 0: the initial weights validated and saved as step 0 (a pretrained model for
  // eval and margins as it is).
  const Run zero =
      run(d.path, {"train", "cfg.yaml", "--set", "train.init=hf", "--set", "train.steps=0", "--set",
                   "train.eval_interval=1", "--set", "train.run_name=zero"});
  INFO(zero.out << zero.err);
  REQUIRE(zero.rc == 0);
  CHECK(zero.out.find("train.steps is 0: the initial weights of hf saved as step 0") !=
        std::string::npos);
  const Checkpoint saved = load_checkpoint(d / "runs/zero/checkpoint.bin");
  CHECK(saved.step == 0);
  CHECK(saved.params == ck.params);
  CHECK(saved.adam_m.empty());  // no optimizer step yet: no moments saved
  CHECK(saved.adam_v.empty());
  CHECK(slurp_required(d / "runs/zero/metrics.jsonl").find("\"kind\":\"eval\",\"step\":0") !=
        std::string::npos);
  // Resumed, it trains as a run started from the same weights.
  REQUIRE(run(d.path, {"train", "--resume", "runs/zero", "--set", "train.steps=2", "-q"}).rc == 0);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.init=hf", "--set", "train.steps=2",
                       "--set", "train.eval_interval=1", "--set", "train.run_name=whole", "-q"})
              .rc == 0);
  const Checkpoint resumed = load_checkpoint(d / "runs/zero/checkpoint.bin"),
                   whole = load_checkpoint(d / "runs/whole/checkpoint.bin");
  CHECK(resumed.step == 2);
  CHECK(resumed.params == whole.params);
  CHECK(resumed.adam_v == whole.adam_v);
  check_error(run(d.path, {"train", "cfg.yaml", "--set", "train.init=nowhere.bin", "--set",
                           "train.run_name=bad"}),
              1, {"nowhere.bin"});
  CHECK(!fs::exists(d / "runs/bad"));
}

TEST_CASE("eval margins sample and export take a Hugging Face GPT-2 directory", "[cli][export]") {
  TempDir d;
  Checkpoint ck = random_checkpoint(d);
  // eval's windows come from eval_batches, batch_size and grad_accum: settings of the run, other
  // than the defaults (16, 1, 20), which the export must carry.
  ck.config.train.batch_size = 6;
  ck.config.train.grad_accum = 2;
  ck.config.train.eval_batches = 3;
  REQUIRE(ck.tokens_seen > 0);
  save_checkpoint(d / "random.bin", ck);
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hf"}).rc == 0);
  // Everything but the line naming the model read.
  const auto output_of = [&](std::vector<std::string> args) {
    const Run r = run(d.path, args);
    INFO(r.out << r.err);
    REQUIRE(r.rc == 0);
    std::string kept;
    for (const std::string& l : lines_of(r.out))
      if (l.find("\"checkpoint\"") == std::string::npos) kept += l + "\n";
    return kept;
  };
  const std::vector<std::string> eval = {"--data", "text.txt", "--noise", "0,0.1", "--draws", "2",
                                         "--batches", "2", "--json", "--backend", "cpu"};
  const auto with = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  // The export evaluates as its checkpoint: the same JSON (step and barrier from barrierlm.json).
  const std::string from_checkpoint = output_of(with({"eval", "random.bin"}, eval));
  CHECK(from_checkpoint.find("\"step\": 2") != std::string::npos);
  CHECK(output_of(with({"eval", "hf"}, eval)) == from_checkpoint);
  const std::vector<std::string> run_batches = {"--data", "text.txt", "--json", "--backend", "cpu"};
  const std::string run_windows = output_of(with({"eval", "random.bin"}, run_batches));
  // eval_batches x grad_accum batches of batch_size / grad_accum sequences: 6 of 3, the windows
  // of training's validation.
  CHECK(run_windows.find("\"batches\": 6") != std::string::npos);
  CHECK(output_of(with({"eval", "hf"}, run_batches)) == run_windows);
  check_error(run(d.path, {"eval", "hf", "--backend", "cpu"}), 1,
              {"'hf' is a Hugging Face model, with no run data of its own: pass --data FILE"});
  // Margins: the same values, written inside the model's directory by default.
  REQUIRE(run(d.path, {"margins", "random.bin", "--data", "text.txt", "--out", "m", "--backend",
                       "cpu"}).rc == 0);
  REQUIRE(run(d.path, {"margins", "hf", "--data", "text.txt", "--backend", "cpu"}).rc == 0);
  CHECK(slurp_required(d / "hf/margins/margins.csv") == slurp_required(d / "m/margins.csv"));
  const std::vector<std::string> greedy = {"--prompt", "the", "--tokens", "12", "--temperature",
                                           "0", "--backend", "cpu"};
  CHECK(output_of(with({"sample", "hf"}, greedy)) ==
        output_of(with({"sample", "random.bin"}, greedy)));
  // export of an export: the same file as the checkpoint's (here in bfloat16).
  REQUIRE(run(d.path, {"export", "hf", "-o", "hf16", "--dtype", "bfloat16"}).rc == 0);
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "ck16", "--dtype", "bfloat16"}).rc == 0);
  const auto hf16 = read_safetensors(d / "hf16/model.safetensors"),
             ck16 = read_safetensors(d / "ck16/model.safetensors");
  REQUIRE(hf16.size() == ck16.size());
  for (const auto& [name, t] : ck16) CHECK(hf16.at(name).values == t.values);
  // ... and the same barrierlm.json but for its source: tokens seen and train settings kept.
  const auto provenance = [&](const std::string& dir) {
    std::string text = slurp_required(d / (dir + "/barrierlm.json"));
    return text.substr(text.find('\n', text.find("\"source\"")));
  };
  CHECK(provenance("hf16") == provenance("ck16"));
  CHECK(provenance("hf16").find("\"tokens_seen\": " + std::to_string(ck.tokens_seen)) !=
        std::string::npos);
  CHECK(checkpoint_from_hf_dir(d / "hf16").config.train.batch_size == 6);

  // As the hub has a model: no barrierlm.json, so step 0 and lambda 0.
  fs::create_directories(d / "hub");
  for (const char* f : {"config.json", "model.safetensors", "vocab.json", "merges.txt"})
    fs::copy_file(d / ("hf/" + std::string(f)), d / ("hub/" + std::string(f)));
  const Checkpoint hub = checkpoint_from_hf_dir(d / "hub");
  CHECK(hub.step == 0);
  CHECK(hub.config.barrier.lambda == 0);
  CHECK(hub.config.model.vocab_size == ck.config.model.vocab_size);
  CHECK(hub.params == ck.params);
  CHECK(hub.tokenizer == ck.tokenizer);
  // An export of a byte run: its tokenizer from barrierlm.json.
  Checkpoint bytes = ck;
  bytes.tokenizer = "byte";
  save_checkpoint(d / "bytes.bin", bytes);
  REQUIRE(run(d.path, {"export", "bytes.bin", "-o", "hfb"}).rc == 0);
  CHECK(!fs::exists(d / "hfb/vocab.json"));
  CHECK(output_of(with({"sample", "hfb"}, greedy)) ==
        output_of(with({"sample", "bytes.bin"}, greedy)));

  // Weights without a tokenizer: token ids, said in a note; text is refused by name.
  fs::remove(d / "hub/vocab.json");
  const Run ids = run(d.path, {"sample", "hub", "--prompt", "<3><4>", "--tokens", "3"});
  CHECK(ids.rc == 0);
  CHECK(ids.out.rfind("<3><4><", 0) == 0);
  CHECK(ids.err.find("note: 'hub' has no tokenizer") != std::string::npos);
  const Run text = run(d.path, {"eval", "hub", "--data", "text.txt"});
  CHECK(text.rc == 1);
  CHECK(text.err.find("barrierlm: error: data file 'text.txt' is text but the checkpoint's "
                      "tokenizer is 'bin'") != std::string::npos);
  // What is not barrierlm's model is named.
  const std::string config = slurp_required(d / "hf/config.json");
  const auto refused = [&](const std::string& from, const std::string& to) {
    write_file(d / "hf/config.json", replaced(config, from, to));
    return run(d.path, {"sample", "hf"});
  };
  check_error(refused("\"gelu_new\"", "\"relu\""), 1,
              {"hf/config.json: 'activation_function' is not the tanh GELU (gelu_new): "
               "barrierlm's model is GPT-2's"});
  check_error(refused("\"layer_norm_epsilon\": 1e-05", "\"layer_norm_epsilon\": 1e-06"), 1,
              {"'layer_norm_epsilon' is not 1e-5"});
  check_error(refused("\"n_head\": 2", "\"n_head\": 3"), 1, {"hf/config.json: "});
  check_error(refused("\"n_layer\": 2", "\"n_layer\": 1"), 1,
              {"h.1.ln_1.weight' is not one of GPT-2's with model.n_layer 1"});
}

// random_checkpoint's run with the byte tokenizer, as bytes.bin.
void save_byte_checkpoint(const TempDir& d, const Checkpoint& ck) {
  Checkpoint bytes = ck;
  bytes.tokenizer = "byte";
  save_checkpoint(d / "bytes.bin", bytes);
}

// The text `sample` writes from model greedily.
std::string greedy_sample(const TempDir& d, const std::string& model) {
  const Run r = run(d.path, {"sample", model, "--prompt", "the", "--tokens", "8", "--temperature",
                             "0", "--backend", "cpu"});
  INFO(r.out << r.err);
  REQUIRE(r.rc == 0);
  return r.out;
}

TEST_CASE("export removes another model's tokenizer files from its directory", "[cli][export]") {
  TempDir d;
  const Checkpoint ck = random_checkpoint(d);
  save_byte_checkpoint(d, ck);
  // A byte model over a gpt2 one (and transformers' files beside it): the tokenizer files it
  // does not write are removed, and said, so that its text is bytes again.
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "mix"}).rc == 0);
  write_file(d / "mix/tokenizer.json", "{}");
  write_file(d / "mix/tokenizer_config.json", "{}");
  const Run over = run(d.path, {"export", "bytes.bin", "-o", "mix"});
  INFO(over.out << over.err);
  REQUIRE(over.rc == 0);
  CHECK(over.out.find("removed vocab.json, merges.txt, tokenizer.json, tokenizer_config.json "
                      "from mix/: another tokenizer's files (this model's is 'byte')") !=
        std::string::npos);
  for (const std::string& f : hf_tokenizer_files()) CHECK(!fs::exists(d / ("mix/" + f)));
  CHECK(greedy_sample(d, "mix") == greedy_sample(d, "bytes.bin"));
  // A gpt2 model over another vocabulary in OpenAI's files, which are read before vocab.json.
  write_gpt2_vocab(d / "mix", random_vocab(7, 40));
  const Run back = run(d.path, {"export", "random.bin", "-o", "mix"});
  REQUIRE(back.rc == 0);
  CHECK(back.out.find("removed encoder.json, vocab.bpe from mix/") != std::string::npos);
  CHECK(checkpoint_from_hf_dir(d / "mix").tokenizer == ck.tokenizer);
  CHECK(greedy_sample(d, "mix") == greedy_sample(d, "random.bin"));
}

TEST_CASE("an export's tokenizer files must agree with its barrierlm.json", "[cli][export]") {
  TempDir d;
  const Checkpoint ck = random_checkpoint(d);
  save_byte_checkpoint(d, ck);
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hfg"}).rc == 0);
  REQUIRE(run(d.path, {"export", "bytes.bin", "-o", "hfb"}).rc == 0);
  // A byte export with GPT-2's files: both named.
  fs::copy_file(d / "hfg/vocab.json", d / "hfb/vocab.json");
  check_error(run(d.path, {"sample", "hfb"}), 1,
              {"hfb/barrierlm.json says tokenizer 'byte', but 'hfb/vocab.json' is another "
               "tokenizer's file"});
  // A gpt2 export without its files, or with another vocabulary's.
  fs::remove(d / "hfg/merges.txt");
  check_error(run(d.path, {"sample", "hfg"}), 1,
              {"hfg/barrierlm.json says tokenizer 'gpt2', but 'hfg' lacks its vocab.json and "
               "merges.txt"});
  write_gpt2_vocab(d / "hfg", random_vocab(7, 40));
  check_error(run(d.path, {"eval", "hfg", "--data", "text.txt"}), 1,
              {"hfg/barrierlm.json says the tokenizer has " +
                   std::to_string(ck.config.model.vocab_size) + " tokens, but 'hfg/encoder.json' "
                   "has "});
  // A hub directory (no barrierlm.json) takes the files it has, as before.
  fs::remove(d / "hfb/barrierlm.json");
  fs::remove(d / "hfg/barrierlm.json");
  CHECK(checkpoint_from_hf_dir(d / "hfg").tokenizer != ck.tokenizer);
}

TEST_CASE("a NaN or infinity in a Hugging Face directory's weights is named", "[cli][export]") {
  TempDir d;
  const Checkpoint ck = random_checkpoint(d);
  // The tensor and its first such index (as the file stores it), for eval and train.init alike.
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "nan"}).rc == 0);
  poke_float(d / "nan/model.safetensors", "transformer.h.0.attn.c_attn.weight", 17, NAN);
  poke_float(d / "nan/model.safetensors", "transformer.h.0.attn.c_attn.weight", 40, NAN);
  check_error(run(d.path, {"eval", "nan", "--data", "text.txt", "--backend", "cpu"}), 1,
              {"'nan/model.safetensors': tensor 'transformer.h.0.attn.c_attn.weight' holds NaN at "
               "index 17 [0, 17] of [16, 48]"});
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "inf"}).rc == 0);
  poke_float(d / "inf/model.safetensors", "transformer.wte.weight", 20, -INFINITY);
  const std::string error = init_error(d / "inf", ck.config.model);
  CHECK(error.find("tensor 'transformer.wte.weight' holds -inf at index 20 [1, 4]") !=
        std::string::npos);
}

TEST_CASE("half a Hugging Face directory: the missing file is named", "[cli][export]") {
  TempDir d;
  random_checkpoint(d);
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hf"}).rc == 0);
  fs::create_directories(d / "half");
  fs::copy_file(d / "hf/model.safetensors", d / "half/model.safetensors");
  check_error(run(d.path, {"sample", "half"}), 1,
              {"'half' holds model.safetensors but no config.json"});
  fs::remove(d / "half/model.safetensors");
  fs::copy_file(d / "hf/config.json", d / "half/config.json");
  check_error(run(d.path, {"eval", "half", "--data", "text.txt"}), 1,
              {"'half' holds config.json but no model.safetensors"});
  // The hub's other layouts are named, with the way to one file.
  write_file(d / "half/pytorch_model.bin", "x");
  check_error(run(d.path, {"eval", "half", "--data", "text.txt"}), 1,
              {"'half' holds its weights as pytorch_model.bin", "save_pretrained(OUT"});
  write_file(d / "half/model.safetensors.index.json", "{}");
  check_error(run(d.path, {"eval", "half", "--data", "text.txt"}), 1,
              {"'half' holds its weights in shards (model.safetensors.index.json)"});
}

TEST_CASE("a Hugging Face directory is read as exactly the model its config.json describes",
          "[cli][export]") {
  TempDir d;
  const Checkpoint ck = random_checkpoint(d);
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hf"}).rc == 0);
  const auto copy_with = [&](const std::string& name, const std::string& from,
                             const std::string& to) {
    fs::copy(d / "hf", d / name, fs::copy_options::recursive);
    write_file(d / (name + "/config.json"), replaced(slurp(d / (name + "/config.json")), from, to));
  };
  // train.init reads config.json as eval does: another architecture is refused, not loaded.
  copy_with("untied", "\"n_layer\"", "\"tie_word_embeddings\": false, \"n_layer\"");
  CHECK(init_error(d / "untied", ck.config.model)
            .find("untied/config.json: 'tie_word_embeddings' is false") != std::string::npos);
  check_error(run(d.path, {"eval", "untied", "--data", "text.txt", "--backend", "cpu"}), 1,
              {"'tie_word_embeddings' is false"});
  // eval takes the weights as config.json sizes them: no padding of a smaller vocabulary.
  copy_with("padded", "\"vocab_size\": " + std::to_string(ck.config.model.vocab_size),
            "\"vocab_size\": " + std::to_string(ck.config.model.vocab_size + 8));
  check_error(run(d.path, {"eval", "padded", "--data", "text.txt", "--backend", "cpu"}), 1,
              {"tensor wte is [" + std::to_string(ck.config.model.vocab_size) + ", 16]"});
  // The same tensor twice, with and without the prefix: which is the model's?
  fs::copy(d / "hf", d / "twice", fs::copy_options::recursive);
  const std::string weight = "\"transformer.ln_f.weight\"";  // the bias's shape, [16]
  const std::string bias = "\"ln_f.bias\"";  // padded to the same length: the header stays valid
  write_file(d / "twice/model.safetensors",
             replaced(slurp(d / "twice/model.safetensors"), weight,
                      bias + std::string(weight.size() - bias.size(), ' ')));
  check_error(run(d.path, {"eval", "twice", "--data", "text.txt", "--backend", "cpu"}), 1,
              {"ln_f.bias' is there twice"});
  // A tokenizer file that does not read is named, not taken for no tokenizer at all.
  fs::copy(d / "hf", d / "broken", fs::copy_options::recursive);
  fs::remove(d / "broken/barrierlm.json");
  write_file(d / "broken/vocab.json", "{\"a\": ");
  check_error(run(d.path, {"eval", "broken", "--data", "text.txt", "--backend", "cpu"}), 1,
              {"broken/vocab.json", "(the tokenizer of 'broken')"});
  // A directory exported over itself would lose its own tokenizer files: refused.
  const Run itself = run(d.path, {"export", "hf", "-o", "hf"});
  CHECK(itself.rc == 2);
  CHECK(itself.err.find("is the directory being exported") != std::string::npos);
}

TEST_CASE("barrierlm.json's numbers are checked, naming the file and the key", "[cli][export]") {
  TempDir d;
  random_checkpoint(d);
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hf"}).rc == 0);
  const std::string provenance = slurp_required(d / "hf/barrierlm.json");
  const auto edited = [&](const std::string& from, const std::string& to) {
    write_file(d / "hf/barrierlm.json", replaced(provenance, from, to));
    return run(d.path, {"sample", "hf"});
  };
  check_error(edited("\"step\": 2,", "\"step\": -5,"), 1,
              {"hf/barrierlm.json: 'step' is -5; it must be an integer >= 0"});
  check_error(edited("\"step\": 2,", "\"step\": 2.5,"), 1, {"'step' is 2.5"});
  check_error(edited("\"tokens_seen\": ", "\"tokens_seen\": -"), 1,
              {"hf/barrierlm.json: 'tokens_seen' is -"});
  check_error(edited("\"batch_size\": 2,", "\"batch_size\": 0,"), 1,
              {"hf/barrierlm.json: 'train.batch_size' is 0; it must be an integer from 1 to"});
  check_error(edited("\"layers\": []", "\"layers\": [1.5]"), 1,
              {"hf/barrierlm.json: 'barrier.layers[0]' is 1.5"});
  check_error(edited("\"lambda\": 0.05", "\"lambda\": null"), 1,
              {"hf/barrierlm.json: 'barrier.lambda' is not a finite number"});
  check_error(edited("\"eps\": 0.0001", "\"eps\": -1"), 1, {"hf/barrierlm.json: barrier.eps"});
}

TEST_CASE("get-data.sh --gpt2-model fetches a model directory, checked and atomically",
          "[cli][export]") {
  if (std::system("command -v curl >/dev/null 2>&1") != 0) {
    WARN("curl is not installed: get-data.sh --gpt2-model not tested");  // wget has no file://
    return;
  }
  const char* source = std::getenv("BLM_SOURCE_DIR");
  REQUIRE(source != nullptr);
  TempDir d;
  random_checkpoint(d);
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hub"}).rc == 0);
  // The hub is this directory, through curl's file:// URLs.
  const std::string fetch = "GPT2_MODEL_URL='file://" + d.path + "/hub' '" + source +
                            "/scripts/get-data.sh' --gpt2-model '" + d.path + "/got'";
  const Run first = run_shell(d.path, fetch);
  INFO(first.out << first.err);
  REQUIRE(first.rc == 0);
  for (const char* name : {"config.json", "vocab.json", "merges.txt", "model.safetensors"})
    CHECK(slurp_required(d / ("got/" + std::string(name))) ==
          slurp_required(d / ("hub/" + std::string(name))));
  CHECK(initial_weights(d / "got", load_checkpoint(d / "random.bin").config.model).params ==
        load_checkpoint(d / "random.bin").params);
  const Run again = run_shell(d.path, fetch);
  CHECK(again.rc == 0);
  CHECK(count_of(again.out, "already there") == 4);
  // An error page instead of a file: refused, and the file fetched before stays as it was.
  const std::string merges = slurp_required(d / "got/merges.txt");
  write_file(d / "hub/merges.txt", "<html>Not Found</html>\n");
  const Run bad = run_shell(d.path, fetch + " --force");
  CHECK(bad.rc == 1);
  CHECK(bad.err.find("merges.txt does not start as a merges.txt should") != std::string::npos);
  CHECK(slurp_required(d / "got/merges.txt") == merges);
  for (const auto& entry : fs::directory_iterator(d / "got"))
    CHECK(entry.path().filename().string().find(".tmp") == std::string::npos);
}

TEST_CASE("export refuses a directory whose files would replace or remove its input",
          "[cli][export]") {
  TempDir d;
  random_checkpoint(d);
  const std::string checkpoint = slurp_required(d / "random.bin");
  // A checkpoint under the name of a file export writes, and of one it removes.
  fs::create_directories(d / "e");
  fs::copy_file(d / "random.bin", d / "e/model.safetensors");
  check_error(run(d.path, {"export", "e/model.safetensors", "-o", "e"}), 1,
              {"-o 'e/model.safetensors' is the checkpoint 'e/model.safetensors'",
               "choose another -o"});
  check_error(run(d.path, {"export", "e/model.safetensors", "-o", "./e/"}), 1,
              {"-o './e/model.safetensors' is the checkpoint 'e/model.safetensors'"});
  fs::copy_file(d / "random.bin", d / "e/tokenizer.json");
  check_error(run(d.path, {"export", "e/tokenizer.json", "-o", "e"}), 1,
              {"-o 'e/tokenizer.json' is the checkpoint 'e/tokenizer.json'"});
  CHECK(slurp(d / "e/model.safetensors") == checkpoint);
  CHECK(slurp(d / "e/tokenizer.json") == checkpoint);
  CHECK(!fs::exists(d / "e/config.json"));

  // A Hugging Face directory: into itself (refused as before), and into a directory whose
  // model.safetensors is a link to the one being read.
  REQUIRE(run(d.path, {"export", "random.bin", "-o", "hf"}).rc == 0);
  const std::string weights = slurp_required(d / "hf/model.safetensors");
  check_error(run(d.path, {"export", "hf", "-o", "hf"}), 2,
              {"-o 'hf' is the directory being exported"});
  fs::create_directories(d / "other");
  fs::create_symlink("../hf/model.safetensors", d / "other/model.safetensors");
  check_error(run(d.path, {"export", "hf", "-o", "other", "--dtype", "bfloat16"}), 1,
              {"-o 'other/model.safetensors' is a file of the model 'hf/model.safetensors'"});
  CHECK(slurp(d / "hf/model.safetensors") == weights);

  // A run directory holds checkpoint.bin, a name export never writes: allowed.
  const Run in_run = run(d.path, {"export", "runs/r", "-o", "runs/r"});
  INFO(in_run.out << in_run.err);
  CHECK(in_run.rc == 0);
}
