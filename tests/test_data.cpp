// Tests of data/: UTF-8 decoding, the byte/char/bin tokenizers, text and .bin shard streams,
// open_dataset's errors and validation split, the batch sampler and the evaluation batches.
// Files are written to a fresh temporary directory; inputs are random draws from fixed seeds.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "data/utf8.h"
#include "tests/catch.h"
#include "tests/cli_util.h"

using namespace blm;

namespace {

// A temporary directory removed (with its files) at the end of the test.
struct TempDir {
  std::string path;
  std::vector<std::string> files;
  TempDir() {
    char tmpl[] = "/tmp/blm_test_data_XXXXXX";
    char* p = mkdtemp(tmpl);
    REQUIRE(p != nullptr);
    path = p;
  }
  ~TempDir() {
    for (const auto& f : files) std::remove(f.c_str());
    rmdir(path.c_str());
  }
  std::string write(const std::string& name, const std::string& bytes) {
    std::string f = path + "/" + name;
    std::ofstream out(f, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(out.good());
    files.push_back(f);
    return f;
  }
};

// The message of the DataError that f throws; fails the test if it throws nothing or another type.
template <class F>
std::string data_error_of(F&& f) {
  try {
    f();
  } catch (const DataError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected DataError, got another exception: " << e.what());
  }
  FAIL("expected DataError, nothing was thrown");
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string random_bytes(Rng& rng, size_t n) {
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng.below(256));
  return s;
}

// Printable ASCII text with newlines (valid UTF-8, many distinct characters).
std::string random_ascii(Rng& rng, size_t n) {
  std::string s(n, '\0');
  for (auto& c : s) c = rng.below(20) == 0 ? '\n' : static_cast<char>(' ' + rng.below(95));
  return s;
}

std::vector<int32_t> random_tokens(Rng& rng, size_t n, int vocab) {
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng.below(vocab));
  return t;
}

std::vector<int32_t> all_tokens(const TokenStream& s) {
  std::vector<int32_t> out(s.size());
  s.read(0, s.size(), out.data());
  return out;
}

DataConfig text_config(const std::string& train, const std::string& tokenizer = "byte") {
  DataConfig c;
  c.train = train;
  c.tokenizer = tokenizer;
  return c;
}

// The value of a well-formed sequence, computed from its bytes alone (no range tables).
uint32_t decode_by_value(const unsigned char* b, int len) {
  static const uint32_t lead_mask[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
  uint32_t cp = b[0] & lead_mask[len];
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (b[k] & 0x3F);
  return cp;
}

}  // namespace

// ------------------------------------------------------------------------------------ UTF-8

TEST_CASE("utf8: known encodings and every code point round trips", "[data][utf8]") {
  CHECK(utf8_encode(0x41) == "A");
  CHECK(utf8_encode(0xE9) == "\xC3\xA9");
  CHECK(utf8_encode(0x20AC) == "\xE2\x82\xAC");
  CHECK(utf8_encode(0x1F600) == "\xF0\x9F\x98\x80");
  for (uint32_t cp = 0; cp <= kMaxCodePoint; ++cp) {
    if (cp >= 0xD800 && cp <= 0xDFFF) continue;
    std::string s = utf8_encode(cp);
    size_t expected_len = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    size_t pos = 0;
    uint32_t back = 0;
    bool ok = utf8_next(s.data(), s.size(), pos, back);
    if (!ok || back != cp || pos != expected_len || s.size() != expected_len) {
      FAIL("code point " << cp << " does not round trip");
    }
  }
}

TEST_CASE("utf8: every 2- and 3-byte sequence is accepted exactly when well formed",
          "[data][utf8]") {
  // Reference: a sequence is well formed when its lead and continuation bytes have the right
  // shape and its value is neither overlong nor a surrogate (RFC 3629 section 3).
  for (uint32_t v = 0; v < (1u << 24); ++v) {
    unsigned char b[3] = {static_cast<unsigned char>(v >> 16), static_cast<unsigned char>(v >> 8),
                          static_cast<unsigned char>(v)};
    bool conts = (b[1] & 0xC0) == 0x80 && (b[2] & 0xC0) == 0x80;
    uint32_t cp3 = decode_by_value(b, 3);
    bool valid3 = (b[0] & 0xF0) == 0xE0 && conts && cp3 >= 0x800 && !(cp3 >= 0xD800 && cp3 <= 0xDFFF);
    bool valid2 = (b[0] & 0xE0) == 0xC0 && (b[1] & 0xC0) == 0x80 && decode_by_value(b, 2) >= 0x80;
    size_t pos = 0;
    uint32_t cp = 0;
    bool ok = utf8_next(reinterpret_cast<const char*>(b), 3, pos, cp);
    // Only leads of 2- and 3-byte forms are judged here; ASCII leads take one byte.
    if ((b[0] & 0xE0) == 0xC0) {
      if (ok != valid2 || (ok && (pos != 2 || cp != decode_by_value(b, 2))))
        FAIL("2-byte sequence " << std::hex << (v >> 8) << " judged wrongly");
    } else if ((b[0] & 0xF0) == 0xE0) {
      if (ok != valid3 || (ok && (pos != 3 || cp != cp3)))
        FAIL("3-byte sequence " << std::hex << v << " judged wrongly");
    } else if (b[0] >= 0x80 && b[0] < 0xC0) {
      if (ok) FAIL("stray continuation byte " << std::hex << int(b[0]) << " accepted");
    }
  }
}

TEST_CASE("utf8: random 4-byte sequences and truncations", "[data][utf8]") {
  Rng rng(11);
  int accepted = 0;
  for (int i = 0; i < 2000000; ++i) {
    unsigned char b[4] = {static_cast<unsigned char>(0xF0 + rng.below(16)),
                          static_cast<unsigned char>(rng.below(256)),
                          static_cast<unsigned char>(rng.below(256)),
                          static_cast<unsigned char>(rng.below(256))};
    if (rng.below(2)) {  // make continuation bytes likely, so valid forms are drawn often
      for (int k = 1; k < 4; ++k) b[k] = static_cast<unsigned char>(0x80 | (b[k] & 0x3F));
    }
    bool conts = (b[1] & 0xC0) == 0x80 && (b[2] & 0xC0) == 0x80 && (b[3] & 0xC0) == 0x80;
    uint32_t v = decode_by_value(b, 4);
    bool valid = b[0] <= 0xF7 && conts && v >= 0x10000 && v <= kMaxCodePoint;
    size_t pos = 0;
    uint32_t cp = 0;
    bool ok = utf8_next(reinterpret_cast<const char*>(b), 4, pos, cp);
    if (ok != valid || (ok && (cp != v || pos != 4))) FAIL("4-byte sequence judged wrongly");
    accepted += ok;
    if (ok) {  // every proper prefix of a valid sequence is truncated, hence rejected
      for (size_t n = 1; n < 4; ++n) {
        size_t p = 0;
        if (utf8_next(reinterpret_cast<const char*>(b), n, p, cp)) FAIL("truncated form accepted");
      }
    }
  }
  CHECK(accepted > 10000);  // the valid branch was exercised
}

// ------------------------------------------------------------------------------- tokenizers

TEST_CASE("byte tokenizer: token = byte, round trip of every byte value", "[data][tokenizer]") {
  Rng rng(1);
  std::string text = random_bytes(rng, 5000);
  for (int b = 0; b < 256; ++b) text += static_cast<char>(b);
  auto tok = make_tokenizer("byte");
  REQUIRE(tok->kind() == "byte");
  CHECK(tok->vocab_size() == 256);
  CHECK(tok->is_bytes());
  CHECK(tok->serialize() == "byte");
  std::vector<int32_t> ids = tok->encode(text);
  REQUIRE(ids.size() == text.size());
  for (size_t i = 0; i < text.size(); ++i) REQUIRE(ids[i] == static_cast<unsigned char>(text[i]));
  CHECK(tok->decode(ids) == text);
  CHECK(contains(data_error_of([&] { tok->decode_token(256); }), "256"));
  CHECK(contains(data_error_of([&] { tok->decode_token(-1); }), "-1"));
}

TEST_CASE("char tokenizer: sorted code points, multi-byte UTF-8 round trip", "[data][tokenizer]") {
  // a, newline, e-acute (2 bytes), euro (3 bytes), CJK (3 bytes), emoji (4 bytes)
  const std::vector<std::string> chars = {"a", "\n", "\xC3\xA9", "\xE2\x82\xAC", "\xE4\xB8\xAD",
                                          "\xF0\x9F\x98\x80", "z", " "};
  Rng rng(2);
  std::string text;
  for (int i = 0; i < 3000; ++i) text += chars[rng.below(chars.size())];
  for (const auto& c : chars) text += c;  // every character appears
  auto tok = make_char_tokenizer(text);
  REQUIRE(tok->kind() == "char");
  REQUIRE(tok->vocab_size() == 8);
  CHECK_FALSE(tok->is_bytes());
  // ids follow code-point order: \n < ' ' < a < z < e-acute < euro < CJK < emoji
  const std::vector<std::string> by_code_point = {"\n", " ", "a", "z", "\xC3\xA9", "\xE2\x82\xAC",
                                                  "\xE4\xB8\xAD", "\xF0\x9F\x98\x80"};
  for (int id = 0; id < 8; ++id) CHECK(tok->decode_token(id) == by_code_point[id]);
  std::vector<int32_t> ids = tok->encode(text);
  CHECK(ids.size() == 3008);  // one token per character
  CHECK(tok->decode(ids) == text);

  // The description rebuilds the same tokenizer.
  std::string desc = tok->serialize();
  CHECK(desc == "char:\n azé€中😀");
  auto again = make_tokenizer(desc);
  CHECK(again->kind() == "char");
  CHECK(again->serialize() == desc);
  CHECK(again->encode(text) == ids);
}

TEST_CASE("char tokenizer: unknown characters and bad UTF-8 are named", "[data][tokenizer]") {
  auto tok = make_char_tokenizer("abc\n");
  std::string msg = data_error_of([&] { tok->encode("ab\xC3\xBC"); });  // u-umlaut
  CHECK(contains(msg, "'\xC3\xBC' (U+00FC)"));
  CHECK(contains(msg, "byte 2"));
  msg = data_error_of([&] { tok->encode("a\t"); });
  CHECK(contains(msg, "U+0009"));
  CHECK(msg.find('\t') == std::string::npos);  // the message stays printable, one line
  CHECK(contains(data_error_of([&] { make_char_tokenizer("ab\x80"); }), "invalid UTF-8 at byte 2"));
  CHECK(contains(data_error_of([&] { make_char_tokenizer("a\xED\xA0\x80"); }), "at byte 1"));  // surrogate
  CHECK(contains(data_error_of([&] { make_char_tokenizer("\xC0\xAF"); }), "at byte 0"));  // overlong
  CHECK(contains(data_error_of([&] { tok->encode("ab\xE2\x82"); }), "invalid UTF-8 at byte 2"));
  CHECK(contains(data_error_of([&] { tok->decode_token(4); }), "4"));
}

TEST_CASE("bin tokenizer and bad tokenizer descriptions", "[data][tokenizer]") {
  auto tok = make_tokenizer("bin:50257");
  REQUIRE(tok->kind() == "bin");
  CHECK(tok->vocab_size() == 50257);
  CHECK(tok->serialize() == "bin:50257");
  Rng rng(3);
  std::vector<int32_t> ids = random_tokens(rng, 500, 50257);
  std::string text = tok->decode(ids);
  CHECK(tok->decode_token(ids[0]) == "<" + std::to_string(ids[0]) + ">");
  CHECK(tok->encode(text) == ids);
  CHECK(contains(data_error_of([&] { tok->encode("<12>hello"); }), "at byte 4"));
  CHECK(contains(data_error_of([&] { tok->encode("<50257>"); }), "50257"));
  CHECK(contains(data_error_of([&] { tok->decode_token(50257); }), "50257"));

  for (const std::string bad : {"", "bytes", "bin:", "bin:0", "bin:x1", "bin:70000", "char:",
                                "char:ba", "char:aa", "char:\xFF"}) {
    std::string msg = data_error_of([&] { make_tokenizer(bad); });
    CHECK(contains(msg, "bad tokenizer description"));
  }
}

// ----------------------------------------------------------------------------- .bin shards

TEST_CASE(".bin shard: written tokens read back, auto-detected, vocab from max", "[data][bin]") {
  TempDir dir;
  Rng rng(4);
  std::vector<int32_t> train = random_tokens(rng, 3000, 65536);
  std::vector<int32_t> val = random_tokens(rng, 700, 1000);
  train[17] = 65535;  // the largest uint16 survives (no sign trouble)
  DataConfig c;
  c.train = dir.write("train.bin", encode_bin_shard(train));
  c.val = dir.write("val.bin", encode_bin_shard(val));
  for (std::string format : {"auto", "bin"}) {
    c.format = format;
    Dataset ds = open_dataset(c, 64);
    REQUIRE(ds.tokenizer->kind() == "bin");
    CHECK(ds.tokenizer->vocab_size() == 65536);
    CHECK(all_tokens(*ds.train) == train);
    CHECK(all_tokens(*ds.val) == val);
    CHECK(ds.train->at(17) == 65535);
  }
  // The byte layout itself: header ints little-endian, then uint16 little-endian tokens.
  std::string bytes = encode_bin_shard({0x1234, 7});
  REQUIRE(bytes.size() == 1024 + 4);
  CHECK(bytes.substr(0, 12) == std::string("\x88\xD8\x34\x01\x01\x00\x00\x00\x02\x00\x00\x00", 12));
  CHECK(bytes.substr(1024) == std::string("\x34\x12\x07\x00", 4));
  // A fixed vocabulary smaller than the data's ids is refused, naming the token.
  std::string msg = data_error_of([&] { open_dataset(c, 64, "bin:1000"); });
  CHECK(contains(msg, "'" + c.train + "'"));
  CHECK(contains(msg, "65535"));
  // A .bin shard is no text: a byte tokenizer from a checkpoint does not read it.
  CHECK(contains(data_error_of([&] { open_dataset(c, 64, "byte"); }), "'byte'"));
}

TEST_CASE(".bin shard: size mismatch, bad magic and bad version are named", "[data][bin]") {
  TempDir dir;
  Rng rng(5);
  std::string good = encode_bin_shard(random_tokens(rng, 500, 300));  // header says 500 tokens
  DataConfig c;
  c.format = "bin";

  c.train = dir.write("short.bin", good.substr(0, good.size() - 2));  // 499 tokens' bytes
  std::string msg = data_error_of([&] { open_dataset(c, 16); });
  CHECK(contains(msg, "'" + c.train + "'"));
  CHECK(contains(msg, "500 tokens"));
  CHECK(contains(msg, std::to_string(good.size() - 2) + " bytes"));

  c.train = dir.write("long.bin", good + "xy");
  msg = data_error_of([&] { open_dataset(c, 16); });
  CHECK(contains(msg, std::to_string(good.size() + 2) + " bytes"));

  std::string bad_magic = good;
  bad_magic[0] = 0x39;  // the low byte of the magic was 0x88
  c.train = dir.write("magic.bin", bad_magic);
  msg = data_error_of([&] { open_dataset(c, 16); });
  CHECK(contains(msg, "'" + c.train + "'"));
  CHECK(contains(msg, "magic number " + std::to_string(kShardMagic - 0x88 + 0x39)));
  CHECK(contains(msg, "20240520"));
  // Under "auto" the same file is not a shard at all, so it reads as text.
  c.format = "auto";
  CHECK(open_dataset(c, 16).tokenizer->kind() == "byte");
  c.format = "bin";

  std::string bad_version = good;
  bad_version[4] = 2;
  c.train = dir.write("version.bin", bad_version);
  msg = data_error_of([&] { open_dataset(c, 16); });
  CHECK(contains(msg, "version 2"));

  c.train = dir.write("tiny.bin", good.substr(0, 100));
  CHECK(contains(data_error_of([&] { open_dataset(c, 16); }), "100 bytes"));
}

// --------------------------------------------------------------------------- open_dataset

TEST_CASE("open_dataset: missing file, too-short file, bad keys", "[data][errors]") {
  TempDir dir;
  DataConfig c = text_config(dir.path + "/nope.txt");
  CHECK(data_error_of([&] { open_dataset(c, 128); }) ==
        "cannot open data file '" + dir.path + "/nope.txt': No such file or directory");

  Rng rng(6);
  c.train = dir.write("short.txt", random_ascii(rng, 10));
  CHECK(data_error_of([&] { open_dataset(c, 128); }) ==
        "data file '" + c.train + "' has 10 tokens; need at least 129 (seq_len + 1)");
  // With a val file the val file is checked too.
  c.train = dir.write("long.txt", random_ascii(rng, 500));
  c.val = dir.write("short_val.txt", random_ascii(rng, 100));
  CHECK(data_error_of([&] { open_dataset(c, 128); }) ==
        "data file '" + c.val + "' has 100 tokens; need at least 129 (seq_len + 1)");
  // The char tokenizer counts characters, not bytes: 60 two-byte characters are 60 tokens.
  std::string two_byte;
  for (int i = 0; i < 60; ++i) two_byte += i % 2 ? "\xC3\xA9" : "\xC3\xB1";
  c = text_config(dir.write("chars.txt", two_byte), "char");
  c.val = c.train;
  CHECK(contains(data_error_of([&] { open_dataset(c, 100); }), "has 60 tokens"));
  CHECK_NOTHROW(open_dataset(c, 59));

  c = text_config(dir.path, "byte");
  CHECK(contains(data_error_of([&] { open_dataset(c, 8); }), "is not a regular file"));
  c = text_config(dir.write("ok.txt", random_ascii(rng, 300)), "bpe");
  CHECK(contains(data_error_of([&] { open_dataset(c, 8); }), "data.tokenizer"));
  c.tokenizer = "byte";
  c.format = "csv";
  CHECK(contains(data_error_of([&] { open_dataset(c, 8); }), "data.format"));
  c.format = "auto";
  c.val_fraction = 1.0;
  CHECK(contains(data_error_of([&] { open_dataset(c, 8); }), "data.val_fraction"));
  c.val_fraction = 0.1;
  c.train = "";
  CHECK(contains(data_error_of([&] { open_dataset(c, 8); }), "data.train"));
}

TEST_CASE("open_dataset: validation split is the last val_fraction of train", "[data][split]") {
  TempDir dir;
  Rng rng(7);
  std::string text = random_bytes(rng, 1000);
  DataConfig c = text_config(dir.write("train.txt", text));
  c.val_fraction = 0.1;
  Dataset ds = open_dataset(c, 32);
  REQUIRE(ds.tokenizer->kind() == "byte");
  REQUIRE(ds.train->size() == 900);
  REQUIRE(ds.val->size() == 100);
  std::vector<int32_t> expect = ds.tokenizer->encode(text);
  std::vector<int32_t> got = all_tokens(*ds.train), got_val = all_tokens(*ds.val);
  CHECK(got == std::vector<int32_t>(expect.begin(), expect.begin() + 900));
  CHECK(got_val == std::vector<int32_t>(expect.begin() + 900, expect.end()));
  CHECK(ds.val->at(0) == static_cast<unsigned char>(text[900]));

  c.val_fraction = 0.25;  // 250 tokens of val
  ds = open_dataset(c, 32);
  CHECK(ds.train->size() == 750);
  CHECK(ds.val->size() == 250);

  // A split too small for one window says which part and how to fix it.
  c.val_fraction = 0.05;  // 50 tokens
  std::string msg = data_error_of([&] { open_dataset(c, 64); });
  CHECK(contains(msg, "validation part"));
  CHECK(contains(msg, "has 50 tokens; need at least 65"));
}

TEST_CASE("open_dataset: char tokenizer over UTF-8 files, split at a character", "[data][split]") {
  TempDir dir;
  const std::vector<std::string> chars = {"x", "\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\n"};
  Rng rng(8);
  std::vector<std::string> picked;
  std::string text;
  for (int i = 0; i < 400; ++i) {
    picked.push_back(chars[rng.below(chars.size())]);
    text += picked.back();
  }
  DataConfig c = text_config(dir.write("utf8.txt", text), "char");
  c.val_fraction = 0.1;
  Dataset ds = open_dataset(c, 16);
  REQUIRE(ds.tokenizer->kind() == "char");
  CHECK(ds.train->size() == 360);  // characters, not bytes
  CHECK(ds.val->size() == 40);
  std::string val_text;
  for (int i = 360; i < 400; ++i) val_text += picked[i];
  CHECK(ds.tokenizer->decode(all_tokens(*ds.val)) == val_text);
  CHECK(ds.tokenizer->decode(all_tokens(*ds.train)) + val_text == text);

  // A val file with a character the training text lacks: named, with the file.
  c.val = dir.write("val.txt", "xx\xC3\xBC" + std::string(40, 'x'));
  std::string msg = data_error_of([&] { open_dataset(c, 16); });
  CHECK(contains(msg, "'" + c.val + "'"));
  CHECK(contains(msg, "U+00FC"));
  // The tokenizer of a checkpoint is used as given (not rebuilt from the new text).
  c.val = "";
  Dataset fixed = open_dataset(c, 16, ds.tokenizer->serialize());
  CHECK(fixed.tokenizer->serialize() == ds.tokenizer->serialize());
  CHECK(all_tokens(*fixed.train) == all_tokens(*ds.train));
  // A checkpoint's vocabulary without e-acute cannot read this text.
  std::string msg2 = data_error_of([&] { open_dataset(c, 16, "char:\nx\xE2\x82\xAC\xF0\x9F\x98\x80"); });
  CHECK(contains(msg2, "'\xC3\xA9' (U+00E9)"));
  CHECK(contains(msg2, "'" + c.train + "'"));
  CHECK(contains(data_error_of([&] { open_dataset(c, 16, "bin:100"); }), "'bin'"));
}

// ---------------------------------------------------------------------------- the sampler

TEST_CASE("sampler: windows are deterministic in (seed, step, row) and rows independent",
          "[data][sampler]") {
  Rng rng(9);
  std::vector<int32_t> tokens = random_tokens(rng, 5000, 50000);
  auto stream = make_memory_stream(tokens);
  const int T = 24;
  BatchSampler a(stream, T, 1234), b(stream, T, 1234), other(stream, T, 1235);
  std::vector<int32_t> x4, y4, x2, y2, x, y;
  for (int64_t step : {0, 1, 7, 123456789}) {
    a.sample(step, 0, 4, x4, y4);
    REQUIRE(x4.size() == 4 * T);
    REQUIRE(y4.size() == 4 * T);
    // Each row is the stream window at the row's offset, targets shifted by one.
    for (int r = 0; r < 4; ++r) {
      size_t off = a.offset(step, r);
      REQUIRE(off + T + 1 <= tokens.size());
      for (int t = 0; t < T; ++t) {
        REQUIRE(x4[r * T + t] == tokens[off + t]);
        REQUIRE(y4[r * T + t] == tokens[off + t + 1]);
      }
    }
    // A second sampler (a resumed run) draws the same batch.
    b.sample(step, 0, 4, x, y);
    CHECK(x == x4);
    CHECK(y == y4);
    // Rows [2, 4) of the batch of 4 are the batch of 2 that starts at row 2.
    b.sample(step, 2, 2, x2, y2);
    CHECK(x2 == std::vector<int32_t>(x4.begin() + 2 * T, x4.end()));
    CHECK(y2 == std::vector<int32_t>(y4.begin() + 2 * T, y4.end()));
    // Another seed draws other windows.
    other.sample(step, 0, 4, x, y);
    CHECK(x != x4);
  }
  // Steps differ from each other, and rows within a step.
  CHECK(a.offset(1, 0) != a.offset(2, 0));
  CHECK(a.offset(1, 0) != a.offset(1, 1));
}

TEST_CASE("sampler: offsets cover [0, N - T) uniformly", "[data][sampler]") {
  const int T = 10;
  const size_t starts = 7;  // N = T + 7 tokens: offsets 0..6
  auto stream = make_memory_stream(std::vector<int32_t>(T + starts, 1));
  BatchSampler s(stream, T, 42);
  std::vector<int> count(starts, 0);
  const int draws = 70000;
  for (int i = 0; i < draws; ++i) {
    size_t off = s.offset(i / 8, i % 8);
    REQUIRE(off < starts);
    ++count[off];
  }
  // Each offset expects 10000 draws, standard deviation sqrt(10000 * 6/7) ~ 93: allow 5 sigma.
  for (size_t k = 0; k < starts; ++k) CHECK(std::abs(count[k] - 10000) < 465);

  // The smallest usable stream (seq_len + 1 tokens) has one window; a shorter one is refused.
  BatchSampler one(make_memory_stream({5, 6, 7}), 2, 1);
  std::vector<int32_t> x, y;
  one.sample(99, 0, 3, x, y);
  CHECK(x == std::vector<int32_t>({5, 6, 5, 6, 5, 6}));
  CHECK(y == std::vector<int32_t>({6, 7, 6, 7, 6, 7}));
  CHECK(contains(data_error_of([&] { BatchSampler too_short(make_memory_stream({1, 2}), 2, 1); }),
                 "need at least 3"));
}

TEST_CASE("eval batches: consecutive, non-overlapping, deterministic", "[data][eval]") {
  Rng rng(10);
  const int T = 16, B = 4;
  std::vector<int32_t> tokens = random_tokens(rng, 1000, 256);
  auto stream = make_memory_stream(tokens);
  // (1000 - 1) / 16 = 62 windows, 15 full batches of 4.
  REQUIRE(eval_batch_count(*stream, T, B) == 15);
  std::set<size_t> predicted;  // stream positions of all targets
  std::vector<int32_t> x, y, x2, y2;
  for (int i = 0; i < 15; ++i) {
    REQUIRE(eval_batch(*stream, T, B, i, x, y));
    REQUIRE(x.size() == B * T);
    for (int r = 0; r < B; ++r) {
      size_t start = (static_cast<size_t>(i) * B + r) * T;
      for (int t = 0; t < T; ++t) {
        REQUIRE(x[r * T + t] == tokens[start + t]);
        REQUIRE(y[r * T + t] == tokens[start + t + 1]);
        REQUIRE(predicted.insert(start + t + 1).second);  // no target is seen twice
      }
    }
    REQUIRE(eval_batch(*stream, T, B, i, x2, y2));  // the same every time
    CHECK(x2 == x);
    CHECK(y2 == y);
  }
  CHECK(predicted.size() == 15 * B * T);
  CHECK(*predicted.begin() == 1);
  CHECK(*predicted.rbegin() == 15 * B * T);  // contiguous from the start
  CHECK_FALSE(eval_batch(*stream, T, B, 15, x, y));
  CHECK_FALSE(eval_batch(*stream, T, B, -1, x, y));
  // Exactly k*B windows + 1 token: the last window still fits.
  auto exact = make_memory_stream(std::vector<int32_t>(2 * B * T + 1, 3));
  CHECK(eval_batch_count(*exact, T, B) == 2);
  auto one_short = make_memory_stream(std::vector<int32_t>(2 * B * T, 3));
  CHECK(eval_batch_count(*one_short, T, B) == 1);
}

TEST_CASE("streams: slices and reads past the end", "[data][stream]") {
  Rng rng(12);
  std::vector<int32_t> tokens = random_tokens(rng, 100, 1000);
  auto s = slice_stream(make_memory_stream(tokens), 10, 60);
  REQUIRE(s->size() == 50);
  CHECK(s->at(0) == tokens[10]);
  CHECK(s->at(49) == tokens[59]);
  std::vector<int32_t> out(5);
  s->read(45, 5, out.data());
  CHECK(out == std::vector<int32_t>(tokens.begin() + 55, tokens.begin() + 60));
  CHECK_THROWS_AS(s->read(46, 5, out.data()), std::out_of_range);
  CHECK_THROWS_AS(s->at(50), std::out_of_range);
  CHECK_THROWS_AS(slice_stream(s, 10, 51), std::out_of_range);
}

TEST_CASE("streams: concatenated streams read across their parts, empty parts included",
          "[data][stream]") {
  Rng rng(31);
  const std::vector<int32_t> a = random_tokens(rng, 37, 1000), c = random_tokens(rng, 50, 1000);
  std::vector<int32_t> whole = a;
  whole.insert(whole.end(), c.begin(), c.end());
  auto s = concat_streams({make_memory_stream(a), make_memory_stream({}), make_memory_stream(c)});
  REQUIRE(s->size() == whole.size());
  CHECK(all_tokens(*s) == whole);
  for (size_t i = 0; i < whole.size(); ++i) REQUIRE(s->at(i) == whole[i]);
  // Every window, the ones that span the join among them.
  std::vector<int32_t> out(9);
  for (size_t start = 0; start + out.size() <= whole.size(); ++start) {
    s->read(start, out.size(), out.data());
    REQUIRE(out == std::vector<int32_t>(whole.begin() + start, whole.begin() + start + 9));
  }
  CHECK_THROWS_AS(s->read(80, 8, out.data()), std::out_of_range);
  CHECK_THROWS_AS(s->at(whole.size()), std::out_of_range);
}

TEST_CASE("open_dataset: a glob pattern reads its files as one stream, in name order",
          "[data][files]") {
  TempDir d;
  Rng rng(32);
  // Text: written out of name order, read in it.
  const std::string t2 = random_ascii(rng, 300), t1 = random_ascii(rng, 200) + "\xC3\xA9",
                    t3 = random_ascii(rng, 250);
  d.write("part_2.txt", t2);
  d.write("part_1.txt", t1);
  d.write("part_3.txt", t3);
  d.write("other.txt", "not part of the pattern");
  DataConfig c = text_config(d.path + "/part_*.txt");
  c.val_fraction = 0.25;
  Dataset ds = open_dataset(c, 16);
  const std::string joined = t1 + t2 + t3;
  std::vector<int32_t> got = all_tokens(*ds.train), val = all_tokens(*ds.val);
  got.insert(got.end(), val.begin(), val.end());
  std::string back;  // the byte tokens as text (a char may be signed)
  for (int32_t t : got) back += static_cast<char>(t);
  CHECK(back == joined);
  CHECK(expand_data_files(c.train, "data.train") ==
        std::vector<std::string>{d.path + "/part_1.txt", d.path + "/part_2.txt",
                                 d.path + "/part_3.txt"});

  // The char tokenizer's vocabulary holds every file's characters (é is only in part_1).
  c.tokenizer = "char";
  ds = open_dataset(c, 16);
  CHECK(ds.tokenizer->decode(ds.tokenizer->encode("\xC3\xA9")) == "\xC3\xA9");
  CHECK(ds.train->size() + ds.val->size() == joined.size() - 1);  // é: 2 bytes, 1 character

  // Shards, train and val each a pattern; one shard empty.
  const std::vector<int32_t> s1 = random_tokens(rng, 100, 500), s2 = random_tokens(rng, 80, 700);
  d.write("train_000.bin", encode_bin_shard(s1));
  d.write("train_001.bin", encode_bin_shard({}));
  d.write("train_002.bin", encode_bin_shard(s2));
  d.write("val_000.bin", encode_bin_shard(random_tokens(rng, 40, 900)));
  DataConfig b;
  b.train = d.path + "/train_*.bin";
  b.val = d.path + "/val_0?0.bin";
  ds = open_dataset(b, 16);
  std::vector<int32_t> shards = s1;
  shards.insert(shards.end(), s2.begin(), s2.end());
  CHECK(all_tokens(*ds.train) == shards);
  CHECK(ds.val->size() == 40);
  // The bin tokenizer's vocabulary covers the largest id of every file, val's too.
  int32_t largest = 0;
  for (int32_t t : shards) largest = std::max(largest, t);
  for (int32_t t : all_tokens(*ds.val)) largest = std::max(largest, t);
  CHECK(ds.tokenizer->vocab_size() == largest + 1);
  // The batch sampler draws windows over the whole stream (some span the join of two files).
  BatchSampler sampler(ds.train, 16, 7);
  std::vector<int32_t> in, tg;
  for (int64_t step = 0; step < 50; ++step) {
    sampler.sample(step, 0, 4, in, tg);
    for (int r = 0; r < 4; ++r) {
      const size_t off = sampler.offset(step, r);
      REQUIRE(std::equal(in.begin() + 16 * r, in.begin() + 16 * (r + 1), shards.begin() + off));
    }
  }
}

TEST_CASE("open_dataset: file patterns that match nothing or mix formats are named",
          "[data][files][errors]") {
  TempDir d;
  Rng rng(33);
  d.write("a_1.txt", random_ascii(rng, 200));
  d.write("a_2.bin", encode_bin_shard(random_tokens(rng, 100, 50)));
  std::string msg =
      data_error_of([&] { open_dataset(text_config(d.path + "/nothing_*.bin"), 16); });
  CHECK(contains(msg, "data.train"));
  CHECK(contains(msg, "no file matches the pattern '" + d.path + "/nothing_*.bin'"));
  DataConfig c = text_config(d.path + "/a_1.txt");
  c.val = d.path + "/b_*";
  msg = data_error_of([&] { open_dataset(c, 16); });
  CHECK(contains(msg, "data.val"));
  CHECK(contains(msg, "b_*"));
  msg = data_error_of([&] { open_dataset(text_config(d.path + "/a_*"), 16); });
  CHECK(contains(msg, "a_2.bin' is a .bin shard but '" + d.path + "/a_1.txt' is text"));
  CHECK(contains(msg, "data.train"));
  // Too short: the message names the pattern and how many files it matched.
  d.write("short_1.txt", "abc");
  d.write("short_2.txt", "def");
  c = text_config(d.path + "/short_*.txt");
  c.val = d.path + "/a_1.txt";
  msg = data_error_of([&] { open_dataset(c, 16); });
  CHECK(contains(msg, "the 2 data files of '" + d.path + "/short_*.txt' have 6 tokens"));
  // A file whose name has wildcard characters is that file, not a pattern.
  const std::string odd = d.write("odd[1]*.txt", random_ascii(rng, 200));
  CHECK(expand_data_files(odd, "data.train") == std::vector<std::string>{odd});
  CHECK(open_dataset(text_config(odd), 16).train->size() == 180);
}

TEST_CASE("open_dataset: an empty text file is no tokens with every tokenizer", "[data][files]") {
  TempDir d;
  Rng rng(34);
  const std::string text = random_ascii(rng, 200);
  d.write("doc_1.txt", text);
  d.write("doc_2.txt", "");
  DataConfig c = text_config(d.path + "/doc_*.txt");
  c.val = d.path + "/doc_1.txt";
  for (const std::string tokenizer : {"byte", "char"}) {
    INFO("tokenizer " << tokenizer);
    c.tokenizer = tokenizer;
    const Dataset ds = open_dataset(c, 16);
    CHECK(ds.train->size() == text.size());  // ASCII: a byte and a character each
    CHECK(ds.tokenizer->decode(all_tokens(*ds.train)) == text);
  }
  // Only a training text with no characters at all leaves the char tokenizer without a
  // vocabulary.
  c = text_config(d.path + "/doc_2.txt", "char");
  c.val = d.path + "/doc_1.txt";
  CHECK(data_error_of([&] { open_dataset(c, 16); }) ==
        "data file '" + d.path + "/doc_2.txt' has no text (char tokenizer: no characters to make "
        "the vocabulary of)");
}

TEST_CASE("open_dataset: val_fraction 0 is refused only when it is used", "[data][split]") {
  TempDir d;
  Rng rng(35);
  DataConfig c = text_config(d.write("train.txt", random_ascii(rng, 300)));
  c.val_fraction = 0.0;
  CHECK(contains(data_error_of([&] { open_dataset(c, 16); }),
                 "data.val_fraction must be in (0, 1) when data.val is empty (got 0)"));
  c.val = d.write("val.txt", random_ascii(rng, 100));
  CHECK(open_dataset(c, 16).train->size() == 300);  // the whole file: nothing held out
}

// tokenize compares its inputs with its output through cli_checks.h's same_file, as eval, bench,
// margins, export and report do: a hard link is the same file under another name.
TEST_CASE("tokenize refuses an --out hard-linked to one of its inputs", "[data][tokenize]") {
  test::TempDir d;
  const std::string text = "hello world\n";
  test::write_file(d / "in.txt", text);
  REQUIRE(link((d / "in.txt").c_str(), (d / "out.bin").c_str()) == 0);
  const test::Run r =
      test::run(d.path, {"tokenize", "in.txt", "-o", "out.bin", "--tokenizer", "byte", "-q"});
  test::check_error(r, 1, {"input 'in.txt' is the file 'out.bin'", "choose another --out"});
  CHECK(test::slurp(d / "in.txt") == text);
}
