// Names shared with Hugging Face GPT-2, and train.init's reader (cmd/hf_gpt2.h).
#include "cmd/hf_gpt2.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>

#include "cmd/runs.h"
#include "cmd/util.h"
#include "core/checkpoint.h"
#include "core/params.h"
#include "data/json_reader.h"
#include "data/streams.h"
#include "data/tokenizers.h"

namespace blm {

namespace fs = std::filesystem;

std::vector<Gpt2TensorName> gpt2_tensor_names(int n_layer) {
  std::vector<Gpt2TensorName> names = {{"wte", "wte.weight", false}, {"wpe", "wpe.weight", false}};
  for (int l = 0; l < n_layer; ++l) {
    const std::string o = "h" + std::to_string(l) + ".", t = "h." + std::to_string(l) + ".";
    for (const Gpt2TensorName& n :
         std::vector<Gpt2TensorName>{{"ln1.w", "ln_1.weight", false},
                                     {"ln1.b", "ln_1.bias", false},
                                     {"attn.qkv.w", "attn.c_attn.weight", true},
                                     {"attn.qkv.b", "attn.c_attn.bias", false},
                                     {"attn.proj.w", "attn.c_proj.weight", true},
                                     {"attn.proj.b", "attn.c_proj.bias", false},
                                     {"ln2.w", "ln_2.weight", false},
                                     {"ln2.b", "ln_2.bias", false},
                                     {"mlp.fc.w", "mlp.c_fc.weight", true},
                                     {"mlp.fc.b", "mlp.c_fc.bias", false},
                                     {"mlp.proj.w", "mlp.c_proj.weight", true},
                                     {"mlp.proj.b", "mlp.c_proj.bias", false}})
      names.push_back({o + n.ours, t + n.theirs, n.transposed});
  }
  names.push_back({"lnf.w", "ln_f.weight", false});
  names.push_back({"lnf.b", "ln_f.bias", false});
  for (Gpt2TensorName& n : names) n.theirs = "transformer." + n.theirs;
  return names;
}

std::vector<float> transposed(const float* m, int64_t rows, int64_t cols) {
  std::vector<float> t(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  return t;
}

namespace {

// A tensor read from a file, under barrierlm's name and in barrierlm's orientation.
struct Source {
  std::vector<int64_t> shape;
  std::vector<float> values;
};
using Sources = std::map<std::string, Source>;

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

float float_of_half(uint16_t h) {  // IEEE binary16
  const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  const float sign = h & 0x8000 ? -1.0f : 1.0f;
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
  if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
  return sign * std::ldexp(static_cast<float>(mantissa + 1024), exponent - 25);
}

float float_of_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// The tensors of a safetensors file, renamed to barrierlm's names and transposed back.
Sources read_safetensors(const std::string& path, int n_layer) {
  const auto file = MappedFile::open(path);
  const auto fail = [&](const std::string& why) -> void {
    throw Error("'" + path + "': " + why);
  };
  const unsigned char* bytes = file->bytes();
  uint64_t n = 0;
  if (file->size() >= 8)
    for (int b = 7; b >= 0; --b) n = n << 8 | bytes[b];
  if (file->size() < 8 || n > file->size() - 8)
    fail("not a safetensors file (its first 8 bytes must give the header's length)");
  const JsonValue header =
      parse_json(std::string(reinterpret_cast<const char*>(bytes) + 8, n), path);
  std::map<std::string, const Gpt2TensorName*> by_their_name;
  const std::vector<Gpt2TensorName> names = gpt2_tensor_names(n_layer);
  for (const Gpt2TensorName& name : names) by_their_name[name.theirs] = &name;
  Sources out;
  for (const auto& [key, v] : header.members()) {
    if (key == "__metadata__") continue;
    const std::string theirs = key.rfind("transformer.", 0) == 0 ? key : "transformer." + key;
    const auto it = by_their_name.find(theirs);
    if (it == by_their_name.end()) {
      const bool skipped = key.find("attn.bias") != std::string::npos ||
                           key.find("attn.masked_bias") != std::string::npos ||
                           key == "lm_head.weight";  // buffers, and the tied output matrix
      if (skipped) continue;
      fail("tensor '" + key + "' is not one of GPT-2's with model.n_layer " +
           std::to_string(n_layer) + " (a file with more layers, or not GPT-2)");
    }
    const JsonValue *dtype = v.find("dtype"), *shape = v.find("shape"),
                    *offsets = v.find("data_offsets");
    if (!dtype || !shape || !offsets || offsets->items().size() != 2)
      fail("tensor '" + key + "' lacks dtype, shape or data_offsets");
    const std::string& type = dtype->as_string();
    const size_t elem = type == "F32" ? 4 : (type == "F16" || type == "BF16") ? 2 : 0;
    if (elem == 0) fail("tensor '" + key + "' is " + type + " (F32, F16 or BF16 are read)");
    Source s;
    size_t count = 1;
    for (const JsonValue& d : shape->items()) {
      s.shape.push_back(static_cast<int64_t>(d.as_number()));
      count *= static_cast<size_t>(d.as_number());
    }
    const size_t begin = static_cast<size_t>(offsets->items()[0].as_number()),
                 end = static_cast<size_t>(offsets->items()[1].as_number());
    if (end < begin || end - begin != count * elem || 8 + n + end > file->size())
      fail("tensor '" + key + "' has data_offsets that disagree with its shape or the file");
    const unsigned char* p = bytes + 8 + n + begin;
    const bool half = type == "F16";
    s.values.resize(count);
    for (size_t i = 0; i < count; ++i, p += elem) {
      if (elem == 4) {
        const uint32_t u = p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24;
        std::memcpy(&s.values[i], &u, 4);
      } else {
        const uint16_t h = static_cast<uint16_t>(p[0] | p[1] << 8);
        s.values[i] = half ? float_of_half(h) : float_of_bf16(h);
      }
    }
    if (it->second->transposed && s.shape.size() == 2) {  // [in, out] -> [out, in]
      s.values = transposed(s.values.data(), s.shape[0], s.shape[1]);
      std::swap(s.shape[0], s.shape[1]);
    }
    out[it->second->ours] = std::move(s);
  }
  return out;
}

// The tensors of a barrierlm checkpoint (and its tokenizer).
Sources read_checkpoint_tensors(const std::string& path, std::string& tokenizer) {
  const Checkpoint ck = load_checkpoint(path);
  tokenizer = ck.tokenizer;
  const ParamLayout layout(ck.config.model);
  Sources out;
  for (const TensorSpec& t : layout.tensors()) {
    Source s;
    for (int d : t.shape) s.shape.push_back(d);
    s.values.assign(ck.params.begin() + t.offset, ck.params.begin() + t.offset + t.size);
    out[t.name] = std::move(s);
  }
  return out;
}

// The config key a tensor's dimensions come from, for messages.
std::string key_of(const std::string& name) {
  if (name == "wte") return "model.vocab_size and model.d_model";
  if (name == "wpe") return "model.seq_len and model.d_model";
  return "model.d_model";
}

// GPT-2's tokenizer from the vocabulary files in dir (gpt2_vocab_files), described; "" when
// they are not there or do not read (the weights do not need them: they only serve train's
// warning).
std::string tokenizer_beside(const fs::path& dir) {
  std::string encoder, merges;
  if (!gpt2_vocab_files(dir.string(), encoder, merges)) return "";
  try {
    return Gpt2Tokenizer::from_files(dir.string())->serialize();
  } catch (const DataError&) {
    return "";
  }
}

// initial_weights, with messages that name the file alone.
InitialWeights read_weights(const std::string& path, const ModelConfig& model) {
  std::error_code ec;
  if (!fs::exists(path, ec))
    throw Error("'" + path + "' does not exist (a checkpoint or run directory, or a "
                "Hugging Face GPT-2 directory or .safetensors file)");
  std::string file = path;
  bool checkpoint = false;
  if (fs::is_directory(path, ec)) {
    checkpoint = fs::exists(fs::path(path) / kCheckpointFile, ec);
    file = (fs::path(path) / (checkpoint ? kCheckpointFile : "model.safetensors")).string();
    if (!checkpoint && !fs::exists(file, ec))
      throw Error("'" + path + "' holds neither " + kCheckpointFile +
                  " nor model.safetensors");
  } else {
    const auto mapped = MappedFile::open(path);  // names the file when it cannot be opened
    checkpoint = mapped->size() >= 8 && std::memcmp(mapped->bytes(), "BLMCKPT", 8) == 0;
  }
  InitialWeights out;
  const Sources sources = checkpoint ? read_checkpoint_tensors(file, out.tokenizer)
                                     : read_safetensors(file, model.n_layer);
  if (!checkpoint) out.tokenizer = tokenizer_beside(fs::path(file).parent_path());

  const ParamLayout layout(model);
  std::vector<float>& params = out.params;
  params.assign(layout.total(), 0.0f);
  for (const TensorSpec& t : layout.tensors()) {
    const auto it = sources.find(t.name);
    if (it == sources.end())
      throw Error("'" + file + "' has no tensor " + t.name + " (model.n_layer " +
                  std::to_string(model.n_layer) + ": does the file have as many layers?)");
    const Source& s = it->second;
    const std::vector<int64_t> want(t.shape.begin(), t.shape.end());
    const bool same_width = s.shape.size() == 2 && want.size() == 2 && s.shape[1] == want[1];
    const bool fits = s.shape == want || (t.name == "wpe" && same_width && s.shape[0] >= want[0]) ||
                      (t.name == "wte" && same_width && s.shape[0] <= want[0]);
    if (!fits)
      throw Error("'" + file + "': tensor " + t.name + " is " + shape_text(s.shape) +
                  ", the config's model needs " + shape_text(want) + " (" + key_of(t.name) + ")");
    const size_t n = std::min(t.size, s.values.size());  // wpe: its first rows; wte: all of it
    std::copy(s.values.begin(), s.values.begin() + n, params.begin() + t.offset);
  }
  if (checkpoint && sources.size() > layout.tensors().size())
    throw Error("'" + file + "' has more layers than model.n_layer " +
                std::to_string(model.n_layer));
  return out;
}

// The value of config.json's key as an integer >= 1 (the model's sizes).
int size_in(const JsonValue& config, const std::string& key, const std::string& file) {
  const double v = json_get_number(config, key, file);
  if (!(v >= 1 && v <= 1 << 24 && v == std::floor(v)))
    throw Error(file + ": '" + key + "' must be a positive integer");
  return static_cast<int>(v);
}

// The model config.json describes, after checking that it is barrierlm's architecture (GPT-2's
// with the tanh GELU, LayerNorm eps 1e-5, tied embeddings and 1/sqrt(dh) attention).
ModelConfig model_of(const JsonValue& config, const std::string& file) {
  const auto refuse = [&](const std::string& key, const std::string& why) {
    throw Error(file + ": '" + key + "' " + why + ": barrierlm's model is GPT-2's");
  };
  const JsonValue* type = config.find("model_type");
  if (type && !(type->is_string() && type->as_string() == "gpt2"))
    refuse("model_type", "is not \"gpt2\"");
  const JsonValue* act = config.find("activation_function");
  if (act && !(act->is_string() &&
               (act->as_string() == "gelu_new" || act->as_string() == "gelu_pytorch_tanh")))
    refuse("activation_function", "is not the tanh GELU (gelu_new)");
  const JsonValue* eps = config.find("layer_norm_epsilon");
  if (eps && !(eps->is_number() && std::abs(eps->as_number() - 1e-5) <= 1e-12))
    refuse("layer_norm_epsilon", "is not 1e-5");
  const JsonValue* tied = config.find("tie_word_embeddings");
  if (tied && !(tied->kind() == JsonValue::Kind::Bool && tied->as_bool()))
    refuse("tie_word_embeddings", "is false");
  for (const char* key : {"scale_attn_by_inverse_layer_idx", "add_cross_attention"}) {
    const JsonValue* v = config.find(key);
    if (v && v->kind() == JsonValue::Kind::Bool && v->as_bool()) refuse(key, "is true");
  }
  const JsonValue* scaled = config.find("scale_attn_weights");
  if (scaled && scaled->kind() == JsonValue::Kind::Bool && !scaled->as_bool())
    refuse("scale_attn_weights", "is false");
  ModelConfig m;
  m.n_layer = size_in(config, "n_layer", file);
  m.n_head = size_in(config, "n_head", file);
  m.d_model = size_in(config, "n_embd", file);
  m.seq_len = size_in(config, config.find("n_positions") ? "n_positions" : "n_ctx", file);
  m.vocab_size = size_in(config, "vocab_size", file);
  const JsonValue* inner = config.find("n_inner");
  if (inner && !inner->is_null() && inner->as_number() != 4.0 * m.d_model)
    refuse("n_inner", "is not 4 n_embd");
  try {
    validate(m);
  } catch (const ConfigError& e) {
    throw Error(file + ": " + e.what());
  }
  return m;
}

}  // namespace

InitialWeights initial_weights(const std::string& path, const ModelConfig& model) {
  try {
    return read_weights(path, model);
  } catch (const Error& e) {
    throw Error(std::string("train.init ") + e.what());
  }
}

bool is_hf_gpt2_dir(const std::string& path) {
  std::error_code ec;
  const fs::path dir(path);
  return fs::is_directory(dir, ec) && !fs::exists(dir / kCheckpointFile, ec) &&
         fs::exists(dir / "config.json", ec) && fs::exists(dir / "model.safetensors", ec);
}

Checkpoint checkpoint_from_hf_dir(const std::string& dir) {
  const std::string config_file = (fs::path(dir) / "config.json").string();
  const std::string provenance_file = (fs::path(dir) / "barrierlm.json").string();
  Checkpoint ck;
  ck.config.model = model_of(parse_json(read_text_file(config_file), config_file), config_file);

  // The tokenizer: GPT-2's files beside the weights, else the one barrierlm.json describes.
  std::error_code ec;
  const bool exported = fs::exists(provenance_file, ec);
  const JsonValue from =
      exported ? parse_json(read_text_file(provenance_file), provenance_file) : JsonValue();
  ck.tokenizer = tokenizer_beside(dir);
  if (ck.tokenizer.empty() && exported && from.find("tokenizer_description"))
    ck.tokenizer = json_get_string(from, "tokenizer_description", provenance_file);
  if (ck.tokenizer.empty()) {
    // Weights alone: its tokens are ids, which .bin shards hold (`barrierlm tokenize`).
    ck.tokenizer = "bin:" + std::to_string(ck.config.model.vocab_size);
    std::fprintf(stderr,
                 "barrierlm: note: '%s' has no tokenizer (GPT-2's vocab.json and merges.txt, or "
                 "an export's barrierlm.json): its tokens are read as ids, from .bin data\n",
                 dir.c_str());
  }
  const auto tok = make_tokenizer(ck.tokenizer);
  if (tok->vocab_size() > ck.config.model.vocab_size)
    throw Error(config_file + ": 'vocab_size' " + std::to_string(ck.config.model.vocab_size) +
                " is smaller than the tokenizer's " + std::to_string(tok->vocab_size()) +
                " tokens");
  DataConfig& data = ck.config.data;
  if (tok->kind() == "gpt2") data.vocab = dir;
  if (tok->kind() == "byte" || tok->kind() == "char" || tok->kind() == "gpt2")
    data.tokenizer = tok->kind();

  // An export keeps its run's step and barrier settings (margins use the barrier's layers).
  if (exported) {
    ck.step = static_cast<int64_t>(json_get_number(from, "step", provenance_file));
    const JsonValue& b = json_member(from, "barrier", provenance_file);
    BarrierConfig& barrier = ck.config.barrier;
    barrier.lambda = json_get_number(b, "lambda", provenance_file, "barrier");
    barrier.eps = json_get_number(b, "eps", provenance_file, "barrier");
    barrier.layers.clear();
    for (double l : json_get_numbers(b, "layers", provenance_file, "barrier"))
      barrier.layers.push_back(static_cast<int>(l));
  }
  try {
    validate(ck.config);
  } catch (const ConfigError& e) {
    throw Error(provenance_file + ": " + e.what());
  }
  ck.params = read_weights(dir, ck.config.model).params;
  return ck;
}

}  // namespace blm
