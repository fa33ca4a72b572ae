// `barrierlm report RUN_DIR... --out DIR`: the study report over trained and evaluated runs.
// Reads each run's config.yaml, metrics.jsonl, eval JSON and margins JSON/CSV, groups the runs by
// barrier weight lambda (seeds together) and writes DIR/report.md, DIR/report.json and the plots
// DIR/noise_vs_loss.svg, DIR/noise_vs_change.svg, DIR/margins_hist.svg, DIR/logdet_hist.svg,
// DIR/training_curves.svg (a plot of an earlier report in DIR that this one does not make is
// removed).  A run reached by two arguments (a `latest` link, "run" and "run/") is read once.
// The maths of every number is in cmd/report_stats.h.
#pragma once
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace blm {

struct ReportOptions {
  std::vector<std::string> runs;        // run directories
  std::string out = "report";           // output directory
  std::string markdown;                 // report.md path; empty: OUT/report.md
  std::string eval_file = "eval.json";  // per run: the `eval --out` file
  std::string margins_dir = "margins";  // per run: the `margins --out` directory
  double compare_sigma = 0.1;           // noise level compared with the paper's -12%
  double tau = -1;                      // "near the boundary" threshold; < 0: margins.json's
  int support_tokens = 5;               // support-token examples shown per lambda
  std::string title = "Barrier study: robustness to embedding noise";
  std::string note;                     // free text under the title (how the runs were made)
};
// Registers `report` on app (filling o when parsed); main.cpp dispatches to run_report.
CLI::App* add_report_command(CLI::App& app, ReportOptions& o);
// Returns the exit status; throws blm::Error (one line) on bad input.
int run_report(const ReportOptions& o);

}  // namespace blm
