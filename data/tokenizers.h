// The concrete tokenizers behind data/dataset.h (internal to blm_data: the rest of the program
// uses the Tokenizer interface).  The char tokenizer also encodes straight from a memory-mapped
// file, so a large text is never copied into a std::string.
#pragma once
#include <cstdint>
#include <string>
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

 private:
  int vocab_;
};

[[noreturn]] void throw_bad_utf8(size_t byte_offset);

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

}  // namespace blm
