// Tests of core/checkpoint.cpp: bit-exact round trip of parameters, moments and state; every
// kind of damage (truncation at many points, wrong magic, wrong version, flipped bytes, trailing
// bytes, tensors that disagree with the config, crafted section lengths with a valid checksum)
// gives a one-line CheckpointError naming the file and the problem; a failed save (missing
// directory, target that is a directory, a write that fails half-way) leaves no temp file and
// the old checkpoint intact; write_file_atomic.
#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/params.h"
#include "core/rng.h"
#include "tests/catch.h"

using namespace blm;

namespace {

// ---------------------------------------------------------------- files

// A fresh directory, removed (with its files) at the end of the test.
struct TempDir {
  std::string path;
  TempDir() {
    char templ[] = "/tmp/blm_test_checkpoint_XXXXXX";
    REQUIRE(mkdtemp(templ) != nullptr);
    path = templ;
  }
  ~TempDir() {
    for (const std::string& name : entries()) std::remove((path + "/" + name).c_str());
    ::rmdir(path.c_str());
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    if (DIR* d = ::opendir(path.c_str())) {
      while (const dirent* e = ::readdir(d)) {
        const std::string n = e->d_name;
        if (n != "." && n != "..") names.push_back(n);
      }
      ::closedir(d);
    }
    return names;
  }
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::remove(path.c_str());  // a new file, not a truncated one: ext4 syncs on truncate-and-rewrite
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

// ---------------------------------------------------------------- the format, as the test knows it

uint64_t get_le(const std::string& b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(b[at + i])) << (8 * i);
  return v;
}

void set_le(std::string& b, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

std::string le(uint64_t v, int n) {
  std::string s(n, '\0');
  set_le(s, 0, v, n);
  return s;
}

uint64_t fnv1a(const std::string& b, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<unsigned char>(b[i])) * 0x100000001b3ull;
  return h;
}

// Makes an edited file self-consistent again: file length and checksum.
void reseal(std::string& b) {
  set_le(b, 16, b.size(), 8);
  set_le(b, b.size() - 8, fnv1a(b, b.size() - 8), 8);
}

struct Section {
  std::string tag;
  size_t header_at, payload_at;
  uint64_t length;
};

std::vector<Section> sections_of(const std::string& b) {
  std::vector<Section> out;
  for (size_t pos = 24; pos + 20 < b.size();) {
    Section s{b.substr(pos, 4), pos, pos + 12, get_le(b, pos + 4, 8)};
    out.push_back(s);
    pos = s.payload_at + s.length;
  }
  return out;
}

Section find_section(const std::string& b, const std::string& tag) {
  for (const Section& s : sections_of(b))
    if (s.tag == tag) return s;
  FAIL("no section " << tag);
  return {};
}

// The file with one section's payload replaced, resealed.
std::string with_payload(const std::string& b, const std::string& tag, const std::string& payload) {
  const Section s = find_section(b, tag);
  std::string out = b.substr(0, s.header_at) + tag + le(payload.size(), 8) + payload + b.substr(s.payload_at + s.length);
  reseal(out);
  return out;
}

// ---------------------------------------------------------------- checkpoints

Config tiny_config() {
  Config c;
  c.model = ModelConfig{2, 2, 32, 32, 256};
  c.barrier.lambda = 0.03;
  c.barrier.layers = {1};
  c.data.train = "data/corpus/brown/train.txt";
  c.train.lr = 2e-3;
  return c;
}

// Random bit patterns: every float value, NaNs and infinities included, must survive.
std::vector<float> random_floats(Rng& rng, size_t n) {
  std::vector<float> v(n);
  for (float& x : v) {
    const uint32_t bits = static_cast<uint32_t>(rng.next());
    std::memcpy(&x, &bits, 4);
  }
  return v;
}

Checkpoint random_checkpoint(Rng& rng, bool with_moments = true) {
  Checkpoint ck;
  ck.config = tiny_config();
  const size_t n = ParamLayout(ck.config.model).total();
  ck.params = random_floats(rng, n);
  if (with_moments) {
    ck.adam_m = random_floats(rng, n);
    ck.adam_v = random_floats(rng, n);
  }
  static const char tokenizer[] = "byte\0\x01\xff tokenizer";  // binary bytes, a NUL included
  ck.tokenizer = std::string(tokenizer, sizeof tokenizer - 1);
  ck.step = static_cast<int64_t>(rng.below(1u << 30));
  ck.adam_t = ck.step + 1;
  ck.tokens_seen = static_cast<int64_t>(rng.next() >> 2);
  ck.seed = rng.next();
  ck.meta_json = "{\"backend\": \"cpu-fp32\", \"val_loss\": 1.25}";
  return ck;
}

bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

void require_same(const Checkpoint& a, const Checkpoint& b) {
  CHECK(config_to_yaml(a.config) == config_to_yaml(b.config));
  CHECK(a.tokenizer == b.tokenizer);
  CHECK(a.step == b.step);
  CHECK(a.adam_t == b.adam_t);
  CHECK(a.tokens_seen == b.tokens_seen);
  CHECK(a.seed == b.seed);
  CHECK(same_floats(a.params, b.params));
  CHECK(same_floats(a.adam_m, b.adam_m));
  CHECK(same_floats(a.adam_v, b.adam_v));
  CHECK(a.meta_json == b.meta_json);
}

// The message of the CheckpointError that loading path throws (one line, naming the file).
std::string load_error(const std::string& path) {
  try {
    load_checkpoint(path);
  } catch (const CheckpointError& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find('\n') == std::string::npos);
    CHECK(msg.find("'" + path + "'") != std::string::npos);
    return msg;
  }
  FAIL("loading " << path << " did not throw");
  return "";
}

std::string load_error_of(const std::string& path, const std::string& bytes) {
  write_bytes(path, bytes);
  return load_error(path);
}

}  // namespace

// ---------------------------------------------------------------- round trip

TEST_CASE("a checkpoint round-trips bit for bit", "[checkpoint]") {
  TempDir dir;
  Rng rng(7);
  const std::string path = dir.path + "/ck.bin";
  const Checkpoint ck = random_checkpoint(rng);
  save_checkpoint(path, ck);
  require_same(load_checkpoint(path), ck);
  CHECK(dir.entries() == std::vector<std::string>{"ck.bin"});  // no temp file left

  // Saving again replaces the file; a checkpoint without optimizer state loads without it.
  const Checkpoint bare = random_checkpoint(rng, false);
  save_checkpoint(path, bare);
  const Checkpoint back = load_checkpoint(path);
  require_same(back, bare);
  CHECK(back.adam_m.empty());
  CHECK(dir.entries() == std::vector<std::string>{"ck.bin"});

  // The file is the documented layout: header, CONF TOKN STAT TENS ADAM META, trailer.
  const std::string b = read_bytes(path);
  CHECK(b.compare(0, 8, std::string("BLMCKPT\0", 8)) == 0);
  CHECK(get_le(b, 8, 4) == kCheckpointVersion);
  CHECK(get_le(b, 16, 8) == b.size());
  std::string tags;
  for (const Section& s : sections_of(b)) tags += s.tag + " ";
  CHECK(tags == "CONF TOKN STAT TENS ADAM META ");
  CHECK(b.compare(b.size() - 20, 4, "END!") == 0);
  CHECK(get_le(b, b.size() - 16, 8) == 8);
  CHECK(get_le(b, b.size() - 8, 8) == fnv1a(b, b.size() - 8));
}

TEST_CASE("save_checkpoint refuses an inconsistent checkpoint and writes nothing", "[checkpoint]") {
  TempDir dir;
  Rng rng(8);
  const std::string path = dir.path + "/ck.bin";
  Checkpoint ck = random_checkpoint(rng);
  ck.params.pop_back();
  CHECK_THROWS_AS(save_checkpoint(path, ck), CheckpointError);
  ck = random_checkpoint(rng);
  ck.adam_v.clear();
  CHECK_THROWS_AS(save_checkpoint(path, ck), CheckpointError);
  ck = random_checkpoint(rng);
  ck.config.train.lr = -1;
  CHECK_THROWS_AS(save_checkpoint(path, ck), CheckpointError);
  CHECK(dir.entries().empty());
}

// ---------------------------------------------------------------- damaged files

TEST_CASE("a truncated checkpoint says so, with both sizes", "[checkpoint]") {
  TempDir dir;
  Rng rng(9);
  const std::string good = dir.path + "/good.bin", bad = dir.path + "/bad.bin";
  save_checkpoint(good, random_checkpoint(rng));
  const std::string b = read_bytes(good);
  const std::string prefix = "checkpoint '" + bad + "' ";
  CHECK(load_error_of(bad, "") == prefix + "is empty (0 bytes)");
  for (size_t n : {1, 5, 8, 11, 12, 20, 23}) {
    INFO("kept " << n << " bytes");
    CHECK(load_error_of(bad, b.substr(0, n)) ==
          prefix + "is truncated (expected at least 24 bytes, found " + std::to_string(n) + ")");
  }
  for (size_t n : {size_t{24}, size_t{25}, size_t{100}, b.size() / 3, b.size() / 2, b.size() - 20, b.size() - 8,
                   b.size() - 1}) {
    INFO("kept " << n << " bytes");
    CHECK(load_error_of(bad, b.substr(0, n)) == prefix + "is truncated (expected " + std::to_string(b.size()) +
                                                     " bytes, found " + std::to_string(n) + ")");
  }
  CHECK(load_error_of(bad, b + "xyz") ==
        prefix + "is corrupt: 3 unexpected bytes after its end (expected " + std::to_string(b.size()) +
            " bytes, found " + std::to_string(b.size() + 3) + ")");
}

TEST_CASE("wrong magic, wrong version and a bad header are named", "[checkpoint]") {
  TempDir dir;
  Rng rng(10);
  const std::string good = dir.path + "/good.bin", bad = dir.path + "/bad.bin";
  save_checkpoint(good, random_checkpoint(rng));
  const std::string b = read_bytes(good);
  const std::string prefix = "checkpoint '" + bad + "' ";
  std::string m = b;
  m[0] = 'X';
  CHECK(load_error_of(bad, m) == prefix + "has wrong magic (not a barrierlm checkpoint)");
  CHECK(load_error_of(bad, "model:\n  n_layer: 2\n") == prefix + "has wrong magic (not a barrierlm checkpoint)");
  CHECK(load_error_of(bad, "BLX") == prefix + "has wrong magic (not a barrierlm checkpoint)");
  m = b;
  set_le(m, 8, 7, 4);
  CHECK(load_error_of(bad, m) == prefix + "has version 7; this barrierlm reads version 1");
  m = b;
  set_le(m, 12, 32, 4);
  CHECK(load_error_of(bad, m) == prefix + "is corrupt: header length 32, expected 24");
  m = b;
  set_le(m, 16, 10, 8);
  CHECK(load_error_of(bad, m) == prefix + "is corrupt: declared file length 10 is too small");
}

TEST_CASE("a flipped byte anywhere after the header is a checksum mismatch", "[checkpoint]") {
  TempDir dir;
  Rng rng(11);
  const std::string good = dir.path + "/good.bin", bad = dir.path + "/bad.bin";
  save_checkpoint(good, random_checkpoint(rng));
  const std::string b = read_bytes(good);
  const std::string expected = "checkpoint '" + bad + "' checksum mismatch (file corrupted)";
  std::vector<size_t> positions = {24, 25, 36, b.size() - 20, b.size() - 9, b.size() - 8, b.size() - 1};
  for (const Section& s : sections_of(b)) positions.push_back(s.payload_at + s.length / 2);
  for (int i = 0; i < 150; ++i) positions.push_back(24 + rng.below(b.size() - 24));
  for (size_t pos : positions) {
    std::string m = b;
    m[pos] = static_cast<char>(m[pos] ^ (1 << rng.below(8)));
    INFO("flipped a bit of byte " << pos);
    CHECK(load_error_of(bad, m) == expected);
  }
  // Flips inside the file-length field are caught as a size mismatch.
  for (size_t pos = 16; pos < 24; ++pos) {
    std::string m = b;
    m[pos] = static_cast<char>(m[pos] ^ 0x04);
    load_error_of(bad, m);  // fails the test unless a CheckpointError naming the file is thrown
  }
}

TEST_CASE("tensors that disagree with the config are named with both shapes", "[checkpoint]") {
  TempDir dir;
  Rng rng(12);
  const std::string good = dir.path + "/good.bin", bad = dir.path + "/bad.bin";
  Checkpoint ck = random_checkpoint(rng);
  save_checkpoint(good, ck);
  const std::string b = read_bytes(good);
  const std::string prefix = "checkpoint '" + bad + "' ";

  // The config says d_model 16; the tensors were written for d_model 32.
  Config narrow = ck.config;
  narrow.model.d_model = 16;
  CHECK(load_error_of(bad, with_payload(b, "CONF", config_to_yaml(narrow))) ==
        prefix + "has tensor 0 'wte' [256, 32] where its model config has 'wte' [256, 16]");
  // One layer fewer: a different tensor count.
  Config shallow = ck.config;
  shallow.model.n_layer = 1;
  shallow.barrier.layers = {0};
  CHECK(load_error_of(bad, with_payload(b, "CONF", config_to_yaml(shallow))) ==
        prefix + "has 28 tensors; its model config has 16");
  // A model too large for the data in the file: refused before any allocation.
  Config wide = ck.config;
  wide.model.d_model = 1 << 20;
  wide.model.vocab_size = 1 << 24;
  CHECK(load_error_of(bad, with_payload(b, "CONF", config_to_yaml(wide))).find(
            prefix + "is corrupt: section TENS holds ") == 0);

  // A renamed tensor and a changed dimension, in TENS itself.
  const Section tens = find_section(b, "TENS");
  std::string m = b;
  const size_t first_name = tens.payload_at + 4 + 4;  // count, name length
  REQUIRE(m.substr(first_name, 3) == "wte");
  m[first_name + 2] = 'f';
  reseal(m);
  CHECK(load_error_of(bad, m) == prefix + "has tensor 0 'wtf' [256, 32] where its model config has 'wte' [256, 32]");
  m = b;
  set_le(m, first_name + 3 + 4, 255, 8);  // wte's first dimension
  reseal(m);
  CHECK(load_error_of(bad, m) == prefix + "has tensor 0 'wte' [255, 32] where its model config has 'wte' [256, 32]");
}

TEST_CASE("crafted lengths with a valid checksum are corruption, not crashes", "[checkpoint]") {
  TempDir dir;
  Rng rng(13);
  const std::string good = dir.path + "/good.bin", bad = dir.path + "/bad.bin";
  save_checkpoint(good, random_checkpoint(rng));
  const std::string b = read_bytes(good);
  const std::string prefix = "checkpoint '" + bad + "' is corrupt: ";

  std::string m = b;
  set_le(m, find_section(b, "TOKN").header_at + 4, ~0ull, 8);  // a section longer than the file
  reseal(m);
  CHECK(load_error_of(bad, m).find(prefix + "section TOKN has length 18446744073709551615 but only ") == 0);

  CHECK(load_error_of(bad, with_payload(b, "STAT", "short")) == prefix + "section STAT has 5 bytes, expected 32");
  CHECK(load_error_of(bad, with_payload(b, "CONF", "model: {n_layer: 0}\n")) ==
        prefix + "its config is invalid: config:1: model.n_layer: must be in [1, 4096], got 0");
  CHECK(load_error_of(bad, with_payload(b, "ADAM", le(5, 8))) ==
        prefix + "section ADAM holds moments of 5 values; the model has " +
            std::to_string(ParamLayout(tiny_config().model).total()));
  CHECK(load_error_of(bad, with_payload(b, "ADAM", le(0, 8) + "x")) ==
        prefix + "section ADAM has 1 bytes of moments, expected 0");

  // A huge tensor-name length inside TENS.
  m = b;
  set_le(m, find_section(b, "TENS").payload_at + 4, 0xffffffffu, 4);
  reseal(m);
  CHECK(load_error_of(bad, m) == prefix + "tensor 0 has a name of 4294967295 bytes");

  // A missing section, a duplicated one, an unknown one (skipped: the file loads).
  const Section stat = find_section(b, "STAT");
  m = b.substr(0, stat.header_at) + b.substr(stat.payload_at + stat.length);
  reseal(m);
  CHECK(load_error_of(bad, m) == prefix + "section STAT is missing");
  m = b.substr(0, stat.payload_at + stat.length) + b.substr(stat.header_at, 12 + stat.length) +
      b.substr(stat.payload_at + stat.length);
  reseal(m);
  CHECK(load_error_of(bad, m) == prefix + "section STAT appears twice");
  m = b.substr(0, stat.header_at) + "XTRA" + le(3, 8) + "abc" + b.substr(stat.header_at);
  reseal(m);
  write_bytes(bad, m);
  CHECK(load_checkpoint(bad).step == load_checkpoint(good).step);
}

TEST_CASE("loading a missing file or a directory names it", "[checkpoint]") {
  TempDir dir;
  CHECK(load_error(dir.path + "/none.bin") ==
        "cannot read checkpoint '" + dir.path + "/none.bin': No such file or directory");
  CHECK(load_error(dir.path) == "checkpoint '" + dir.path + "' is not a regular file");
}

// ---------------------------------------------------------------- failed saves

TEST_CASE("a failed save leaves no temp file and the old checkpoint intact", "[checkpoint]") {
  TempDir dir;
  Rng rng(14);
  const Checkpoint ck = random_checkpoint(rng);

  SECTION("the directory does not exist") {
    const std::string path = dir.path + "/missing/ck.bin";
    try {
      save_checkpoint(path, ck);
      FAIL("no error");
    } catch (const CheckpointError& e) {
      CHECK(std::string(e.what()) == "cannot write checkpoint '" + path + "': No such file or directory");
    }
    CHECK(dir.entries().empty());
  }

  SECTION("the target is a directory: the rename fails after the data is written") {
    const std::string path = dir.path + "/ck.bin";
    REQUIRE(::mkdir(path.c_str(), 0755) == 0);
    try {
      save_checkpoint(path, ck);
      FAIL("no error");
    } catch (const CheckpointError& e) {
      CHECK(std::string(e.what()) == "cannot write checkpoint '" + path + "': Is a directory");
    }
    CHECK(dir.entries() == std::vector<std::string>{"ck.bin"});
    ::rmdir(path.c_str());
  }

  SECTION("a write fails half-way (file size limit): the old checkpoint survives") {
    const std::string path = dir.path + "/ck.bin";
    save_checkpoint(path, ck);
    const std::string before = read_bytes(path);
    const Checkpoint other = random_checkpoint(rng);
    struct rlimit old_limit;
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    struct rlimit limit = old_limit;
    limit.rlim_cur = 4096;  // far below the checkpoint's size
    void (*old_handler)(int) = std::signal(SIGXFSZ, SIG_IGN);  // get EFBIG, not a signal
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &limit) == 0);
    std::string message;
    try {
      save_checkpoint(path, other);
    } catch (const CheckpointError& e) {
      message = e.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &old_limit);
    std::signal(SIGXFSZ, old_handler);
    CHECK(message == "cannot write checkpoint '" + path + "': File too large");
    CHECK(read_bytes(path) == before);
    CHECK(dir.entries() == std::vector<std::string>{"ck.bin"});
    require_same(load_checkpoint(path), ck);
  }

  SECTION("the directory is not writable") {
    if (::geteuid() == 0) return;  // root writes anyway; the other sections cover the failure
    const std::string path = dir.path + "/ro/ck.bin";
    REQUIRE(::mkdir((dir.path + "/ro").c_str(), 0555) == 0);
    CHECK_THROWS_AS(save_checkpoint(path, ck), CheckpointError);
    ::rmdir((dir.path + "/ro").c_str());
  }
}

// ---------------------------------------------------------------- write_file_atomic

TEST_CASE("write_file_atomic writes, replaces, and fails cleanly", "[checkpoint]") {
  TempDir dir;
  const std::string path = dir.path + "/metrics.json";
  write_file_atomic(path, "{\"a\": 1}\n");
  CHECK(read_bytes(path) == "{\"a\": 1}\n");
  const std::string big(3 << 20, 'x');  // larger than the write buffer
  write_file_atomic(path, big);
  CHECK(read_bytes(path) == big);
  write_file_atomic(path, "");
  CHECK(read_bytes(path).empty());
  CHECK(dir.entries() == std::vector<std::string>{"metrics.json"});
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  const mode_t mask = ::umask(022);
  ::umask(mask);
  CHECK((st.st_mode & 0777) == (0666 & ~mask));  // like any new file (not mkstemp's 0600)
  try {
    write_file_atomic(dir.path + "/no/such/dir.json", "x");
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()) == "cannot write '" + dir.path + "/no/such/dir.json': No such file or directory");
  }
}

TEST_CASE("write_file_atomic writes through links and into pipes, never replacing them",
          "[checkpoint]") {
  TempDir dir;
  // A link to a file (here a relative one, into a subdirectory): the file it names is written
  // and the link stays a link, as with a shell's '>'.
  REQUIRE(::mkdir((dir.path + "/real").c_str(), 0777) == 0);
  const std::string link = dir.path + "/link.bin";
  REQUIRE(::symlink("real/t.bin", link.c_str()) == 0);
  write_file_atomic(link, "through the link");
  struct stat st;
  REQUIRE(::lstat(link.c_str(), &st) == 0);
  CHECK(S_ISLNK(st.st_mode));
  CHECK(read_bytes(dir.path + "/real/t.bin") == "through the link");

  // A FIFO (as /dev/null, not a regular file): written in place, still a FIFO afterwards.
  const std::string fifo = dir.path + "/pipe";
  REQUIRE(::mkfifo(fifo.c_str(), 0666) == 0);
  // The reading end is open first (non-blocking), so the writer's open does not wait for one.
  const int reader = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK);
  REQUIRE(reader >= 0);
  write_file_atomic(fifo, "into the pipe");
  char buf[64] = {};
  const ssize_t n = ::read(reader, buf, sizeof buf);
  ::close(reader);
  CHECK(std::string(buf, n > 0 ? static_cast<size_t>(n) : 0) == "into the pipe");
  REQUIRE(::lstat(fifo.c_str(), &st) == 0);
  CHECK(S_ISFIFO(st.st_mode));

  // A directory is named as such.
  try {
    write_file_atomic(dir.path + "/real", "x");
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()) == "cannot write '" + dir.path + "/real': Is a directory");
  }
  std::remove((dir.path + "/real/t.bin").c_str());
  ::rmdir((dir.path + "/real").c_str());
}

TEST_CASE("an atomic write removes what a killed write of the same file left, and only that",
          "[checkpoint]") {
  TempDir dir;
  // A process that has ended: its temporaries are stale.
  const pid_t gone = ::fork();
  if (gone == 0) ::_exit(0);
  REQUIRE(gone > 0);
  int status;
  REQUIRE(::waitpid(gone, &status, 0) == gone);
  const std::string dead = std::to_string(gone), alive = std::to_string(::getppid());
  for (const std::string& name : {"out.json.tmp." + dead + ".0", "out.json.tmp." + alive + ".3",
                                  "other.json.tmp." + dead + ".1"})
    write_bytes(dir.path + "/" + name, "partial");
  write_file_atomic(dir.path + "/out.json", "whole");
  std::vector<std::string> names = dir.entries();
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"other.json.tmp." + dead + ".1", "out.json",
                                          "out.json.tmp." + alive + ".3"});

  // A name long enough that the temporary suffix would pass 255 bytes still writes.
  const std::string long_name = std::string(249, 'x') + ".json";
  write_file_atomic(dir.path + "/" + long_name, "long");
  CHECK(read_bytes(dir.path + "/" + long_name) == "long");
}

TEST_CASE("save_checkpoint replaces a link to another checkpoint instead of overwriting it",
          "[checkpoint]") {
  TempDir dir;
  Rng rng(11);
  const std::string other = dir.path + "/other.bin", link = dir.path + "/ck.bin";
  const Checkpoint theirs = random_checkpoint(rng);
  save_checkpoint(other, theirs);
  REQUIRE(::symlink("other.bin", link.c_str()) == 0);
  const Checkpoint ours = random_checkpoint(rng, false);
  save_checkpoint(link, ours);
  struct stat st;
  REQUIRE(::lstat(link.c_str(), &st) == 0);
  CHECK(S_ISREG(st.st_mode));
  require_same(load_checkpoint(link), ours);
  require_same(load_checkpoint(other), theirs);
}
