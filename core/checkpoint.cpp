// Checkpoint files (layout in core/checkpoint.h) and atomic file writes.
//
// Saving streams the file into a temp file next to the target (same directory, so the rename
// is atomic), computing the FNV-1a checksum on the way; then fsync, rename, fsync of the
// directory.  Any failure removes the temp file and leaves an existing target untouched.
//
// Loading trusts nothing in the file: it checks magic, version, header and total length against
// the real file size, verifies the checksum over the whole file, and only then walks the
// sections.  Every length read from the file is compared with the bytes that remain before it
// is used, so a corrupt or crafted length can never cause a huge allocation or a read past the
// end.  Tensor names and shapes must equal ParamLayout(config.model) exactly.
#include "core/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>

#include "core/params.h"

namespace blm {
namespace {

constexpr char kMagic[8] = {'B', 'L', 'M', 'C', 'K', 'P', 'T', '\0'};
constexpr uint64_t kHeaderBytes = 24;         // magic, version u32, header length u32, file length u64
constexpr uint64_t kSectionHeaderBytes = 12;  // tag, length u64
constexpr uint64_t kTrailerBytes = 20;        // "END!", length u64 (= 8), checksum u64
constexpr uint32_t kMaxNameBytes = 4096;      // tensor names are short; longer means corruption
constexpr uint32_t kMaxDims = 8;

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
constexpr bool kLittleEndian = true;
#else
constexpr bool kLittleEndian = false;
#endif

// FNV-1a, 64 bit.
struct Fnv1a {
  uint64_t hash = 0xcbf29ce484222325ull;
  void update(const void* data, size_t n) {
    const unsigned char* p = static_cast<const unsigned char*>(data);
    uint64_t h = hash;
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
    hash = h;
  }
};

std::string quoted(const std::string& path) { return "'" + path + "'"; }

// Bytes from the file (tags and names are ASCII), for a message: anything but printable ASCII
// becomes '?', so the message stays one line of valid text.
std::string printable(std::string s, size_t max_len = 64) {
  if (s.size() > max_len) s = s.substr(0, max_len) + "...";
  for (char& ch : s)
    if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) >= 0x7f) ch = '?';
  return s;
}

// ------------------------------------------------------------------ little-endian encoding

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((v >> (8 * i)) & 0xff);
}

uint64_t get_le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

// ------------------------------------------------------------------ atomic writer

// What an atomic write does with a path that is a symbolic link.
enum class Links {
  kReplace,  // the link becomes a regular file; what it pointed at is left alone (checkpoints:
             // a link to another run's checkpoint must never overwrite that checkpoint)
  kFollow,   // the file the link names is written (as a shell's '>' does: outputs, shards)
};

// The file a chain of symbolic links starting at path ends at (path itself when it is no link);
// that file need not exist.
std::string follow_links(const std::string& path) {
  namespace fs = std::filesystem;
  fs::path p = path;
  for (int hops = 0; hops < 40; ++hops) {
    std::error_code ec;
    if (!fs::is_symlink(fs::symlink_status(p, ec))) return p.string();
    const fs::path target = fs::read_symlink(p, ec);
    if (ec) return p.string();
    p = target.is_absolute() ? target : p.parent_path() / target;
  }
  throw Error("cannot write " + quoted(path) + ": too many levels of symbolic links");
}

// Temporary names of atomic writes of a file named `name`: "<name>.tmp.<pid>.<n>" beside it.  A
// name longer than kTempNameBytes is cut there, so that a long but legal output name plus the
// suffix still fits the file system's 255 bytes.
constexpr size_t kTempNameBytes = 200;
std::string temp_stem(const std::string& name) { return name.substr(0, kTempNameBytes) + ".tmp."; }

// A file written to "<path>.tmp.<pid>.<n>" and renamed over path on commit(); removed if
// commit() is never reached (and, when a kill left it, by the next write of the same path).
// Errors are blm::Error "cannot write <label> 'path': reason".
// A path that exists and is neither a regular file nor a directory (/dev/null, a FIFO) is
// written in place: renaming over it would replace the device or pipe with a regular file.
class AtomicFile {
 public:
  AtomicFile(const std::string& path, const std::string& label, Links links = Links::kReplace)
      : path_(links == Links::kFollow ? follow_links(path) : path), shown_(path), label_(label) {
    struct stat st {};
    if (::lstat(path_.c_str(), &st) == 0 && !S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode)) {
      if (S_ISDIR(st.st_mode)) fail(std::strerror(EISDIR));
      fd_ = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC);
      if (fd_ < 0) fail(std::strerror(errno));
      in_place_ = true;
      return;
    }
    static std::atomic<unsigned> counter{0};
    const std::filesystem::path target(path_), dir = target.parent_path();
    const std::string stem = temp_stem(target.filename().string());
    remove_stale_temporaries(dir.empty() ? "." : dir.string(), stem);
    for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
      const std::string name = stem + std::to_string(::getpid()) + "." + std::to_string(counter++);
      temp_ = (dir / name).string();
      fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ < 0 && errno != EEXIST) fail(std::strerror(errno));
    }
    if (fd_ < 0) fail("cannot create a temporary file next to it");
    buffer_.reserve(kBufferBytes);
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_ && !in_place_) ::unlink(temp_.c_str());
  }

  void write(const void* data, size_t n) {
    checksum_.update(data, n);
    written_ += n;
    if (buffer_.size() + n > kBufferBytes) flush();
    if (n >= kBufferBytes) {
      write_fully(static_cast<const char*>(data), n);
    } else {
      buffer_.append(static_cast<const char*>(data), n);
    }
  }
  void write(const std::string& s) { write(s.data(), s.size()); }
  uint64_t checksum() const { return checksum_.hash; }
  uint64_t written() const { return written_; }

  void commit() {
    flush();
    if (in_place_) {  // a device or a pipe: nothing to sync or rename
      const int fd = fd_;
      fd_ = -1;
      committed_ = true;
      if (::close(fd) != 0) fail(std::strerror(errno));
      return;
    }
    if (::fsync(fd_) != 0) fail(std::strerror(errno));
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail(std::strerror(errno));
    if (::rename(temp_.c_str(), path_.c_str()) != 0) fail(std::strerror(errno));
    committed_ = true;
    sync_directory();
  }

 private:
  static constexpr size_t kBufferBytes = 1 << 20;

  [[noreturn]] void fail(const std::string& reason) const {
    throw Error("cannot write " + (label_.empty() ? "" : label_ + " ") + quoted(shown_) + ": " +
                reason);
  }

  void flush() {
    write_fully(buffer_.data(), buffer_.size());
    buffer_.clear();
  }

  void write_fully(const char* p, size_t n) {
    while (n > 0) {
      const ssize_t k = ::write(fd_, p, n);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) fail(k < 0 ? std::strerror(errno) : "write made no progress");
      p += k;
      n -= static_cast<size_t>(k);
    }
  }

  // Makes the rename itself durable.  The new file is already in place, so a filesystem that
  // cannot sync directories (EINVAL) is not an error; an I/O error is.
  void sync_directory() const {
    const size_t slash = path_.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    const int rc = ::fsync(fd);
    const int err = errno;
    ::close(fd);
    if (rc != 0 && err == EIO) fail(std::string("syncing its directory: ") + std::strerror(err));
  }

  std::string path_;   // the file written: shown_, or where its links lead (Links::kFollow)
  std::string shown_;  // the path as given, for messages
  std::string label_, temp_;
  int fd_ = -1;
  bool in_place_ = false;  // writing a device or pipe directly, no temporary file
  bool committed_ = false;
  std::string buffer_;
  Fnv1a checksum_;
  uint64_t written_ = 0;
};

// n float32 values, little-endian.
void write_floats(AtomicFile& out, const float* v, size_t n) {
  if (kLittleEndian) {
    out.write(v, n * sizeof(float));
    return;
  }
  std::string chunk;
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, v + i, 4);
    put_le(chunk, bits, 4);
    if (chunk.size() >= (1 << 16)) {
      out.write(chunk);
      chunk.clear();
    }
  }
  out.write(chunk);
}

// ------------------------------------------------------------------ section payloads

std::string encode_stat(const Checkpoint& ck) {
  std::string s;
  put_le(s, static_cast<uint64_t>(ck.step), 8);
  put_le(s, static_cast<uint64_t>(ck.adam_t), 8);
  put_le(s, static_cast<uint64_t>(ck.tokens_seen), 8);
  put_le(s, ck.seed, 8);
  return s;
}

// The TENS payload without the float data: count, then per tensor its name and shape.  The data
// of tensor i follows its header; headers[i] is that header.
std::vector<std::string> tensor_headers(const ParamLayout& layout) {
  std::vector<std::string> headers;
  for (const TensorSpec& t : layout.tensors()) {
    std::string h;
    put_le(h, t.name.size(), 4);
    h += t.name;
    put_le(h, t.shape.size(), 4);
    for (int dim : t.shape) put_le(h, static_cast<uint64_t>(dim), 8);
    headers.push_back(std::move(h));
  }
  return headers;
}

void write_section_header(AtomicFile& out, const char tag[4], uint64_t length) {
  std::string h(tag, 4);
  put_le(h, length, 8);
  out.write(h);
}

// Throws unless ck is consistent: a valid config, parameters and moments of the model's size.
void check_savable(const std::string& path, const Checkpoint& ck) {
  const auto fail = [&](const std::string& why) {
    throw CheckpointError("cannot save checkpoint " + quoted(path) + ": " + why);
  };
  try {
    validate(ck.config);  // load_checkpoint must accept whatever was saved
  } catch (const ConfigError& e) {
    fail(std::string("invalid config: ") + e.what());
  }
  if (ck.config.model.vocab_size < 2)
    fail("model.vocab_size is " + std::to_string(ck.config.model.vocab_size) + "; resolve it from the tokenizer first");
  const ParamLayout layout(ck.config.model);
  if (ck.params.size() != layout.total())
    fail(std::to_string(ck.params.size()) + " parameters given, the model has " + std::to_string(layout.total()));
  if (ck.adam_m.size() != ck.adam_v.size() || (!ck.adam_m.empty() && ck.adam_m.size() != layout.total()))
    fail("optimizer moments of " + std::to_string(ck.adam_m.size()) + " and " + std::to_string(ck.adam_v.size()) +
         " values; expected none or " + std::to_string(layout.total()) + " each");
}

// ------------------------------------------------------------------ reading

// A checkpoint file open for reading; every error names it.
class CheckpointFile {
 public:
  explicit CheckpointFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw CheckpointError("cannot read checkpoint " + quoted(path) + ": " + std::strerror(errno));
    struct stat st;
    if (::fstat(fd_, &st) != 0) fail_io();
    if (!S_ISREG(st.st_mode)) throw CheckpointError("checkpoint " + quoted(path) + " is not a regular file");
    size_ = static_cast<uint64_t>(st.st_size);
  }
  CheckpointFile(const CheckpointFile&) = delete;
  CheckpointFile& operator=(const CheckpointFile&) = delete;
  ~CheckpointFile() { ::close(fd_); }

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Reads n bytes at offset; the caller has checked that they lie inside the file.
  void read_at(uint64_t offset, void* dst, size_t n) const {
    char* p = static_cast<char*>(dst);
    while (n > 0) {
      const ssize_t k = ::pread(fd_, p, n, static_cast<off_t>(offset));
      if (k < 0 && errno == EINTR) continue;
      if (k < 0) fail_io();
      if (k == 0) throw CheckpointError("checkpoint " + quoted(path_) + " shrank while being read");
      p += k;
      n -= static_cast<size_t>(k);
      offset += static_cast<uint64_t>(k);
    }
  }

  [[noreturn]] void fail(const std::string& problem) const {
    throw CheckpointError("checkpoint " + quoted(path_) + " " + problem);
  }
  [[noreturn]] void corrupt(const std::string& detail) const { fail("is corrupt: " + detail); }

 private:
  [[noreturn]] void fail_io() const {
    throw CheckpointError("cannot read checkpoint " + quoted(path_) + ": " + std::strerror(errno));
  }
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// Checks the fixed header against the file; returns the file length it declares (== size).
uint64_t read_header(const CheckpointFile& f) {
  unsigned char h[kHeaderBytes] = {};
  const uint64_t have = std::min<uint64_t>(f.size(), kHeaderBytes);
  f.read_at(0, h, have);
  const auto truncated_header = [&]() {
    f.fail("is truncated (expected at least " + std::to_string(kHeaderBytes) + " bytes, found " +
           std::to_string(f.size()) + ")");
  };
  if (f.size() == 0) f.fail("is empty (0 bytes)");
  if (std::memcmp(h, kMagic, std::min<uint64_t>(have, 8)) != 0) f.fail("has wrong magic (not a barrierlm checkpoint)");
  if (have < 12) truncated_header();
  const uint32_t version = static_cast<uint32_t>(get_le(h + 8, 4));
  if (version != kCheckpointVersion)
    f.fail("has version " + std::to_string(version) + "; this barrierlm reads version " +
           std::to_string(kCheckpointVersion));
  if (have < kHeaderBytes) truncated_header();
  const uint32_t header_length = static_cast<uint32_t>(get_le(h + 12, 4));
  if (header_length != kHeaderBytes)
    f.corrupt("header length " + std::to_string(header_length) + ", expected " + std::to_string(kHeaderBytes));
  const uint64_t file_length = get_le(h + 16, 8);
  if (file_length < kHeaderBytes + kTrailerBytes)
    f.corrupt("declared file length " + std::to_string(file_length) + " is too small");
  if (f.size() < file_length)
    f.fail("is truncated (expected " + std::to_string(file_length) + " bytes, found " + std::to_string(f.size()) + ")");
  if (f.size() > file_length)
    f.corrupt(std::to_string(f.size() - file_length) + " unexpected bytes after its end (expected " +
              std::to_string(file_length) + " bytes, found " + std::to_string(f.size()) + ")");
  return file_length;
}

// Checks the trailer and the checksum of every byte before the checksum field.
void verify_checksum(const CheckpointFile& f, uint64_t file_length) {
  unsigned char trailer[kTrailerBytes];
  const uint64_t trailer_at = file_length - kTrailerBytes;
  f.read_at(trailer_at, trailer, kTrailerBytes);
  Fnv1a fnv;
  std::vector<char> chunk(1 << 20);
  for (uint64_t pos = 0; pos < file_length - 8;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), file_length - 8 - pos));
    f.read_at(pos, chunk.data(), n);
    fnv.update(chunk.data(), n);
    pos += n;
  }
  if (fnv.hash != get_le(trailer + 12, 8)) f.fail("checksum mismatch (file corrupted)");
  if (std::memcmp(trailer, "END!", 4) != 0 || get_le(trailer + 4, 8) != 8) f.corrupt("bad trailer");
}

// Reads forward through one section [pos, end); a read past end is corruption of that section.
class SectionReader {
 public:
  SectionReader(const CheckpointFile& f, const std::string& tag, uint64_t pos, uint64_t end)
      : f_(f), tag_(tag), pos_(pos), end_(end) {}
  uint64_t remaining() const { return end_ - pos_; }
  void need(uint64_t n, const std::string& what) const {
    if (n > remaining())
      f_.corrupt("section " + tag_ + " ends inside " + what + " (needs " + std::to_string(n) + " bytes, " +
                 std::to_string(remaining()) + " left)");
  }
  void read(void* dst, uint64_t n, const std::string& what) {
    need(n, what);
    f_.read_at(pos_, dst, static_cast<size_t>(n));
    pos_ += n;
  }
  uint64_t u64(const std::string& what) { return number(8, what); }
  uint32_t u32(const std::string& what) { return static_cast<uint32_t>(number(4, what)); }
  std::string bytes(uint64_t n, const std::string& what) {
    need(n, what);
    std::string s(static_cast<size_t>(n), '\0');
    read(&s[0], n, what);
    return s;
  }
  // n float32 values into dst.
  void floats(float* dst, uint64_t n, const std::string& what) {
    if (n > remaining() / 4)
      f_.corrupt("section " + tag_ + " ends inside " + what + " (" + std::to_string(n) + " values, " +
                 std::to_string(remaining()) + " bytes left)");
    read(dst, n * 4, what);
    if (!kLittleEndian) {
      for (uint64_t i = 0; i < n; ++i) {
        unsigned char b[4];
        std::memcpy(b, dst + i, 4);
        const uint32_t bits = static_cast<uint32_t>(get_le(b, 4));
        std::memcpy(dst + i, &bits, 4);
      }
    }
  }
  void expect_end() const {
    if (remaining() != 0)
      f_.corrupt("section " + tag_ + " has " + std::to_string(remaining()) + " unexpected bytes at its end");
  }

 private:
  uint64_t number(int n, const std::string& what) {
    unsigned char b[8];
    read(b, static_cast<uint64_t>(n), what);
    return get_le(b, n);
  }
  const CheckpointFile& f_;
  std::string tag_;
  uint64_t pos_, end_;
};

std::string shape_text(const std::vector<uint64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void read_config(SectionReader& r, const CheckpointFile& f, Checkpoint& ck) {
  const std::string yaml = r.bytes(r.remaining(), "the config");
  try {
    ck.config = parse_config(yaml, "config");
  } catch (const ConfigError& e) {
    f.corrupt(std::string("its config is invalid: ") + e.what());
  }
  if (ck.config.model.vocab_size < 2)
    f.corrupt("its config has model.vocab_size " + std::to_string(ck.config.model.vocab_size));
}

void read_stat(SectionReader& r, const CheckpointFile& f, Checkpoint& ck) {
  if (r.remaining() != 32) f.corrupt("section STAT has " + std::to_string(r.remaining()) + " bytes, expected 32");
  ck.step = static_cast<int64_t>(r.u64("the step"));
  ck.adam_t = static_cast<int64_t>(r.u64("the optimizer step"));
  ck.tokens_seen = static_cast<int64_t>(r.u64("the token count"));
  ck.seed = r.u64("the seed");
  if (ck.step < 0 || ck.adam_t < 0 || ck.tokens_seen < 0) f.corrupt("section STAT holds a negative count");
}

// The tensors must be exactly those of ParamLayout(config.model), in its order.
void read_tensors(SectionReader& r, const CheckpointFile& f, Checkpoint& ck) {
  const ParamLayout layout(ck.config.model);
  // Before allocating for the config's model, make sure the section can hold it.
  if (layout.total() > r.remaining() / 4)
    f.corrupt("section TENS holds " + std::to_string(r.remaining()) + " bytes, too few for the " +
              std::to_string(layout.total()) + " parameters of its model");
  const uint32_t count = r.u32("the tensor count");
  if (count != layout.tensors().size())
    f.fail("has " + std::to_string(count) + " tensors; its model config has " +
           std::to_string(layout.tensors().size()));
  ck.params.assign(layout.total(), 0.0f);
  for (uint32_t i = 0; i < count; ++i) {
    const TensorSpec& spec = layout.tensors()[i];
    const std::string where = "tensor " + std::to_string(i);
    const uint32_t name_length = r.u32(where + "'s name length");
    if (name_length > kMaxNameBytes) f.corrupt(where + " has a name of " + std::to_string(name_length) + " bytes");
    const std::string name = r.bytes(name_length, where + "'s name");
    const uint32_t ndim = r.u32(where + "'s rank");
    if (ndim > kMaxDims) f.corrupt(where + " has rank " + std::to_string(ndim));
    std::vector<uint64_t> shape;
    for (uint32_t k = 0; k < ndim; ++k) shape.push_back(r.u64(where + "'s shape"));
    const std::vector<uint64_t> expected(spec.shape.begin(), spec.shape.end());
    if (name != spec.name || shape != expected)
      f.fail("has tensor " + std::to_string(i) + " '" + printable(name) + "' " + shape_text(shape) +
             " where its model config has '" + spec.name + "' " + shape_text(expected));
    r.floats(ck.params.data() + spec.offset, spec.size, "tensor '" + spec.name + "'");
  }
}

void read_adam(SectionReader& r, const CheckpointFile& f, Checkpoint& ck) {
  const uint64_t n = r.u64("the moment count");
  const uint64_t total = ck.params.size();
  if (n != 0 && n != total)
    f.corrupt("section ADAM holds moments of " + std::to_string(n) + " values; the model has " + std::to_string(total));
  if (r.remaining() != 8 * n)
    f.corrupt("section ADAM has " + std::to_string(r.remaining()) + " bytes of moments, expected " +
              std::to_string(8 * n));
  ck.adam_m.assign(n, 0.0f);
  ck.adam_v.assign(n, 0.0f);
  r.floats(ck.adam_m.data(), n, "the first moments");
  r.floats(ck.adam_v.data(), n, "the second moments");
}

// Parts: everything, or (kSummary) all but the tensors and moments, whose sections are skipped.
enum class Parts { kAll, kSummary };

Checkpoint read_sections(const CheckpointFile& f, uint64_t file_length, Parts parts = Parts::kAll) {
  Checkpoint ck;
  const uint64_t sections_end = file_length - kTrailerBytes;
  std::vector<std::string> seen;
  for (uint64_t pos = kHeaderBytes; pos < sections_end;) {
    if (sections_end - pos < kSectionHeaderBytes) f.corrupt("a section header runs into the trailer");
    unsigned char h[kSectionHeaderBytes];
    f.read_at(pos, h, kSectionHeaderBytes);
    const std::string tag = printable(std::string(reinterpret_cast<const char*>(h), 4));
    const uint64_t length = get_le(h + 4, 8);
    pos += kSectionHeaderBytes;
    if (length > sections_end - pos)
      f.corrupt("section " + tag + " has length " + std::to_string(length) + " but only " +
                std::to_string(sections_end - pos) + " bytes remain");
    for (const std::string& s : seen)
      if (s == tag) f.corrupt("section " + tag + " appears twice");
    seen.push_back(tag);
    SectionReader r(f, tag, pos, pos + length);
    const auto have = [&](const char* t) { return std::find(seen.begin(), seen.end(), t) != seen.end(); };
    if (tag == "CONF") {
      read_config(r, f, ck);
    } else if (tag == "TOKN") {
      ck.tokenizer = r.bytes(length, "the tokenizer");
    } else if (tag == "STAT") {
      read_stat(r, f, ck);
    } else if (parts == Parts::kSummary && (tag == "TENS" || tag == "ADAM")) {
      pos += length;
      continue;
    } else if (tag == "TENS") {
      if (!have("CONF")) f.corrupt("section TENS comes before CONF");
      read_tensors(r, f, ck);
    } else if (tag == "ADAM") {
      if (!have("TENS")) f.corrupt("section ADAM comes before TENS");
      read_adam(r, f, ck);
    } else if (tag == "META") {
      ck.meta_json = r.bytes(length, "the metadata");
    } else {
      pos += length;  // an unknown section (a later addition): skipped
      continue;
    }
    r.expect_end();
    pos += length;
  }
  for (const char* required : {"CONF", "TOKN", "STAT", "TENS"})
    if (std::find(seen.begin(), seen.end(), required) == seen.end())
      f.corrupt(std::string("section ") + required + " is missing");
  return ck;
}

}  // namespace

// ------------------------------------------------------------------ public interface

void save_checkpoint(const std::string& path, const Checkpoint& ck) {
  check_savable(path, ck);
  const ParamLayout layout(ck.config.model);
  const std::string conf = config_to_yaml(ck.config), stat = encode_stat(ck);
  const std::vector<std::string> headers = tensor_headers(layout);
  uint64_t tens_length = 4 + 4 * static_cast<uint64_t>(layout.total());
  for (const std::string& h : headers) tens_length += h.size();
  const uint64_t adam_length = 8 + 8 * static_cast<uint64_t>(ck.adam_m.size());
  const uint64_t file_length = kHeaderBytes + 6 * kSectionHeaderBytes + conf.size() + ck.tokenizer.size() +
                               stat.size() + tens_length + adam_length + ck.meta_json.size() + kTrailerBytes;
  try {
    AtomicFile out(path, "checkpoint");
    std::string header(kMagic, 8);
    put_le(header, kCheckpointVersion, 4);
    put_le(header, kHeaderBytes, 4);
    put_le(header, file_length, 8);
    out.write(header);
    write_section_header(out, "CONF", conf.size());
    out.write(conf);
    write_section_header(out, "TOKN", ck.tokenizer.size());
    out.write(ck.tokenizer);
    write_section_header(out, "STAT", stat.size());
    out.write(stat);
    write_section_header(out, "TENS", tens_length);
    std::string count;
    put_le(count, headers.size(), 4);
    out.write(count);
    for (size_t i = 0; i < headers.size(); ++i) {
      const TensorSpec& t = layout.tensors()[i];
      out.write(headers[i]);
      write_floats(out, ck.params.data() + t.offset, t.size);
    }
    write_section_header(out, "ADAM", adam_length);
    std::string n;
    put_le(n, ck.adam_m.size(), 8);
    out.write(n);
    write_floats(out, ck.adam_m.data(), ck.adam_m.size());
    write_floats(out, ck.adam_v.data(), ck.adam_v.size());
    write_section_header(out, "META", ck.meta_json.size());
    out.write(ck.meta_json);
    std::string trailer("END!", 4);
    put_le(trailer, 8, 8);
    out.write(trailer);
    std::string sum;
    put_le(sum, out.checksum(), 8);
    out.write(sum);
    if (out.written() != file_length) throw Error("internal error: checkpoint length mismatch");
    out.commit();
  } catch (const CheckpointError&) {
    throw;
  } catch (const Error& e) {
    throw CheckpointError(e.what());
  }
}

Checkpoint load_checkpoint(const std::string& path) {
  const CheckpointFile f(path);
  const uint64_t file_length = read_header(f);
  verify_checksum(f, file_length);
  return read_sections(f, file_length);
}

Checkpoint load_checkpoint_summary(const std::string& path) {
  const CheckpointFile f(path);
  return read_sections(f, read_header(f), Parts::kSummary);
}

void remove_stale_temporaries(const std::string& dir, const std::string& prefix) {
  std::error_code ec;
  for (const std::filesystem::directory_entry& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const size_t at = name.rfind(".tmp.");
    if (at == std::string::npos || at + 5 < prefix.size()) continue;
    const long pid = std::strtol(name.c_str() + at + 5, nullptr, 10);
    if (pid <= 0 || pid == static_cast<long>(::getpid())) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive, or not ours
    std::filesystem::remove(e.path(), ec);
  }
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile out(path, "", Links::kFollow);
  out.write(contents);
  out.commit();
}

}  // namespace blm
