// `barrierlm report RUN_DIR... --out DIR`: loads each run (report_runs.h), computes the study's
// statistics (report_stats.h), renders report.md, report.json and the plots (report_render.h),
// writes them atomically, and prints the summary table to stdout.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "cmd/cli_checks.h"
#include "cmd/commands_report.h"
#include "cmd/report_render.h"
#include "cmd/report_runs.h"
#include "cmd/report_stats.h"
#include "cmd/runs.h"
#include "cmd/util.h"
#include "core/checkpoint.h"

namespace fs = std::filesystem;

namespace blm {

namespace {

// The command line that reproduces this report (for report.md's last section).
std::string command_line(const ReportOptions& o) {
  std::string c = "barrierlm report";
  for (const std::string& r : o.runs) c += " " + r;
  c += " --out " + o.out;
  if (!o.markdown.empty()) c += " --markdown " + o.markdown;
  if (o.eval_file != "eval.json") c += " --eval-file " + o.eval_file;
  if (o.margins_dir != "margins") c += " --margins-dir " + o.margins_dir;
  c += " --compare-sigma " + format_general(o.compare_sigma, 6);
  if (o.tau >= 0) c += " --tau " + format_general(o.tau, 6);
  return c;
}

// The plots' directory as seen from report.md's directory ("" when they are the same).
std::string image_prefix(const std::string& out_dir, const std::string& markdown_path) {
  const fs::path md_dir = fs::absolute(fs::path(markdown_path)).parent_path().lexically_normal();
  const fs::path rel = fs::absolute(fs::path(out_dir)).lexically_normal().lexically_relative(md_dir);
  const std::string r = rel.generic_string();
  if (r.empty() || r == ".") return "";
  return r.back() == '/' ? r : r + "/";
}

// Removes the plots of an earlier report in out_dir that this report does not make (the
// change plot of a report with a baseline, when this one has none), so that every plot in the
// directory belongs to this report.  Only the report's own file names are touched.
void remove_stale_plots(const std::string& out_dir,
                        const std::vector<std::pair<std::string, std::string>>& plots) {
  for (const std::string& name : report_plot_names()) {
    const bool made = std::any_of(plots.begin(), plots.end(),
                                  [&](const auto& p) { return p.first == name; });
    const std::string path = join_path(out_dir, name);
    std::error_code ec;
    if (made || !fs::is_regular_file(fs::symlink_status(path, ec))) continue;
    if (!fs::remove(path, ec) && ec)
      throw Error("cannot remove '" + path + "', a plot of an earlier report: " + ec.message());
  }
}

// The files load_run reads in one run directory.
std::vector<NamedFile> run_inputs(const std::string& dir, const RunFiles& files) {
  const std::string margins = join_path(dir, files.margins_dir);
  return {{"a run's config", join_path(dir, kConfigFile)},
          {"a run's metrics", join_path(dir, kMetricsFile)},
          {"a run's eval file", join_path(dir, files.eval_file)},
          {"a run's margins JSON", join_path(margins, "margins.json")},
          {"a run's margins CSV", join_path(margins, "margins.csv")}};
}

// Refuses, before any run is read, an output that would replace a file the report reads
// (--markdown RUN/metrics.jsonl would lose the run's training log) or another output of the
// report.  Every plot name counts: those this report does not make are removed.
void refuse_overwriting(const ReportOptions& o, const std::string& md_path,
                        const std::vector<std::string>& run_dirs, const RunFiles& files) {
  std::vector<NamedFile> inputs;
  for (const std::string& dir : run_dirs) {
    const std::vector<NamedFile> of_run = run_inputs(dir, files);
    inputs.insert(inputs.end(), of_run.begin(), of_run.end());
  }
  std::vector<NamedFile> in_out_dir = {{"the report's JSON", join_path(o.out, "report.json")}};
  for (const std::string& name : report_plot_names())
    in_out_dir.push_back({"a plot of the report", join_path(o.out, name)});
  for (const NamedFile& f : in_out_dir) refuse_output_over("--out", f.path, inputs);
  // Without --markdown, OUT/report.md is one more file of --out.
  const std::string md_option = o.markdown.empty() ? "--out" : "--markdown";
  inputs.insert(inputs.end(), in_out_dir.begin(), in_out_dir.end());
  refuse_output_over(md_option, md_path, inputs);
}

void print_summary(const Study& s) {
  std::printf("%-10s %-7s %-22s %-22s %-10s\n", "lambda", "sigma", "CE (nats/token)",
              "vs baseline %", "seeds lower");
  for (const Group& g : s.groups)
    for (const NoiseRow& r : g.noise) {
      std::printf("%-10s %-7s %-22s %-22s %-10s\n", format_general(g.lambda, 6).c_str(),
                  format_general(r.sigma, 6).c_str(), format_stat(r.ce, 4).c_str(),
                  g.lambda == 0 ? "(baseline)" : format_stat(r.change_pct, 2, true).c_str(),
                  r.have_change ? (std::to_string(r.seeds_lower) + "/" + std::to_string(r.seeds_compared)).c_str()
                                : "-");
    }
}

}  // namespace

CLI::App* add_report_command(CLI::App& app, ReportOptions& o) {
  auto* cmd = app.add_subcommand(
      "report",
      "The study report over trained runs: reads each RUN_DIR's config.yaml, metrics.jsonl, "
      "eval JSON (barrierlm eval RUN --out RUN/eval.json) and margins (barrierlm margins RUN), "
      "groups the runs by barrier.lambda (seeds together) and writes DIR/report.md, "
      "DIR/report.json and plots: CE under noise with spread over seeds and draws, change "
      "against the lambda = 0 baseline (paired by seed and noise draw), margin and log det "
      "distributions side by side, support tokens, training curves, and the comparison with "
      "the paper's +1.7% clean / -12% noisy.");
  cmd->add_option("RUN_DIR", o.runs, "run directories (one per lambda and seed)")->required();
  cmd->add_option("--out", o.out, "output directory (default: report)")->check(non_empty_path());
  cmd->add_option("--markdown", o.markdown,
                  "write the markdown report here instead of DIR/report.md (image links are made "
                  "relative to it)");
  cmd->add_option("--eval-file", o.eval_file, "each run's eval JSON, relative to the run (default: eval.json)");
  cmd->add_option("--margins-dir", o.margins_dir,
                  "each run's margins directory, relative to the run (default: margins)");
  cmd->add_option("--compare-sigma", o.compare_sigma,
                  "noise level compared with the paper's -12% (default: 0.1; the largest evaluated "
                  "level when 0.1 was not evaluated)");
  cmd->add_option("--tau", o.tau,
                  "margin threshold for the counts near the boundary (default: margins.json's tau)")
      ->check(non_negative_number());
  cmd->add_option("--support-tokens", o.support_tokens,
                  "support-token examples per lambda (default: 5)")
      ->check(non_negative_number());
  cmd->add_option("--title", o.title, "the report's title");
  cmd->add_option("--note", o.note, "text placed under the title (e.g. how the runs were made)");
  return cmd;
}

int run_report(const ReportOptions& o) {
  if (o.runs.empty()) throw UsageError("report: give at least one run directory");
  if (o.out.empty()) throw UsageError("--out: the output directory must not be empty");
  if (!std::isfinite(o.compare_sigma) || o.compare_sigma <= 0)
    throw UsageError("--compare-sigma must be a noise level > 0, got " + format_general(o.compare_sigma));
  if (o.support_tokens < 0) throw UsageError("--support-tokens must be >= 0");
  // Before the runs are read and the plots rendered: a bad --out or --markdown fails at once.
  check_output_dir(o.out, "output directory");
  if (!o.markdown.empty()) check_output_file(o.markdown, true);  // its directory is created

  RunFiles files;
  files.eval_file = o.eval_file;
  files.margins_dir = o.margins_dir;
  // A run reached twice (`report st/*` with st/latest, "run run/") is read once.
  std::vector<std::string> duplicate_notes;
  const std::vector<std::string> run_dirs = unique_run_dirs(o.runs, &duplicate_notes);
  const std::string md_path = o.markdown.empty() ? join_path(o.out, "report.md") : o.markdown;
  refuse_overwriting(o, md_path, run_dirs, files);
  std::vector<RunData> runs;
  for (const std::string& dir : run_dirs) runs.push_back(load_run(dir, files));
  Study study = build_study(runs, o.tau >= 0 ? o.tau : NAN);
  // Said once the runs are read: an error stays the one line on stderr.
  for (const std::string& n : duplicate_notes)
    std::fprintf(stderr, "barrierlm: note: %s\n", n.c_str());
  study.notes.insert(study.notes.begin(), duplicate_notes.begin(), duplicate_notes.end());

  ReportContext ctx;
  ctx.title = o.title;
  ctx.note = o.note;
  ctx.command = command_line(o);
  ctx.image_prefix = image_prefix(o.out, md_path);
  ctx.compare_sigma = comparison_sigma(study, o.compare_sigma);
  ctx.support_tokens = o.support_tokens;
  if (std::isfinite(ctx.compare_sigma) && ctx.compare_sigma != o.compare_sigma)
    study.notes.push_back("sigma = " + format_general(o.compare_sigma, 6) + " (--compare-sigma) was not "
                          "evaluated; the paper comparison uses the largest evaluated level, sigma = " +
                          format_general(ctx.compare_sigma, 6));

  // Render everything before writing anything: a failure leaves no half-made report.
  const std::string md = report_markdown(study, ctx), json = report_json(study, ctx);
  const auto plots = report_plots(study);
  std::error_code ec;
  fs::create_directories(o.out, ec);
  if (ec) throw Error("cannot create output directory '" + o.out + "': " + ec.message());
  const fs::path md_dir = fs::path(md_path).parent_path();
  if (!md_dir.empty()) {
    fs::create_directories(md_dir, ec);
    if (ec) throw Error("cannot create directory '" + md_dir.string() + "': " + ec.message());
  }
  remove_stale_plots(o.out, plots);
  for (const auto& p : plots) write_file_atomic(join_path(o.out, p.first), p.second);
  write_file_atomic(join_path(o.out, "report.json"), json);
  write_file_atomic(md_path, md);

  print_summary(study);
  for (const std::string& n : study.notes) std::printf("note: %s\n", n.c_str());
  std::printf("\nwrote %s, %s/report.json and %zu plots in %s/\n", md_path.c_str(), o.out.c_str(),
              plots.size(), o.out.c_str());
  return 0;
}

}  // namespace blm
