// The outputs of `barrierlm report` from a computed Study (report_stats.h): report.md (markdown
// tables and the comparison with the paper), report.json (the same numbers for programs) and the
// SVG plots.  Pure functions returning text; cmd_report.cpp writes the files.
#pragma once
#include <string>
#include <vector>

#include "cmd/report_stats.h"

namespace blm {

// The paper's reported effect (arXiv 2602.22271, small character-level GPT on WikiText-2).
constexpr double kPaperCleanChangePct = 1.7;
constexpr double kPaperNoisyChangePct = -12.0;

struct ReportContext {
  std::string title;
  std::string note;          // free text under the title
  std::string command;       // the report command line, for "how to reproduce"
  std::string image_prefix;  // path from report.md to the plots ("" or "dir/")
  double compare_sigma = NAN;  // the evaluated level compared with the paper (NaN: none)
  int support_tokens = 5;
};

std::string report_markdown(const Study& s, const ReportContext& c);
std::string report_json(const Study& s, const ReportContext& c);

// Plot files by name (noise_vs_loss.svg, ...), each with its SVG text.
std::vector<std::pair<std::string, std::string>> report_plots(const Study& s);
// Every file name report_plots may return (noise_vs_change.svg only with a baseline): a plot of
// an earlier report in the same directory that this one does not make is removed.
const std::vector<std::string>& report_plot_names();

// One run's training curves (train writes RUN/curves.svg): the training CE and, with a barrier,
// the loss CE + lambda R at each logged step, and the validation CE at each evaluation, in
// nats/token against the step.
std::string run_curves_svg(const RunMetrics& m, const std::string& run_name, double lambda);

// "3.2786 ± 0.0063" (the spread only when n > 1), "-" when n = 0.  signed: a leading '+'.
std::string format_stat(const Stat& st, int digits, bool signed_mean = false);

}  // namespace blm
