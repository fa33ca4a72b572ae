// The gpt2 tokenizer (data/tokenizers.h): GPT-2's byte alphabet, the classes and pieces of its
// pre-tokenization pattern, readers of encoder.json and vocab.bpe, BPE with a per-piece cache,
// and the self-contained description that checkpoints store.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iterator>
#include <queue>
#include <thread>

#include "data/json_reader.h"
#include "data/streams.h"
#include "data/tokenizers.h"

namespace blm {

// ------------------------------------------------------------------------- byte alphabet

namespace {

// Bytes that stand for themselves; the other 68 map to U+0100.. in increasing byte order.
bool is_printable_byte(int b) {
  return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
}

struct ByteAlphabet {
  uint32_t code_point[256];
  int16_t byte_of[324];  // code points 0..323 cover the alphabet; -1: no byte
  ByteAlphabet() {
    std::fill(byte_of, byte_of + 324, static_cast<int16_t>(-1));
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      code_point[b] = is_printable_byte(b) ? static_cast<uint32_t>(b) : next++;
      byte_of[code_point[b]] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

// The bytes that the alphabet text `text` spells; false (with `why`) for malformed UTF-8 or a
// character outside the alphabet.
bool bytes_of_alphabet_text(const std::string& text, std::string& bytes, std::string& why) {
  bytes.clear();
  for (size_t pos = 0; pos < text.size();) {
    const size_t start = pos;
    uint32_t cp;
    if (!utf8_next(text.data(), text.size(), pos, cp)) {
      why = "invalid UTF-8 at byte " + std::to_string(start);
      return false;
    }
    const int b = gpt2_byte_of_code_point(cp);
    if (b < 0) {
      why = "character " + describe_code_point(cp) + " is not in GPT-2's byte alphabet";
      return false;
    }
    bytes += static_cast<char>(b);
  }
  return true;
}

}  // namespace

std::string gpt2_alphabet_text(const std::string& bytes) {
  std::string out;
  for (unsigned char b : bytes) out += utf8_encode(alphabet().code_point[b]);
  return out;
}

uint32_t gpt2_code_point_of_byte(unsigned char byte) { return alphabet().code_point[byte]; }

int gpt2_byte_of_code_point(uint32_t cp) { return cp < 324 ? alphabet().byte_of[cp] : -1; }

// ------------------------------------------------------------------- character classes

namespace {

using CC = Gpt2CharClass;

// U+0000..U+00FF, exactly as Unicode classes them (\s is the White_Space property).
const char kLatin1Classes[] =
    "OOOOOOOOOSSSSSOOOOOOOOOOOOOOOOOOSOOOOOOOOOOOOOOONNNNNNNNNNOOOOOOOLLLLLLLLLLLLLLLLLLLLLLLLLL"
    "OOOOOOLLLLLLLLLLLLLLLLLLLLLLLLLLOOOOOOOOOOSOOOOOOOOOOOOOOOOOOOOOOOOOOSOOOOOOOOOLOOOOOOONNOL"
    "OOONLONNNOLLLLLLLLLLLLLLLLLLLLLLLOLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLOLLLLLLLL";
static_assert(sizeof kLatin1Classes == 257, "one class per Latin-1 code point");

struct ClassRange {
  uint32_t first, last;
  CC cls;
};

// Above U+00FF: ranges whose every code point is of the class (checked against Unicode's
// tables), in increasing order.  They cover the Latin, Greek, Cyrillic, Armenian, Hebrew, Arabic,
// Devanagari, Thai and Georgian letters, Hangul, kana and the CJK ideographs (84k of Unicode's
// 132k letters above U+00FF), the common digit blocks, superscripts, fractions and circled
// numbers, and every Unicode space.  Anything else counts as "other": letters of the scripts left
// out then group with punctuation, and combining marks (which are not \p{L}) split words, as in
// GPT-2.
// clang-format off
const ClassRange kClassRanges[] = {
    {0x0100, 0x02AF, CC::letter},  {0x02B0, 0x02C1, CC::letter},  {0x02C6, 0x02D1, CC::letter},
    {0x02E0, 0x02E4, CC::letter},  {0x02EC, 0x02EC, CC::letter},  {0x02EE, 0x02EE, CC::letter},
    {0x0370, 0x0374, CC::letter},  {0x0376, 0x0377, CC::letter},  {0x037A, 0x037D, CC::letter},
    {0x037F, 0x037F, CC::letter},  {0x0386, 0x0386, CC::letter},  {0x0388, 0x038A, CC::letter},
    {0x038C, 0x038C, CC::letter},  {0x038E, 0x03A1, CC::letter},  {0x03A3, 0x03F5, CC::letter},
    {0x03F7, 0x0481, CC::letter},  {0x048A, 0x052F, CC::letter},  {0x0531, 0x0556, CC::letter},
    {0x0559, 0x0559, CC::letter},  {0x0560, 0x0588, CC::letter},  {0x05D0, 0x05EA, CC::letter},
    {0x05EF, 0x05F2, CC::letter},  {0x0620, 0x064A, CC::letter},  {0x0660, 0x0669, CC::number},
    {0x066E, 0x066F, CC::letter},  {0x0671, 0x06D3, CC::letter},  {0x06D5, 0x06D5, CC::letter},
    {0x06E5, 0x06E6, CC::letter},  {0x06EE, 0x06EF, CC::letter},  {0x06F0, 0x06F9, CC::number},
    {0x06FA, 0x06FC, CC::letter},  {0x06FF, 0x06FF, CC::letter},  {0x0904, 0x0939, CC::letter},
    {0x093D, 0x093D, CC::letter},  {0x0950, 0x0950, CC::letter},  {0x0958, 0x0961, CC::letter},
    {0x0966, 0x096F, CC::number},  {0x0971, 0x0980, CC::letter},  {0x0E01, 0x0E30, CC::letter},
    {0x0E32, 0x0E33, CC::letter},  {0x0E40, 0x0E46, CC::letter},  {0x0E50, 0x0E59, CC::number},
    {0x10A0, 0x10C5, CC::letter},  {0x10D0, 0x10FA, CC::letter},  {0x10FC, 0x11FF, CC::letter},
    {0x1680, 0x1680, CC::space},   {0x1E00, 0x1F15, CC::letter},  {0x1F18, 0x1F1D, CC::letter},
    {0x1F20, 0x1F45, CC::letter},  {0x1F48, 0x1F4D, CC::letter},  {0x1F50, 0x1F57, CC::letter},
    {0x1F59, 0x1F59, CC::letter},  {0x1F5B, 0x1F5B, CC::letter},  {0x1F5D, 0x1F5D, CC::letter},
    {0x1F5F, 0x1F7D, CC::letter},  {0x1F80, 0x1FB4, CC::letter},  {0x1FB6, 0x1FBC, CC::letter},
    {0x1FBE, 0x1FBE, CC::letter},  {0x1FC2, 0x1FC4, CC::letter},  {0x1FC6, 0x1FCC, CC::letter},
    {0x1FD0, 0x1FD3, CC::letter},  {0x1FD6, 0x1FDB, CC::letter},  {0x1FE0, 0x1FEC, CC::letter},
    {0x1FF2, 0x1FF4, CC::letter},  {0x1FF6, 0x1FFC, CC::letter},  {0x2000, 0x200A, CC::space},
    {0x2028, 0x2029, CC::space},   {0x202F, 0x202F, CC::space},   {0x205F, 0x205F, CC::space},
    {0x2070, 0x2070, CC::number},  {0x2074, 0x2079, CC::number},  {0x2080, 0x2089, CC::number},
    {0x2150, 0x2182, CC::number},  {0x2185, 0x2189, CC::number},  {0x2460, 0x249B, CC::number},
    {0x3000, 0x3000, CC::space},   {0x3005, 0x3006, CC::letter},  {0x3007, 0x3007, CC::number},
    {0x3021, 0x3029, CC::number},  {0x3031, 0x3035, CC::letter},  {0x3038, 0x303A, CC::number},
    {0x303B, 0x303C, CC::letter},  {0x3041, 0x3096, CC::letter},  {0x309D, 0x309F, CC::letter},
    {0x30A1, 0x30FA, CC::letter},  {0x30FC, 0x30FF, CC::letter},  {0x3400, 0x4DBF, CC::letter},
    {0x4E00, 0x9FFF, CC::letter},  {0xAC00, 0xD7A3, CC::letter},  {0xF900, 0xFA6D, CC::letter},
    {0xFA70, 0xFAD9, CC::letter},  {0xFF10, 0xFF19, CC::number},  {0xFF21, 0xFF3A, CC::letter},
    {0xFF41, 0xFF5A, CC::letter},  {0xFF66, 0xFFBE, CC::letter},  {0x20000, 0x2A6DF, CC::letter},
};
// clang-format on

CC latin1_class(unsigned char c) {
  switch (kLatin1Classes[c]) {
    case 'L': return CC::letter;
    case 'N': return CC::number;
    case 'S': return CC::space;
    default: return CC::other;
  }
}

}  // namespace

Gpt2CharClass gpt2_char_class(uint32_t cp) {
  if (cp < 256) return latin1_class(static_cast<unsigned char>(cp));
  const ClassRange* end = std::end(kClassRanges);
  const ClassRange* r =
      std::upper_bound(std::begin(kClassRanges), end, cp,
                       [](uint32_t c, const ClassRange& x) { return c < x.first; });
  if (r == std::begin(kClassRanges)) return CC::other;
  --r;
  return cp <= r->last ? r->cls : CC::other;
}

// --------------------------------------------------------------------------- the pattern

namespace {

// One character of the text: its class and its length in bytes.  A byte that does not start
// well-formed UTF-8 is one "other" character of its own.
struct Char {
  CC cls;
  size_t len;
};

Char char_at(const char* text, size_t n, size_t pos) {
  const unsigned char c = static_cast<unsigned char>(text[pos]);
  if (c < 0x80) return {latin1_class(c), 1};
  size_t next = pos;
  uint32_t cp;
  if (!utf8_next(text, n, next, cp)) return {CC::other, 1};
  return {gpt2_char_class(cp), next - pos};
}

// The end of the run of characters of class `cls` that starts at pos.
size_t run_end(const char* text, size_t n, size_t pos, CC cls) {
  while (pos < n) {
    const Char c = char_at(text, n, pos);
    if (c.cls != cls) break;
    pos += c.len;
  }
  return pos;
}

// The length of the contraction 's 't 're 've 'm 'll 'd at text[pos], or 0.
size_t contraction_length(const char* text, size_t n, size_t pos) {
  if (text[pos] != '\'' || pos + 1 >= n) return 0;
  const char a = text[pos + 1];
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  const char b = pos + 2 < n ? text[pos + 2] : '\0';
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

}  // namespace

// The alternatives in the pattern's order; the first that matches at pos wins.
size_t gpt2_piece_end(const char* text, size_t n, size_t pos) {
  if (const size_t len = contraction_length(text, n, pos)) return pos + len;
  const Char first = char_at(text, n, pos);
  // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": one optional ASCII space, then a run.
  if (text[pos] == ' ' && pos + 1 < n) {
    const Char second = char_at(text, n, pos + 1);
    if (second.cls != CC::space) return run_end(text, n, pos + 1, second.cls);
  }
  if (first.cls != CC::space) return run_end(text, n, pos, first.cls);
  // "\s+(?!\S)": a run of spaces that ends the text, or all of it but its last character, which
  // then starts the next piece (" b" in "a  b").  Else "\s+": a single space before a non-space.
  size_t last = pos, end = pos;
  while (end < n) {
    const Char c = char_at(text, n, end);
    if (c.cls != CC::space) break;
    last = end;
    end += c.len;
  }
  return end == n || last == pos ? end : last;
}

std::vector<std::string> gpt2_pieces(const std::string& text) {
  std::vector<std::string> pieces;
  for (size_t pos = 0; pos < text.size();) {
    const size_t end = gpt2_piece_end(text.data(), text.size(), pos);
    pieces.push_back(text.substr(pos, end - pos));
    pos = end;
  }
  return pieces;
}

// ------------------------------------------------------------------------- reading files

namespace {

// "where: why" as a DataError; `where` names the file (and line, column).
[[noreturn]] void fail_at(const std::string& where, const std::string& why) {
  throw DataError(where + ": " + why);
}

// A token string as it may be shown in a message: quoted, one line, not too long, bytes that
// are not UTF-8 written \xNN.
std::string shown(const std::string& alphabet_string) {
  std::string utf8;
  for (size_t pos = 0; pos < alphabet_string.size();) {
    const size_t start = pos;
    uint32_t cp;
    if (utf8_next(alphabet_string.data(), alphabet_string.size(), pos, cp)) {
      utf8.append(alphabet_string, start, pos - start);
    } else {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02X", static_cast<unsigned char>(alphabet_string[pos++]));
      utf8 += hex;
    }
  }
  return "'" + printable_excerpt(utf8, 40) + "'";
}

std::string read_vocab_file(const std::string& path) {
  try {
    const std::shared_ptr<MappedFile> f = MappedFile::open(path);
    if (f->size() == 0) return "";
    return std::string(reinterpret_cast<const char*>(f->bytes()), f->size());
  } catch (const DataError& e) {
    throw DataError(std::string(e.what()) +
                    " (data.vocab must be a directory holding GPT-2's encoder.json and vocab.bpe, "
                    "or a Hugging Face GPT-2 directory with vocab.json and merges.txt; "
                    "scripts/get-data.sh --gpt2-vocab downloads them; without them, .bin shards "
                    "train with --set data.tokenizer=byte, their ids shown as <id>)");
  }
}

// The token strings of a vocabulary with their ids, for resolving merges.
struct Vocabulary {
  std::vector<std::string> bytes;                // by id
  std::unordered_map<std::string, int32_t> ids;  // bytes -> id
};

// Reads encoder.json: one JSON object of token strings (in the byte alphabet) to ids, the ids
// 0..n-1 each once.  Syntax errors name the line and column; the others name the token.
Vocabulary read_encoder(const std::string& path) {
  JsonValue doc;
  try {
    doc = parse_json(read_vocab_file(path), path);
  } catch (const DataError&) {
    throw;
  } catch (const Error& e) {
    throw DataError(e.what());
  }
  if (!doc.is_object()) fail_at(path, "expected one JSON object of token strings to ids");
  const auto& members = doc.members();
  const size_t n = members.size();
  if (n == 0) fail_at(path, "holds no tokens");
  Vocabulary v;
  v.bytes.resize(n);
  std::vector<const std::string*> token_of_id(n, nullptr);
  const std::string* beyond = nullptr;  // a token whose id is n or more
  double beyond_id = 0;
  for (const auto& [token, value] : members) {
    std::string bytes, why;
    if (!bytes_of_alphabet_text(token, bytes, why))
      fail_at(path, "token " + shown(token) + ": " + why);
    if (bytes.empty()) fail_at(path, "a token is the empty string");
    const double id = value.is_number() ? value.as_number() : -1;
    if (!(id >= 0 && id == static_cast<double>(static_cast<int64_t>(id))))
      fail_at(path, "token " + shown(token) + ": the id must be an integer >= 0");
    if (id >= static_cast<double>(n)) {
      beyond = &token;
      beyond_id = id;
      continue;
    }
    const size_t i = static_cast<size_t>(id);
    if (token_of_id[i])
      fail_at(path, "tokens " + shown(*token_of_id[i]) + " and " + shown(token) + " both have id " +
                        std::to_string(i));
    token_of_id[i] = &token;
    if (!v.ids.emplace(bytes, static_cast<int32_t>(i)).second)
      fail_at(path, "token " + shown(token) + " is given twice");
    v.bytes[i] = std::move(bytes);
  }
  for (size_t i = 0; i < n; ++i)
    if (!token_of_id[i])  // n distinct ids, one missing below n: some token's id is n or more
      fail_at(path, "no token has id " + std::to_string(i) + ", but " + shown(*beyond) +
                        " has id " + std::to_string(static_cast<int64_t>(beyond_id)) + " (the " +
                        std::to_string(n) + " tokens must have the ids 0.." +
                        std::to_string(n - 1) + ", each once)");
  return v;
}

// Reads merge lines "left right" (vocab.bpe after its first line, and the description's merge
// part): both sides and their concatenation must be tokens of the vocabulary, and no merge may
// repeat.  `where(line)` names a line in messages.
template <class Where>
std::vector<Gpt2Tokenizer::Merge> read_merges(const std::string& text, size_t from,
                                              size_t first_line, const Vocabulary& vocab,
                                              Where&& where) {
  std::vector<Gpt2Tokenizer::Merge> merges;
  std::unordered_map<uint64_t, size_t> line_of_pair;
  size_t line_number = first_line;
  for (size_t pos = from; pos < text.size(); ++line_number) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    std::string line = text.substr(pos, eol - pos);
    pos = eol + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const size_t space = line.find(' ');
    if (space == 0 || space == std::string::npos || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string::npos)
      fail_at(where(line_number), "expected a merge 'left right' (two tokens, one space), got '" +
                                      printable_excerpt(line, 40) + "'");
    int32_t ids[2];
    std::string parts[2] = {line.substr(0, space), line.substr(space + 1)}, bytes[2], why;
    for (int k = 0; k < 2; ++k) {
      if (!bytes_of_alphabet_text(parts[k], bytes[k], why))
        fail_at(where(line_number), "token " + shown(parts[k]) + ": " + why);
      const auto it = vocab.ids.find(bytes[k]);
      if (it == vocab.ids.end())
        fail_at(where(line_number), shown(parts[k]) + " is not a token of encoder.json");
      ids[k] = it->second;
    }
    const auto result = vocab.ids.find(bytes[0] + bytes[1]);
    if (result == vocab.ids.end())
      fail_at(where(line_number), "the merge of " + shown(parts[0]) + " and " + shown(parts[1]) +
                                      ", " + shown(parts[0] + parts[1]) +
                                      ", is not a token of encoder.json");
    const uint64_t key = static_cast<uint64_t>(ids[0]) << 32 | static_cast<uint32_t>(ids[1]);
    const auto seen = line_of_pair.emplace(key, line_number);
    if (!seen.second)
      fail_at(where(line_number), "the merge '" + printable_excerpt(line, 40) + "' repeats line " +
                                      std::to_string(seen.first->second));
    merges.push_back({ids[0], ids[1], result->second});
  }
  return merges;
}

}  // namespace

bool gpt2_vocab_files(const std::string& dir, std::string& encoder, std::string& merges) {
  const std::string base = dir.empty() || dir.back() == '/' ? dir : dir + "/";
  const auto exists = [](const std::string& path) { return access(path.c_str(), F_OK) == 0; };
  const bool hugging_face = !exists(base + "encoder.json") && !exists(base + "vocab.bpe") &&
                            exists(base + "vocab.json") && exists(base + "merges.txt");
  encoder = base + (hugging_face ? "vocab.json" : "encoder.json");
  merges = base + (hugging_face ? "merges.txt" : "vocab.bpe");
  return exists(encoder) && exists(merges);
}

std::unique_ptr<Gpt2Tokenizer> Gpt2Tokenizer::from_files(const std::string& dir) {
  std::string encoder_path, merges_path;
  gpt2_vocab_files(dir, encoder_path, merges_path);  // a missing one is named by its reader
  Vocabulary vocab = read_encoder(encoder_path);
  const std::string merges_text = read_vocab_file(merges_path);
  // GPT-2's reader skips the first line, "#version: 0.2".
  if (merges_text.compare(0, 8, "#version") != 0)
    fail_at(merges_path + ":1",
            "expected '#version: 0.2' (GPT-2's vocab.bpe starts so), got '" +
                printable_excerpt(merges_text.substr(0, merges_text.find('\n')), 40) + "'");
  const size_t first_eol = merges_text.find('\n');
  std::vector<Merge> merges =
      read_merges(merges_text, first_eol == std::string::npos ? merges_text.size() : first_eol + 1,
                  2, vocab, [&](size_t line) { return merges_path + ":" + std::to_string(line); });
  try {
    return std::make_unique<Gpt2Tokenizer>(std::move(vocab.bytes), std::move(merges));
  } catch (const DataError& e) {
    throw DataError(encoder_path + ": " + e.what());
  }
}

// --------------------------------------------------------------------- the tokenizer

namespace {

constexpr size_t kMaxCachedPieces = size_t{1} << 18;  // about 30 MB of short pieces at most
constexpr const char* kDescriptionVersion = "1";

uint64_t pair_key(int32_t left, int32_t right) {
  return static_cast<uint64_t>(left) << 32 | static_cast<uint32_t>(right);
}

}  // namespace

Gpt2Tokenizer::Gpt2Tokenizer(std::vector<std::string> tokens, std::vector<Merge> merges)
    : tokens_(std::move(tokens)), merges_(std::move(merges)) {
  const int32_t n = static_cast<int32_t>(tokens_.size());
  if (tokens_.size() > static_cast<size_t>(INT32_MAX)) throw DataError("too many tokens");
  std::fill(byte_ids_, byte_ids_ + 256, -1);
  std::unordered_map<std::string, int32_t> seen;
  for (int32_t id = 0; id < n; ++id) {
    const std::string& t = tokens_[id];
    if (t.empty()) throw DataError("token " + std::to_string(id) + " is empty");
    if (!seen.emplace(t, id).second)
      throw DataError("tokens " + std::to_string(seen[t]) + " and " + std::to_string(id) +
                      " are both " + shown(gpt2_alphabet_text(t)));
    if (t.size() == 1) byte_ids_[static_cast<unsigned char>(t[0])] = id;
  }
  for (int b = 0; b < 256; ++b)
    if (byte_ids_[b] < 0)
      throw DataError("no token is the single byte " + std::to_string(b) + " (" +
                      shown(gpt2_alphabet_text(std::string(1, static_cast<char>(b)))) +
                      "): byte-level BPE needs all 256");
  merge_of_pair_.reserve(merges_.size());
  for (size_t rank = 0; rank < merges_.size(); ++rank) {
    const Merge& m = merges_[rank];
    const bool ids_ok =
        m.left >= 0 && m.left < n && m.right >= 0 && m.right < n && m.result >= 0 && m.result < n;
    if (!ids_ok || tokens_[m.result] != tokens_[m.left] + tokens_[m.right])
      throw DataError("merge " + std::to_string(rank) +
                      " does not join its two tokens into its result");
    merge_of_pair_.emplace(pair_key(m.left, m.right), Ranked{static_cast<int32_t>(rank), m.result});
  }
  end_of_text_ = id_of_token("<|endoftext|>");
}

size_t gpt2_end_of_text_at_or_after(const char* text, size_t n, size_t pos) {
  static const std::string kText = "<|endoftext|>";
  const char* found = std::search(text + pos, text + n, kText.begin(), kText.end());
  return static_cast<size_t>(found - text);
}

// BPE on one piece, over a linked list of symbols.  Each round takes the lowest rank present and
// merges every occurrence of its pair from left to right (GPT-2's reference merges them all before
// looking at the pairs the merges make), so a heap ordered by (rank, position) is popped one rank
// at a time and the new pairs wait until the round ends.  O(n log n) for a piece of n bytes.
std::vector<int32_t> Gpt2Tokenizer::bpe(const char* piece, size_t n) const {
  std::vector<int32_t> id(n), prev(n), next(n);
  for (size_t i = 0; i < n; ++i) {
    id[i] = byte_ids_[static_cast<unsigned char>(piece[i])];
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  struct Candidate {
    int32_t rank, pos, left, right;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  std::vector<Candidate> waiting;
  const auto consider = [&](int32_t pos, std::vector<Candidate>* later) {
    if (pos < 0 || next[pos] < 0) return;
    const auto it = merge_of_pair_.find(pair_key(id[pos], id[next[pos]]));
    if (it == merge_of_pair_.end()) return;
    const Candidate c{it->second.rank, pos, id[pos], id[next[pos]]};
    if (later) {
      later->push_back(c);
    } else {
      heap.push(c);
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(static_cast<int32_t>(i), nullptr);
  while (!heap.empty()) {
    const int32_t rank = heap.top().rank;
    while (!heap.empty() && heap.top().rank == rank) {
      const Candidate c = heap.top();
      heap.pop();
      // Stale when an earlier merge of this round took one of its symbols.
      const int32_t right = next[c.pos];
      if (id[c.pos] != c.left || right < 0 || id[right] != c.right) continue;
      id[c.pos] = merge_of_pair_.find(pair_key(c.left, c.right))->second.result;
      id[right] = -1;
      next[c.pos] = next[right];
      if (next[right] >= 0) prev[next[right]] = c.pos;
      consider(prev[c.pos], &waiting);
      consider(c.pos, &waiting);
    }
    for (const Candidate& c : waiting) heap.push(c);
    waiting.clear();
  }
  std::vector<int32_t> out;
  for (int32_t p = n ? 0 : -1; p >= 0; p = next[p]) out.push_back(id[p]);
  return out;
}

const std::vector<int32_t>& Gpt2Tokenizer::piece_ids(const char* piece, size_t n,
                                                     PieceCache& cache) const {
  std::string key(piece, n);
  const auto it = cache.ids_.find(key);
  if (it != cache.ids_.end()) return it->second;
  if (cache.ids_.size() >= kMaxCachedPieces) cache.ids_.clear();
  return cache.ids_.emplace(std::move(key), bpe(piece, n)).first->second;
}

std::vector<int32_t> Gpt2Tokenizer::encode(const std::string& text) const {
  return ids_of(*this, text);
}

std::string Gpt2Tokenizer::decode_token(int32_t id) const {
  if (id < 0 || id >= vocab_size()) throw_bad_id("gpt2", id, vocab_size());
  return tokens_[id];
}

int32_t Gpt2Tokenizer::id_of_token(const std::string& bytes) const {
  const auto it = std::find(tokens_.begin(), tokens_.end(), bytes);
  return it == tokens_.end() ? -1 : static_cast<int32_t>(it - tokens_.begin());
}

std::string Gpt2Tokenizer::serialize() const {
  std::string out = std::string("gpt2:") + kDescriptionVersion + "\n" +
                    std::to_string(tokens_.size()) + " " + std::to_string(merges_.size()) + "\n";
  for (const std::string& t : tokens_) out += gpt2_alphabet_text(t) + "\n";
  for (const Merge& m : merges_)
    out += gpt2_alphabet_text(tokens_[m.left]) + " " + gpt2_alphabet_text(tokens_[m.right]) + "\n";
  return out;
}

std::unique_ptr<Gpt2Tokenizer> Gpt2Tokenizer::from_description(const std::string& text) {
  const auto where = [](size_t line) { return "line " + std::to_string(line); };
  size_t pos = 0;
  const auto next_line = [&](size_t number) {
    const size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) fail_at(where(number), "the description ends early");
    std::string line = text.substr(pos, eol - pos);
    pos = eol + 1;
    return line;
  };
  const std::string version = next_line(1);
  if (version != kDescriptionVersion)
    fail_at(where(1), "expected version " + std::string(kDescriptionVersion) + ", got '" +
                          printable_excerpt(version, 20) + "'");
  const std::string counts = next_line(2);
  unsigned long long n_tokens = 0, n_merges = 0;
  char end = 0;
  if (std::sscanf(counts.c_str(), "%llu %llu%c", &n_tokens, &n_merges, &end) != 2 || !n_tokens)
    fail_at(where(2),
            "expected the token and merge counts, got '" + printable_excerpt(counts, 20) + "'");
  // A token line takes at least two bytes, a merge line four: more is a cut description (and
  // would reserve memory for nothing).
  if (n_tokens > text.size() / 2 || n_merges > text.size() / 4)
    fail_at(where(2), "the description ends early: it is too short for " +
                          std::to_string(n_tokens) + " tokens and " + std::to_string(n_merges) +
                          " merges");
  Vocabulary vocab;
  vocab.bytes.reserve(n_tokens);
  for (size_t id = 0; id < n_tokens; ++id) {
    std::string bytes, why;
    if (!bytes_of_alphabet_text(next_line(3 + id), bytes, why)) fail_at(where(3 + id), why);
    vocab.ids.emplace(bytes, static_cast<int32_t>(id));
    vocab.bytes.push_back(std::move(bytes));
  }
  std::vector<Merge> merges = read_merges(text, pos, 3 + n_tokens, vocab, where);
  if (merges.size() != n_merges)
    fail_at(where(3 + n_tokens), "expected " + std::to_string(n_merges) + " merges, found " +
                                     std::to_string(merges.size()));
  return std::make_unique<Gpt2Tokenizer>(std::move(vocab.bytes), std::move(merges));
}

// ------------------------------------------------------------------ encoding on many threads

size_t gpt2_cut_at_or_after(const char* text, size_t n, size_t from) {
  const auto printable = [](char c) { return c > ' ' && c < 0x7f; };
  for (size_t p = std::max<size_t>(from, 1); p < n; ++p)
    if (text[p] == ' ' && printable(text[p - 1])) return p;
  return n;
}

template <class T>
void encode_gpt2_parallel(const Gpt2Tokenizer& tok, const char* text, size_t n,
                          std::vector<T>& out, int threads, size_t chunk_bytes) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  chunk_bytes = std::max<size_t>(chunk_bytes, 1);
  std::vector<Gpt2Tokenizer::PieceCache> caches(threads);
  const size_t round_chunks = 4 * static_cast<size_t>(threads);  // uneven chunks even out
  std::vector<std::vector<T>> ids(round_chunks);
  for (size_t start = 0; start < n;) {
    // This round's chunks: [cuts[i], cuts[i + 1]).
    std::vector<size_t> cuts{start};
    while (cuts.size() <= round_chunks && cuts.back() < n)
      cuts.push_back(gpt2_cut_at_or_after(text, n, cuts.back() + chunk_bytes));
    const size_t chunks = cuts.size() - 1;
    std::atomic<size_t> next{0};
    std::vector<std::exception_ptr> failed(threads);
    const auto work = [&](int w) {
      try {
        for (size_t i; (i = next++) < chunks;) {
          ids[i].clear();
          tok.for_each_id(text + cuts[i], cuts[i + 1] - cuts[i],
                          [&](int32_t id) { ids[i].push_back(static_cast<T>(id)); }, caches[w]);
        }
      } catch (...) {
        failed[w] = std::current_exception();
      }
    };
    std::vector<std::thread> pool;
    for (int w = 1; w < threads && static_cast<size_t>(w) < chunks; ++w) pool.emplace_back(work, w);
    work(0);
    for (std::thread& t : pool) t.join();
    for (const std::exception_ptr& e : failed)
      if (e) std::rethrow_exception(e);
    for (size_t i = 0; i < chunks; ++i) out.insert(out.end(), ids[i].begin(), ids[i].end());
    start = cuts.back();
  }
}

template void encode_gpt2_parallel<uint16_t>(const Gpt2Tokenizer&, const char*, size_t,
                                             std::vector<uint16_t>&, int, size_t);
template void encode_gpt2_parallel<int32_t>(const Gpt2Tokenizer&, const char*, size_t,
                                            std::vector<int32_t>&, int, size_t);

std::unique_ptr<Tokenizer> make_gpt2_tokenizer(const std::string& vocab_dir) {
  return Gpt2Tokenizer::from_files(vocab_dir);
}

}  // namespace blm
