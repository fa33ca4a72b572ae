// barrierlm tokenize: text files -> .bin token shards, the llm.c / nanoGPT format that data.train
// and data.val read (data/dataset.h), so that a large corpus is encoded once instead of at the
// start of every run and by every data-parallel worker.
//
// Each input file is one document; "-" is standard input, read in blocks, so that a corpus can
// come through a pipe (zstd -dc corpus.zst | barrierlm tokenize - -o ...).  With GPT-2's
// tokenizer every document starts with <|endoftext|> (llm.c's convention: the model sees where
// documents begin), unless --no-eot.  The text is encoded on every core (encode_gpt2_parallel,
// the same ids as one thread) in slices of about kSliceBytes that end where GPT-2's pieces
// cannot change (gpt2_cut_at_or_after), so memory holds one slice and its tokens plus the shard
// being filled.  Each shard is written atomically (a temporary file, then rename) when it is
// full.  A failed or interrupted (SIGINT / SIGTERM) run removes the shards it wrote: a partial
// set would look complete to the pattern OUT_*.bin.
#include <fnmatch.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "cmd/cli_checks.h"
#include "cmd/commands.h"
#include "cmd/signals.h"
#include "cmd/util.h"
#include "core/checkpoint.h"
#include "data/streams.h"
#include "data/tokenizers.h"

namespace blm {

namespace {

namespace fs = std::filesystem;

// Text encoded per call on all cores; BLM_TOKENIZE_SLICE_BYTES sets another size (the tests
// use small ones to cut standard input's blocks many times).
size_t slice_bytes() {
  const char* env = std::getenv("BLM_TOKENIZE_SLICE_BYTES");
  const long long v = env ? std::atoll(env) : 0;
  return v > 0 ? static_cast<size_t>(v) : size_t{64} << 20;
}
const char* const kEndOfText = "<|endoftext|>";

// Where shard `index` goes: --out itself for one file, else OUT_000000.bin, OUT_000001.bin, ...
// (OUT = --out without ".bin"), which the pattern OUT_*.bin lists in order.
std::string shard_stem(const std::string& out) {
  const std::string ext = ".bin";
  const bool has_ext = out.size() > ext.size() && out.compare(out.size() - ext.size(), 4, ext) == 0;
  return has_ext ? out.substr(0, out.size() - ext.size()) : out;
}
std::string shard_path(const TokenizeOptions& o, int index) {
  if (o.shard_tokens == 0) return o.out;
  char number[16];
  std::snprintf(number, sizeof number, "_%06d.bin", index);
  return shard_stem(o.out) + number;
}

// The existing files that the pattern OUT_*.bin of --out's shards could name, sorted.
std::vector<std::string> existing_shards(const TokenizeOptions& o) {
  const fs::path stem(shard_stem(o.out));
  const fs::path dir = stem.has_parent_path() ? stem.parent_path() : fs::path(".");
  const std::string pattern = stem.filename().string() + "_[0-9][0-9][0-9][0-9][0-9][0-9].bin";
  std::error_code ec;
  std::vector<std::string> found;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (fnmatch(pattern.c_str(), it->path().filename().c_str(), 0) == 0)
      found.push_back(it->path().string());
  std::sort(found.begin(), found.end());
  return found;
}

// Shards of an earlier run that a pattern OUT_*.bin would read beside this run's: refused before
// any work, since overwriting some of them would leave a set that is neither run's.
void refuse_earlier_shards(const TokenizeOptions& o) {
  if (o.shard_tokens == 0) return;
  const std::vector<std::string> found = existing_shards(o);
  if (found.empty()) return;
  throw Error("'" + found[0] + "' exists" +
              (found.size() > 1 ? " (and " + std::to_string(found.size() - 1) + " more)" : "") +
              ": shards of an earlier run would mix with these in the pattern '" +
              shard_stem(o.out) + "_*.bin'; remove them or choose another --out");
}

// An --out that ends in '/' or names a directory lacks the file name: refused before the
// directory is created (a missing one would be, and then the write would fail).
void refuse_directory_out(const TokenizeOptions& o) {
  std::error_code ec;
  const bool slash = !o.out.empty() && o.out.back() == '/';
  if (!slash && !fs::is_directory(o.out, ec)) return;
  const std::string dir = slash ? o.out.substr(0, o.out.find_last_not_of('/') + 1) : o.out;
  throw Error("--out '" + o.out + (slash ? "' ends in '/'" : "' is a directory") +
              ": give the file to write, such as '" + (fs::path(dir) / "train.bin").string() +
              "'");
}

// An input that is the output, or with --shard-tokens an existing file the shards' pattern names
// (refuse_earlier_shards would only call it an earlier run's): writing would replace the text.
// same_file (cli_checks.h) compares them, "-" as the file standard input reads; the message is
// tokenize's own, which names the input first (refuse_output_over names the option first).
void refuse_overwriting_inputs(const TokenizeOptions& o) {
  const std::vector<std::string> outputs =
      o.shard_tokens == 0 ? std::vector<std::string>{o.out} : existing_shards(o);
  for (const std::string& input : o.inputs)
    for (const std::string& output : outputs)
      if (same_file(input, output))
        throw Error("input '" + input + "'" + (input == "-" ? " (standard input)" : "") +
                    " is the file '" + output + "' that tokenize would write (--out '" + o.out +
                    "'): its text would be lost; choose another --out");
}

// The tokens of the shard being filled, written out when full and at the end.
class ShardWriter {
 public:
  explicit ShardWriter(const TokenizeOptions& o) : o_(o) {}

  template <class T>
  void append(const T* ids, size_t n) {
    while (n > 0) {
      const size_t room =
          o_.shard_tokens > 0 ? static_cast<size_t>(o_.shard_tokens) - tokens_.size() : n;
      const size_t take = std::min(n, room);
      tokens_.insert(tokens_.end(), ids, ids + take);
      ids += take, n -= take, total_ += take;
      if (o_.shard_tokens > 0 && tokens_.size() == static_cast<size_t>(o_.shard_tokens)) flush();
      if (o_.shard_tokens == 0 && tokens_.size() > static_cast<size_t>(INT32_MAX))
        throw Error("more than " + std::to_string(INT32_MAX) + " tokens, the most one .bin "
                    "file holds: split them with --shard-tokens (e.g. 100000000)");
    }
  }
  void finish() {
    if (!tokens_.empty() || written_.empty()) flush();
  }
  size_t total() const { return total_; }
  const std::vector<std::string>& written() const { return written_; }
  // Removes the files written (a failed or interrupted run); returns how many there were.
  size_t remove_written() {
    std::error_code ec;
    for (const std::string& path : written_) fs::remove(path, ec);
    const size_t n = written_.size();
    written_.clear();
    return n;
  }

 private:
  void flush() {
    const std::string path = shard_path(o_, static_cast<int>(written_.size()));
    write_file_atomic(path, encode_bin_shard_u16(tokens_));
    written_.push_back(path);
    tokens_.clear();
  }

  const TokenizeOptions& o_;
  std::vector<uint16_t> tokens_;
  std::vector<std::string> written_;
  size_t total_ = 0;
};

// "12.3 MB of 1.20 GB (1%), 8.1 MB/s, 2.95M tokens, ETA 2m27s" on stderr (without the total,
// the share and the ETA when standard input is among the inputs): one updating line on a
// terminal, else a line every 10 seconds.
class Progress {
 public:
  // total_bytes: 0 when unknown.
  Progress(size_t total_bytes, bool quiet)
      : total_(total_bytes), quiet_(quiet), terminal_(isatty(fileno(stderr)) != 0) {}
  void update(size_t done_bytes, size_t tokens) {
    if (quiet_) return;
    const double now = seconds();
    if (!terminal_ && now - last_ < 10.0) return;
    last_ = now;
    const double rate = done_bytes / std::max(now, 1e-9);
    std::string of_total;
    if (total_ > 0) {
      char share[16];
      std::snprintf(share, sizeof share, " (%.0f%%)", 100.0 * done_bytes / total_);
      of_total = " of " + format_rate(total_) + "B" + share;
    }
    std::fprintf(stderr, "%stokenize: %sB%s, %sB/s, %s tokens%s%s", terminal_ ? "\r\033[K" : "",
                 format_rate(done_bytes).c_str(), of_total.c_str(), format_rate(rate).c_str(),
                 format_rate(tokens).c_str(),
                 total_ > 0
                     ? (", ETA " + format_duration((total_ - done_bytes) / std::max(rate, 1.0)))
                           .c_str()
                     : "",
                 terminal_ ? "" : "\n");
    std::fflush(stderr);
  }
  void done() {
    if (!quiet_ && terminal_) std::fprintf(stderr, "\r\033[K");
  }
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  size_t total_;
  bool quiet_, terminal_;
  double last_ = 0.0;
};

// The tokenizer of the options and the id of <|endoftext|> (-1: none, or --no-eot).
std::unique_ptr<Gpt2Tokenizer> gpt2_tokenizer(const TokenizeOptions& o, int32_t& eot) {
  const std::string wanted =
      "the directory of encoder.json and vocab.bpe (OpenAI's names: scripts/get-data.sh "
      "--gpt2-vocab) or of vocab.json and merges.txt (a Hugging Face GPT-2 directory: "
      "scripts/get-data.sh --gpt2-model)";
  std::error_code ec;
  if (!fs::exists(o.vocab, ec))
    throw Error("--vocab '" + o.vocab + "' does not exist: give " + wanted);
  if (!fs::is_directory(o.vocab, ec))
    throw Error("--vocab '" + o.vocab + "' is not a directory: give " + wanted);
  std::string encoder, merges;
  if (!gpt2_vocab_files(o.vocab, encoder, merges))
    throw Error("--vocab '" + o.vocab +
                "' has neither encoder.json and vocab.bpe (OpenAI's names: scripts/get-data.sh "
                "--gpt2-vocab) nor vocab.json and merges.txt (a Hugging Face GPT-2 directory: "
                "scripts/get-data.sh --gpt2-model)");
  auto tok = Gpt2Tokenizer::from_files(o.vocab);
  if (tok->vocab_size() > 65536)
    throw Error("the vocabulary of '" + o.vocab + "' has " + std::to_string(tok->vocab_size()) +
                " tokens; .bin shards hold ids below 65536");
  eot = o.no_eot ? -1 : tok->id_of_token(kEndOfText);
  if (!o.no_eot && eot < 0)
    throw Error("the vocabulary of '" + o.vocab + "' has no " + kEndOfText +
                " token to start each document with; give --no-eot");
  return tok;
}

[[noreturn]] void refuse_shard(const std::string& name) {
  throw Error("input '" + name + "' is already a .bin shard; tokenize reads text");
}

// A pipe or device among the named inputs (such as bash's <(...), /dev/fd/63) cannot be mapped;
// standard input reads it.
void refuse_unmappable(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0 || S_ISREG(st.st_mode) || S_ISDIR(st.st_mode)) return;
  throw Error("input '" + path + "' is not a regular file (a pipe or device, which tokenize "
              "cannot map): give - and send the text to standard input instead, e.g. "
              "'cat a.txt | barrierlm tokenize - -o OUT.bin'");
}

// Thrown out of the encoding when SIGINT or SIGTERM asks tokenize to stop.
struct Interrupted {};

void stop_if_interrupted() {
  if (interrupted()) throw Interrupted();
}

// The last position p < n (p > 0) where text[0, n) can be cut (gpt2_cut_at_or_after), or 0.
size_t last_cut(const char* text, size_t n) {
  const size_t window = size_t{1} << 20;
  for (size_t from : {n > window ? n - window : size_t{0}, size_t{0}}) {
    size_t found = 0;
    for (size_t p = gpt2_cut_at_or_after(text, n, from); p < n;
         p = gpt2_cut_at_or_after(text, n, p + 1))
      found = p;
    if (found > 0 || from == 0) return found;
  }
  return 0;
}

// One input's text in slices of about slice_bytes() that end where GPT-2's pieces cannot change
// (anywhere for the byte tokenizer): a mapped file, or standard input ("-") read in blocks,
// each slice up to its last cut and the rest kept for the next.
class TextSource {
 public:
  TextSource(const std::string& path, bool gpt2) : path_(path), gpt2_(gpt2) {
    if (path == "-") return;
    refuse_unmappable(path);
    file_ = MappedFile::open(path);
    if (has_shard_magic(*file_)) refuse_shard(path);
  }
  size_t size() const { return file_ ? file_->size() : 0; }  // 0: unknown (standard input)

  // The next slice; empty at the end.  Valid until the next call.
  std::string_view next() { return file_ ? next_of_file() : next_of_stdin(); }

 private:
  std::string_view next_of_file() {
    const char* text = reinterpret_cast<const char*>(file_->bytes());
    const size_t n = file_->size(), want = begin_ + slice_bytes();
    const size_t end = gpt2_ ? gpt2_cut_at_or_after(text, n, want) : std::min(n, want);
    const std::string_view slice(text + begin_, end - begin_);
    begin_ = end;
    return slice;
  }
  std::string_view next_of_stdin() {
    buffer_.erase(0, taken_);
    taken_ = 0;
    for (;;) {
      const size_t old = buffer_.size();
      buffer_.resize(std::max(old + slice_bytes() / 4, slice_bytes()));
      buffer_.resize(old + std::fread(&buffer_[old], 1, buffer_.size() - old, stdin));
      if (std::ferror(stdin)) {
        stop_if_interrupted();  // the signal cut the read short (EINTR)
        throw Error("cannot read standard input: " + std::string(std::strerror(errno)));
      }
      if (!checked_ && buffer_.size() >= 4) {
        checked_ = true;
        uint32_t first = 0;  // the shard header's first int32, little-endian
        for (int b = 3; b >= 0; --b) first = first << 8 | static_cast<unsigned char>(buffer_[b]);
        if (first == static_cast<uint32_t>(kShardMagic)) refuse_shard(path_);
      }
      const bool end = std::feof(stdin) != 0;
      taken_ = end || !gpt2_ ? buffer_.size() : last_cut(buffer_.data(), buffer_.size());
      if (taken_ > 0 || end) return std::string_view(buffer_.data(), taken_);
      // No cut in all of it yet (text without spaces): read on, the buffer grows.
    }
  }

  std::string path_;
  bool gpt2_;
  std::shared_ptr<MappedFile> file_;
  size_t begin_ = 0;    // mapped file: where the next slice starts
  std::string buffer_;  // standard input: bytes read and not yet handed out, from taken_ on
  size_t taken_ = 0;
  bool checked_ = false;  // the first bytes were compared with the shard magic
};

// Encodes the inputs into the writer, each non-empty one a document (after <|endoftext|> when
// eot >= 0); an empty one adds nothing, as an empty text file is no tokens to open_dataset.
// Stops (Interrupted) between slices when asked to.  Returns the bytes of text read.
size_t encode_inputs(std::vector<TextSource>& inputs, const Gpt2Tokenizer* gpt2, int32_t eot,
                     int threads, ShardWriter& writer, Progress& progress) {
  size_t done_bytes = 0;
  std::vector<uint16_t> ids;
  for (TextSource& input : inputs) {
    bool document_started = false;
    for (std::string_view slice = input.next(); !slice.empty(); slice = input.next()) {
      if (!document_started && eot >= 0) {
        const uint16_t start = static_cast<uint16_t>(eot);
        writer.append(&start, 1);
      }
      document_started = true;
      if (gpt2) {
        ids.clear();
        encode_gpt2_parallel(*gpt2, slice.data(), slice.size(), ids, threads);
        writer.append(ids.data(), ids.size());
      } else {
        writer.append(reinterpret_cast<const unsigned char*>(slice.data()), slice.size());
      }
      done_bytes += slice.size();
      progress.update(done_bytes, writer.total());
      stop_if_interrupted();
    }
  }
  return done_bytes;
}

// After an error or an interruption (the exception being handled): removes the shards written,
// so that no partial set is left for a pattern to read as if whole.  Interrupted: says so and
// returns 128 + the signal, as a shell reports a process the signal killed.  Else rethrows the
// error, with what was removed.
int abandon(ShardWriter& writer) {
  const size_t removed = writer.remove_written();
  const std::string what = "removed the " + std::to_string(removed) +
                           (removed == 1 ? " shard" : " shards") + " written";
  if (const int sig = interrupt_signal()) {
    std::fprintf(stderr, "interrupted: %s\n", removed > 0 ? what.c_str() : "nothing written");
    return 128 + sig;
  }
  try {
    throw;
  } catch (const Error& e) {
    if (removed == 0) throw;
    throw Error(std::string(e.what()) + " (" + what + ")");
  }
}

}  // namespace

int run_tokenize(const TokenizeOptions& o) {
  if (o.tokenizer != "gpt2" && o.tokenizer != "byte")
    throw UsageError("--tokenizer: unknown tokenizer '" + o.tokenizer + "' (gpt2 or byte)");
  if (o.shard_tokens < 0 || o.shard_tokens > INT32_MAX)
    throw UsageError("--shard-tokens must be in [0, " + std::to_string(INT32_MAX) + "] (got " +
                     std::to_string(o.shard_tokens) + ")");
  refuse_directory_out(o);
  check_output_file(shard_path(o, 0), true);
  refuse_overwriting_inputs(o);
  refuse_earlier_shards(o);
  int32_t eot = -1;
  const std::unique_ptr<Gpt2Tokenizer> gpt2 =
      o.tokenizer == "gpt2" ? gpt2_tokenizer(o, eot) : nullptr;
  std::vector<TextSource> inputs;
  size_t total_bytes = 0;  // 0 when standard input is among the inputs (unknown)
  bool known = true;
  for (const std::string& path : o.inputs) {
    inputs.emplace_back(path, gpt2 != nullptr);
    total_bytes += inputs.back().size();
    known = known && path != "-";
  }
  const fs::path out_dir = fs::path(shard_path(o, 0)).parent_path();
  if (!out_dir.empty()) fs::create_directories(out_dir);  // check_output_file: it can be

  ShardWriter writer(o);
  Progress progress(known ? total_bytes : 0, o.quiet);
  size_t done_bytes = 0;
  install_interrupt_handlers();
  try {
    done_bytes = encode_inputs(inputs, gpt2.get(), eot, o.threads, writer, progress);
    if (writer.total() == 0) throw Error("the inputs hold no text: nothing to write");
    stop_if_interrupted();  // a signal after this leaves the finished output
    writer.finish();
  } catch (...) {
    remove_interrupt_handlers();
    progress.done();
    return abandon(writer);
  }
  remove_interrupt_handlers();
  progress.done();

  const double secs = progress.seconds();
  const std::vector<std::string>& out = writer.written();
  std::printf(
      "tokenize: %zu file%s, %sB -> %s tokens (%.2f bytes a token, %s tokenizer%s) in "
      "%s (%sB/s)\n",
      inputs.size(), inputs.size() == 1 ? "" : "s", format_rate(done_bytes).c_str(),
      format_rate(writer.total()).c_str(), static_cast<double>(done_bytes) / writer.total(),
      o.tokenizer.c_str(), eot >= 0 ? ", <|endoftext|> before each file" : "",
      secs < 60 ? format_fixed(secs, 2).append("s").c_str() : format_duration(secs).c_str(),
      format_rate(done_bytes / std::max(secs, 1e-9)).c_str());
  if (out.size() == 1)
    std::printf("wrote %s (data.train or data.val: %s)\n", out[0].c_str(), out[0].c_str());
  else
    std::printf("wrote %zu shards, %s .. %s (data.train or data.val: %s_*.bin)\n", out.size(),
                out.front().c_str(), out.back().c_str(), shard_stem(o.out).c_str());
  return 0;
}

}  // namespace blm
