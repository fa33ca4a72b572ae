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

// The element at flat index i of a row-major tensor of that shape, as "[r, c]".
std::string index_text(size_t i, const std::vector<int64_t>& shape) {
  std::vector<int64_t> at(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    const size_t extent = static_cast<size_t>(std::max<int64_t>(shape[d], 1));
    at[d] = static_cast<int64_t>(i % extent);
    i /= extent;
  }
  return shape_text(at);
}

// A NaN or infinity in the weights would give NaN logits, and eval a CE of null, without an
// error; a damaged file or a diverged model is named here instead, at its first such value.
void check_finite(const Source& s, const std::string& path, const std::string& key) {
  const auto bad = std::find_if(s.values.begin(), s.values.end(),
                                [](float x) { return !std::isfinite(x); });
  if (bad == s.values.end()) return;
  const size_t i = static_cast<size_t>(bad - s.values.begin());
  const char* what = std::isnan(*bad) ? "NaN" : *bad < 0 ? "-inf" : "inf";
  throw Error("'" + path + "': tensor '" + key + "' holds " + what + " at index " +
              std::to_string(i) + " " + index_text(i, s.shape) + " of " + shape_text(s.shape) +
              " (a damaged file, or a model that diverged)");
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
    if (it != by_their_name.end() && out.count(it->second->ours))
      fail("tensor '" + key + "' is there twice (with and without the 'transformer.' prefix): "
           "which copy is the model's?");
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
    // Sizes and offsets are checked before they are converted: a negative, fractional or huge
    // one is a damaged header, not a tensor to read.
    const auto size_in_file = [&](const JsonValue& v) {
      const double x = v.is_number() ? v.as_number() : -1;
      if (!(x >= 0 && x <= static_cast<double>(file->size()) && x == std::floor(x)))
        throw Error("'" + path + "': tensor '" + key +
                    "' has a shape or data_offsets that are not sizes within the file");
      return static_cast<size_t>(x);
    };
    Source s;
    size_t count = 1;
    for (const JsonValue& d : shape->items()) {
      const size_t extent = size_in_file(d);
      s.shape.push_back(static_cast<int64_t>(extent));
      count = extent != 0 && count > file->size() / extent ? file->size() + 1 : count * extent;
    }
    const size_t begin = size_in_file(offsets->items()[0]), end = size_in_file(offsets->items()[1]);
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
    check_finite(s, path, key);  // before the transposition: the index as the file stores it
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

// What to do with vocabulary files beside the weights that do not read.
enum class BrokenTokenizer {
  kFail,  // an error: the model's text would be read with no tokenizer (eval, margins, sample)
  kNote,  // a note, and no tokenizer: only train.init's tokenizer warning needs it
};

// GPT-2's tokenizer from the vocabulary files in dir (gpt2_vocab_files), described; "" when
// they are not there.  Files that are there but do not read are an error or a note (`broken`).
std::string tokenizer_beside(const fs::path& dir, BrokenTokenizer broken) {
  std::string encoder, merges;
  if (!gpt2_vocab_files(dir.string(), encoder, merges)) return "";
  try {
    return Gpt2Tokenizer::from_files(dir.string())->serialize();
  } catch (const DataError& e) {
    if (broken == BrokenTokenizer::kFail)
      throw Error(std::string(e.what()) + " (the tokenizer of '" + dir.string() + "')");
    std::fprintf(stderr, "barrierlm: note: the tokenizer files of '%s' do not read (%s)\n",
                 dir.string().c_str(), e.what());
    return "";
  }
}

// How the file's tensors must fit the model: exactly (a model evaluated as it is), or with
// train.init's two allowances (wpe may have more rows, wte fewer).
enum class Fit { kExact, kInit };

// initial_weights, with messages that name the file alone.
InitialWeights read_weights(const std::string& path, const ModelConfig& model, Fit fit) {
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
  if (!checkpoint)
    out.tokenizer = tokenizer_beside(fs::path(file).parent_path(), BrokenTokenizer::kNote);

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
    const bool lenient = fit == Fit::kInit && same_width;
    const bool fits = s.shape == want || (lenient && t.name == "wpe" && s.shape[0] >= want[0]) ||
                      (lenient && t.name == "wte" && s.shape[0] <= want[0]);
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


const std::vector<std::string>& hf_vocabulary_files() {
  static const std::vector<std::string> files = {"vocab.json", "merges.txt", "encoder.json",
                                                 "vocab.bpe", "tokenizer.json"};
  return files;
}

const std::vector<std::string>& hf_tokenizer_files() {
  static const std::vector<std::string> files = [] {
    std::vector<std::string> all = hf_vocabulary_files();
    for (const char* f : {"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"})
      all.push_back(f);
    return all;
  }();
  return files;
}

bool is_hf_gpt2_dir(const std::string& path) {
  std::error_code ec;
  const fs::path dir(path);
  return fs::is_directory(dir, ec) && !fs::exists(dir / kCheckpointFile, ec) &&
         (fs::exists(dir / "config.json", ec) || fs::exists(dir / "model.safetensors", ec));
}

namespace {

// config.json and model.safetensors, or the one of them that is missing named.
void require_model_files(const fs::path& dir) {
  std::error_code ec;
  const bool config = fs::exists(dir / "config.json", ec),
             weights = fs::exists(dir / "model.safetensors", ec);
  if (config && weights) return;
  // The hub's other layouts: say how to get the one file barrierlm reads.
  const char* convert =
      " (transformers writes one file: GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(OUT, "
      "safe_serialization=True, max_shard_size=\"100GB\"))";
  if (config && fs::exists(dir / "model.safetensors.index.json", ec))
    throw Error("'" + dir.string() + "' holds its weights in shards (model.safetensors.index.json);"
                " barrierlm reads one model.safetensors" + convert);
  if (config && fs::exists(dir / "pytorch_model.bin", ec))
    throw Error("'" + dir.string() + "' holds its weights as pytorch_model.bin; barrierlm reads "
                "model.safetensors" + convert);
  if (!config && !weights)
    throw Error("'" + dir.string() + "' holds neither " + kCheckpointFile +
                " nor a Hugging Face model (config.json and model.safetensors)");
  throw Error("'" + dir.string() + "' holds " +
              (config ? "config.json but no model.safetensors (barrierlm reads a Hugging Face "
                        "model's weights from model.safetensors only)"
                      : "model.safetensors but no config.json (GPT2Config: the model's sizes)"));
}

// The largest integer a JSON number (a double) holds exactly.
constexpr int64_t kLargestExact = int64_t{1} << 53;

// The number v, at `name` in barrierlm.json, as an integer in [least, most]: checked before it
// is converted, so that a damaged or hand-edited file is named instead of read as a negative
// step or converted with undefined behaviour.
int64_t checked_integer(double v, const std::string& name, const std::string& file,
                        int64_t least, int64_t most = kLargestExact) {
  if (v >= static_cast<double>(least) && v <= static_cast<double>(most) && v == std::floor(v))
    return static_cast<int64_t>(v);
  const std::string range = most == kLargestExact
                                ? ">= " + std::to_string(least)
                                : "from " + std::to_string(least) + " to " + std::to_string(most);
  throw Error(file + ": '" + name + "' is " + format_general(v, 17) +
              "; it must be an integer " + range);
}

// barrierlm.json's integer at key of object (at `where` in the file, "" for the top level).
int64_t integer_in(const JsonValue& object, const std::string& key, const std::string& file,
                   const std::string& where, int64_t least, int64_t most = kLargestExact) {
  const double v = json_get_number(object, key, file, where);  // null reads as NaN
  return checked_integer(v, where.empty() ? key : where + "." + key, file, least, most);
}

// barrierlm.json's finite number at key (the config's checks then say which values are valid).
double finite_in(const JsonValue& object, const std::string& key, const std::string& file,
                 const std::string& where) {
  const double v = json_get_number(object, key, file, where);
  if (!std::isfinite(v))
    throw Error(file + ": '" + where + "." + key + "' is not a finite number");
  return v;
}

// A hub model's tokenizer: GPT-2's files beside the weights, else none (token ids).
std::string hub_tokenizer(const fs::path& dir, int vocab_size) {
  const std::string beside = tokenizer_beside(dir, BrokenTokenizer::kFail);
  if (!beside.empty()) return beside;
  // Weights alone: its tokens are ids, which .bin shards hold (`barrierlm tokenize`).
  std::fprintf(stderr,
               "barrierlm: note: '%s' has no tokenizer (GPT-2's vocab.json and merges.txt, or "
               "an export's barrierlm.json): its tokens are read as ids, from .bin data\n",
               dir.string().c_str());
  return "bin:" + std::to_string(vocab_size);
}

// An export's tokenizer: the one barrierlm.json names, after checking that the tokenizer files
// in the directory agree with it.  A directory exported into twice, or filled by hand, could
// hold another model's files, which would otherwise be used without a word.
std::string exported_tokenizer(const fs::path& dir, const JsonValue& from,
                               const std::string& file) {
  const std::string kind = json_get_string(from, "tokenizer", file);
  if (kind != "gpt2") {
    std::error_code ec;
    for (const std::string& name : hf_vocabulary_files())
      if (fs::exists(dir / name, ec))
        throw Error(file + " says tokenizer '" + kind + "', but '" + (dir / name).string() +
                    "' is another tokenizer's file (left by an earlier export?): remove it, or "
                    "export into this directory again");
    const std::string description = json_get_string(from, "tokenizer_description", file);
    if (make_tokenizer(description)->kind() != kind)
      throw Error(file + ": 'tokenizer_description' is not a " + kind + " tokenizer's");
    return description;
  }
  std::string encoder, merges;
  if (!gpt2_vocab_files(dir.string(), encoder, merges))
    throw Error(file + " says tokenizer 'gpt2', but '" + dir.string() +
                "' lacks its vocab.json and merges.txt");
  const auto tok = Gpt2Tokenizer::from_files(dir.string());  // a bad file is named
  if (from.find("tokenizer_vocab_size")) {
    const int64_t size = integer_in(from, "tokenizer_vocab_size", file, "", 1);
    if (size != tok->vocab_size())
      throw Error(file + " says the tokenizer has " + std::to_string(size) + " tokens, but '" +
                  encoder + "' has " + std::to_string(tok->vocab_size()) +
                  " (another model's tokenizer files?)");
  }
  return tok->serialize();
}

// What an export's barrierlm.json says of its run: its step and tokens, the barrier's settings
// (margins use its layers), and the train settings eval's windows are chosen by (an export
// evaluates as its checkpoint only with the run's batch size).  Each number is checked.
void read_provenance(const JsonValue& from, const std::string& file, Checkpoint& ck) {
  ck.step = integer_in(from, "step", file, "", 0);
  if (from.find("tokens_seen")) ck.tokens_seen = integer_in(from, "tokens_seen", file, "", 0);
  const JsonValue& b = json_member(from, "barrier", file);
  BarrierConfig& barrier = ck.config.barrier;
  barrier.lambda = finite_in(b, "lambda", file, "barrier");
  barrier.eps = finite_in(b, "eps", file, "barrier");
  if (b.find("positions"))
    barrier.positions = static_cast<int>(integer_in(b, "positions", file, "barrier", 0, 1 << 30));
  barrier.layers.clear();
  const std::vector<double> layers = json_get_numbers(b, "layers", file, "barrier");
  for (size_t i = 0; i < layers.size(); ++i)
    barrier.layers.push_back(static_cast<int>(checked_integer(
        layers[i], "barrier.layers[" + std::to_string(i) + "]", file, 0, 1 << 30)));
  const JsonValue* train = from.find("train");  // absent in exports older than this key
  if (!train) return;
  TrainConfig& t = ck.config.train;
  t.batch_size = static_cast<int>(integer_in(*train, "batch_size", file, "train", 1, 1 << 30));
  t.grad_accum = static_cast<int>(integer_in(*train, "grad_accum", file, "train", 1, 1 << 30));
  t.eval_batches = static_cast<int>(integer_in(*train, "eval_batches", file, "train", 1, 1 << 30));
}

}  // namespace

Checkpoint checkpoint_from_hf_dir(const std::string& dir) {
  require_model_files(dir);
  const std::string config_file = (fs::path(dir) / "config.json").string();
  const std::string provenance_file = (fs::path(dir) / "barrierlm.json").string();
  Checkpoint ck;
  ck.config.model = model_of(parse_json(read_text_file(config_file), config_file), config_file);

  std::error_code ec;
  const bool exported = fs::exists(provenance_file, ec);
  const JsonValue from =
      exported ? parse_json(read_text_file(provenance_file), provenance_file) : JsonValue();
  ck.tokenizer = exported ? exported_tokenizer(dir, from, provenance_file)
                          : hub_tokenizer(dir, ck.config.model.vocab_size);
  const auto tok = make_tokenizer(ck.tokenizer);
  if (tok->vocab_size() > ck.config.model.vocab_size)
    throw Error(config_file + ": 'vocab_size' " + std::to_string(ck.config.model.vocab_size) +
                " is smaller than the tokenizer's " + std::to_string(tok->vocab_size()) +
                " tokens");
  DataConfig& data = ck.config.data;
  if (tok->kind() == "gpt2") data.vocab = dir;
  if (tok->kind() == "byte" || tok->kind() == "char" || tok->kind() == "gpt2")
    data.tokenizer = tok->kind();

  if (exported) read_provenance(from, provenance_file, ck);
  try {
    validate(ck.config);
  } catch (const ConfigError& e) {
    throw Error((exported ? provenance_file : config_file) + ": " + e.what());
  }
  ck.params = read_weights(dir, ck.config.model, Fit::kExact).params;
  return ck;
}

namespace {

// A Hugging Face directory given as train.init: its config.json must describe barrierlm's
// architecture (model_of) with the run's layers, heads and width, as eval would require; its
// weights alone would not show another activation, untied embeddings or another head count.
// Its positions and vocabulary may differ (read_weights' allowances).
void check_init_architecture(const fs::path& dir, const ModelConfig& model) {
  require_model_files(dir);
  const std::string file = (dir / "config.json").string();
  const ModelConfig theirs = model_of(parse_json(read_text_file(file), file), file);
  const struct {
    const char* key;
    const char* ours;
    int a, b;
  } sizes[] = {{"n_layer", "model.n_layer", theirs.n_layer, model.n_layer},
               {"n_head", "model.n_head", theirs.n_head, model.n_head},
               {"n_embd", "model.d_model", theirs.d_model, model.d_model}};
  for (const auto& k : sizes)
    if (k.a != k.b)
      throw Error(file + ": '" + k.key + "' is " + std::to_string(k.a) + " but the run's " +
                  k.ours + " is " + std::to_string(k.b));
}

}  // namespace

InitialWeights initial_weights(const std::string& path, const ModelConfig& model) {
  try {
    std::error_code ec;
    const fs::path dir(path);
    const bool hf_dir =
        fs::is_directory(dir, ec) && !fs::exists(dir / kCheckpointFile, ec);
    if (hf_dir) check_init_architecture(dir, model);
    InitialWeights w = read_weights(path, model, Fit::kInit);
    const std::string provenance = (dir / "barrierlm.json").string();
    if (hf_dir && fs::exists(provenance, ec))  // an export: the tokenizer barrierlm.json names
      w.tokenizer =
          exported_tokenizer(dir, parse_json(read_text_file(provenance), provenance), provenance);
    return w;
  } catch (const Error& e) {
    throw Error(std::string("train.init ") + e.what());
  }
}

}  // namespace blm
