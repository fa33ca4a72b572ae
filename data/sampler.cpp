// Training batches (random windows, a pure function of seed, step and row) and evaluation
// batches (consecutive windows from the start of a stream).
//
// A window of T + 1 tokens starting at `offset` gives one row: inputs = tokens [offset,
// offset + T), targets = tokens [offset + 1, offset + T + 1).
#include "core/error.h"
#include "core/rng.h"
#include "data/dataset.h"

namespace blm {

namespace {

// floor(h * n / 2^64): maps a uniform 64-bit hash to a uniform integer in [0, n) without the
// modulo's bias toward small values (the bias left is below n / 2^64).
uint64_t scale_to_range(uint64_t h, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(h) * n) >> 64);
}

// Row r of the [B, T] outputs from the window at `start`.
void copy_window(const TokenStream& s, size_t start, int T, int r, int32_t* inputs,
                 int32_t* targets) {
  s.read(start, T, inputs + static_cast<size_t>(r) * T);
  s.read(start + 1, T, targets + static_cast<size_t>(r) * T);
}

void check_shape(const char* who, int seq_len, int B) {
  if (seq_len < 1 || B < 0)
    throw DataError(std::string(who) + ": bad shape (seq_len " + std::to_string(seq_len) +
                    ", batch " + std::to_string(B) + ")");
}

}  // namespace

BatchSampler::BatchSampler(std::shared_ptr<TokenStream> stream, int seq_len, uint64_t seed)
    : stream_(std::move(stream)), T_(seq_len), seed_(seed) {
  check_shape("batch sampler", seq_len, 0);
  if (!stream_) throw DataError("batch sampler: no token stream");
  if (stream_->size() < static_cast<size_t>(seq_len) + 1)
    throw DataError("batch sampler: the stream has " + std::to_string(stream_->size()) +
                    " tokens; need at least " + std::to_string(seq_len + 1) + " (seq_len + 1)");
}

size_t BatchSampler::offset(int64_t step, int row) const {
  uint64_t starts = stream_->size() - static_cast<size_t>(T_);  // offsets 0 .. N - T - 1
  uint64_t h = hash2(hash2(hash2(seed_, kDataStream), static_cast<uint64_t>(step)),
                     static_cast<uint64_t>(row));
  return static_cast<size_t>(scale_to_range(h, starts));
}

void BatchSampler::sample(int64_t step, int row0, int B, std::vector<int32_t>& inputs,
                          std::vector<int32_t>& targets) const {
  check_shape("batch sampler", T_, B);
  if (row0 < 0) throw DataError("batch sampler: negative first row " + std::to_string(row0));
  inputs.resize(static_cast<size_t>(B) * T_);
  targets.resize(static_cast<size_t>(B) * T_);
  for (int r = 0; r < B; ++r)
    copy_window(*stream_, offset(step, row0 + r), T_, r, inputs.data(), targets.data());
}

int eval_batch_count(const TokenStream& stream, int seq_len, int B) {
  check_shape("eval batches", seq_len, B);
  if (B == 0 || stream.size() < 2) return 0;
  // Window w predicts tokens [w*T + 1, w*T + T], so windows share no targets.
  size_t windows = (stream.size() - 1) / static_cast<size_t>(seq_len);
  size_t batches = windows / static_cast<size_t>(B);
  return batches > static_cast<size_t>(INT32_MAX) ? INT32_MAX : static_cast<int>(batches);
}

bool eval_batch(const TokenStream& stream, int seq_len, int B, int index,
                std::vector<int32_t>& inputs, std::vector<int32_t>& targets) {
  if (index < 0 || index >= eval_batch_count(stream, seq_len, B)) return false;
  inputs.resize(static_cast<size_t>(B) * seq_len);
  targets.resize(static_cast<size_t>(B) * seq_len);
  for (int r = 0; r < B; ++r) {
    size_t window = static_cast<size_t>(index) * B + r;
    copy_window(stream, window * seq_len, seq_len, r, inputs.data(), targets.data());
  }
  return true;
}

}  // namespace blm
