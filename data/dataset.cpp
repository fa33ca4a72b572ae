// open_dataset: reads a DataConfig into a tokenizer and training/validation token streams.
//
// Steps: check the config's data keys; map the files; decide text or .bin (format, or the magic
// number for "auto"); build or take the tokenizer; make the streams; cut the validation part off
// the end of train when no val file is given; check every stream holds one window (seq_len + 1).
// The gpt2 tokenizer serves both formats: it encodes text, and it decodes a shard's ids (which
// must then lie in its vocabulary); the other tokenizers are for text, and a shard without the
// gpt2 tokenizer gets the bin tokenizer.
#include <glob.h>
#include <sys/stat.h>

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

// The files of data.train or data.val (expand_data_files), opened, all of one format.
struct SourceSet {
  std::string spec;  // as the config gives it
  std::vector<SourceFile> files;
  bool is_bin = false;
  // "data file 'x'", or "the 12 data files of 'shards/*.bin'", for messages.
  std::string name() const {
    if (files.size() == 1) return "data file '" + files[0].file->path() + "'";
    return "the " + std::to_string(files.size()) + " data files of '" + spec + "'";
  }
  const char* has() const { return files.size() == 1 ? "has" : "have"; }
  // "data file 'x' is a .bin shard", "the 2 data files of 'y*' are text".
  std::string format_said() const {
    if (files.size() == 1) return name() + (is_bin ? " is a .bin shard" : " is text");
    return name() + (is_bin ? " are .bin shards" : " are text");
  }
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

SourceSet open_set(const std::string& spec, const std::string& key, const std::string& format) {
  SourceSet set;
  set.spec = spec;
  for (const std::string& path : expand_data_files(spec, key))
    set.files.push_back(open_source(path, format));
  set.is_bin = set.files[0].is_bin;
  for (const SourceFile& f : set.files)
    if (f.is_bin != set.is_bin)
      throw DataError("data file '" + f.file->path() + "' is " + kind_name(f.is_bin) + " but '" +
                      set.files[0].file->path() + "' is " + kind_name(set.is_bin) +
                      "; the files of " + key + " '" + spec + "' must have one format");
  return set;
}

// The tokenizer the config asks for, built from the training text when it is the char kind
// (the characters of every training file).  An empty file adds no characters, as it adds no
// tokens with the other tokenizers; only a training text without any is an error.
std::unique_ptr<Tokenizer> configured_tokenizer(const DataConfig& cfg, const SourceSet& train) {
  if (cfg.tokenizer == "byte") return make_byte_tokenizer();
  if (cfg.tokenizer == "gpt2") return make_gpt2_tokenizer(cfg.vocab);
  std::vector<uint32_t> characters;
  for (const SourceFile& f : train.files) {
    if (f.file->size() == 0) continue;
    try {
      const std::vector<uint32_t> of_file = CharTokenizer::vocabulary_of(
          reinterpret_cast<const char*>(f.file->bytes()), f.file->size());
      characters.insert(characters.end(), of_file.begin(), of_file.end());
    } catch (const DataError& e) {
      throw DataError("data file '" + f.file->path() + "' (char tokenizer): " + e.what());
    }
  }
  if (characters.empty())
    throw DataError(train.name() + " " + train.has() + " no text (char tokenizer: no characters "
                    "to make the vocabulary of)");
  std::sort(characters.begin(), characters.end());
  characters.erase(std::unique(characters.begin(), characters.end()), characters.end());
  return std::make_unique<CharTokenizer>(std::move(characters));
}

std::shared_ptr<TokenStream> text_stream(const SourceFile& s, const Tokenizer& tok, int threads) {
  if (tok.kind() == "byte") return byte_stream(s.file);
  if (tok.kind() == "gpt2")
    return gpt2_stream(*s.file, static_cast<const Gpt2Tokenizer&>(tok), threads);
  return char_stream(*s.file, static_cast<const CharTokenizer&>(tok));
}

// Whether a tokenizer of this kind reads text, .bin shards, or (gpt2) both.
bool reads_format(const Tokenizer& tok, bool is_bin) {
  if (tok.kind() == "gpt2") return true;
  return (tok.kind() == "bin") == is_bin;
}

// The .bin shards of a set as one stream, each checked against a fixed vocabulary when there is
// one (vocab > 0); max_id: the largest token of them all.
std::shared_ptr<TokenStream> bin_stream(const SourceSet& set, int vocab, int32_t& max_id) {
  std::vector<std::shared_ptr<TokenStream>> parts;
  for (const SourceFile& f : set.files) {
    parts.push_back(shard_stream(f.file));
    const int32_t file_max = max_token(*parts.back());
    if (vocab > 0 && file_max >= vocab)
      throw DataError("data file '" + f.file->path() + "' holds token " +
                      std::to_string(file_max) + ", outside the tokenizer's vocabulary of " +
                      std::to_string(vocab));
    max_id = std::max(max_id, file_max);
  }
  return concat_streams(std::move(parts));
}

// The texts of a set encoded by tok, as one stream (file after file, nothing between them).
std::shared_ptr<TokenStream> text_stream(const SourceSet& set, const Tokenizer& tok, int threads) {
  std::vector<std::shared_ptr<TokenStream>> parts;
  for (const SourceFile& f : set.files) parts.push_back(text_stream(f, tok, threads));
  return concat_streams(std::move(parts));
}

void require_window(const std::string& what, size_t tokens, int seq_len, const std::string& hint,
                    const char* has = "has") {
  size_t need = static_cast<size_t>(seq_len) + 1;
  if (tokens < need)
    throw DataError(what + " " + has + " " + std::to_string(tokens) + " tokens; need at least " +
                    std::to_string(need) + " (seq_len + 1)" + hint);
}

std::string percent(double fraction) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g%%", 100.0 * fraction);
  return buf;
}

Dataset open_impl(const DataConfig& cfg, int seq_len, const std::string* fixed_tokenizer,
                  int threads) {
  check_config(cfg, seq_len, fixed_tokenizer != nullptr);
  const SourceSet train = open_set(cfg.train, "data.train", cfg.format);
  SourceSet val;
  if (!cfg.val.empty()) {
    val = open_set(cfg.val, "data.val", cfg.format);
    if (val.is_bin != train.is_bin)
      throw DataError(val.format_said() + " but " + train.format_said() +
                      "; train and val must have the same format");
  }

  Dataset ds;
  ds.train_files = train.files.size();
  if (fixed_tokenizer) {
    ds.tokenizer = make_tokenizer(*fixed_tokenizer);
    if (!reads_format(*ds.tokenizer, train.is_bin))
      throw DataError(train.format_said() + " but the checkpoint's tokenizer is '" +
                      ds.tokenizer->kind() + "'");
  } else if (!train.is_bin || cfg.tokenizer == "gpt2") {
    ds.tokenizer = configured_tokenizer(cfg, train);
  }

  if (train.is_bin) {
    int vocab = ds.tokenizer ? ds.tokenizer->vocab_size() : 0;
    int32_t max_id = -1;
    ds.train = bin_stream(train, vocab, max_id);
    if (!val.files.empty()) ds.val = bin_stream(val, vocab, max_id);
    // A shard does not say its vocabulary: the largest id seen is the best lower bound.
    if (!ds.tokenizer) ds.tokenizer = make_bin_tokenizer(std::max(1, max_id + 1));
  } else {
    ds.train = text_stream(train, *ds.tokenizer, threads);
    if (!val.files.empty()) ds.val = text_stream(val, *ds.tokenizer, threads);
  }

  require_window(train.name(), ds.train->size(), seq_len, "", train.has());
  if (ds.val) {
    require_window(val.name(), ds.val->size(), seq_len, "", val.has());
    return ds;
  }
  // No val file: the last val_fraction of train, cut at a token boundary.
  size_t n = ds.train->size();
  size_t n_val = static_cast<size_t>(std::floor(static_cast<double>(n) * cfg.val_fraction));
  auto whole = ds.train;
  ds.train = slice_stream(whole, 0, n - n_val);
  ds.val = slice_stream(whole, n - n_val, n);
  std::string val_pct = percent(cfg.val_fraction), train_pct = percent(1.0 - cfg.val_fraction);
  require_window("the training part (first " + train_pct + ") of " + train.name(),
                 ds.train->size(), seq_len, "; lower data.val_fraction or give data.val");
  require_window("the validation part (last " + val_pct + ", data.val_fraction) of " +
                     train.name(),
                 ds.val->size(), seq_len, "; raise data.val_fraction or give data.val");
  return ds;
}

}  // namespace

std::vector<std::string> expand_data_files(const std::string& spec, const std::string& key) {
  struct stat st;
  const bool pattern = spec.find_first_of("*?[") != std::string::npos;
  if (!pattern || stat(spec.c_str(), &st) == 0) return {spec};  // a path: opening it says more
  glob_t matches{};
  const int status = glob(spec.c_str(), GLOB_NOSORT, nullptr, &matches);
  std::vector<std::string> files(matches.gl_pathv, matches.gl_pathv + matches.gl_pathc);
  globfree(&matches);
  if (status == GLOB_NOMATCH || (status == 0 && files.empty()))
    throw DataError(key + ": no file matches the pattern '" + spec + "'");
  if (status != 0)
    throw DataError(key + ": cannot list the files of the pattern '" + spec + "' (" +
                    (status == GLOB_NOSPACE ? "out of memory" : "a directory cannot be read") +
                    ")");
  std::sort(files.begin(), files.end());  // byte order: the same on every machine and locale
  return files;
}

Dataset open_dataset(const DataConfig& cfg, int seq_len, int encode_threads) {
  return open_impl(cfg, seq_len, nullptr, encode_threads);
}

Dataset open_dataset(const DataConfig& cfg, int seq_len, const std::string& tokenizer_serialized,
                     int encode_threads) {
  return open_impl(cfg, seq_len, &tokenizer_serialized, encode_threads);
}

}  // namespace blm
