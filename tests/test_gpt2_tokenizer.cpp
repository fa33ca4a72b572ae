// Tests of the gpt2 tokenizer (data/gpt2_tokenizer.cpp): GPT-2's byte alphabet; the pieces of
// GPT-2's pre-tokenization pattern on ASCII (expectations derived from the pattern by hand) and
// on the non-ASCII classes it approximates; BPE on small synthetic vocabularies whose merge
// order matters; decode(encode(s)) == s on random bytes and random UTF-8; the description that
// checkpoints store (a GPT-2-sized one through a checkpoint file); open_dataset with text and
// .bin shards; every malformed encoder.json / vocab.bpe / description named in its error; and
// `barrierlm tokenize`'s refusals, empty inputs and clean-up after an interruption or a failure.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/params.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "data/tokenizers.h"
#include "data/utf8.h"
#include "tests/catch.h"
#include "tests/cli_util.h"
#include "tests/error_of.h"
#include "tests/gpt2_vocab.h"

using namespace blm;
using namespace blm::test;

namespace {

using Pieces = std::vector<std::string>;

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// Merges whose order decides the result: "abc" is one token when "a b" comes before "b c", and
// "a" + "bc" otherwise; " the" is one token; "aa" tests left-to-right merging of a run.
std::vector<std::pair<std::string, std::string>> ordered_merges(bool ab_first) {
  std::vector<std::pair<std::string, std::string>> m;
  if (ab_first) m = {{"a", "b"}, {"b", "c"}};
  else m = {{"b", "c"}, {"a", "b"}};
  m.insert(m.end(), {{"ab", "c"}, {" ", "t"}, {" t", "h"}, {" th", "e"}, {"a", "a"}});
  return m;
}

std::unique_ptr<Tokenizer> tokenizer_of(const TempDir& d, const Gpt2Vocab& v) {
  write_gpt2_vocab(d.path, v);
  return make_gpt2_tokenizer(d.path);
}

std::string random_bytes(Rng& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng.below(256));
  return s;
}

// Random well-formed UTF-8: ASCII words and spaces, Latin-1, Cyrillic, CJK, emoji, combining
// marks, Unicode spaces.
std::string random_utf8(Rng& rng, size_t chars) {
  static const uint32_t pool[] = {'a', 'b', 'c', ' ', ' ', '\n', '\'', 's', '1', '.', 0xE9, 0xA0,
                                  0x416, 0x4E2D, 0x3042, 0x1F600, 0x301, 0x3000, 0x2028, 0x660};
  std::string s;
  for (size_t i = 0; i < chars; ++i) {
    const uint32_t cp = rng.below(4) == 0 ? static_cast<uint32_t>(1 + rng.below(0xD7FF))
                                          : pool[rng.below(sizeof pool / sizeof pool[0])];
    s += utf8_encode(cp);
  }
  return s;
}

}  // namespace

// ------------------------------------------------------------------------- byte alphabet

TEST_CASE("gpt2: the byte alphabet maps bytes to code points and back", "[gpt2]") {
  CHECK(gpt2_code_point_of_byte(32) == 0x120);  // space: 'Ġ'
  CHECK(gpt2_code_point_of_byte(10) == 0x10A);  // newline: 'Ċ'
  CHECK(gpt2_code_point_of_byte(0) == 0x100);
  CHECK(gpt2_code_point_of_byte(33) == '!');
  CHECK(gpt2_code_point_of_byte(126) == '~');
  CHECK(gpt2_code_point_of_byte(127) == 0x121);
  CHECK(gpt2_code_point_of_byte(173) == 0x143);  // soft hyphen, the last byte remapped
  CHECK(gpt2_code_point_of_byte(255) == 0xFF);
  std::set<uint32_t> seen;
  for (int b = 0; b < 256; ++b) {
    const uint32_t cp = gpt2_code_point_of_byte(static_cast<unsigned char>(b));
    CHECK(cp == alphabet_code_point(static_cast<unsigned char>(b)));  // the definition
    CHECK(gpt2_byte_of_code_point(cp) == b);
    seen.insert(cp);
  }
  CHECK(seen.size() == 256);  // a bijection onto 256 code points
  int mapped = 0;
  for (uint32_t cp = 0; cp < 0x400; ++cp) mapped += gpt2_byte_of_code_point(cp) >= 0;
  CHECK(mapped == 256);  // and nothing else maps back
  CHECK(gpt2_byte_of_code_point(' ') == -1);
  CHECK(gpt2_byte_of_code_point(0x144) == -1);
}

// -------------------------------------------------------------------------- the pattern

TEST_CASE("gpt2: ASCII pieces follow GPT-2's pattern exactly", "[gpt2]") {
  const std::vector<std::pair<std::string, Pieces>> cases = {
      {"Hello world", {"Hello", " world"}},
      {"I'm here  now\n\n", {"I", "'m", " here", " ", " now", "\n\n"}},
      {"they'll", {"they", "'ll"}},
      {"don't", {"don", "'t"}},
      {"'ll've", {"'ll", "'ve"}},
      {"We've 2024 items!!! ok?", {"We", "'ve", " 2024", " items", "!!!", " ok", "?"}},
      {"3.14", {"3", ".", "14"}},
      {" $100", {" $", "100"}},
      {"'S", {"'", "S"}},  // contractions are lower case only
      {"a 'd", {"a", " '", "d"}},
      {"a\n b", {"a", "\n", " b"}},   // \s+(?!\S) leaves the last space to " b"
      {"x\t\ty", {"x", "\t", "\t", "y"}},  // ... and a lone tab before y is \s+ alone
      {"hi  !", {"hi", " ", " !"}},
      {"  leading", {" ", " leading"}},
      {"trailing   ", {"trailing", "   "}},
      {"it's   OK '", {"it", "'s", "  ", " OK", " '"}},
      {"(x)  -> [y]\r\n", {"(", "x", ")", " ", " ->", " [", "y", "]", "\r\n"}},
      {"\n", {"\n"}},
      {"", {}},
  };
  for (const auto& [text, pieces] : cases) {
    INFO("text: '" << printable_excerpt(text, 60) << "'");
    CHECK(gpt2_pieces(text) == pieces);
  }
  // Every ASCII character is classed as Unicode classes it.
  for (int c = 0; c < 128; ++c) {
    INFO("character " << c);
    const Gpt2CharClass expected =
        std::isalpha(c) ? Gpt2CharClass::letter
        : std::isdigit(c) ? Gpt2CharClass::number
        : (c == ' ' || (c >= 9 && c <= 13)) ? Gpt2CharClass::space
                                            : Gpt2CharClass::other;
    CHECK(gpt2_char_class(static_cast<uint32_t>(c)) == expected);
  }
}

TEST_CASE("gpt2: non-ASCII classes and pieces, and bytes that are not UTF-8", "[gpt2]") {
  CHECK(gpt2_pieces("caf\xC3\xA9 na\xC3\xAFve") == Pieces{"caf\xC3\xA9", " na\xC3\xAFve"});
  CHECK(gpt2_pieces("\xD0\x9F\xD1\x80\xD0\xB8 \xD0\xBC\xD0\xB8\xD1\x80") ==  // Russian
        Pieces{"\xD0\x9F\xD1\x80\xD0\xB8", " \xD0\xBC\xD0\xB8\xD1\x80"});
  CHECK(gpt2_pieces("\xE4\xB8\xAD\xE6\x96\x87 \xE3\x83\x86\xE3\x82\xB9") ==  // CJK, katakana
        Pieces{"\xE4\xB8\xAD\xE6\x96\x87", " \xE3\x83\x86\xE3\x82\xB9"});
  CHECK(gpt2_pieces("a\xC2\xA0" "b") == Pieces{"a", "\xC2\xA0", "b"});  // no-break space
  CHECK(gpt2_pieces("a \xE3\x80\x80" "b") == Pieces{"a", " ", "\xE3\x80\x80", "b"});  // U+3000
  // superscript two and one half are numbers, the multiplication sign is not a letter
  CHECK(gpt2_pieces("x\xC2\xB2+\xC2\xBD \xC3\x97y") ==
        Pieces{"x", "\xC2\xB2", "+", "\xC2\xBD", " \xC3\x97", "y"});
  CHECK(gpt2_char_class(0xAA) == Gpt2CharClass::letter);
  CHECK(gpt2_char_class(0xF7) == Gpt2CharClass::other);
  CHECK(gpt2_char_class(0x85) == Gpt2CharClass::space);
  CHECK(gpt2_char_class(0x37E) == Gpt2CharClass::other);  // Greek question mark
  CHECK(gpt2_char_class(0x3B1) == Gpt2CharClass::letter);
  CHECK(gpt2_char_class(0x301) == Gpt2CharClass::other);  // a combining mark is not \p{L}
  CHECK(gpt2_char_class(0x661) == Gpt2CharClass::number);
  CHECK(gpt2_char_class(0xAC00) == Gpt2CharClass::letter);
  CHECK(gpt2_char_class(0x2029) == Gpt2CharClass::space);
  CHECK(gpt2_char_class(0x1F600) == Gpt2CharClass::other);
  // A byte that starts no UTF-8 character is an "other" character of its own.
  CHECK(gpt2_pieces("ab\xFF\xFE" "cd \xC3") == Pieces{"ab", "\xFF\xFE", "cd", " \xC3"});
  // Pieces always cover the text.
  Rng rng(11);
  for (int i = 0; i < 200; ++i) {
    const std::string s =
        i % 2 ? random_bytes(rng, rng.below(40)) : random_utf8(rng, rng.below(30));
    std::string joined;
    for (const std::string& p : gpt2_pieces(s)) {
      CHECK(!p.empty());
      joined += p;
    }
    CHECK(joined == s);
  }
}

// --------------------------------------------------------------------------------- BPE

TEST_CASE("gpt2: BPE merges by rank, ids come from encoder.json", "[gpt2]") {
  TempDir d;
  const Gpt2Vocab v = vocab_of_merges(ordered_merges(true));
  const auto tok = tokenizer_of(d, v);
  REQUIRE(tok->kind() == "gpt2");
  CHECK(tok->vocab_size() == 256 + 7 + 1);
  CHECK_FALSE(tok->is_bytes());
  const auto id = [&](const std::string& bytes) { return v.id_of(bytes); };
  CHECK(tok->encode("abc") == std::vector<int32_t>{id("abc")});
  CHECK(tok->encode("bc") == std::vector<int32_t>{id("bc")});
  // " abc": (a, b) first, then (ab, c); the space has no merge with "a".
  CHECK(tok->encode(" the abc") == std::vector<int32_t>{id(" the"), id(" "), id("abc")});
  CHECK(tok->encode("aaa") == std::vector<int32_t>{id("aa"), id("a")});  // left to right
  CHECK(tok->encode("aaaa") == std::vector<int32_t>{id("aa"), id("aa")});
  CHECK(tok->encode("\n") == std::vector<int32_t>{id("\n")});
  for (int b = 0; b < 256; ++b) {
    const std::string s(1, static_cast<char>(b));
    CHECK(tok->decode_token(id(s)) == s);
  }
  // The text "<|endoftext|>" is that token, and the text around it is cut into pieces as if it
  // ended (began) there: "a  " before it is "a", "  " (a run of spaces at the end), not
  // "a", " ", " " + what follows.
  const int32_t eot = id("<|endoftext|>");
  CHECK(eot == tok->vocab_size() - 1);
  CHECK(tok->decode_token(eot) == "<|endoftext|>");
  CHECK(tok->encode("<|endoftext|>") == std::vector<int32_t>{eot});
  const auto cat = [](std::vector<std::vector<int32_t>> parts) {
    std::vector<int32_t> all;
    for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
    return all;
  };
  for (const char* before : {"", "a", "abc  ", "the\n\n", " ab"})
    for (const char* after : {"", "abc", " the", "\n ab", "<|endoftext|>"}) {
      const std::string s = std::string(before) + "<|endoftext|>" + after;
      INFO(s);
      CHECK(tok->encode(s) == cat({tok->encode(before), {eot}, tok->encode(after)}));
      CHECK(tok->decode(tok->encode(s)) == s);
    }
  const std::vector<int32_t> partial = tok->encode("<|endoftext|");  // only the whole text
  CHECK(std::find(partial.begin(), partial.end(), eot) == partial.end());
  // A run of spaces before <|endoftext|> is one piece, as at the end of a text: with the
  // pattern's lookahead seeing the '<' it would be two (" ", then " " leading " <|").
  TempDir d_runs;
  const Gpt2Vocab r = vocab_of_merges({{" ", " "}, {"\n", "\n"}, {"a", "b"}});
  const auto runs = tokenizer_of(d_runs, r);
  const int32_t r_eot = r.id_of("<|endoftext|>");
  CHECK(runs->encode("ab  <|endoftext|>") ==
        std::vector<int32_t>{r.id_of("ab"), r.id_of("  "), r_eot});
  CHECK(runs->encode("ab\n\n<|endoftext|>ab") ==
        std::vector<int32_t>{r.id_of("ab"), r.id_of("\n\n"), r_eot, r.id_of("ab")});
  CHECK(contains(error_of<DataError>([&] { tok->decode_token(tok->vocab_size()); }),
                 "gpt2 tokenizer"));
  CHECK(contains(error_of<DataError>([&] { tok->decode_token(-1); }), "-1"));

  // The same merges with "b c" first: "abc" is "a" + "bc".
  TempDir d2;
  const Gpt2Vocab w = vocab_of_merges(ordered_merges(false));
  const auto other = tokenizer_of(d2, w);
  CHECK(other->encode("abc") == std::vector<int32_t>{w.id_of("a"), w.id_of("bc")});
  CHECK(other->encode("ab") == std::vector<int32_t>{w.id_of("ab")});

  // A round merges every occurrence of its pair before the pairs it makes, even one of lower
  // rank: "abab" is "ab" "ab" (merging ("ab", "a") as soon as it appears would give "aba" "b").
  TempDir d3;
  const Gpt2Vocab u = vocab_of_merges({{"ab", "a"}, {"a", "b"}});
  const auto rounds = tokenizer_of(d3, u);
  CHECK(rounds->encode("abab") == std::vector<int32_t>{u.id_of("ab"), u.id_of("ab")});
  CHECK(rounds->encode("aba") == std::vector<int32_t>{u.id_of("aba")});
}

TEST_CASE("gpt2: decode(encode(s)) == s for any bytes and any UTF-8", "[gpt2]") {
  TempDir d;
  const Gpt2Vocab v = random_vocab(5, 3000);
  const auto tok = tokenizer_of(d, v);
  Rng rng(12);
  size_t tokens = 0, bytes = 0;
  for (int i = 0; i < 300; ++i) {
    const std::string s =
        i % 2 ? random_bytes(rng, rng.below(300)) : random_utf8(rng, rng.below(200));
    const std::vector<int32_t> ids = tok->encode(s);
    for (int32_t t : ids) REQUIRE((t >= 0 && t < tok->vocab_size()));
    CHECK(tok->decode(ids) == s);
    tokens += ids.size();
    bytes += s.size();
  }
  CHECK(tokens < bytes);  // the merges are used
  // Every piece's tokens are a fixed point: no adjacent pair of them is a merge.
  std::set<std::pair<int32_t, int32_t>> merge_pairs;
  for (const auto& m : v.merges) merge_pairs.insert({v.id_of(m.first), v.id_of(m.second)});
  const std::string text = random_utf8(rng, 2000);
  for (const std::string& piece : gpt2_pieces(text)) {
    const std::vector<int32_t> ids = tok->encode(piece);
    for (size_t k = 0; k + 1 < ids.size(); ++k) CHECK(merge_pairs.count({ids[k], ids[k + 1]}) == 0);
  }
}

TEST_CASE("gpt2: encoding on many threads gives the one-thread ids", "[gpt2]") {
  TempDir d;
  const auto tok = tokenizer_of(d, random_vocab(6, 3000));
  const auto& gpt2 = dynamic_cast<const Gpt2Tokenizer&>(*tok);
  Rng rng(13);
  // Prose (many cuts), UTF-8 with Unicode spaces and contractions, bytes that are not UTF-8,
  // and runs of spaces and newlines around the cuts.
  std::string spaces;
  for (int i = 0; i < 3000; ++i) {
    for (int k = 1 + static_cast<int>(rng.below(4)); k > 0; --k) spaces += " \n\t'x"[rng.below(5)];
    spaces += rng.below(2) ? "ab" : "'s";
  }
  std::string documents;  // a corpus as TinyStories marks its documents' ends
  for (int i = 0; i < 200; ++i)
    documents += generated_text(i, 50 + rng.below(200)) + (rng.below(2) ? "\n" : " ") +
                 "<|endoftext|>" + (rng.below(2) ? "\n" : "");
  const std::vector<std::string> texts = {generated_text(7, 20000), random_utf8(rng, 20000),
                                          random_bytes(rng, 20000), spaces, documents, "",
                                          "no-space"};
  for (const std::string& text : texts) {
    const std::vector<int32_t> expect = tok->encode(text);
    // Each cut p is where a piece of the whole text ends, and that piece ends there too in the
    // text cut at p (the pieces before it end earlier, and the pattern never looks back).
    std::vector<size_t> piece_start{0};  // piece_start[i]: where piece i starts
    for (const std::string& piece : gpt2_pieces(text))
      piece_start.push_back(piece_start.back() + piece.size());
    size_t cuts = 0;
    for (size_t p = gpt2_cut_at_or_after(text.data(), text.size(), 0); p < text.size();
         p = gpt2_cut_at_or_after(text.data(), text.size(), p + 1)) {
      const auto at = std::lower_bound(piece_start.begin(), piece_start.end(), p);
      REQUIRE(*at == p);
      REQUIRE(gpt2_piece_end(text.data(), p, *(at - 1)) == p);
      ++cuts;
    }
    if (text.size() > 1000) CHECK(cuts > 10);  // the chunks below are really cut
    if (&text == &texts[0]) CHECK(cuts > 2000);   // prose: at almost every word
    for (const int threads : {1, 3, 8})
      for (const size_t chunk : {size_t{1}, size_t{13}, size_t{500}, size_t{1} << 20}) {
        std::vector<uint16_t> narrow;
        std::vector<int32_t> wide{-1};  // appended to: the -1 stays in front
        encode_gpt2_parallel(gpt2, text.data(), text.size(), narrow, threads, chunk);
        encode_gpt2_parallel(gpt2, text.data(), text.size(), wide, threads, chunk);
        REQUIRE(std::vector<int32_t>(narrow.begin(), narrow.end()) == expect);
        REQUIRE(wide.front() == -1);
        REQUIRE(std::vector<int32_t>(wide.begin() + 1, wide.end()) == expect);
      }
  }
}

// -------------------------------------------------------------------------- description

TEST_CASE("gpt2: the description rebuilds the tokenizer without the files", "[gpt2]") {
  std::string desc;
  std::vector<int32_t> ids;
  Rng rng(13);
  const std::string text = random_utf8(rng, 3000) + random_bytes(rng, 500);
  {
    TempDir d;
    const auto tok = tokenizer_of(d, random_vocab(6, 2000));
    desc = tok->serialize();
    ids = tok->encode(text);
  }  // the files are gone
  CHECK(desc.rfind("gpt2:1\n", 0) == 0);
  const auto again = make_tokenizer(desc);
  REQUIRE(again->kind() == "gpt2");
  CHECK(again->vocab_size() == 256 + 2000 + 1);
  CHECK(again->serialize() == desc);
  CHECK(again->encode(text) == ids);
  CHECK(again->decode(ids) == text);
}

TEST_CASE("gpt2: a GPT-2-sized description goes through a checkpoint and loads fast", "[gpt2]") {
  TempDir d;
  const auto tok = tokenizer_of(d, random_vocab(7, 50000));
  REQUIRE(tok->vocab_size() == 50257);
  Checkpoint ck;
  ck.config.model = ModelConfig{1, 1, 8, 8, 50257};
  ck.config.data.tokenizer = "gpt2";
  ck.config.data.vocab = d.path;
  ck.params.assign(ParamLayout(ck.config.model).total(), 0.5f);
  ck.tokenizer = tok->serialize();
  INFO("description: " << ck.tokenizer.size() << " bytes");
  CHECK(ck.tokenizer.size() > 500000);  // about 1 MB, like GPT-2's
  save_checkpoint(d / "ck.bin", ck);
  const auto start = std::chrono::steady_clock::now();
  const Checkpoint back = load_checkpoint(d / "ck.bin");
  const auto rebuilt = make_tokenizer(back.tokenizer);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO("load and rebuild: " << seconds << " s");
  CHECK(seconds < 3.0);  // about 0.05 s on the development machine
  CHECK(back.tokenizer == ck.tokenizer);
  Rng rng(14);
  const std::string text = random_utf8(rng, 5000);
  CHECK(rebuilt->encode(text) == tok->encode(text));
}

// ----------------------------------------------------------------------------- datasets

TEST_CASE("gpt2: open_dataset encodes text and decodes .bin shards", "[gpt2]") {
  TempDir d;
  std::vector<std::string> words;  // those of generated_text, with and without a space
  for (const char* w : {"the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and",
                        "cat", "sat", "on", "mat", "with", "hat", "margin", "token", "support",
                        "barrier"})
    words.insert(words.end(), {std::string(" ") + w, w});
  const Gpt2Vocab v = vocab_of_words(words);
  write_gpt2_vocab(d.path, v);
  const std::string text = generated_text(3, 5000);
  write_file(d / "text.txt", text);
  DataConfig c;
  c.train = d / "text.txt";
  c.tokenizer = "gpt2";
  c.vocab = d.path;
  const Dataset ds = open_dataset(c, 16);
  REQUIRE(ds.tokenizer->kind() == "gpt2");
  const std::vector<int32_t> expect = ds.tokenizer->encode(text);
  CHECK(expect.size() < text.size() / 2);
  std::vector<int32_t> got(ds.train->size() + ds.val->size());
  ds.train->read(0, ds.train->size(), got.data());
  ds.val->read(0, ds.val->size(), got.data() + ds.train->size());
  CHECK(got == expect);

  // A checkpoint's description reads the same text without the files.
  const std::string desc = ds.tokenizer->serialize();
  std::filesystem::remove(d / "encoder.json");
  const Dataset fixed = open_dataset(c, 16, desc);
  CHECK(fixed.train->size() == ds.train->size());

  // .bin shards: the ids are the shard's, the gpt2 tokenizer decodes them.
  write_gpt2_vocab(d.path, v);
  const std::vector<int32_t> ids = ds.tokenizer->encode(text);
  write_file(d / "t.bin", encode_bin_shard(ids));
  c.train = d / "t.bin";
  const Dataset bin = open_dataset(c, 16);
  REQUIRE(bin.tokenizer->kind() == "gpt2");
  CHECK(bin.tokenizer->vocab_size() == static_cast<int>(v.tokens.size()));
  std::vector<int32_t> back(bin.train->size());
  bin.train->read(0, back.size(), back.data());
  CHECK(back == std::vector<int32_t>(ids.begin(), ids.begin() + back.size()));
  CHECK(text.rfind(bin.tokenizer->decode(back), 0) == 0);  // a prefix of the text
  CHECK(open_dataset(c, 16, desc).tokenizer->kind() == "gpt2");
  // An id outside the vocabulary is named, with the file.
  std::vector<int32_t> bad = ids;
  bad[40] = static_cast<int32_t>(v.tokens.size());
  write_file(d / "bad.bin", encode_bin_shard(bad));
  c.train = d / "bad.bin";
  const std::string msg = error_of<DataError>([&] { open_dataset(c, 16); });
  CHECK(contains(msg, "bad.bin"));
  CHECK(contains(msg, "holds token " + std::to_string(v.tokens.size())));
  CHECK(contains(error_of<DataError>([&] { open_dataset(c, 16, desc); }),
                 "outside the tokenizer's vocabulary"));
  // Without gpt2, a shard still gets the bin tokenizer.
  c.train = d / "t.bin";
  c.tokenizer = "byte";
  CHECK(open_dataset(c, 16).tokenizer->kind() == "bin");
}

// ------------------------------------------------------------------------------- errors

TEST_CASE("gpt2: a missing data.vocab or missing files are named", "[gpt2][errors]") {
  TempDir d;
  write_file(d / "text.txt", generated_text(3, 2000));
  DataConfig c;
  c.train = d / "text.txt";
  c.tokenizer = "gpt2";
  const std::string msg = error_of<ConfigError>([&] { open_dataset(c, 16); });
  CHECK(contains(msg, "data.vocab"));
  CHECK(contains(msg, "encoder.json and vocab.bpe"));
  c.vocab = d / "nowhere";
  std::string missing = error_of<DataError>([&] { open_dataset(c, 16); });
  CHECK(contains(missing, "'" + d / "nowhere/encoder.json" + "': No such file or directory"));
  CHECK(contains(missing, "scripts/get-data.sh --gpt2-vocab"));
  write_file(d / "encoder.json", encoder_json(vocab_of_merges({})));
  c.vocab = d.path;
  missing = error_of<DataError>([&] { open_dataset(c, 16); });
  CHECK(contains(missing, "'" + d / "vocab.bpe" + "': No such file or directory"));
}

TEST_CASE("gpt2: malformed encoder.json is named with its line, column or token",
          "[gpt2][errors]") {
  TempDir d;
  const Gpt2Vocab v = vocab_of_merges({{"a", "b"}});
  write_text(d / "vocab.bpe", vocab_bpe(v));
  const std::string good = encoder_json(v);
  const std::string path = d / "encoder.json";
  const auto error_with = [&](const std::string& json) {
    write_text(path, json);
    INFO("encoder.json: " << printable_excerpt(json, 80));
    const std::string msg = error_of<DataError>([&] { make_gpt2_tokenizer(d.path); });
    CHECK(contains(msg, path));
    return msg;
  };
  CHECK_NOTHROW(tokenizer_of(d, v));
  // JSON syntax: line and column.
  std::string msg = error_with("{\"\\u0100\": 0,\n \"a\\q\": 1}");
  CHECK(contains(msg, path + ":2:"));
  CHECK(contains(msg, "escape"));
  CHECK(contains(error_with(good.substr(0, good.size() / 2)), path + ":1:"));
  CHECK(contains(error_with("[1, 2]"), "one JSON object"));
  // Ids: a duplicate, a gap, a non-integer.
  std::string dup = good;
  const std::string last = ": " + std::to_string(v.tokens.size() - 1) + "}";
  dup.replace(dup.rfind(last), last.size(), ": 0}");
  msg = error_with(dup);
  CHECK(contains(msg, "both have id 0"));
  CHECK(contains(msg, "'<|endoftext|>'"));
  for (size_t beyond : {v.tokens.size(), v.tokens.size() + 5}) {  // one past the end, and more
    std::string gap = good;
    gap.replace(gap.rfind(last), last.size(), ": " + std::to_string(beyond) + "}");
    msg = error_with(gap);
    CHECK(contains(msg, "no token has id " + std::to_string(v.tokens.size() - 1)));
    CHECK(contains(msg, "'<|endoftext|>' has id " + std::to_string(beyond)));
  }
  std::string fraction = good;
  fraction.replace(fraction.rfind(last), last.size(), ": 1.5}");
  CHECK(contains(error_with(fraction), "must be an integer"));
  // A token string outside the byte alphabet (a raw space), the empty token, a repeated token.
  msg = error_with("{\"a b\": 0}");
  CHECK(contains(msg, "'a b'"));
  CHECK(contains(msg, "not in GPT-2's byte alphabet"));
  CHECK(contains(error_with("{\"\": 0}"), "empty string"));
  CHECK(contains(error_with("{\"a\": 0, \"a\": 1}"), "'a' is given twice"));
  // Every byte needs a token.
  write_text(d / "vocab.bpe", "#version: 0.2\n");
  msg = error_with("{\"a\": 0}");
  CHECK(contains(msg, "no token is the single byte 0"));
}

TEST_CASE("gpt2: malformed vocab.bpe is named with its line", "[gpt2][errors]") {
  TempDir d;
  const Gpt2Vocab v = vocab_of_merges({{"a", "b"}, {"ab", "c"}});
  write_text(d / "encoder.json", encoder_json(v));
  const std::string path = d / "vocab.bpe";
  const auto error_with = [&](const std::string& merges) {
    write_text(path, merges);
    INFO("vocab.bpe: " << printable_excerpt(merges, 80));
    return error_of<DataError>([&] { make_gpt2_tokenizer(d.path); });
  };
  write_text(path, "#version: 0.2\na b\nab c\n");
  CHECK_NOTHROW(make_gpt2_tokenizer(d.path));
  CHECK(contains(error_with("a b\nab c\n"), path + ":1: expected '#version: 0.2'"));
  std::string msg = error_with("#version: 0.2\na b\nb c\n");  // "bc" is no token
  CHECK(contains(msg, path + ":3:"));
  CHECK(contains(msg, "'bc', is not a token of encoder.json"));
  msg = error_with("#version: 0.2\na b\nabc\n");
  CHECK(contains(msg, path + ":3:"));
  CHECK(contains(msg, "two tokens, one space"));
  CHECK(contains(error_with("#version: 0.2\na  b\n"), path + ":2:"));
  msg = error_with("#version: 0.2\na b\nabd c\n");
  CHECK(contains(msg, path + ":3: 'abd' is not a token"));
  msg = error_with("#version: 0.2\na b\nab c\na b\n");
  CHECK(contains(msg, path + ":4:"));
  CHECK(contains(msg, "repeats line 2"));
  CHECK(contains(error_with("#version: 0.2\na\xC4 b\n"), path + ":2:"));  // bad UTF-8
}

TEST_CASE("gpt2: bad descriptions are named", "[gpt2][errors]") {
  TempDir d;
  const std::string desc = tokenizer_of(d, vocab_of_merges({{"a", "b"}}))->serialize();
  CHECK_NOTHROW(make_tokenizer(desc));
  const std::vector<std::string> bad = {
      "gpt2:",
      "gpt2:2\n258 1\n",
      "gpt2:1\n258\n",
      "gpt2:1\n99999999 1\n",
      desc.substr(0, desc.size() / 2),               // cut in the tokens
      desc.substr(0, desc.size() - 4),               // cut in the merges
      desc + "a b\n",                                // a merge more than counted
      "gpt2:1\n1 0\na\n",                            // bytes missing
  };
  for (const std::string& s : bad) {
    INFO("description: " << printable_excerpt(s, 60));
    CHECK(contains(error_of<DataError>([&] { make_tokenizer(s); }), "bad tokenizer description"));
  }
}

// ------------------------------------------------------------------ barrierlm tokenize

namespace {

// The names in dir (the test's own .stdout / .stderr aside), sorted.
std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name != ".stdout" && name != ".stderr") names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

// Waits (up to 20 s) until `path` exists; whether it does.
bool wait_for_file(const std::string& path) {
  for (int i = 0; i < 2000 && !std::filesystem::exists(path); ++i) usleep(10000);
  return std::filesystem::exists(path);
}

// `barrierlm tokenize - args...` in dir reading standard input from a pipe, with slices of 10
// bytes; returns its pid and the pipe's write end.
pid_t spawn_tokenize_of_pipe(const std::string& dir, const std::vector<std::string>& args,
                             int& pipe_in) {
  int fds[2];
  REQUIRE(pipe2(fds, O_CLOEXEC) == 0);  // the child keeps only the read end, as its stdin
  const int saved_stdin = dup(0);
  REQUIRE(dup2(fds[0], 0) == 0);
  std::vector<std::string> all = {"tokenize", "-"};
  all.insert(all.end(), args.begin(), args.end());
  const pid_t pid = spawn_barrierlm(dir, all, dir + "/.stdout", dir + "/.stderr",
                                    {{"BLM_TOKENIZE_SLICE_BYTES", "10"}});
  REQUIRE(dup2(saved_stdin, 0) == 0);
  close(saved_stdin);
  close(fds[0]);
  pipe_in = fds[1];
  return pid;
}

void write_all(int fd, const std::string& bytes) {
  REQUIRE(write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
}

}  // namespace

TEST_CASE("tokenize refuses an output that is one of its inputs", "[tokenize][errors]") {
  TempDir d;
  const std::string text = "hello world\n";
  write_file(d / "self.txt", text);
  const std::vector<std::string> byte = {"--tokenizer", "byte", "-q"};
  auto tokenize = [&](std::vector<std::string> args) {
    args.insert(args.begin(), "tokenize");
    args.insert(args.end(), byte.begin(), byte.end());
    return run(d.path, args);
  };
  check_error(tokenize({"self.txt", "-o", "self.txt"}), 1,
              {"input 'self.txt' is the file 'self.txt'", "choose another --out"});
  // Through another name: a link, and the directory spelt otherwise.
  std::filesystem::create_symlink("self.txt", d / "link.txt");
  check_error(tokenize({"link.txt", "-o", "./self.txt"}), 1,
              {"input 'link.txt' is the file './self.txt'"});
  // Standard input redirected from the output.
  const std::string in_dir = "cd '" + d.path + "' && ";
  check_error(run_shell(d.path, in_dir + binary() + " tokenize - -o self.txt --tokenizer byte "
                                                   "< self.txt"),
              1, {"input '-' (standard input) is the file 'self.txt'"});
  // With --shard-tokens, an input that is one of the names the shards could take.
  write_file(d / "t_000001.bin", text);
  check_error(tokenize({"self.txt", "t_000001.bin", "-o", "t.bin", "--shard-tokens", "4"}), 1,
              {"input 't_000001.bin' is the file './t_000001.bin'", "--out 't.bin'"});
  CHECK(slurp(d / "self.txt") == text);
  CHECK(slurp(d / "t_000001.bin") == text);
  CHECK(!std::filesystem::exists(d / "t_000000.bin"));
}

TEST_CASE("tokenize: an interrupted run removes the shards it wrote and exits 128 + signal",
          "[tokenize]") {
  for (const int sig : {SIGINT, SIGTERM}) {
    INFO("signal " << sig);
    TempDir d;
    int pipe_in = -1;
    const pid_t pid = spawn_tokenize_of_pipe(
        d.path, {"--tokenizer", "byte", "-o", "t.bin", "--shard-tokens", "10", "-q"}, pipe_in);
    write_all(pipe_in, std::string(105, 'x'));  // 10 full shards, then it waits for more
    const bool tenth_written = wait_for_file(d / "t_000009.bin");
    kill(pid, sig);
    close(pipe_in);  // the end of the text, in case the signal came before the read
    const Run r = finish(d.path, pid);
    INFO(r.out << r.err);
    REQUIRE(tenth_written);
    CHECK(r.rc == 128 + sig);
    CHECK(r.err == "interrupted: removed the 10 shards written\n");
    CHECK(names_in(d.path).empty());  // no shard, no temporary file
  }
}

TEST_CASE("tokenize: a run that fails removes the shards it wrote", "[tokenize][errors]") {
  TempDir d;
  int pipe_in = -1;
  const pid_t pid = spawn_tokenize_of_pipe(
      d.path, {"--tokenizer", "byte", "-o", "t.bin", "--shard-tokens", "10", "-q"}, pipe_in);
  write_all(pipe_in, std::string(25, 'x'));
  const bool second_written = wait_for_file(d / "t_000001.bin");
  std::filesystem::create_directory(d / "t_000002.bin");  // the third shard cannot be written
  write_all(pipe_in, std::string(10, 'x'));
  close(pipe_in);
  const Run r = finish(d.path, pid);
  REQUIRE(second_written);
  check_error(r, 1, {"t_000002.bin", "(removed the 2 shards written)"});
  CHECK(names_in(d.path) == std::vector<std::string>{"t_000002.bin"});
}

TEST_CASE("tokenize: a missing --vocab, a directory for -o and a pipe as input are named",
          "[tokenize][errors]") {
  TempDir d;
  write_file(d / "a.txt", "hello world\n");
  write_file(d / "file", "not a directory\n");
  check_error(run(d.path, {"tokenize", "a.txt", "-o", "x.bin", "--vocab", "nonexist"}), 1,
              {"--vocab 'nonexist' does not exist", "--gpt2-vocab", "--gpt2-model"});
  check_error(run(d.path, {"tokenize", "a.txt", "-o", "x.bin", "--vocab", "file"}), 1,
              {"--vocab 'file' is not a directory", "--gpt2-vocab"});
  // An output without a file name is refused before its directory is made.
  for (const std::string shard_tokens : {"0", "5"}) {
    check_error(run(d.path, {"tokenize", "a.txt", "-o", "newdir/", "--tokenizer", "byte",
                             "--shard-tokens", shard_tokens}),
                1, {"--out 'newdir/' ends in '/'", "such as 'newdir/train.bin'"});
    CHECK(!std::filesystem::exists(d / "newdir"));
    std::filesystem::create_directory(d / "olddir");
    check_error(run(d.path, {"tokenize", "a.txt", "-o", "olddir", "--tokenizer", "byte",
                             "--shard-tokens", shard_tokens}),
                1, {"--out 'olddir' is a directory", "such as 'olddir/train.bin'"});
    CHECK(names_in(d / "olddir").empty());
    CHECK(!std::filesystem::exists(d / "olddir_000000.bin"));
  }
  // A pipe (bash's <(...)) or a device: standard input reads it.
  const Run piped = run_shell(d.path, "cd '" + d.path + "' && bash -c '" + binary() +
                                          " tokenize <(cat a.txt) -o x.bin --tokenizer byte'");
  check_error(piped, 1, {"is not a regular file", "give - ", "| barrierlm tokenize -"});
  check_error(run(d.path, {"tokenize", "/dev/null", "-o", "x.bin", "--tokenizer", "byte"}), 1,
              {"input '/dev/null' is not a regular file", "give - "});
  CHECK(!std::filesystem::exists(d / "x.bin"));
}

TEST_CASE("tokenize: an empty input is no document, with either tokenizer", "[tokenize]") {
  TempDir d;
  write_word_vocab(d / "vocab");
  const auto tok = make_gpt2_tokenizer(d / "vocab");
  const int32_t eot = static_cast<int32_t>(tok->vocab_size()) - 1;
  REQUIRE(tok->decode_token(eot) == "<|endoftext|>");
  write_file(d / "empty.txt", "");
  const std::string text = generated_text(1, 300);
  write_file(d / "doc.txt", text);
  for (const std::string tokenizer : {"gpt2", "byte"}) {
    check_error(run(d.path, {"tokenize", "empty.txt", "-o", "x.bin", "--tokenizer", tokenizer,
                             "--vocab", "vocab"}),
                1, {"the inputs hold no text"});
    CHECK(!std::filesystem::exists(d / "x.bin"));
  }
  // Among other files an empty one adds nothing: no lone <|endoftext|>, as open_dataset reads
  // an empty text file as no tokens.
  REQUIRE(run(d.path, {"tokenize", "empty.txt", "doc.txt", "empty.txt", "-o", "docs.bin",
                       "--vocab", "vocab", "-q"})
              .rc == 0);
  std::vector<int32_t> expect = {eot};
  for (int32_t id : tok->encode(text)) expect.push_back(id);
  CHECK(slurp(d / "docs.bin") == encode_bin_shard(expect));
}
