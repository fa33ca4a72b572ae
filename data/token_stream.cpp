// Token streams: memory-mapped text (token = byte), memory-mapped .bin shards (256 x int32
// header, then uint16 tokens), characters encoded into memory, in-memory vectors and slices.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "data/streams.h"
#include "data/tokenizers.h"

namespace blm {

namespace {

constexpr size_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);

// Streams are read by the sampler with indices it computed; a bad index is a bug, not bad data.
void check_range(size_t start, size_t n, size_t size) {
  if (start > size || n > size - start)
    throw std::out_of_range("token stream: read [" + std::to_string(start) + ", " +
                            std::to_string(start + n) + ") past the end (" +
                            std::to_string(size) + " tokens)");
}

int32_t read_le_i32(const unsigned char* p) {
  return static_cast<int32_t>(static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
                              static_cast<uint32_t>(p[2]) << 16 |
                              static_cast<uint32_t>(p[3]) << 24);
}

int32_t read_le_u16(const unsigned char* p) {
  return static_cast<int32_t>(p[0] | p[1] << 8);
}

// Bytes of a mapped text file, one token each.
class ByteStream : public TokenStream {
 public:
  explicit ByteStream(std::shared_ptr<MappedFile> f) : file_(std::move(f)) {}
  size_t size() const override { return file_->size(); }
  int32_t at(size_t i) const override {
    check_range(i, 1, size());
    return file_->bytes()[i];
  }
  void read(size_t start, size_t n, int32_t* out) const override {
    check_range(start, n, size());
    const unsigned char* p = file_->bytes() + start;
    for (size_t i = 0; i < n; ++i) out[i] = p[i];
  }

 private:
  std::shared_ptr<MappedFile> file_;
};

// uint16 tokens of a mapped .bin shard, after its header.
class ShardStream : public TokenStream {
 public:
  ShardStream(std::shared_ptr<MappedFile> f, size_t count) : file_(std::move(f)), count_(count) {}
  size_t size() const override { return count_; }
  int32_t at(size_t i) const override {
    check_range(i, 1, count_);
    return read_le_u16(tokens() + 2 * i);
  }
  void read(size_t start, size_t n, int32_t* out) const override {
    check_range(start, n, count_);
    const unsigned char* p = tokens() + 2 * start;
    for (size_t i = 0; i < n; ++i) out[i] = read_le_u16(p + 2 * i);
  }

 private:
  const unsigned char* tokens() const { return file_->bytes() + kShardHeaderBytes; }
  std::shared_ptr<MappedFile> file_;
  size_t count_;
};

// Tokens in memory; T is uint16_t or int32_t (encoded characters use the narrower type when
// the vocabulary allows, halving the memory of a large text).
template <class T>
class VectorStream : public TokenStream {
 public:
  explicit VectorStream(std::vector<T> v) : v_(std::move(v)) {}
  size_t size() const override { return v_.size(); }
  int32_t at(size_t i) const override {
    check_range(i, 1, v_.size());
    return static_cast<int32_t>(v_[i]);
  }
  void read(size_t start, size_t n, int32_t* out) const override {
    check_range(start, n, v_.size());
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(v_[start + i]);
  }

 private:
  std::vector<T> v_;
};

// Tokens [begin, begin + n) of another stream.
class SliceStream : public TokenStream {
 public:
  SliceStream(std::shared_ptr<TokenStream> s, size_t begin, size_t n)
      : s_(std::move(s)), begin_(begin), n_(n) {}
  size_t size() const override { return n_; }
  int32_t at(size_t i) const override {
    check_range(i, 1, n_);
    return s_->at(begin_ + i);
  }
  void read(size_t start, size_t n, int32_t* out) const override {
    check_range(start, n, n_);
    s_->read(begin_ + start, n, out);
  }

 private:
  std::shared_ptr<TokenStream> s_;
  size_t begin_, n_;
};

// Several streams back to back (the files of a data set): stream j's token i is token
// starts_[j] + i of this one.
class ConcatStream : public TokenStream {
 public:
  explicit ConcatStream(std::vector<std::shared_ptr<TokenStream>> parts)
      : parts_(std::move(parts)) {
    starts_.push_back(0);
    for (const auto& p : parts_) starts_.push_back(starts_.back() + p->size());
  }
  size_t size() const override { return starts_.back(); }
  int32_t at(size_t i) const override {
    check_range(i, 1, size());
    const size_t j = part_of(i);
    return parts_[j]->at(i - starts_[j]);
  }
  void read(size_t start, size_t n, int32_t* out) const override {
    check_range(start, n, size());
    for (size_t j = part_of(start); n > 0; ++j) {  // a window may span the end of a part
      const size_t offset = start - starts_[j], take = std::min(n, parts_[j]->size() - offset);
      parts_[j]->read(offset, take, out);
      start += take, out += take, n -= take;
    }
  }

 private:
  // The part holding token i (i < size()): the last start <= i among the non-empty parts.
  size_t part_of(size_t i) const {
    return static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), i) -
                               starts_.begin()) - 1;
  }
  std::vector<std::shared_ptr<TokenStream>> parts_;
  std::vector<size_t> starts_;  // parts_.size() + 1 prefix sums
};

[[noreturn]] void throw_file_error(const std::string& path, const std::string& why) {
  throw DataError("data file '" + path + "' " + why);
}

}  // namespace

// ------------------------------------------------------------------------------ MappedFile

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw DataError("cannot open data file '" + path + "': " + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw DataError("cannot open data file '" + path + "': " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw_file_error(path, "is not a regular file");
  }
  std::shared_ptr<MappedFile> f(new MappedFile());
  f->path_ = path;
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {  // mmap rejects length 0; an empty file simply has no bytes
    void* p = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw DataError("cannot map data file '" + path + "': " + std::strerror(err));
    }
    f->bytes_ = static_cast<const unsigned char*>(p);
  }
  ::close(fd);  // the mapping stays valid without the descriptor
  return f;
}

MappedFile::~MappedFile() {
  if (bytes_) munmap(const_cast<unsigned char*>(bytes_), size_);
}

// -------------------------------------------------------------------------------- streams

bool has_shard_magic(const MappedFile& file) {
  return file.size() >= 4 && read_le_i32(file.bytes()) == kShardMagic;
}

std::shared_ptr<TokenStream> byte_stream(std::shared_ptr<MappedFile> file) {
  return std::make_shared<ByteStream>(std::move(file));
}

std::shared_ptr<TokenStream> shard_stream(std::shared_ptr<MappedFile> file) {
  const std::string& path = file->path();
  if (file->size() < 4 || !has_shard_magic(*file)) {
    std::string got = file->size() < 4 ? "a file of " + std::to_string(file->size()) + " bytes"
                                       : std::to_string(read_le_i32(file->bytes()));
    throw_file_error(path, "is not a .bin shard: magic number " + got + ", expected " +
                               std::to_string(kShardMagic));
  }
  if (file->size() < kShardHeaderBytes)
    throw_file_error(path, "is too short for a .bin header: " + std::to_string(file->size()) +
                               " bytes, the header alone is " + std::to_string(kShardHeaderBytes));
  const unsigned char* h = file->bytes();
  int32_t version = read_le_i32(h + 4), count = read_le_i32(h + 8);
  if (version != kShardVersion)
    throw_file_error(path, "has .bin version " + std::to_string(version) + ", expected " +
                               std::to_string(kShardVersion));
  if (count < 0)
    throw_file_error(path, "has a negative token count " + std::to_string(count) +
                               " in its .bin header");
  size_t expected = kShardHeaderBytes + 2 * static_cast<size_t>(count);
  if (file->size() != expected)
    throw_file_error(path, "has " + std::to_string(file->size()) + " bytes but its .bin header says " +
                               std::to_string(count) + " tokens, which take " +
                               std::to_string(expected) + " bytes");
  return std::make_shared<ShardStream>(std::move(file), static_cast<size_t>(count));
}

namespace {

// The ids that fill(ids) appends, in memory as uint16 when the vocabulary allows (half the
// memory of a large text), else int32; `expected_tokens` reserves room (ids grow past it if need
// be).  fill is called with a std::vector<uint16_t> or std::vector<int32_t>.
template <class Fill>
std::shared_ptr<TokenStream> ids_in_memory(int vocab_size, size_t expected_tokens, Fill&& fill) {
  const auto make = [&](auto ids) {
    ids.reserve(expected_tokens);
    fill(ids);
    ids.shrink_to_fit();
    using T = typename decltype(ids)::value_type;
    return std::shared_ptr<TokenStream>(std::make_shared<VectorStream<T>>(std::move(ids)));
  };
  if (vocab_size <= 65536) return make(std::vector<uint16_t>());
  return make(std::vector<int32_t>());
}

}  // namespace

std::shared_ptr<TokenStream> char_stream(const MappedFile& file, const CharTokenizer& tok) {
  const char* text = reinterpret_cast<const char*>(file.bytes());
  return ids_in_memory(tok.vocab_size(), file.size(), [&](auto& ids) {  // a token at most a byte
    using T = typename std::decay_t<decltype(ids)>::value_type;
    try {
      tok.for_each_id(text, file.size(), [&](int32_t id) { ids.push_back(static_cast<T>(id)); });
    } catch (const DataError& e) {
      throw_file_error(file.path(), "(" + tok.kind() + " tokenizer): " + e.what());
    }
  });
}

std::shared_ptr<TokenStream> gpt2_stream(const MappedFile& file, const Gpt2Tokenizer& tok,
                                         int threads) {
  const char* text = reinterpret_cast<const char*>(file.bytes());
  return ids_in_memory(tok.vocab_size(), file.size() / 3, [&](auto& ids) {  // ~4 bytes a token
    encode_gpt2_parallel(tok, text, file.size(), ids, threads);
  });
}

int32_t max_token(const TokenStream& stream) {
  int32_t best = -1;
  std::vector<int32_t> chunk(1 << 16);
  for (size_t start = 0; start < stream.size(); start += chunk.size()) {
    size_t n = std::min(chunk.size(), stream.size() - start);
    stream.read(start, n, chunk.data());
    best = std::max(best, *std::max_element(chunk.begin(), chunk.begin() + n));
  }
  return best;
}

std::shared_ptr<TokenStream> make_memory_stream(std::vector<int32_t> tokens) {
  return std::make_shared<VectorStream<int32_t>>(std::move(tokens));
}

std::shared_ptr<TokenStream> concat_streams(std::vector<std::shared_ptr<TokenStream>> parts) {
  if (parts.size() == 1) return std::move(parts[0]);
  return std::make_shared<ConcatStream>(std::move(parts));
}

std::shared_ptr<TokenStream> slice_stream(std::shared_ptr<TokenStream> stream, size_t begin,
                                          size_t end) {
  if (!stream || begin > end || end > stream->size())
    throw std::out_of_range("slice_stream: [" + std::to_string(begin) + ", " +
                            std::to_string(end) + ") is not inside the stream");
  return std::make_shared<SliceStream>(std::move(stream), begin, end - begin);
}

namespace {

// The shard's bytes for tokens already checked to lie in [0, 65535].
template <class T>
std::string shard_bytes(const std::vector<T>& tokens) {
  if (tokens.size() > static_cast<size_t>(INT32_MAX))
    throw DataError(".bin shard: " + std::to_string(tokens.size()) +
                    " tokens exceed the format's int32 count");
  std::string out(kShardHeaderBytes + 2 * tokens.size(), '\0');
  auto put_i32 = [&](size_t at, int32_t v) {
    for (int k = 0; k < 4; ++k)
      out[at + k] = static_cast<char>((static_cast<uint32_t>(v) >> (8 * k)) & 0xFF);
  };
  put_i32(0, kShardMagic);
  put_i32(4, kShardVersion);
  put_i32(8, static_cast<int32_t>(tokens.size()));
  char* p = &out[kShardHeaderBytes];
  for (const T t : tokens) *p++ = static_cast<char>(t & 0xFF), *p++ = static_cast<char>(t >> 8);
  return out;
}

}  // namespace

std::string encode_bin_shard(const std::vector<int32_t>& tokens) {
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || tokens[i] > 65535)
      throw DataError(".bin shard: token " + std::to_string(tokens[i]) + " at position " +
                      std::to_string(i) + " does not fit uint16");
  return shard_bytes(tokens);
}

std::string encode_bin_shard_u16(const std::vector<uint16_t>& tokens) {
  return shard_bytes(tokens);
}

}  // namespace blm
