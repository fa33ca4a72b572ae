// The numbers of `barrierlm report`: runs grouped by barrier weight lambda (the seeds of one
// lambda together), and for each group
//   - per noise level sigma: CE, bits per byte, accuracy (mean and sample standard deviation over
//     every (run, draw) evaluation), relative degradation against the same run's clean CE, and
//     the change against the baseline (lambda = 0) in %, paired by (train.seed, noise draw) when
//     the baseline has the same seeds and the same noise draws (eval's draw d uses the noise seed
//     hash(seed, d) for every model, so a pair saw exactly the same noise), with how many seeds
//     came out lower / higher than their baseline;
//   - margin statistics of each run (pooled over sequences, barrier layers, heads, positions
//     t >= 2), then mean and spread over the group's runs;
//   - training: final validation CE and the change over the last fifth of training.
// Pure functions of the loaded runs (report_runs.h), so the tests can check them by hand.
#pragma once
#include <cmath>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "cmd/report_runs.h"

namespace blm {

// Mean and sample standard deviation (n - 1; 0 for n = 1) of the finite values; n counts them.
struct Stat {
  double mean = NAN, sd = NAN;
  int n = 0;
};
Stat stat_of(const std::vector<double>& xs);

struct NoiseRow {
  double sigma = 0;
  int runs = 0;                  // runs evaluated at this sigma
  Stat ce, bpb, acc;             // pooled over runs x draws; bpb only when every eval has it
  Stat degradation_pct;          // 100 (ce - clean ce of the run) / clean ce; n = 0 at sigma 0
  bool have_change = false;      // there is a baseline to compare with
  bool paired = false;           // paired by (seed, draw); else against the baseline's mean
  Stat change_pct;               // 100 (ce - baseline ce) / baseline ce
  int seeds_lower = 0, seeds_higher = 0, seeds_compared = 0;  // by each run's mean change
};

// One margin statistic of one run, by key; report_margin_keys() lists them in display order.
struct MarginKey {
  const char* key;    // report.json name
  const char* label;  // report.md row label
};
const std::vector<MarginKey>& report_margin_keys();
// The values of report_margin_keys() for one run (NaN where the run has no such data); tau is the
// boundary threshold for the "under tau" counts.
std::vector<double> margin_values(const RunMargins& m, double tau);

struct TrainingSummary {
  double final_val_ce = NAN;       // the last validation CE of metrics.jsonl
  double last_fifth_change_pct = NAN;  // 100 (last val CE - val CE at ~80% of steps) / the latter
  double train_seconds = NAN;
  double tokens_per_s = NAN;
};
TrainingSummary training_summary(const RunMetrics& m);

struct Group {
  double lambda = 0;
  std::vector<const RunData*> runs;  // ordered by seed
  std::vector<NoiseRow> noise;       // one per Study::sigmas entry
  std::vector<Stat> margins;         // one per report_margin_keys() entry, over runs
  Stat final_val_ce, last_fifth_change_pct;
  std::string label() const;         // "lambda = 0.03" (baseline: "lambda = 0 (baseline)")
};

struct Study {
  std::vector<Group> groups;    // by lambda, ascending
  std::vector<double> sigmas;   // every evaluated noise level, ascending (0 first)
  int baseline = -1;            // index of the lambda = 0 group, -1 when there is none
  double tau = NAN;             // margin threshold used for "under tau"
  bool with_bpb = false;        // every evaluation knew its text's bytes (bits per byte)
  // The evaluation settings (names of eval_settings()) that differ between the evaluated runs.
  std::set<std::string> eval_differences;
  std::vector<std::string> notes;  // comparability problems and missing files, for the reader
};

// The settings of `barrierlm eval` that decide what an eval JSON's numbers measure, by name
// ("--batches", ...), with the evaluation's value of each as text.
std::vector<std::pair<std::string, std::string>> eval_settings(const RunEval& e);

// Groups runs by lambda and computes everything above.  tau: NaN takes the first margins.json's.
// The Study points into `runs`, which must outlive it.  Its notes name the config keys and
// evaluation settings that differ between runs, the runs stopped before train.steps, and the
// runs' own notes (missing or stale files).  Throws blm::Error when no run is given or two runs
// share a directory.
Study build_study(const std::vector<RunData>& runs, double tau);

// The noise level to compare with the paper: `wanted` when it was evaluated, else the largest
// evaluated level; NaN when no noisy level exists.
double comparison_sigma(const Study& s, double wanted);

// "lower" (every compared seed below its baseline and the mean change < 0), "higher" (every seed
// above, mean > 0) or "mixed"; "n/a" without a baseline.
std::string verdict(const NoiseRow& row);

}  // namespace blm
