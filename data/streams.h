// Token streams over files (internal to blm_data): a memory-mapped file, the byte stream of a
// mapped text, the uint16 tokens of a mapped .bin shard, and characters or GPT-2 tokens encoded
// into memory.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "data/dataset.h"

namespace blm {

class CharTokenizer;
class Gpt2Tokenizer;

// A whole file mapped read-only.  Opening throws DataError "cannot open data file 'x': <why>".
// (Truncating the file while it is mapped would crash the reader: data files are inputs only.)
class MappedFile {
 public:
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* bytes() const { return bytes_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  std::string path_;
  const unsigned char* bytes_ = nullptr;  // null for an empty file
  size_t size_ = 0;
};

// Whether a file starts with the .bin shard magic number.
bool has_shard_magic(const MappedFile& file);

// The file's bytes as tokens (the byte tokenizer).
std::shared_ptr<TokenStream> byte_stream(std::shared_ptr<MappedFile> file);

// The tokens of a .bin shard.  Throws DataError naming the file and the numbers when the magic,
// the version or the size disagrees with the format.
std::shared_ptr<TokenStream> shard_stream(std::shared_ptr<MappedFile> file);

// The file's characters encoded once into memory (uint16 ids when the vocabulary fits).
// Throws DataError naming the file and the byte offset of malformed UTF-8 or of a character
// outside the tokenizer's vocabulary.
std::shared_ptr<TokenStream> char_stream(const MappedFile& file, const CharTokenizer& tok);

// The file's GPT-2 tokens encoded once into memory (uint16 ids when the vocabulary fits), on
// every core (encode_gpt2_parallel: the same ids as one thread).
// threads: as encode_gpt2_parallel's (0: all cores).
std::shared_ptr<TokenStream> gpt2_stream(const MappedFile& file, const Gpt2Tokenizer& tok,
                                         int threads = 0);

// The largest token of a stream (-1 when it is empty).
int32_t max_token(const TokenStream& stream);

}  // namespace blm
