// Randomised robustness test of the two readers of user files, load_checkpoint and parse_config
// (and apply_override): a few thousand mutations of valid inputs (bit flips, random bytes,
// truncations, deletions, insertions of random or YAML-significant text, duplicated chunks, and
// random or extreme integers written over length fields).  Half of the damaged checkpoints are
// resealed (file length and checksum fixed) so the section parser itself meets the damage.
// The only acceptable outcomes: success, or the reader's own blm::Error subclass with a one-line
// message.  Anything else (another exception, a crash, a sanitizer report) is a defect.
//
// Seeded, so a failure reproduces; the failing input is printed escaped.  Build with
// -DBARRIERLM_SANITIZE=ON to run it under AddressSanitizer and UBSan.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/params.h"
#include "core/rng.h"
#include "tests/catch.h"

using namespace blm;

namespace {

std::string escaped(const std::string& s) {
  std::string out;
  for (unsigned char ch : s) {
    if (ch >= 0x20 && ch < 0x7f && ch != '\\') {
      out += static_cast<char>(ch);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", ch);
      out += buf;
    }
  }
  return out;
}

void set_le(std::string& b, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n && at + i < b.size(); ++i) b[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

uint64_t get_le(const std::string& b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(b[at + i])) << (8 * i);
  return v;
}

uint64_t fnv1a(const std::string& b, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<unsigned char>(b[i])) * 0x100000001b3ull;
  return h;
}

// Integers that break careless length handling.
uint64_t interesting_integer(Rng& rng, uint64_t size) {
  const uint64_t choices[] = {0,           1,           2,          3,         7,          8,
                              255,         256,         65535,      size,      size - 1,   size + 1,
                              size / 2,    0x7fffffff,  0x80000000, 0xffffffff, 1ull << 32, 1ull << 62,
                              1ull << 63,  ~0ull,       ~0ull - 7,  rng.next(), rng.below(size + 16)};
  return choices[rng.below(sizeof choices / sizeof choices[0])];
}

// One random edit of b.  fields: offsets of integer fields worth hitting (length fields).
void mutate_once(Rng& rng, std::string& b, const std::vector<std::string>& tokens, const std::vector<size_t>& fields) {
  const size_t n = b.size();
  const auto pos = [&](size_t extra = 0) { return static_cast<size_t>(rng.below(n + extra)); };
  switch (rng.below(10)) {
    case 0:  // flip one bit
      if (n) b[pos()] ^= static_cast<char>(1 << rng.below(8));
      break;
    case 1:  // a random byte
      if (n) b[pos()] = static_cast<char>(rng.below(256));
      break;
    case 2:  // truncate
      b.resize(pos(1));
      break;
    case 3: {  // delete a range
      if (!n) break;
      const size_t at = pos();
      b.erase(at, 1 + rng.below(std::min<size_t>(64, n - at)));
      break;
    }
    case 4: {  // insert random bytes
      std::string ins(1 + rng.below(16), '\0');
      for (char& ch : ins) ch = static_cast<char>(rng.below(256));
      b.insert(pos(1), ins);
      break;
    }
    case 5:  // insert a token
      b.insert(pos(1), tokens[rng.below(tokens.size())]);
      break;
    case 6: {  // copy a chunk elsewhere
      if (!n) break;
      const size_t from = pos(), len = 1 + rng.below(std::min<size_t>(128, n - from));
      b.insert(pos(1), b.substr(from, len));
      break;
    }
    case 7:
    case 8: {  // an extreme integer over a length field (or anywhere)
      const bool on_field = !fields.empty() && rng.below(4) != 0;
      const size_t at = on_field ? fields[rng.below(fields.size())] : pos();
      set_le(b, at, interesting_integer(rng, n), rng.below(2) ? 8 : 4);
      break;
    }
    default:  // replace a token's worth of bytes
      if (n) {
        const std::string& t = tokens[rng.below(tokens.size())];
        b.replace(pos(), std::min(t.size(), n), t);
      }
      break;
  }
}

std::string mutate(Rng& rng, std::string b, const std::vector<std::string>& tokens,
                   const std::vector<size_t>& fields = {}) {
  const int edits = 1 + static_cast<int>(rng.below(4));
  for (int i = 0; i < edits; ++i) mutate_once(rng, b, tokens, fields);
  return b;
}

// Runs f and accepts success or an E with a one-line message; fails on anything else.
template <class E, class F>
bool survives(F&& f, const std::string& input, int iteration) {
  try {
    f();
    return true;
  } catch (const E& e) {
    const std::string msg = e.what();
    if (msg.find('\n') != std::string::npos || msg.empty()) {
      FAIL_CHECK("iteration " << iteration << ": message is not one line: " << escaped(msg)
                              << "\ninput: " << escaped(input));
      return false;
    }
    return true;
  } catch (const std::exception& e) {
    FAIL_CHECK("iteration " << iteration << ": unexpected exception: " << e.what() << "\ninput: " << escaped(input));
  } catch (...) {
    FAIL_CHECK("iteration " << iteration << ": unexpected non-standard exception\ninput: " << escaped(input));
  }
  return false;
}

// The offsets of the checkpoint's integer fields: file length, section lengths, the tensor
// count, the first tensor's name length and rank, the moment count.
std::vector<size_t> length_fields(const std::string& b) {
  std::vector<size_t> fields = {8, 12, 16};
  for (size_t pos = 24; pos + 20 < b.size();) {
    fields.push_back(pos + 4);
    const std::string tag = b.substr(pos, 4);
    const size_t payload = pos + 12;
    if (tag == "TENS") {
      fields.push_back(payload);
      fields.push_back(payload + 4);
      const size_t name_length = static_cast<size_t>(get_le(b, payload + 4, 4));
      fields.push_back(payload + 8 + name_length);
      fields.push_back(payload + 8 + name_length + 4);
    }
    if (tag == "ADAM") fields.push_back(payload);
    pos = payload + static_cast<size_t>(get_le(b, pos + 4, 8));
  }
  fields.push_back(b.size() - 16);
  return fields;
}

}  // namespace

TEST_CASE("load_checkpoint survives thousands of damaged files", "[fuzz]") {
  Checkpoint ck;
  ck.config.model = ModelConfig{1, 1, 4, 4, 5};  // small, so edits land in every part
  ck.config.barrier.lambda = 0.03;
  Rng rng(0xC0FFEE);
  const size_t total = ParamLayout(ck.config.model).total();
  for (size_t i = 0; i < total; ++i) ck.params.push_back(static_cast<float>(rng.normal()));
  ck.adam_m = ck.params;
  ck.adam_v = ck.params;
  ck.tokenizer = "byte";
  ck.meta_json = "{}";
  ck.step = 12;
  char templ[] = "/tmp/blm_fuzz_ckpt_XXXXXX";
  REQUIRE(mkdtemp(templ) != nullptr);
  const std::string dir = templ, good = dir + "/good.bin", path = dir + "/fuzz.bin";
  save_checkpoint(good, ck);
  std::ifstream in(good, std::ios::binary);
  const std::string original((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::vector<size_t> fields = length_fields(original);
  const std::vector<std::string> tokens = {"CONF", "TOKN", "STAT", "TENS", "ADAM", "META", "END!",
                                           std::string("BLMCKPT\0", 8), std::string(8, '\xff'),
                                           std::string(4, '\0'), "model: {n_layer: 3}\n", "wte"};
  int loaded = 0, rejected = 0;
  const int iterations = 3000;
  for (int it = 0; it < iterations; ++it) {
    std::string b = mutate(rng, original, tokens, fields);
    if (rng.below(2) && b.size() >= 32) {  // reseal: the damage must be found by the parser
      set_le(b, 16, b.size(), 8);
      set_le(b, b.size() - 8, fnv1a(b, b.size() - 8), 8);
    }
    {
      std::remove(path.c_str());  // a new file, not a truncated one: ext4 syncs on truncate-and-rewrite
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(b.data(), static_cast<std::streamsize>(b.size()));
    }
    bool ok = false;
    survives<CheckpointError>(
        [&] {
          const Checkpoint back = load_checkpoint(path);
          // Whatever loads is consistent.
          CHECK(back.params.size() == ParamLayout(back.config.model).total());
          CHECK((back.adam_m.empty() || back.adam_m.size() == back.params.size()));
          CHECK(back.adam_m.size() == back.adam_v.size());
          ok = true;
        },
        b, it);
    (ok ? loaded : rejected)++;
  }
  std::remove(path.c_str());
  std::remove(good.c_str());
  ::rmdir(dir.c_str());
  INFO("loaded " << loaded << ", rejected " << rejected);
  CHECK(rejected > iterations / 2);  // the mutations do damage
  CHECK(loaded > 0);                 // and some (resealed float edits) are harmless
}

TEST_CASE("parse_config and apply_override survive thousands of mutated inputs", "[fuzz]") {
  Config sample;
  sample.barrier.layers = {0, 2};
  sample.data.train = "data/a: b.txt";
  sample.train.run_name = "quote\" and \\ back";
  const std::vector<std::string> seeds = {
      config_to_yaml(sample),
      "model: {n_layer: 4, n_head: 4, d_model: 128}\nbarrier: {lambda: 0.03, layers: [0, 1]}\n"
      "train: {lr: 3e-4, steps: 1e3, seed: 18446744073709551615}\n",
      "# comment\nmodel:\n  n_layer: 2   # two\ndata:\n  train: |\n    block\n  val: >\n    folded\n"
      "device:\n  backend: &b cpu\n  precision: fp64\ntrain:\n  run_name: *b\n",
  };
  const std::vector<std::string> tokens = {
      ":", ": ", " ", "\n", "\n  ", "- ", "[", "]", "{", "}", ",", "\"", "'", "#", "&a ", "*a", "!!str ", "!!map ",
      "%YAML 1.2\n", "---\n", "...\n", "? ", "|", ">", "\t", "~", "null", "all", "1e999", "-1", "nan",
      "99999999999999999999", "0x10", ".inf", "<<: *a\n", "model:", "train:", "barrier:", "device:", "  lr: ",
      "layers: [", "\xef\xbb\xbf", "\\", std::string(1, '\0'), "\xff\xfe", "\xc3", "\r\n", "\\x41", "\\u12",
      std::string(200, '['), std::string(200, '{'), std::string(100, '-') + " "};
  Rng rng(0xBADC0DE);
  int accepted = 0, rejected = 0;
  const int iterations = 4000;
  for (int it = 0; it < iterations; ++it) {
    const std::string text = mutate(rng, seeds[rng.below(seeds.size())], tokens);
    bool ok = false;
    survives<ConfigError>(
        [&] {
          const Config c = parse_config(text, "fuzz.yaml");
          validate(c);  // whatever parses is valid
          ok = true;
        },
        text, it);
    (ok ? accepted : rejected)++;
  }
  INFO("accepted " << accepted << ", rejected " << rejected);
  CHECK(rejected > iterations / 4);
  CHECK(accepted > 0);

  const std::vector<std::string> assignments = {"train.lr=3e-4", "barrier.layers=[0, 1]", "data.train=x.txt",
                                                "model.n_head=2", "train.seed=7", "barrier.layers=all"};
  for (int it = 0; it < 1500; ++it) {
    const std::string a = mutate(rng, assignments[rng.below(assignments.size())], tokens);
    Config c;
    survives<ConfigError>([&] { apply_override(c, a); }, a, it);
  }
}
