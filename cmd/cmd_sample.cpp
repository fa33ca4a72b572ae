// `barrierlm sample`: autoregressive generation.  Each new token is drawn from
// softmax(logits / temperature) of the last position, restricted to the k most likely tokens when
// top_k > 0 (temperature 0: the argmax), with the context cut to the model's last seq_len tokens.
// Sampling uses a seeded stream (core/rng.h), so a seed repeats its text on the same backend.
// With GPT-2's tokenizer a document's end is <|endoftext|>: generation starts after one when
// there is no prompt, and stops at one unless --ignore-eot.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "cmd/commands.h"
#include "cmd/runs.h"
#include "cmd/util.h"
#include "core/rng.h"
#include "data/tokenizers.h"

namespace blm {

namespace {

// Index drawn from logits[0, V) (only the first `usable` entries: a model may have more rows than
// its tokenizer has tokens).
int32_t draw_token(const float* logits, int usable, double temperature, int top_k, Rng& rng) {
  if (temperature <= 0) return static_cast<int32_t>(std::max_element(logits, logits + usable) - logits);
  std::vector<int> idx(usable);
  std::iota(idx.begin(), idx.end(), 0);
  int k = usable;
  if (top_k > 0 && top_k < usable) {
    std::partial_sort(idx.begin(), idx.begin() + top_k, idx.end(),
                      [&](int a, int b) { return logits[a] > logits[b]; });
    k = top_k;
  }
  double mx = -INFINITY;
  for (int i = 0; i < k; ++i) mx = std::max(mx, double(logits[idx[i]]));
  std::vector<double> p(k);
  double z = 0;
  for (int i = 0; i < k; ++i) z += p[i] = std::exp((logits[idx[i]] - mx) / temperature);
  double u = rng.uniform() * z;
  for (int i = 0; i < k; ++i) {
    u -= p[i];
    if (u <= 0) return idx[i];
  }
  return idx[k - 1];
}

}  // namespace

int run_sample(const SampleOptions& o) {
  if (o.tokens < 0) throw UsageError("--tokens must be >= 0");
  if (!(o.temperature >= 0) || !std::isfinite(o.temperature))
    throw UsageError("--temperature must be a number >= 0");
  if (o.top_k < 0) throw UsageError("--top-k must be >= 0");
  TrainedModel model = load_trained_model(checkpoint_for(o.model), o.model.backend, o.model.threads);
  const Tokenizer& tok = *model.tokenizer;
  const int T = model.checkpoint.config.model.seq_len;
  const int V = model.checkpoint.config.model.vocab_size;
  const int usable = std::min(V, tok.vocab_size());

  const auto* gpt2 = dynamic_cast<const Gpt2Tokenizer*>(&tok);
  const int32_t end_of_text = gpt2 ? gpt2->id_of_token("<|endoftext|>") : -1;
  std::vector<int32_t> context = tok.encode(o.prompt);
  if (context.empty() && end_of_text >= 0) {
    context.push_back(end_of_text);  // a document's start, as `barrierlm tokenize` writes them
  } else if (context.empty()) {
    // Generation needs one token to start from: a newline where the vocabulary has one.
    std::vector<int32_t> nl;
    try {
      nl = tok.encode("\n");
    } catch (const Error&) {
    }
    context.push_back(nl.empty() ? 0 : nl[0]);
  } else {
    std::fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
  }
  Rng rng(o.seed);
  std::vector<float> logits;
  std::vector<int32_t> window;
  for (int n = 0; n < o.tokens; ++n) {
    // The last seq_len tokens; while the context fits, each window extends the one before, and
    // the backend computes only the new token (Backend::next_logits).
    const size_t len = std::min<size_t>(T, context.size());
    window.assign(context.end() - static_cast<std::ptrdiff_t>(len), context.end());
    model.backend->next_logits(window, logits);
    const int32_t next = draw_token(logits.data(), usable, o.temperature, o.top_k, rng);
    if (next == end_of_text && !o.ignore_eot) break;  // the document ends
    context.push_back(next);
    const std::string text = tok.decode_token(next);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }
  std::fputs("\n", stdout);
  return 0;
}

}  // namespace blm
