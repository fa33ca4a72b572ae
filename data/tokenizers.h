// The concrete tokenizers behind data/dataset.h (internal to blm_data: the rest of the program
// uses the Tokenizer interface).  The char and gpt2 tokenizers also encode straight from a
// memory-mapped file, so a large text is never copied into a std::string.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "data/dataset.h"
#include "data/utf8.h"

namespace blm {

// Token = byte value; vocabulary 256.
class ByteTokenizer : public Tokenizer {
 public:
  std::string kind() const override { return "byte"; }
  int vocab_size() const override { return 256; }
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode_token(int32_t id) const override;
  std::string serialize() const override { return "byte"; }
  bool is_bytes() const override { return true; }
};

// Token = index of the character's code point in a sorted list of distinct code points.
class CharTokenizer : public Tokenizer {
 public:
  // `code_points` must be strictly increasing, non-empty, valid scalar values.
  explicit CharTokenizer(std::vector<uint32_t> code_points);
  // The vocabulary of a text: its sorted distinct code points.  Throws DataError at malformed
  // UTF-8 or an empty text.
  static std::vector<uint32_t> vocabulary_of(const char* text, size_t n);

  std::string kind() const override { return "char"; }
  int vocab_size() const override { return static_cast<int>(code_points_.size()); }
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode_token(int32_t id) const override;
  std::string serialize() const override;

  // Calls sink(id) for each character of text[0, n).  Throws DataError naming the byte offset
  // at malformed UTF-8, and the character when it is not in the vocabulary.
  template <class Sink>
  void for_each_id(const char* text, size_t n, Sink&& sink) const;

 private:
  // The id of a code point, or -1.
  int32_t id_of(uint32_t code_point) const;
  [[noreturn]] void throw_unknown(uint32_t code_point, size_t byte_offset) const;

  std::vector<uint32_t> code_points_;
  int32_t ascii_ids_[128];  // fast path: id of each ASCII code point, or -1
};

// Token ids of .bin shards; their text is unknown, so a token decodes to "<id>".
class BinTokenizer : public Tokenizer {
 public:
  explicit BinTokenizer(int vocab_size);
  std::string kind() const override { return "bin"; }
  int vocab_size() const override { return vocab_; }
  // Parses a concatenation of "<id>" (what decode gives back); anything else is a DataError.
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode_token(int32_t id) const override;
  std::string serialize() const override { return "bin:" + std::to_string(vocab_); }
  bool decodes_to_text() const override { return false; }

 private:
  int vocab_;
};

// GPT-2's byte-level BPE, read from OpenAI's encoder.json (token string -> id) and vocab.bpe
// (the merges in priority order).  Both files write a token's bytes in GPT-2's byte alphabet:
// bytes 33..126, 161..172 and 174..255 stand for the code point of the same value, the other 68
// bytes, in increasing order, for U+0100, U+0101, ...
//
// Encoding splits the text into pieces by GPT-2's pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (hand-written: gpt2_piece_end), then runs BPE on each piece's bytes: the adjacent pair of lowest
// merge rank is merged, every occurrence left to right, until no pair is a merge.  The pattern's
// classes are exact for ASCII and Latin-1 (U+0000..U+00FF); above that they are an approximation
// (gpt2_char_class lists the ranges), so a non-ASCII text's pieces, and so its tokens, can differ
// from OpenAI's tokenizer (tiktoken) there.  Bytes that are not UTF-8 count as "other"
// characters.  Every text encodes (all 256 bytes are tokens) and decode(encode(s)) == s.  The
// text "<|endoftext|>" encodes to that token when the vocabulary has it (as Hugging Face's
// GPT2Tokenizer does, and as corpora such as TinyStories mark their documents' ends): the text
// is split there first, and each part is cut into pieces on its own.
class Gpt2Tokenizer : public Tokenizer {
 public:
  struct Merge {
    int32_t left, right, result;  // token ids; result's bytes are left's then right's
  };
  // `tokens`: each token's bytes, in id order, all distinct, every single byte among them;
  // `merges`: in priority order (rank = index).  Throws DataError when they are inconsistent.
  Gpt2Tokenizer(std::vector<std::string> tokens, std::vector<Merge> merges);
  // Reads dir/encoder.json and dir/vocab.bpe, OpenAI's names; where dir has neither but holds
  // vocab.json and merges.txt (the same two files under Hugging Face's names: a model directory
  // from the hub or from `barrierlm export`), those.  Throws DataError naming the file, and the
  // line and column where one is at fault.
  static std::unique_ptr<Gpt2Tokenizer> from_files(const std::string& dir);
  // Rebuilds the tokenizer from serialize() without the "gpt2:" prefix.
  static std::unique_ptr<Gpt2Tokenizer> from_description(const std::string& text);

  std::string kind() const override { return "gpt2"; }
  int vocab_size() const override { return static_cast<int>(tokens_.size()); }
  std::vector<int32_t> encode(const std::string& text) const override;
  // The token's bytes: possibly part of a UTF-8 character (decode concatenates).
  std::string decode_token(int32_t id) const override;
  // The id of the token whose bytes are `bytes` (such as "<|endoftext|>"), or -1.
  int32_t id_of_token(const std::string& bytes) const;
  // The merges, in priority order (rank = index).
  const std::vector<Merge>& merges() const { return merges_; }
  // "gpt2:1\n<tokens> <merges>\n", then each token in the byte alphabet, one a line in id
  // order, then each merge "left right" in priority order: about 1 MB for GPT-2.
  std::string serialize() const override;

  // Pieces repeat (words), so each is merged once per cache; a cache is emptied when it grows
  // past a bound.  One per thread (encode_gpt2_parallel), or the tokenizer's own behind a mutex.
  class PieceCache {
    friend class Gpt2Tokenizer;
    std::unordered_map<std::string, std::vector<int32_t>> ids_;
  };

  // Calls sink(id) for each token of text[0, n), with the tokenizer's own cache (one thread at a
  // time) or the caller's.
  template <class Sink>
  void for_each_id(const char* text, size_t n, Sink&& sink) const;
  template <class Sink>
  void for_each_id(const char* text, size_t n, Sink&& sink, PieceCache& cache) const;

 private:
  // The tokens of one piece, from the cache or computed by bpe() and cached.  The reference
  // stays valid until the next call with that cache.
  const std::vector<int32_t>& piece_ids(const char* piece, size_t n, PieceCache& cache) const;
  std::vector<int32_t> bpe(const char* piece, size_t n) const;

  std::vector<std::string> tokens_;
  std::vector<Merge> merges_;
  int32_t byte_ids_[256];
  struct Ranked {
    int32_t rank, result;
  };
  std::unordered_map<uint64_t, Ranked> merge_of_pair_;  // (left << 32 | right) -> its merge
  int32_t end_of_text_ = -1;  // the id of "<|endoftext|>", -1 when the vocabulary lacks it
  // encode is const and may be called from several threads, hence the mutex.
  mutable std::mutex cache_mutex_;
  mutable PieceCache cache_;
};

// GPT-2's byte alphabet: the code point that stands for a byte, and back (-1: none).
uint32_t gpt2_code_point_of_byte(unsigned char byte);
int gpt2_byte_of_code_point(uint32_t code_point);

// The class of a code point in GPT-2's pattern: exact below U+0100, approximate above.
enum class Gpt2CharClass { letter, number, space, other };
Gpt2CharClass gpt2_char_class(uint32_t code_point);

// The two files of a GPT-2 vocabulary in dir (as from_files reads them): OpenAI's encoder.json
// and vocab.bpe, or, where dir has neither but both of Hugging Face's, vocab.json and
// merges.txt.  Returns whether the two it names both exist.
bool gpt2_vocab_files(const std::string& dir, std::string& encoder, std::string& merges);

// The bytes written in GPT-2's byte alphabet, as encoder.json spells tokens ("Ġthe" for " the").
std::string gpt2_alphabet_text(const std::string& bytes);

// Where the piece that starts at text[pos] (pos < n) ends, by GPT-2's pattern.
size_t gpt2_piece_end(const char* text, size_t n, size_t pos);
// The pieces of a text (tests and tools).
std::vector<std::string> gpt2_pieces(const std::string& text);

// The first position p >= from (or n) where text[0, n) can be cut so that the two parts split
// into the same pieces as the whole: a space after a printable ASCII character.  The piece
// holding that character cannot take the space, so a piece ends there in the whole text too;
// the pattern looks only forward from a piece's start, and none of its alternatives that ends
// at p would have gone on past a space.
size_t gpt2_cut_at_or_after(const char* text, size_t n, size_t from);

// The ids of text[0, n), for_each_id's exactly, encoded by `threads` threads (0: all cores) on
// chunks of about chunk_bytes cut by gpt2_cut_at_or_after, appended to `out` in text order.  T is
// uint16_t (a vocabulary of at most 65536 tokens) or int32_t.  Encodes a round of chunks at a
// time, so the memory beyond `out` stays about threads x chunk_bytes x 4 bytes.
template <class T>
void encode_gpt2_parallel(const Gpt2Tokenizer& tok, const char* text, size_t n,
                          std::vector<T>& out, int threads = 0,
                          size_t chunk_bytes = size_t{1} << 20);

[[noreturn]] void throw_bad_utf8(size_t byte_offset);
// "token id 7 is outside the char tokenizer's vocabulary (5 tokens)".
[[noreturn]] void throw_bad_id(const std::string& kind, int32_t id, int vocab);

// encode() of a tokenizer that has for_each_id.
template <class Tok>
std::vector<int32_t> ids_of(const Tok& tok, const std::string& text) {
  std::vector<int32_t> ids;
  tok.for_each_id(text.data(), text.size(), [&](int32_t id) { ids.push_back(id); });
  return ids;
}

template <class Sink>
void CharTokenizer::for_each_id(const char* text, size_t n, Sink&& sink) const {
  size_t pos = 0;
  while (pos < n) {
    unsigned char c = static_cast<unsigned char>(text[pos]);
    if (c < 0x80 && ascii_ids_[c] >= 0) {  // the common case, one table lookup
      sink(ascii_ids_[c]);
      ++pos;
      continue;
    }
    size_t start = pos;
    uint32_t cp;
    if (!utf8_next(text, n, pos, cp)) throw_bad_utf8(start);
    int32_t id = id_of(cp);
    if (id < 0) throw_unknown(cp, start);
    sink(id);
  }
}

// Where the next "<|endoftext|>" of text[pos, n) starts, or n.
size_t gpt2_end_of_text_at_or_after(const char* text, size_t n, size_t pos);

template <class Sink>
void Gpt2Tokenizer::for_each_id(const char* text, size_t n, Sink&& sink,
                                PieceCache& cache) const {
  constexpr size_t kEndOfTextBytes = 13;  // "<|endoftext|>"
  for (size_t pos = 0; pos < n;) {
    // The pieces of the text up to the next "<|endoftext|>" (bounded there: its pattern's
    // lookahead sees the part's end), then that token.
    const size_t part_end = end_of_text_ < 0 ? n : gpt2_end_of_text_at_or_after(text, n, pos);
    while (pos < part_end) {
      const size_t end = gpt2_piece_end(text, part_end, pos);
      for (int32_t id : piece_ids(text + pos, end - pos, cache)) sink(id);
      pos = end;
    }
    if (part_end < n) {
      sink(end_of_text_);
      pos = part_end + kEndOfTextBytes;
    }
  }
}

template <class Sink>
void Gpt2Tokenizer::for_each_id(const char* text, size_t n, Sink&& sink) const {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  for_each_id(text, n, sink, cache_);
}

}  // namespace blm
