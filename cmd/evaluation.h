// Validation passes shared by `train` (periodic validation) and `eval` (noise robustness):
// mean cross-entropy and top-1 accuracy over fixed evaluation batches, optionally with embedding
// noise (spec section 6), and the smallest stability margin of one batch (spec section 5).
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include "core/backend.h"
#include "data/dataset.h"

namespace blm {

// How much of a stream one validation pass reads: `batches` batches of B consecutive windows.
struct EvalPlan {
  int B = 0;
  int batches = 0;
  int T = 0;
  int64_t tokens() const { return static_cast<int64_t>(B) * batches * T; }
};
// At most max_batches batches of (at most) preferred_B sequences; smaller batches when the
// stream is short.  Throws DataError when it does not hold one window of T + 1 tokens.
EvalPlan plan_eval(const TokenStream& stream, int T, int preferred_B, int max_batches,
                   const std::string& what);
// Training's validation: eval_batches x batch_size windows, in batches of one worker's
// micro-batch (batch_size / (grad_accum x world) sequences; eval is one process, world 1), so
// the windows are the same whatever grad_accum and world (eval_batch takes consecutive
// windows).  max_batches > 0 asks for that many batches of batch_size sequences instead of
// eval_batches (eval --batches: the same unit, so --batches N covers N x batch_size windows
// whatever grad_accum).
EvalPlan plan_validation(const TokenStream& stream, int T, const TrainConfig& train, int world,
                         const std::string& what, int max_batches = 0);

struct EvalResult {
  double ce = 0;        // mean cross-entropy, nats per token
  double accuracy = 0;  // fraction of targets that are the argmax of the logits
  int64_t tokens = 0;
};
// noise_std > 0 adds N(0, noise_std^2) to the embeddings; batch i draws with seed
// hash2(noise_seed, i), so one noise_seed fixes the noise of the whole pass.
// after_batch, when set, is called after each batch (for a progress line).
EvalResult evaluate(Backend& backend, const TokenStream& stream, const EvalPlan& plan,
                    double noise_std, uint64_t noise_seed,
                    const std::function<void()>& after_batch = nullptr);

// ln 2: bits per byte = CE / ln 2 x tokens / bytes.
constexpr double kLn2 = 0.69314718055994530942;
// Bits per byte of a cross-entropy ce (nats/token) on text of tokens_per_byte (NaN: none).
inline double bits_per_byte(double ce, double tokens_per_byte) {
  return ce / kLn2 * tokens_per_byte;
}

// The targets of the plan's windows (what evaluate scores): their number over the bytes of their
// text, so that bits per byte = CE / ln 2 x this compares models across tokenizers.  1 for the
// byte tokenizer; NaN when the tokenizer does not know its tokens' text (bin) or there is none.
double tokens_per_byte(const TokenStream& stream, const EvalPlan& plan, const Tokenizer& tok);

// Smallest sigma_min over the barrier layers, all heads and positions t >= 2 (positions 0 and 1
// have J = I).  NaN when there is no such position.
double smallest_margin(const Margins& m, const BarrierConfig& barrier);
// Margins of the first evaluation batch of `stream` (B sequences).
Margins first_batch_margins(Backend& backend, const TokenStream& stream, const EvalPlan& plan);

}  // namespace blm
