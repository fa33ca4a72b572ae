// Token data: tokenizers, token streams (text or .bin shards), and the batch sampler.
//
// Text files are memory-mapped: with the byte tokenizer the file *is* the token stream (token =
// byte value, vocabulary 256).  The char tokenizer maps each distinct UTF-8 code point of the
// training text to an id (sorted by code point).  The gpt2 tokenizer is GPT-2's byte-level BPE,
// read from OpenAI's encoder.json and vocab.bpe (data.vocab); it encodes text and decodes the ids
// of .bin shards.  .bin shards use the llm.c / nanoGPT format: a 256 x int32 header (magic
// 20240520, version 1, token count), then uint16 tokens.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"

namespace blm {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string kind() const = 0;  // "byte", "char", "bin", "gpt2"
  virtual int vocab_size() const = 0;
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  // Text of one token (for margins' context and sampling); bytes for the byte tokenizer.
  virtual std::string decode_token(int32_t id) const = 0;
  std::string decode(const std::vector<int32_t>& ids) const;
  // A self-contained description stored in checkpoints; make_tokenizer(serialize()) rebuilds it.
  virtual std::string serialize() const = 0;
  // Whether a token is one byte (the byte tokenizer).
  virtual bool is_bytes() const { return false; }
  // Whether decode_token gives the token's text (not so for the bin tokenizer's "<id>"), so that
  // bits per byte can be counted.
  virtual bool decodes_to_text() const { return true; }
};

// Rebuilds a tokenizer from serialize(): "byte", "char:<the characters, UTF-8>", "bin:<vocab>",
// "gpt2:<its tokens and merges>".  Throws DataError for anything else.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& serialized);

// The four kinds.  The char tokenizer's vocabulary is the sorted distinct code points of
// `training_text` (malformed UTF-8 -> DataError naming the byte offset); encoding a character
// outside it throws DataError naming the character.  The bin tokenizer describes token ids of a
// .bin shard: it cannot know their text, so decode_token gives "<id>" and encode reads "<id>"s.
std::unique_ptr<Tokenizer> make_byte_tokenizer();
std::unique_ptr<Tokenizer> make_char_tokenizer(const std::string& training_text);
std::unique_ptr<Tokenizer> make_bin_tokenizer(int vocab_size);
// GPT-2's tokenizer from vocab_dir/encoder.json and vocab_dir/vocab.bpe, or Hugging Face's
// vocab.json and merges.txt (Gpt2Tokenizer::from_files; DataError naming the file, line and
// column of a problem).  Its description holds the whole vocabulary, so
// make_tokenizer rebuilds it without the files.
std::unique_ptr<Tokenizer> make_gpt2_tokenizer(const std::string& vocab_dir);

// A read-only stream of tokens.
class TokenStream {
 public:
  virtual ~TokenStream() = default;
  virtual size_t size() const = 0;
  virtual int32_t at(size_t i) const = 0;
  // Copies tokens [start, start + n) into out.
  virtual void read(size_t start, size_t n, int32_t* out) const = 0;
};

// A stream over tokens held in memory (tools and tests).
std::shared_ptr<TokenStream> make_memory_stream(std::vector<int32_t> tokens);
// The streams one after another, as one stream (one part: that part itself).
std::shared_ptr<TokenStream> concat_streams(std::vector<std::shared_ptr<TokenStream>> parts);
// Tokens [begin, end) of `stream` as a stream of their own (end <= stream->size()).
std::shared_ptr<TokenStream> slice_stream(std::shared_ptr<TokenStream> stream, size_t begin,
                                          size_t end);

// The .bin shard format: kShardHeaderInts little-endian int32 (magic, version, token count, then
// zeros), then the tokens as little-endian uint16.
constexpr int32_t kShardMagic = 20240520;
constexpr int32_t kShardVersion = 1;
constexpr int kShardHeaderInts = 256;
// The bytes of a .bin shard holding `tokens` (each in [0, 65535], else DataError).
std::string encode_bin_shard(const std::vector<int32_t>& tokens);
// The same for ids already held as uint16 (no check needed).
std::string encode_bin_shard_u16(const std::vector<uint16_t>& tokens);

// The files data.train or data.val name (`key`, for messages): `spec` itself when it names a
// file or has no wildcard, else the files its glob pattern (*, ?, [...]) matches, sorted by name
// in byte order.  A pattern that matches nothing is a DataError naming the key and the pattern.
// Several files are read as one stream, one after another (the shards of a large corpus).
std::vector<std::string> expand_data_files(const std::string& spec, const std::string& key);

// Opens the training and validation streams of a DataConfig and the tokenizer they use.
// Throws DataError naming the file when it is missing, unreadable, too short for one sequence
// of seq_len + 1 tokens, or a .bin shard whose size disagrees with its header.  data.train and
// data.val may each be a glob pattern (expand_data_files); the files of one must all be text or
// all be .bin shards.
struct Dataset {
  std::unique_ptr<Tokenizer> tokenizer;
  std::shared_ptr<TokenStream> train;
  std::shared_ptr<TokenStream> val;
  size_t train_files = 0;  // how many files data.train names
};
// encode_threads: the threads that encode GPT-2 text (0: all cores; data-parallel workers on one
// machine share them out).
Dataset open_dataset(const DataConfig& cfg, int seq_len, int encode_threads = 0);
// Opens a dataset whose tokenizer is fixed (eval/margins of a checkpoint on new text).
Dataset open_dataset(const DataConfig& cfg, int seq_len, const std::string& tokenizer_serialized,
                     int encode_threads = 0);

// Deterministic batches: row r of step s starts at a uniform offset drawn from
// hash(seed, s, r), so batches depend on (seed, step, row) alone: resuming at step s gives the
// same batches, and a data-parallel rank that takes rows [r0, r0 + B_local) of the global batch
// sees exactly the rows a single worker would.
// Exactly: offset = floor(h * (N - T) / 2^64) with h = hash2(hash2(hash2(seed, kDataStream),
// step), row) (core/rng.h), N the stream's size; the window is tokens [offset, offset + T].
class BatchSampler {
 public:
  // Throws DataError when the stream holds fewer than seq_len + 1 tokens.
  BatchSampler(std::shared_ptr<TokenStream> stream, int seq_len, uint64_t seed);
  // Rows [row0, row0 + B) of global step `step`: inputs and targets [B, T], targets shifted by 1.
  void sample(int64_t step, int row0, int B, std::vector<int32_t>& inputs,
              std::vector<int32_t>& targets) const;
  // Where row `row` of step `step` starts in the stream.
  size_t offset(int64_t step, int row) const;
  // Separates the sampler's hash stream from other users of the same seed (e.g. init noise).
  static constexpr uint64_t kDataStream = 0x64617461;  // "data"

 private:
  std::shared_ptr<TokenStream> stream_;
  int T_;
  uint64_t seed_;
};

// Evaluation batches: consecutive non-overlapping windows from the start of a stream (the same
// every time), batch i covering windows [i*B, (i+1)*B).  Returns false past the end.
bool eval_batch(const TokenStream& stream, int seq_len, int B, int index,
                std::vector<int32_t>& inputs, std::vector<int32_t>& targets);
// How many full evaluation batches a stream holds.
int eval_batch_count(const TokenStream& stream, int seq_len, int B);

}  // namespace blm
