// The byte, char and bin tokenizers, and make_tokenizer, which rebuilds one from the description
// a checkpoint stores ("byte", "char:<characters>", "bin:<vocab size>", "gpt2:..."; the gpt2
// tokenizer is in data/gpt2_tokenizer.cpp).
#include <algorithm>
#include <cstdlib>
#include <memory>

#include "data/tokenizers.h"

namespace blm {

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += decode_token(id);
  return out;
}

void throw_bad_id(const std::string& kind, int32_t id, int vocab) {
  throw DataError("token id " + std::to_string(id) + " is outside the " + kind +
                  " tokenizer's vocabulary (" + std::to_string(vocab) + " tokens)");
}

void throw_bad_utf8(size_t byte_offset) {
  throw DataError("invalid UTF-8 at byte " + std::to_string(byte_offset) +
                  " (the char tokenizer needs UTF-8 text; use data.tokenizer: byte for other "
                  "encodings)");
}

// ------------------------------------------------------------------------------------ byte

std::vector<int32_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode_token(int32_t id) const {
  if (id < 0 || id >= 256) throw_bad_id("byte", id, 256);
  return std::string(1, static_cast<char>(id));
}

// ------------------------------------------------------------------------------------ char

CharTokenizer::CharTokenizer(std::vector<uint32_t> code_points)
    : code_points_(std::move(code_points)) {
  if (code_points_.empty()) throw DataError("char tokenizer: empty vocabulary");
  for (size_t i = 0; i < code_points_.size(); ++i) {
    uint32_t cp = code_points_[i];
    if (cp > kMaxCodePoint || (cp >= 0xD800 && cp <= 0xDFFF))
      throw DataError("char tokenizer: " + describe_code_point(cp) + " is not a character");
    if (i > 0 && cp <= code_points_[i - 1])
      throw DataError("char tokenizer: characters not sorted and distinct at " +
                      describe_code_point(cp));
  }
  std::fill(ascii_ids_, ascii_ids_ + 128, -1);
  for (size_t i = 0; i < code_points_.size() && code_points_[i] < 128; ++i)
    ascii_ids_[code_points_[i]] = static_cast<int32_t>(i);
}

std::vector<uint32_t> CharTokenizer::vocabulary_of(const char* text, size_t n) {
  std::vector<uint8_t> seen(kMaxCodePoint + 1, 0);
  size_t pos = 0;
  while (pos < n) {
    size_t start = pos;
    uint32_t cp;
    if (!utf8_next(text, n, pos, cp)) throw_bad_utf8(start);
    seen[cp] = 1;
  }
  std::vector<uint32_t> cps;
  for (uint32_t cp = 0; cp <= kMaxCodePoint; ++cp)
    if (seen[cp]) cps.push_back(cp);
  if (cps.empty()) throw DataError("char tokenizer: the training text is empty");
  return cps;
}

int32_t CharTokenizer::id_of(uint32_t cp) const {
  auto it = std::lower_bound(code_points_.begin(), code_points_.end(), cp);
  if (it == code_points_.end() || *it != cp) return -1;
  return static_cast<int32_t>(it - code_points_.begin());
}

void CharTokenizer::throw_unknown(uint32_t cp, size_t byte_offset) const {
  throw DataError("character " + describe_code_point(cp) + " at byte " +
                  std::to_string(byte_offset) + " is not in the char tokenizer's vocabulary (" +
                  std::to_string(code_points_.size()) + " characters of the training text)");
}

std::vector<int32_t> CharTokenizer::encode(const std::string& text) const {
  return ids_of(*this, text);
}

std::string CharTokenizer::decode_token(int32_t id) const {
  if (id < 0 || id >= vocab_size()) throw_bad_id("char", id, vocab_size());
  return utf8_encode(code_points_[id]);
}

std::string CharTokenizer::serialize() const {
  std::string out = "char:";
  for (uint32_t cp : code_points_) out += utf8_encode(cp);
  return out;
}

// ------------------------------------------------------------------------------------- bin

BinTokenizer::BinTokenizer(int vocab_size) : vocab_(vocab_size) {
  if (vocab_size < 1 || vocab_size > 65536)
    throw DataError("bin tokenizer: vocabulary size " + std::to_string(vocab_size) +
                    " is outside [1, 65536] (.bin shards hold uint16 tokens)");
}

std::vector<int32_t> BinTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t close = text.find('>', pos);
    bool ok = text[pos] == '<' && close != std::string::npos && close > pos + 1 &&
              close - pos <= 7;
    for (size_t i = pos + 1; ok && i < close; ++i) ok = text[i] >= '0' && text[i] <= '9';
    if (!ok)
      throw DataError("the bin tokenizer reads only token ids written \"<id>\"; got '" +
                      printable_excerpt(text.substr(pos), 20) + "' at byte " +
                      std::to_string(pos));
    long id = std::strtol(text.c_str() + pos + 1, nullptr, 10);
    if (id >= vocab_) throw_bad_id("bin", static_cast<int32_t>(id), vocab_);
    ids.push_back(static_cast<int32_t>(id));
    pos = close + 1;
  }
  return ids;
}

std::string BinTokenizer::decode_token(int32_t id) const {
  if (id < 0 || id >= vocab_) throw_bad_id("bin", id, vocab_);
  return "<" + std::to_string(id) + ">";
}

// ----------------------------------------------------------------------------- factories

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteTokenizer>(); }

std::unique_ptr<Tokenizer> make_char_tokenizer(const std::string& training_text) {
  return std::make_unique<CharTokenizer>(
      CharTokenizer::vocabulary_of(training_text.data(), training_text.size()));
}

std::unique_ptr<Tokenizer> make_bin_tokenizer(int vocab_size) {
  return std::make_unique<BinTokenizer>(vocab_size);
}

namespace {

[[noreturn]] void throw_bad_description(const std::string& s, const std::string& why) {
  throw DataError("bad tokenizer description '" + printable_excerpt(s, 24) + "': " + why);
}

// The code points of the UTF-8 string s, in order.
std::vector<uint32_t> code_points_of(const std::string& whole, size_t from) {
  std::vector<uint32_t> cps;
  size_t pos = from;
  while (pos < whole.size()) {
    uint32_t cp;
    if (!utf8_next(whole.data(), whole.size(), pos, cp))
      throw_bad_description(whole, "invalid UTF-8 at byte " + std::to_string(pos));
    cps.push_back(cp);
  }
  return cps;
}

}  // namespace

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& s) {
  if (s == "byte") return make_byte_tokenizer();
  if (s.compare(0, 5, "char:") == 0) {
    std::vector<uint32_t> cps = code_points_of(s, 5);
    try {
      return std::make_unique<CharTokenizer>(std::move(cps));
    } catch (const DataError& e) {
      throw_bad_description(s, e.what());
    }
  }
  if (s.compare(0, 4, "bin:") == 0) {
    std::string digits = s.substr(4);
    bool ok = !digits.empty() && digits.size() <= 6 &&
              std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!ok) throw_bad_description(s, "expected bin:<vocabulary size>");
    try {
      return make_bin_tokenizer(std::atoi(digits.c_str()));
    } catch (const DataError& e) {
      throw_bad_description(s, e.what());
    }
  }
  if (s.compare(0, 5, "gpt2:") == 0) {
    try {
      return Gpt2Tokenizer::from_description(s.substr(5));
    } catch (const DataError& e) {
      throw_bad_description(s, e.what());
    }
  }
  throw_bad_description(s, "expected byte, char:<characters>, bin:<vocabulary size> or gpt2:...");
}

}  // namespace blm
