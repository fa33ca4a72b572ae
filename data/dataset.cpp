// open_dataset: reads a DataConfig into a tokenizer and training/validation token streams.
//
// Steps: check the config's data keys; map the files; decide text or .bin (format, or the magic
// number for "auto"); build or take the tokenizer; make the streams; cut the validation part off
// the end of train when no val file is given; check every stream holds one window (seq_len + 1).
// The gpt2 tokenizer serves both formats: it encodes text, and it decodes a shard's ids (which
// must then lie in its vocabulary); the other tokenizers are for text, and a shard without the
// gpt2 tokenizer gets the bin tokenizer.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "data/streams.h"
#include "data/tokenizers.h"

namespace blm {

namespace {

struct SourceFile {
  std::shared_ptr<MappedFile> file;
  bool is_bin = false;
};

void check_config(const DataConfig& cfg, int seq_len, bool tokenizer_fixed) {
  if (cfg.train.empty()) throw DataError("data.train is empty: give the training data file");
  if (cfg.format != "auto" && cfg.format != "text" && cfg.format != "bin")
    throw DataError("data.format: unknown format '" + cfg.format + "' (auto, text or bin)");
  const bool known = cfg.tokenizer == "byte" || cfg.tokenizer == "char" || cfg.tokenizer == "gpt2";
  if (!tokenizer_fixed && !known)
    throw DataError("data.tokenizer: unknown tokenizer '" + cfg.tokenizer +
                    "' (byte, char or gpt2)");
  const std::string vocab_problem = gpt2_vocab_problem(cfg);
  if (!tokenizer_fixed && !vocab_problem.empty()) throw ConfigError(vocab_problem);
  if (cfg.val.empty() && !(cfg.val_fraction > 0.0 && cfg.val_fraction < 1.0)) {
    char got[32];
    std::snprintf(got, sizeof got, "%g", cfg.val_fraction);
    throw DataError("data.val_fraction must be in (0, 1) when data.val is empty (got " +
                    std::string(got) + ")");
  }
  if (seq_len < 1) throw DataError("seq_len must be at least 1 (got " + std::to_string(seq_len) + ")");
}

SourceFile open_source(const std::string& path, const std::string& format) {
  SourceFile s;
  s.file = MappedFile::open(path);
  s.is_bin = format == "bin" || (format == "auto" && has_shard_magic(*s.file));
  return s;
}

const char* kind_name(bool is_bin) { return is_bin ? "a .bin shard" : "text"; }

// The tokenizer the config asks for, built from the training text when it is the char kind.
std::unique_ptr<Tokenizer> configured_tokenizer(const DataConfig& cfg, const MappedFile& train) {
  if (cfg.tokenizer == "byte") return make_byte_tokenizer();
  if (cfg.tokenizer == "gpt2") return make_gpt2_tokenizer(cfg.vocab);
  try {
    return std::make_unique<CharTokenizer>(CharTokenizer::vocabulary_of(
        reinterpret_cast<const char*>(train.bytes()), train.size()));
  } catch (const DataError& e) {
    throw DataError("data file '" + train.path() + "' (char tokenizer): " + e.what());
  }
}

std::shared_ptr<TokenStream> text_stream(const SourceFile& s, const Tokenizer& tok) {
  if (tok.kind() == "byte") return byte_stream(s.file);
  if (tok.kind() == "gpt2") return gpt2_stream(*s.file, static_cast<const Gpt2Tokenizer&>(tok));
  return char_stream(*s.file, static_cast<const CharTokenizer&>(tok));
}

// Whether a tokenizer of this kind reads text, .bin shards, or (gpt2) both.
bool reads_format(const Tokenizer& tok, bool is_bin) {
  if (tok.kind() == "gpt2") return true;
  return (tok.kind() == "bin") == is_bin;
}

// A .bin stream, checked against a fixed vocabulary when there is one (vocab > 0).
std::shared_ptr<TokenStream> bin_stream(const SourceFile& s, int vocab, int32_t& max_id) {
  auto stream = shard_stream(s.file);
  max_id = max_token(*stream);
  if (vocab > 0 && max_id >= vocab)
    throw DataError("data file '" + s.file->path() + "' holds token " + std::to_string(max_id) +
                    ", outside the tokenizer's vocabulary of " + std::to_string(vocab));
  return stream;
}

void require_window(const std::string& what, size_t tokens, int seq_len, const std::string& hint) {
  size_t need = static_cast<size_t>(seq_len) + 1;
  if (tokens < need)
    throw DataError(what + " has " + std::to_string(tokens) + " tokens; need at least " +
                    std::to_string(need) + " (seq_len + 1)" + hint);
}

std::string percent(double fraction) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g%%", 100.0 * fraction);
  return buf;
}

Dataset open_impl(const DataConfig& cfg, int seq_len, const std::string* fixed_tokenizer) {
  check_config(cfg, seq_len, fixed_tokenizer != nullptr);
  SourceFile train = open_source(cfg.train, cfg.format);
  SourceFile val;
  if (!cfg.val.empty()) {
    val = open_source(cfg.val, cfg.format);
    if (val.is_bin != train.is_bin)
      throw DataError("data file '" + cfg.val + "' is " + kind_name(val.is_bin) + " but '" +
                      cfg.train + "' is " + kind_name(train.is_bin) +
                      "; train and val must have the same format");
  }

  Dataset ds;
  if (fixed_tokenizer) {
    ds.tokenizer = make_tokenizer(*fixed_tokenizer);
    if (!reads_format(*ds.tokenizer, train.is_bin))
      throw DataError("data file '" + cfg.train + "' is " + kind_name(train.is_bin) +
                      " but the checkpoint's tokenizer is '" + ds.tokenizer->kind() + "'");
  } else if (!train.is_bin || cfg.tokenizer == "gpt2") {
    ds.tokenizer = configured_tokenizer(cfg, *train.file);
  }

  if (train.is_bin) {
    int vocab = ds.tokenizer ? ds.tokenizer->vocab_size() : 0;
    int32_t max_train = -1, max_val = -1;
    ds.train = bin_stream(train, vocab, max_train);
    if (val.file) ds.val = bin_stream(val, vocab, max_val);
    // A shard does not say its vocabulary: the largest id seen is the best lower bound.
    if (!ds.tokenizer) ds.tokenizer = make_bin_tokenizer(std::max(1, std::max(max_train, max_val) + 1));
  } else {
    ds.train = text_stream(train, *ds.tokenizer);
    if (val.file) ds.val = text_stream(val, *ds.tokenizer);
  }

  require_window("data file '" + cfg.train + "'", ds.train->size(), seq_len, "");
  if (ds.val) {
    require_window("data file '" + cfg.val + "'", ds.val->size(), seq_len, "");
    return ds;
  }
  // No val file: the last val_fraction of train, cut at a token boundary.
  size_t n = ds.train->size();
  size_t n_val = static_cast<size_t>(std::floor(static_cast<double>(n) * cfg.val_fraction));
  auto whole = ds.train;
  ds.train = slice_stream(whole, 0, n - n_val);
  ds.val = slice_stream(whole, n - n_val, n);
  std::string val_pct = percent(cfg.val_fraction), train_pct = percent(1.0 - cfg.val_fraction);
  require_window("the training part (first " + train_pct + ") of data file '" + cfg.train + "'",
                 ds.train->size(), seq_len, "; lower data.val_fraction or give data.val");
  require_window("the validation part (last " + val_pct + ", data.val_fraction) of data file '" +
                     cfg.train + "'",
                 ds.val->size(), seq_len, "; raise data.val_fraction or give data.val");
  return ds;
}

}  // namespace

Dataset open_dataset(const DataConfig& cfg, int seq_len) { return open_impl(cfg, seq_len, nullptr); }

Dataset open_dataset(const DataConfig& cfg, int seq_len, const std::string& tokenizer_serialized) {
  return open_impl(cfg, seq_len, &tokenizer_serialized);
}

}  // namespace blm
