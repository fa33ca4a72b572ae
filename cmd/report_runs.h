// What `barrierlm report` reads from one run directory:
//   RUN/config.yaml               the resolved config (lambda, seed, model, steps)
//   RUN/metrics.jsonl             training and validation curves
//   RUN/<eval file>               `barrierlm eval --out` JSON (default eval.json): CE per noise
//                                 level and draw
//   RUN/<margins dir>/margins.json  `barrierlm margins --out` (default margins/): tau, token
//                                 margins, support tokens
//   RUN/<margins dir>/margins.csv   every (sequence, layer, head, position): sigma_min, log det
// The eval and margins files are optional (a run without them gets only its training summary and
// a note); a file that exists but is malformed is an error naming the file and line.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace blm {

// metrics.jsonl as columns.  Train lines: step, ce, loss, barrier (NaN when lambda = 0),
// min_logdet, tokens_per_s, elapsed; eval lines: step, val_ce, val_bpb, val_acc, min_margin.
struct RunMetrics {
  std::vector<double> train_step, train_ce, train_loss, train_barrier, train_min_logdet;
  std::vector<double> val_step, val_ce, val_bpb, val_acc, val_min_margin;
  double last_tokens_per_s = NAN;
  double last_elapsed = NAN;  // seconds of training (resumed runs: summed)
  int64_t last_step = 0;      // the largest step logged
};

// One noise level of eval.json: the per-draw cross-entropy and accuracy.
struct EvalLevel {
  double sigma = 0;
  std::vector<double> ce, acc;  // one per draw (one for the clean level)
};

struct RunEval {
  bool present = false;
  std::string path;
  int64_t step = 0;           // the checkpoint's step
  std::string tokenizer;
  // Tokens per byte of the evaluated text: bits per byte = CE / ln 2 x this.  NaN when eval
  // knew no text (.bin shards); files of earlier versions had it only for "byte", where it is 1.
  double tokens_per_byte = NAN;
  std::string data;           // what was evaluated
  uint64_t seed = 0;          // draw d used noise seed hash(seed, d): equal seeds, equal noise
  int64_t batches = 0;        // evaluation batches (--batches); 0 when the file does not say
  int64_t tokens_per_draw = 0;
  std::vector<EvalLevel> levels;  // clean (sigma 0) first, as eval writes them
  const EvalLevel* level(double sigma) const;  // nullptr when not evaluated
};

struct SupportToken {
  int rank = 0, sequence = 0, position = 0, layer = 0, head = 0;
  double margin = NAN, logdet = NAN;
  std::string text, before, after;
};

struct RunMargins {
  bool present = false;
  std::string dir;
  int64_t step = 0;
  double tau = NAN;
  int n_layer = 0, n_head = 0, sequences = 0, seq_len = 0;
  std::vector<int> barrier_layers;
  // Pooled over sequences x barrier layers x heads x positions t >= 2 (margins.csv).
  std::vector<double> sigma_min, logdet;
  // Token margins m_t = min over barrier layers and heads, over sequences x positions t >= 2.
  std::vector<double> token_margin;
  std::vector<double> sequence_margin;  // min_t m_t per sequence
  std::vector<SupportToken> support;    // smallest token margins first
};

struct RunData {
  std::string dir;   // as given on the command line
  std::string name;  // the directory's last component
  Config config;
  RunMetrics metrics;
  RunEval eval;
  RunMargins margins;
  std::vector<std::string> notes;  // things the reader should know (missing or stale files)
  double lambda() const { return config.barrier.lambda; }
  uint64_t seed() const { return config.train.seed; }
  // Training stopped before train.steps (--until, Ctrl-C): the numbers are of an unfinished model.
  bool stopped_early() const { return metrics.last_step < config.train.steps; }
};

// Where the evaluation outputs sit inside a run directory.
struct RunFiles {
  std::string eval_file = "eval.json";
  std::string margins_dir = "margins";
};

// The run directories to read, each run once however many arguments reach it ("run" and "run/",
// a `latest` link next to the run it points to): arguments are the same run when their canonical
// paths are equal.  Of the arguments naming one run the first that is not a symbolic link is kept
// (the report then names the run, not the link), at the place of the run's first argument; each
// argument dropped gets a line in *notes naming it and the argument kept.
std::vector<std::string> unique_run_dirs(const std::vector<std::string>& dirs,
                                         std::vector<std::string>* notes);

// Reads one run directory.  Throws blm::Error naming the file (and line) when config.yaml or
// metrics.jsonl is missing or malformed, or when an eval / margins file is malformed.
RunData load_run(const std::string& dir, const RunFiles& files = RunFiles());

// Parsers of the individual files (text in, data out), used by load_run and the tests.
RunMetrics parse_metrics(const std::string& text, const std::string& source);
RunEval parse_eval(const std::string& text, const std::string& source);
// margins.json (support tokens, tau, token margins) and margins.csv (sigma_min, log det).
RunMargins parse_margins(const std::string& json_text, const std::string& json_source,
                         const std::string& csv_text, const std::string& csv_source);

}  // namespace blm
