// Synthetic GPT-2 vocabularies for the tests of the gpt2 tokenizer: all 256 byte tokens, one
// token per merge, then <|endoftext|>, written as encoder.json and vocab.bpe the way OpenAI's
// files are (token strings in GPT-2's byte alphabet, JSON with \u escapes).  The alphabet is
// computed here from its definition, not taken from the tokenizer under test, and the ids are a
// permutation of the tokens' order so that no code can rely on "id = position".
// Header-only: every tests/test_*.cpp is an executable of its own.
#pragma once
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "data/utf8.h"
#include "tests/catch.h"

namespace blm {
namespace test {

// The bytes of every token (by id) and the merges (bytes of left and right, in priority order).
struct Gpt2Vocab {
  std::vector<std::string> tokens;
  std::vector<std::pair<std::string, std::string>> merges;
  int32_t id_of(const std::string& bytes) const {
    for (size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] == bytes) return static_cast<int32_t>(i);
    FAIL("no token '" << bytes << "'");
    return -1;
  }
};

// GPT-2's byte alphabet, from its definition: printable Latin-1 bytes stand for themselves, the
// other 68, in increasing order, for U+0100, U+0101, ...
inline uint32_t alphabet_code_point(unsigned char b) {
  const auto printable = [](int x) {
    return (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174;
  };
  if (printable(b)) return b;
  uint32_t cp = 256;
  for (int x = 0; x < b; ++x)
    if (!printable(x)) ++cp;
  return cp;
}

inline std::string alphabet_text(const std::string& bytes) {
  std::string out;
  for (unsigned char b : bytes) out += utf8_encode(alphabet_code_point(b));
  return out;
}

// The vocabulary of a list of merges (bytes; each side must be a byte or an earlier result).
inline Gpt2Vocab vocab_of_merges(const std::vector<std::pair<std::string, std::string>>& merges) {
  std::vector<std::string> order;
  for (int b = 0; b < 256; ++b) order.push_back(std::string(1, static_cast<char>(b)));
  for (const auto& m : merges) order.push_back(m.first + m.second);
  // id = position * stride mod n, stride coprime to n: a fixed shuffle.
  const size_t n = order.size();
  size_t stride = 7919;
  const auto gcd = [](size_t a, size_t b) {
    while (b) a %= b, std::swap(a, b);
    return a;
  };
  while (gcd(stride, n) != 1) ++stride;
  Gpt2Vocab v;
  v.tokens.resize(n);
  for (size_t i = 0; i < n; ++i) v.tokens[(i * stride + 3) % n] = order[i];
  v.tokens.push_back("<|endoftext|>");
  v.merges = merges;
  return v;
}

// Merges that build each word byte by byte from its first byte (a chain of prefixes), so every
// word is one token; words in order of priority.
inline Gpt2Vocab vocab_of_words(const std::vector<std::string>& words) {
  std::vector<std::pair<std::string, std::string>> merges;
  std::unordered_set<std::string> have;
  for (const std::string& w : words)
    for (size_t k = 1; k < w.size(); ++k)
      if (have.insert(w.substr(0, k + 1)).second)
        merges.emplace_back(w.substr(0, k), w.substr(k, 1));
  return vocab_of_merges(merges);
}

// GPT-2-sized: `count` merges of random earlier tokens (at most 12 bytes each), all distinct.
inline Gpt2Vocab random_vocab(uint64_t seed, size_t count) {
  Rng rng(seed);
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(std::string(1, static_cast<char>(b)));
  std::unordered_set<std::string> have(tokens.begin(), tokens.end());
  std::vector<std::pair<std::string, std::string>> merges;
  while (merges.size() < count) {
    const std::string& a = tokens[rng.below(tokens.size())];
    const std::string& b = tokens[rng.below(tokens.size())];
    if (a.size() + b.size() > 12 || !have.insert(a + b).second) continue;
    merges.emplace_back(a, b);
    tokens.push_back(a + b);
  }
  return vocab_of_merges(merges);
}

// A JSON string of an alphabet text as Python's json.dump writes it (\uXXXX above U+007E) for
// code points above U+00FF, raw UTF-8 for the Latin-1 ones; '/' escaped as \/ (legal JSON).
inline std::string json_key(const std::string& bytes) {
  std::string out = "\"";
  for (unsigned char b : bytes) {
    const uint32_t cp = alphabet_code_point(b);
    if (cp == '"' || cp == '\\') {
      out += '\\';
      out += static_cast<char>(cp);
    } else if (cp == '/') {
      out += "\\/";
    } else if (cp > 0xFF) {
      char buf[16];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(cp));
      out += buf;
    } else {
      out += utf8_encode(cp);
    }
  }
  return out + "\"";
}

inline std::string encoder_json(const Gpt2Vocab& v) {
  std::string out = "{";
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    if (id) out += ", ";
    out += json_key(v.tokens[id]) + ": " + std::to_string(id);
  }
  return out + "}";
}

inline std::string vocab_bpe(const Gpt2Vocab& v) {
  std::string out = "#version: 0.2\n";
  for (const auto& m : v.merges)
    out += alphabet_text(m.first) + " " + alphabet_text(m.second) + "\n";
  return out;
}

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  REQUIRE(out.good());
}

// dir/encoder.json and dir/vocab.bpe (dir must exist).
inline void write_gpt2_vocab(const std::string& dir, const Gpt2Vocab& v) {
  write_text(dir + "/encoder.json", encoder_json(v));
  write_text(dir + "/vocab.bpe", vocab_bpe(v));
}

// The words of tests/cli_util.h's generated_text (enough of them for the end-to-end tests).
inline const std::vector<std::string> kSomeWords = {"the",  "quick", "brown", "fox", "jumps",
                                                    "over", "a",     "lazy",  "dog"};

// A vocabulary in which each word, with and without a leading space, is one token, written as
// dir/encoder.json and dir/vocab.bpe (dir is created).
inline Gpt2Vocab write_word_vocab(const std::string& dir,
                                  const std::vector<std::string>& words = kSomeWords) {
  std::vector<std::string> spaced;
  for (const std::string& w : words) spaced.insert(spaced.end(), {" " + w, w});
  const Gpt2Vocab v = vocab_of_words(spaced);
  std::filesystem::create_directories(dir);
  write_gpt2_vocab(dir, v);
  return v;
}

}  // namespace test
}  // namespace blm
