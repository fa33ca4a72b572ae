// The evaluation subcommands (train is in trainer.h): their options, as main.cpp fills them from
// the command line, and their entry points.  Each returns the process exit status and throws
// blm::Error (one line naming the problem) on bad input.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace blm {

// Options every command that loads a trained model shares.
struct ModelOptions {
  std::string checkpoint;         // file or run directory; empty: out_dir/latest
  std::string runs_dir = "runs";  // where `latest` is looked up
  std::string backend = "auto";   // cpu | cuda | auto
  int threads = 0;                // CPU threads, 0: all cores
};

// `barrierlm eval`: CE, bits per byte and accuracy under embedding noise (spec section 6).
struct EvalOptions {
  ModelOptions model;
  std::string noise = "0,0.05,0.1,0.2";  // comma-separated noise standard deviations
  int draws = 5;        // noise draws per level (fixed seeds), for mean and spread
  std::string data;     // evaluation file; empty: the run's validation data
  int batches = 0;      // evaluation batches; 0: the run's train.eval_batches
  bool json = false;    // JSON to stdout (or to `out`)
  std::string out;      // JSON file, written atomically
  std::string plot;     // SVG of CE against the noise level, written atomically; empty: none
  uint64_t seed = 1234;
};
int run_eval(const EvalOptions& o);
// "0,0.05,0.1" -> {0, 0.05, 0.1}; throws UsageError naming a bad entry.
std::vector<double> parse_noise_list(const std::string& text);

// `barrierlm margins`: stability margins, support tokens and plots (spec section 5).
struct MarginsOptions {
  ModelOptions model;
  std::string data;      // text or .bin file; empty: the run's validation data
  std::string text;      // literal text instead of a file
  bool have_text = false;
  int sequences = 8;     // sequences of seq_len tokens to analyse
  int top = 20;          // support tokens to list
  double tau = 0.25;     // margin threshold: positions below it are listed too
  std::string out;       // output directory; empty: <checkpoint dir>/margins
};
int run_margins(const MarginsOptions& o);

// `barrierlm sample`: generates text from a trained model.
struct SampleOptions {
  ModelOptions model;
  std::string prompt;
  int tokens = 200;
  double temperature = 0.8;  // 0: greedy
  int top_k = 0;             // 0: no top-k filtering
  uint64_t seed = 1;
  bool ignore_eot = false;   // gpt2: go on past <|endoftext|> instead of stopping there
};
int run_sample(const SampleOptions& o);

// `barrierlm tokenize`: text files -> .bin token shards (cmd/cmd_tokenize.cpp).
struct TokenizeOptions {
  std::vector<std::string> inputs;  // text files, one document each, in this order
  std::string out;                  // the shard, or with shard_tokens the stem of OUT_000000.bin
  std::string tokenizer = "gpt2";   // gpt2 | byte
  std::string vocab = "data/gpt2";  // gpt2: the directory of encoder.json and vocab.bpe
  int64_t shard_tokens = 0;         // tokens a shard; 0: one file
  bool no_eot = false;              // gpt2: no <|endoftext|> before each document
  int threads = 0;                  // encoding threads, 0: all cores
  bool quiet = false;               // no progress lines
};
int run_tokenize(const TokenizeOptions& o);

// `barrierlm export`: a checkpoint as a Hugging Face GPT-2 directory (cmd/cmd_export.cpp).
struct ExportOptions {
  std::string checkpoint;         // file or run directory; empty: runs_dir/latest
  std::string runs_dir = "runs";
  std::string out;                // the directory to write
  std::string dtype = "float32";  // float32 | bfloat16
};
int run_export(const ExportOptions& o);

// The checkpoint the options name: the given file or run directory (or a Hugging Face GPT-2
// directory, as it is: cmd/hf_gpt2.h), else out_dir/latest (and then says on stderr which run
// it took).
std::string checkpoint_for(const ModelOptions& o);

}  // namespace blm
