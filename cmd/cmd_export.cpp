// barrierlm export: a checkpoint as a Hugging Face GPT-2 model directory, so that the trained
// model can be read by transformers (GPT2LMHeadModel.from_pretrained), TransformerLens,
// evaluation harnesses and anything else that reads that layout.
//
// barrierlm's model is GPT-2's architecture exactly (core/reference.h: pre-LN, learned
// positions, tied embeddings, GELU with tanh, LayerNorm eps 1e-5, biases), so the export is a
// renaming plus one transposition (cmd/hf_gpt2.h; train.init reads the same names back).
//
// Writes into DIR, each file atomically:
//   config.json         GPT2Config (no dropout: barrierlm trains without it)
//   model.safetensors   the weights (float32, or bfloat16 rounded to nearest even), named as
//                       GPT2LMHeadModel's state dict; lm_head is tied to transformer.wte
//   vocab.json, merges.txt   GPT-2's tokenizer files (gpt2 tokenizer only)
//   barrierlm.json      where it came from: checkpoint, step, tokens, barrier, tokenizer, and
//                       the train settings that choose eval's windows
// and removes the tokenizer files it does not write (another model's, from an earlier export
// into DIR), so that the directory describes one model.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "cmd/cli_checks.h"
#include "cmd/commands.h"
#include "cmd/hf_gpt2.h"
#include "cmd/json.h"
#include "cmd/runs.h"
#include "cmd/util.h"
#include "core/checkpoint.h"
#include "core/params.h"
#include "data/tokenizers.h"

namespace blm {

namespace {

namespace fs = std::filesystem;

// One tensor of the safetensors file: its name, shape and float32 values in row-major order.
struct Exported {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

// A [rows, cols] block of the flat parameters, as it is or transposed to [cols, rows].
std::vector<float> block(const std::vector<float>& params, const TensorSpec& t, bool transpose) {
  const float* p = params.data() + t.offset;
  return transpose ? transposed(p, t.shape[0], t.shape[1]) : std::vector<float>(p, p + t.size);
}

// The parameters under GPT2LMHeadModel's names, in ParamLayout's order.
std::vector<Exported> gpt2_tensors(const ModelConfig& m, const std::vector<float>& params) {
  const ParamLayout layout(m);
  std::vector<Exported> out;
  for (const Gpt2TensorName& n : gpt2_tensor_names(m.n_layer)) {
    const TensorSpec& t = layout.find(n.ours);
    Exported e{n.theirs, {}, block(params, t, n.transposed)};
    for (int d : t.shape) e.shape.push_back(d);
    if (n.transposed) std::swap(e.shape[0], e.shape[1]);
    out.push_back(std::move(e));
  }
  return out;
}

// bfloat16 of x, rounded to nearest even (NaN stays NaN).
uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// The safetensors file: u64 header length, the JSON header (name -> dtype, shape, data_offsets
// into the data that follows; padded with spaces to a multiple of 8), then the data,
// little-endian.
std::string safetensors(const std::vector<Exported>& tensors, bool bf16,
                        const std::string& source) {
  const size_t elem = bf16 ? 2 : 4;
  JsonWriter h;
  h.begin_object().key("__metadata__").begin_object();
  h.kv("format", "pt").kv("source", source).end_object();
  size_t offset = 0;
  for (const Exported& t : tensors) {
    h.key(t.name).begin_object().kv("dtype", bf16 ? "BF16" : "F32").key("shape").begin_array();
    for (int64_t d : t.shape) h.value(d);
    h.end_array().key("data_offsets").begin_array();
    h.value(static_cast<uint64_t>(offset))
        .value(static_cast<uint64_t>(offset + elem * t.values.size()));
    h.end_array().end_object();
    offset += elem * t.values.size();
  }
  h.end_object();
  std::string header = h.str();
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string out(8 + header.size() + offset, '\0');
  for (int b = 0; b < 8; ++b)
    out[b] = static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * b));
  std::memcpy(&out[8], header.data(), header.size());
  unsigned char* p = reinterpret_cast<unsigned char*>(&out[8 + header.size()]);
  for (const Exported& t : tensors)
    for (float x : t.values) {
      uint32_t u;
      std::memcpy(&u, &x, 4);
      if (bf16) u = to_bf16(x);
      for (size_t b = 0; b < elem; ++b) *p++ = static_cast<unsigned char>(u >> (8 * b));
    }
  return out;
}

std::string config_json(const ModelConfig& m, int32_t eos, bool bf16) {
  JsonWriter j(true);
  j.begin_object();
  j.key("architectures").begin_array().value("GPT2LMHeadModel").end_array();
  j.kv("model_type", "gpt2").kv("vocab_size", m.vocab_size).kv("n_positions", m.seq_len);
  j.kv("n_ctx", m.seq_len).kv("n_embd", m.d_model).kv("n_layer", m.n_layer);
  j.kv("n_head", m.n_head).key("n_inner").null();
  j.kv("activation_function", "gelu_new").kv("layer_norm_epsilon", 1e-5);
  j.kv("resid_pdrop", 0.0).kv("embd_pdrop", 0.0).kv("attn_pdrop", 0.0);
  j.kv("initializer_range", 0.02).kv("scale_attn_weights", true);
  j.kv("tie_word_embeddings", true).kv("use_cache", true);
  if (eos >= 0) j.kv("bos_token_id", eos).kv("eos_token_id", eos);
  j.kv("torch_dtype", bf16 ? "bfloat16" : "float32");
  j.end_object();
  return j.str() + "\n";
}

// vocab.json and merges.txt, as OpenAI's encoder.json and vocab.bpe (which they are).
void write_gpt2_files(const Gpt2Tokenizer& tok, const std::string& dir) {
  JsonWriter vocab;
  vocab.begin_object();
  for (int32_t id = 0; id < tok.vocab_size(); ++id)
    vocab.kv(gpt2_alphabet_text(tok.decode_token(id)), id);
  vocab.end_object();
  write_file_atomic((fs::path(dir) / "vocab.json").string(), vocab.str());
  std::string merges = "#version: 0.2\n";
  for (const Gpt2Tokenizer::Merge& m : tok.merges())
    merges += gpt2_alphabet_text(tok.decode_token(m.left)) + " " +
              gpt2_alphabet_text(tok.decode_token(m.right)) + "\n";
  write_file_atomic((fs::path(dir) / "merges.txt").string(), merges);
}

std::string provenance_json(const Checkpoint& ck, const std::string& source, const Tokenizer& tok) {
  const BarrierConfig& b = ck.config.barrier;
  const TrainConfig& t = ck.config.train;
  JsonWriter j(true);
  j.begin_object().kv("source", source).kv("step", ck.step).kv("tokens_seen", ck.tokens_seen);
  j.key("barrier").begin_object().kv("lambda", b.lambda).kv("eps", b.eps);
  j.kv("positions", b.positions).key("layers").begin_array();
  for (int l : b.layers) j.value(l);
  j.end_array().end_object();
  // eval's windows come from eval_batches, batch_size and grad_accum: without them an export
  // would be evaluated on other windows than its checkpoint.
  j.key("train").begin_object().kv("batch_size", t.batch_size).kv("grad_accum", t.grad_accum);
  j.kv("eval_batches", t.eval_batches).end_object();
  j.kv("tokenizer", tok.kind()).kv("tokenizer_vocab_size", tok.vocab_size());
  // byte: id = byte value; char and bin: their description (the characters, or the vocabulary).
  if (tok.kind() != "gpt2") j.kv("tokenizer_description", ck.tokenizer);
  j.end_object();
  return j.str() + "\n";
}

// Removes the tokenizer files in dir that the export does not write (written: the gpt2
// tokenizer's vocab.json and merges.txt), and returns their names.  Left there, another model's
// vocabulary would be read with these weights: by barrierlm (OpenAI's encoder.json and vocab.bpe
// are read first) and by transformers (tokenizer.json first).
std::vector<std::string> remove_other_tokenizer_files(const std::string& dir, bool gpt2) {
  std::vector<std::string> removed;
  // A gpt2 export keeps the files that configure a GPT-2 tokenizer for transformers (special
  // tokens): they go with vocab.json and merges.txt, whichever GPT-2 vocabulary those hold.
  const std::vector<std::string>& names = gpt2 ? hf_vocabulary_files() : hf_tokenizer_files();
  for (const std::string& name : names) {
    if (gpt2 && (name == "vocab.json" || name == "merges.txt")) continue;
    const fs::path path = fs::path(dir) / name;
    std::error_code ec;
    if (!fs::exists(path, ec)) continue;
    if (!fs::remove(path, ec) || ec)
      throw Error("cannot remove '" + path.string() + "' (another tokenizer's file): " +
                  ec.message());
    removed.push_back(name);
  }
  return removed;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// Refuses, before the checkpoint is read, an -o whose files would replace or remove what export
// reads: `export e/model.safetensors -o e` (a checkpoint under that name) would be overwritten
// by its own export, a checkpoint named e/tokenizer.json removed as another model's file.
void refuse_overwriting(const std::string& out_dir, const std::string& checkpoint) {
  std::vector<std::string> touched = {"model.safetensors", "config.json", "barrierlm.json"};
  touched.insert(touched.end(), hf_tokenizer_files().begin(), hf_tokenizer_files().end());
  const std::vector<NamedFile> inputs = model_input_files(checkpoint);
  for (const std::string& name : touched)
    refuse_output_over("-o", join_path(out_dir, name), inputs);
}

}  // namespace

int run_export(const ExportOptions& o) {
  if (o.dtype != "float32" && o.dtype != "bfloat16")
    throw UsageError("--dtype: unknown type '" + o.dtype + "' (float32 or bfloat16)");
  check_output_dir(o.out, "output directory");
  ModelOptions which;
  which.checkpoint = o.checkpoint;
  which.runs_dir = o.runs_dir;
  const std::string path = checkpoint_for(which);
  // A Hugging Face directory written over itself: its own tokenizer files would be removed as
  // another model's (tokenizer.json, where it is the only one) before anything is gained.
  std::error_code ec;
  if (is_hf_gpt2_dir(path) && fs::equivalent(path, o.out, ec))
    throw UsageError("-o '" + o.out + "' is the directory being exported; write to another one");
  refuse_overwriting(o.out, path);
  const Checkpoint ck = load_model_checkpoint(path);
  const auto tok = make_tokenizer(ck.tokenizer);
  const auto* gpt2 = dynamic_cast<const Gpt2Tokenizer*>(tok.get());
  const bool bf16 = o.dtype == "bfloat16";
  const int32_t eos = gpt2 ? gpt2->id_of_token("<|endoftext|>") : -1;

  fs::create_directories(o.out);
  const auto file = [&](const char* name) { return (fs::path(o.out) / name).string(); };
  write_file_atomic(file("model.safetensors"),
                    safetensors(gpt2_tensors(ck.config.model, ck.params), bf16, path));
  write_file_atomic(file("config.json"), config_json(ck.config.model, eos, bf16));
  if (gpt2) write_gpt2_files(*gpt2, o.out);
  const std::vector<std::string> removed = remove_other_tokenizer_files(o.out, gpt2 != nullptr);
  // Last, after the files it describes: an export cut short leaves the old one, whose tokenizer
  // then disagrees with the files (an error when read) wherever the tokenizer changed.
  write_file_atomic(file("barrierlm.json"), provenance_json(ck, path, *tok));

  std::printf(
      "exported %s (step %lld, %s parameters, %s) to %s/: config.json, model.safetensors%s, "
      "barrierlm.json\n",
      path.c_str(), static_cast<long long>(ck.step),
      format_rate(static_cast<double>(ck.params.size())).c_str(), o.dtype.c_str(), o.out.c_str(),
      gpt2 ? ", vocab.json, merges.txt" : "");
  if (!removed.empty())
    std::printf("removed %s from %s/: another tokenizer's files (this model's is '%s')\n",
                joined(removed).c_str(), o.out.c_str(), tok->kind().c_str());
  if (!gpt2)
    std::printf("tokenizer '%s': no tokenizer files (barrierlm.json describes it%s)\n",
                tok->kind().c_str(), tok->kind() == "byte" ? "; token id = byte value" : "");
  return 0;
}

}  // namespace blm
