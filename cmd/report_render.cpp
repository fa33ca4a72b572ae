// Rendering of `barrierlm report` (report_render.h): report.md, report.json and the SVG plots
// (noise vs loss, change vs baseline, sigma_min and log det histograms, training curves) from a
// Study.  Every number shown comes from the Study; nothing is computed here beyond formatting,
// histogram binning and the choice of words for the verdicts.
#include "cmd/report_render.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "cmd/json.h"
#include "cmd/svg.h"
#include "cmd/util.h"

namespace blm {

std::string format_stat(const Stat& st, int digits, bool signed_mean) {
  if (st.n == 0 || !std::isfinite(st.mean)) return "-";
  std::string s = (signed_mean && st.mean >= 0 ? "+" : "") + format_fixed(st.mean, digits);
  if (st.n > 1) s += " ± " + format_fixed(st.sd, digits);
  return s;
}

namespace {

std::string lam(double lambda) { return format_general(lambda, 6); }
std::string sig(double sigma) { return format_general(sigma, 6); }

// Table cell text: pipes escaped, one line.
std::string cell(const std::string& s) {
  std::string out;
  for (char c : visible_text(utf8_sanitize(s))) {
    if (c == '|') out += "\\|";
    else if (c == '`') out += '\'';
    else out += c;
  }
  return out;
}

// Plot legends hold about 20 characters: the short form of Group::label().
std::string plot_label(const Group& g) {
  return "\u03bb = " + lam(g.lambda) + (g.lambda == 0 ? " (baseline)" : "");
}

const NoiseRow* row_at(const Group& g, const Study& s, double sigma) {
  for (size_t i = 0; i < s.sigmas.size(); ++i)
    if (s.sigmas[i] == sigma) return &g.noise[i];
  return nullptr;
}

std::string seeds_text(const NoiseRow& r) {
  if (!r.have_change || r.seeds_compared == 0) return "-";
  return std::to_string(r.seeds_lower) + "/" + std::to_string(r.seeds_compared);
}

// ------------------------------------------------------------------ markdown sections

// " (2 runs stopped earlier: see the notes)" after train.steps; "" when every run finished.
std::string stopped_early_text(const Study& s) {
  int stopped = 0;
  for (const Group& g : s.groups)
    for (const RunData* r : g.runs) stopped += r->stopped_early();
  if (stopped == 0) return "";
  return " (" + std::to_string(stopped) + (stopped == 1 ? " run" : " runs") +
         " stopped earlier: see the notes)";
}

const RunEval* first_eval(const Study& s) {
  for (const Group& g : s.groups)
    for (const RunData* r : g.runs)
      if (r->eval.present) return &r->eval;
  return nullptr;
}

// The noise protocol of the evaluations, with e's values of the settings that all runs share;
// those that differ are only said to differ (the notes name each run's value).
std::string noise_setup(const Study& s, const RunEval& e) {
  const auto differ = [&](const char* setting) { return s.eval_differences.count(setting) > 0; };
  std::string t = "Noise: i.i.d. N(0, sigma^2) added to every coordinate of the input embedding "
                  "(token + position) before the first block; ";
  t += differ("tokens per draw") || differ("--batches")
           ? std::string("a number of evaluation tokens per draw that differs between runs")
           : std::to_string(e.tokens_per_draw) + " evaluation tokens per draw";
  t += " (" + (differ("--data") ? std::string("data that differs between runs") : cell(e.data));
  // In eval's unit, which load_run converts the JSON's micro-batches to.
  if (e.batches > 0 && !differ("--batches"))
    t += "; eval --batches " + std::to_string(e.batches) +
         ", batches of train.batch_size sequences";
  t += ")";
  if (differ("--seed"))
    t += "; noise draw d uses seed hash(seed, d) with each run's eval seed, which differs between "
         "runs, so not every model met the same noise";
  else
    t += "; noise draw d uses seed hash(" + std::to_string(e.seed) + ", d) for every model, so "
         "models meet identical noise";
  if (differ("--draws") || differ("--noise"))
    t += "; the runs were evaluated with different numbers of draws or noise levels";
  return t + (s.eval_differences.empty() ? "." : " (see the notes).");
}

void md_setup(std::ostringstream& o, const Study& s) {
  const RunData& first = *s.groups.front().runs.front();
  const Config& c = first.config;
  int runs = 0;
  std::string per;
  for (const Group& g : s.groups) {
    runs += static_cast<int>(g.runs.size());
    std::string seeds;
    for (const RunData* r : g.runs) seeds += (seeds.empty() ? "" : ", ") + std::to_string(r->seed());
    per += (per.empty() ? "" : "; ") + lam(g.lambda) + " (seeds " + seeds + ")";
  }
  o << "## Setup\n\n";
  o << "- " << runs << " runs; lambda: " << per << ".\n";
  o << "- Model (of " << first.name << "): " << c.model.n_layer << " layers, " << c.model.n_head
    << " heads, d = " << c.model.d_model << ", T = " << c.model.seq_len << ", V = "
    << c.model.vocab_size << "; " << c.data.tokenizer << " tokenizer; batch " << c.train.batch_size
    << " x " << c.model.seq_len << " tokens; " << c.train.steps << " steps" << stopped_early_text(s)
    << ", lr " << format_general(c.train.lr)
    << " (" << c.train.schedule << ", warmup " << c.train.warmup << "); barrier eps "
    << format_general(c.barrier.eps) << ", positions " << (c.barrier.positions == 0 ? std::string("all (exact)") : std::to_string(c.barrier.positions))
    << "; device " << c.device.backend << " / " << c.device.precision << ".\n";
  o << "- Data: train `" << cell(c.data.train) << "`, validation `"
    << cell(c.data.val.empty() ? "(held out of train)" : c.data.val) << "`. The batches depend "
    << "only on (train.seed, step), so runs of one seed see the same data in the same order for "
    << "every lambda.\n";
  const RunEval* eval = first_eval(s);
  if (eval) o << "- " << noise_setup(s, *eval) << "\n";
  o << "\n";
}

void md_summary(std::ostringstream& o, const Study& s, const ReportContext& c) {
  o << "## Summary and comparison with the paper\n\n";
  if (s.baseline < 0) {
    o << "No baseline run (lambda = 0) was given, so there is no change against a baseline to "
         "report.\n\n";
    return;
  }
  if (std::isnan(c.compare_sigma)) {
    o << "No noisy evaluation was found (eval.json with a noise level > 0).\n\n";
    return;
  }
  const std::string cs = sig(c.compare_sigma);
  o << "The paper reports, for a small character-level GPT on WikiText-2, a clean loss about "
    << "1.7% worse and a loss under embedding noise about 12% better than without the barrier. "
    << "Its noise protocol (the noise scale relative to its embeddings, where exactly the noise "
    << "enters, how many draws) is not known to us, so the comparison below is at sigma = " << cs
    << ", a level fixed before the runs (`--compare-sigma`); every level is in the next section.\n\n";
  o << "| lambda | clean CE vs baseline % (paper +1.7) | CE at sigma = " << cs
    << " vs baseline % (paper -12) | seeds lower at sigma = " << cs
    << " | noise levels where every seed is lower |\n|---|---|---|---|---|\n";
  for (const Group& g : s.groups) {
    if (g.lambda == 0) continue;
    const NoiseRow* clean = row_at(g, s, 0.0);
    const NoiseRow* noisy = row_at(g, s, c.compare_sigma);
    std::string helps;
    for (size_t i = 0; i < s.sigmas.size(); ++i)
      if (s.sigmas[i] > 0 && verdict(g.noise[i]) == "lower") helps += (helps.empty() ? "" : ", ") + sig(s.sigmas[i]);
    o << "| " << lam(g.lambda) << " | " << (clean ? format_stat(clean->change_pct, 2, true) : "-")
      << " | " << (noisy ? format_stat(noisy->change_pct, 2, true) : "-") << " | "
      << (noisy ? seeds_text(*noisy) : "-") << " | " << (helps.empty() ? "none" : helps) << " |\n";
  }
  o << "\n± is the sample standard deviation over (seed, noise draw) pairs. \"12% better\" may "
       "also be read as a 12% smaller degradation (noisy CE relative to clean CE); the degradation "
       "column of the next section gives that reading.\n\n";
  o << "In words (\"lower\" means the barrier model's noisy loss is below its baseline's in every "
       "seed; \"mixed\" means the seeds disagree):\n\n";
  for (const Group& g : s.groups) {
    if (g.lambda == 0) continue;
    const NoiseRow* clean = row_at(g, s, 0.0);
    const NoiseRow* noisy = row_at(g, s, c.compare_sigma);
    if (!clean || !noisy || !noisy->have_change) continue;
    o << "- lambda = " << lam(g.lambda) << ": clean loss " << format_stat(clean->change_pct, 2, true)
      << "% against the baseline (paper: +1.7%); at sigma = " << cs << " "
      << format_stat(noisy->change_pct, 2, true) << "% (paper: -12%), " << verdict(*noisy)
      << " (" << seeds_text(*noisy) << " seeds lower). ";
    bool any = false;
    for (size_t i = 0; i < s.sigmas.size(); ++i) any = any || (s.sigmas[i] > 0 && verdict(g.noise[i]) == "lower");
    if (!any) o << "**The barrier does not lower the noisy loss at any evaluated noise level at this lambda.**";
    else if (verdict(*noisy) != "lower") o << "**At sigma = " << cs << " the barrier does not help at this lambda.**";
    o << "\n";
  }
  o << "\n";
}

void md_noise_table(std::ostringstream& o, const Study& s, const ReportContext& c) {
  o << "## Loss under embedding noise\n\n";
  o << "Mean ± sample standard deviation over every (seed, noise draw) evaluation; n counts them. "
       "Degradation: CE relative to the same run's clean CE. Change vs baseline: CE relative to "
       "the baseline (lambda = 0) run of the same seed under the same noise draw, then averaged; "
       "seeds lower: runs whose mean change is negative.\n\n";
  o << "| lambda | sigma | CE (nats/token) |" << (s.with_bpb ? " bits/byte |" : "")
    << " accuracy % | degradation % | change vs baseline % | seeds lower | n |\n|---|---|---|"
    << (s.with_bpb ? "---|" : "") << "---|---|---|---|---|\n";
  for (const Group& g : s.groups)
    for (const NoiseRow& r : g.noise) {
      Stat acc = r.acc;
      acc.mean *= 100;
      acc.sd *= 100;
      o << "| " << lam(g.lambda) << " | " << sig(r.sigma) << " | " << format_stat(r.ce, 4) << " | ";
      if (s.with_bpb) o << format_stat(r.bpb, 4) << " | ";
      o << format_stat(acc, 2) << " | " << (r.sigma == 0 ? "(clean)" : format_stat(r.degradation_pct, 2, true))
        << " | " << (g.lambda == 0 ? "(baseline)" : format_stat(r.change_pct, 2, true)) << " | "
        << seeds_text(r) << " | " << r.ce.n << " |\n";
    }
  o << "\n![CE against noise level](" << c.image_prefix << "noise_vs_loss.svg)\n\n";
  if (s.baseline >= 0)
    o << "![CE change against the baseline](" << c.image_prefix << "noise_vs_change.svg)\n\n";
}

// Data-driven remarks: how each barrier model's log det and low sigma_min quantile compare with
// the baseline's (the barrier rewards det J > 1 without bound: see the note below the table).
void md_margin_remarks(std::ostringstream& o, const Study& s) {
  if (s.baseline < 0) return;
  const auto& keys = report_margin_keys();
  const auto index = [&](const char* k) {
    for (size_t i = 0; i < keys.size(); ++i)
      if (std::string(keys[i].key) == k) return i;
    return keys.size();
  };
  const size_t ld = index("logdet_q50"), pos = index("logdet_positive_pct"), q05 = index("sigma_min_q05"),
               under = index("under_tau_pct");
  const Group& base = s.groups[s.baseline];
  if (base.margins[ld].n == 0) return;
  for (const Group& g : s.groups) {
    if (&g == &base || g.margins[ld].n == 0) continue;
    o << "- lambda = " << lam(g.lambda) << ": median log det J " << format_fixed(g.margins[ld].mean, 3)
      << " (baseline " << format_fixed(base.margins[ld].mean, 3) << "), " << format_fixed(g.margins[pos].mean, 1)
      << "% of log det > 0 (baseline " << format_fixed(base.margins[pos].mean, 1) << "%); 5% quantile of sigma_min "
      << format_fixed(g.margins[q05].mean, 4) << " (baseline " << format_fixed(base.margins[q05].mean, 4)
      << "); under tau " << format_fixed(g.margins[under].mean, 2) << "% (baseline "
      << format_fixed(base.margins[under].mean, 2) << "%).\n";
  }
  o << "\n";
}

void md_margins(std::ostringstream& o, const Study& s, const ReportContext& c) {
  o << "## Stability margins\n\n";
  bool any = false;
  for (const Group& g : s.groups) any = any || g.margins.back().n > 0;
  if (!any) {
    o << "No margins.json was found for any run (`barrierlm margins RUN --out RUN/margins`).\n\n";
    return;
  }
  o << "sigma_min(J_t) is the distance of J_t to the degeneracy boundary det J_t = 0, log det J_t "
       "the barrier's potential; both are pooled over the analysed sequences x barrier layers x "
       "heads x positions t >= 2 of each run, the token margin m_t is the minimum over layers and "
       "heads. Each cell: mean ± standard deviation over the lambda's seeds. tau = "
    << format_general(s.tau, 4) << ".\n\n";
  o << "| statistic |";
  for (const Group& g : s.groups) o << " lambda = " << lam(g.lambda) << " |";
  o << "\n|---|";
  for (size_t i = 0; i < s.groups.size(); ++i) o << "---|";
  o << "\n";
  const auto& keys = report_margin_keys();
  for (size_t k = 0; k < keys.size(); ++k) {
    const std::string key = keys[k].key;
    const int digits = key == "under_tau" || key == "count" ? 1 : key.find("pct") != std::string::npos ? 2 : 4;
    o << "| " << (key.rfind("under_tau", 0) == 0
                      ? std::string(keys[k].label) + " = " + format_general(s.tau, 4)
                      : std::string(keys[k].label))
      << " |";
    for (const Group& g : s.groups) o << " " << format_stat(g.margins[k], digits) << " |";
    o << "\n";
  }
  o << "\nA caution on reading these: phi(det) = -log det is unbounded below for det J > 1, so "
       "with lambda > 0 training can lower the barrier term by inflating det J_t (log det > 0) "
       "instead of widening the smallest singular value sigma_min, which is the actual distance to "
       "the boundary. Compare the log det rows with the sigma_min rows:\n\n";
  md_margin_remarks(o, s);
  o << "![sigma_min histograms](" << c.image_prefix << "margins_hist.svg)\n\n";
  o << "![log det histograms](" << c.image_prefix << "logdet_hist.svg)\n\n";
}

void md_support(std::ostringstream& o, const Study& s, const ReportContext& c) {
  o << "## Support tokens\n\n";
  o << "The positions closest to the degeneracy boundary (smallest token margin) of each lambda's "
       "first run, with the text before them and the token itself in brackets.\n\n";
  bool any = false;
  for (const Group& g : s.groups) {
    const RunData& r = *g.runs.front();
    if (!r.margins.present || r.margins.support.empty() || c.support_tokens <= 0) continue;
    any = true;
    o << "**lambda = " << lam(g.lambda) << "** (" << cell(r.name) << ")\n\n";
    o << "| rank | margin | layer / head | log det | sequence, position | context |\n|---|---|---|---|---|---|\n";
    for (size_t k = 0; k < r.margins.support.size() && static_cast<int>(k) < c.support_tokens; ++k) {
      const SupportToken& t = r.margins.support[k];
      o << "| " << t.rank << " | " << format_fixed(t.margin, 4) << " | L" << t.layer << " H" << t.head
        << " | " << (std::isfinite(t.logdet) ? format_fixed(t.logdet, 3) : "det <= 0") << " | " << t.sequence << ", " << t.position << " | `"
        << cell(t.before) << "[" << cell(t.text) << "]" << cell(t.after) << "` |\n";
    }
    o << "\n";
  }
  if (!any) o << "No support tokens were found (no margins.json).\n\n";
}

void md_training(std::ostringstream& o, const Study& s, const ReportContext& c) {
  o << "## Training\n\n";
  o << "| run | lambda | seed | steps | final val CE | val CE change over the last fifth % | "
       "training time | tokens/s |\n|---|---|---|---|---|---|---|---|\n";
  int improving = 0, total = 0;
  for (const Group& g : s.groups)
    for (const RunData* r : g.runs) {
      const TrainingSummary t = training_summary(r->metrics);
      ++total;
      improving += t.last_fifth_change_pct < -0.5;
      o << "| " << cell(r->name) << " | " << lam(g.lambda) << " | " << r->seed() << " | "
        << r->metrics.last_step << " | " << format_fixed(t.final_val_ce, 4) << " | "
        << (std::isfinite(t.last_fifth_change_pct) ? format_fixed(t.last_fifth_change_pct, 2) : "-")
        << " | " << (std::isfinite(t.train_seconds) ? format_duration(t.train_seconds) : "-") << " | "
        << (std::isfinite(t.tokens_per_s) ? format_rate(t.tokens_per_s) : "-") << " |\n";
    }
  o << "\n";
  if (improving > 0)
    o << "**" << improving << " of " << total << " runs were still improving** (validation CE fell "
      << "by more than 0.5% over the last fifth of training): these models are not trained to "
      << "convergence, and longer runs may change the comparison.\n\n";
  else
    o << "Every run's validation CE moved by less than 0.5% (or rose) over its last fifth of "
         "training.\n\n";
  o << "![validation CE during training](" << c.image_prefix << "training_curves.svg)\n\n";
}

}  // namespace

std::string report_markdown(const Study& s, const ReportContext& c) {
  std::ostringstream o;
  o << "# " << c.title << "\n\n";
  if (!c.note.empty()) o << c.note << "\n\n";
  md_setup(o, s);
  md_summary(o, s, c);
  md_noise_table(o, s, c);
  md_margins(o, s, c);
  md_support(o, s, c);
  md_training(o, s, c);
  if (!s.notes.empty()) {
    o << "## Notes\n\n";
    for (const std::string& n : s.notes) o << "- " << cell(n) << "\n";
    o << "\n";
  }
  o << "## How this report was made\n\n";
  o << "Every number above is computed by `barrierlm report` from the runs' config.yaml, "
       "metrics.jsonl, eval JSON and margins JSON/CSV; report.json holds the same numbers. "
       "Command:\n\n    " << c.command << "\n";
  return o.str();
}

// ------------------------------------------------------------------ report.json

namespace {

void json_stat(JsonWriter& j, const std::string& name, const Stat& st) {
  j.key(name).begin_object().kv("mean", st.mean).kv("sd", st.sd).kv("n", st.n).end_object();
}

}  // namespace

std::string report_json(const Study& s, const ReportContext& c) {
  JsonWriter j(true);
  j.begin_object().kv("title", c.title).kv("tau", s.tau).kv("compare_sigma", c.compare_sigma);
  j.key("baseline_lambda");
  if (s.baseline >= 0) j.value(0.0); else j.null();
  j.key("sigmas").numbers(s.sigmas);
  j.key("paper").begin_object().kv("clean_change_pct", kPaperCleanChangePct)
      .kv("noisy_change_pct", kPaperNoisyChangePct).end_object();
  j.key("groups").begin_array();
  const auto& keys = report_margin_keys();
  for (const Group& g : s.groups) {
    j.begin_object().kv("lambda", g.lambda);
    j.key("runs").begin_array();
    for (const RunData* r : g.runs)
      j.begin_object().kv("dir", r->dir).kv("name", r->name).kv("seed", r->seed())
          .kv("step", r->metrics.last_step).kv("eval", r->eval.present).kv("margins", r->margins.present)
          .end_object();
    j.end_array();
    j.key("noise").begin_array();
    for (const NoiseRow& r : g.noise) {
      j.begin_object().kv("sigma", r.sigma).kv("runs", r.runs);
      json_stat(j, "ce", r.ce);
      if (s.with_bpb) json_stat(j, "bpb", r.bpb);
      json_stat(j, "acc", r.acc);
      json_stat(j, "degradation_pct", r.degradation_pct);
      if (r.have_change) {
        json_stat(j, "change_vs_baseline_pct", r.change_pct);
        j.kv("paired", r.paired).kv("seeds_lower", r.seeds_lower).kv("seeds_higher", r.seeds_higher)
            .kv("seeds_compared", r.seeds_compared).kv("verdict", verdict(r));
      }
      j.end_object();
    }
    j.end_array();
    j.key("margins").begin_object();
    for (size_t k = 0; k < keys.size(); ++k) json_stat(j, keys[k].key, g.margins[k]);
    j.end_object();
    j.key("training").begin_object();
    json_stat(j, "final_val_ce", g.final_val_ce);
    json_stat(j, "last_fifth_change_pct", g.last_fifth_change_pct);
    j.end_object();
    j.end_object();
  }
  j.end_array();
  j.key("notes").begin_array();
  for (const std::string& n : s.notes) j.value(n);
  j.end_array();
  j.kv("command", c.command);
  j.end_object();
  return j.str() + "\n";
}

// ------------------------------------------------------------------ plots

namespace {

std::string noise_vs_loss(const Study& s) {
  SvgPlot p;
  p.title("Validation CE under embedding noise (mean ± sd over seeds and draws)")
      .xlabel("noise standard deviation sigma").ylabel("CE (nats/token)");
  for (size_t i = 0; i < s.groups.size(); ++i) {
    const Group& g = s.groups[i];
    std::vector<double> x, y;
    for (const NoiseRow& r : g.noise)
      if (r.ce.n > 0) x.push_back(r.sigma), y.push_back(r.ce.mean);
    p.line(plot_label(g), x, y, series_color(static_cast<int>(i)));
    for (const NoiseRow& r : g.noise)  // error bars: unlabelled vertical segments
      if (r.ce.n > 1 && r.ce.sd > 0)
        p.line("", {r.sigma, r.sigma}, {r.ce.mean - r.ce.sd, r.ce.mean + r.ce.sd}, series_color(static_cast<int>(i)));
  }
  return p.render();
}

std::string noise_vs_change(const Study& s) {
  SvgPlot p;
  p.title("CE change against the baseline (lambda = 0), same seed and noise")
      .xlabel("noise standard deviation sigma").ylabel("change of CE vs baseline (%)");
  double lo = s.sigmas.empty() ? 0 : s.sigmas.front(), hi = s.sigmas.empty() ? 1 : s.sigmas.back();
  p.line("no change", {lo, hi}, {0, 0}, "#999999");
  for (size_t i = 0; i < s.groups.size(); ++i) {
    const Group& g = s.groups[i];
    if (g.lambda == 0) continue;
    std::vector<double> x, y;
    for (const NoiseRow& r : g.noise)
      if (r.have_change && r.change_pct.n > 0) x.push_back(r.sigma), y.push_back(r.change_pct.mean);
    p.line(plot_label(g), x, y, series_color(static_cast<int>(i)));
    for (const NoiseRow& r : g.noise)
      if (r.have_change && r.change_pct.n > 1 && r.change_pct.sd > 0)
        p.line("", {r.sigma, r.sigma}, {r.change_pct.mean - r.change_pct.sd, r.change_pct.mean + r.change_pct.sd},
               series_color(static_cast<int>(i)));
  }
  return p.render();
}

// Histograms of one pooled quantity per group, as fractions (groups may hold different counts),
// on common bins.
std::string group_histogram(const Study& s, std::vector<double> RunMargins::*field, const std::string& title,
                            const std::string& xlabel, double marker, const std::string& marker_label,
                            bool from_zero) {
  double lo = INFINITY, hi = -INFINITY;
  for (const Group& g : s.groups)
    for (const RunData* r : g.runs)
      for (double v : r->margins.*field)
        if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  SvgPlot p;
  p.title(title).xlabel(xlabel).ylabel("fraction of (sequence, layer, head, position)");
  if (lo > hi) return p.render();
  const double pad = std::max(0.03 * (hi - lo), 1e-3);
  lo = from_zero ? std::max(0.0, lo - pad) : lo - pad;
  hi += pad;
  const int bins = 50;
  std::vector<double> edges(bins + 1);
  for (int i = 0; i <= bins; ++i) edges[i] = lo + (hi - lo) * i / bins;
  p.x_range(lo, hi);
  for (size_t i = 0; i < s.groups.size(); ++i) {
    std::vector<double> counts(bins, 0);
    double n = 0;
    for (const RunData* r : s.groups[i].runs)
      for (double v : r->margins.*field) {
        if (!std::isfinite(v)) continue;
        counts[std::min(bins - 1, std::max(0, static_cast<int>((v - lo) / (hi - lo) * bins)))] += 1;
        n += 1;
      }
    if (n == 0) continue;
    for (double& x : counts) x /= n;
    p.histogram(plot_label(s.groups[i]), edges, counts, series_color(static_cast<int>(i)));
  }
  if (std::isfinite(marker) && marker >= lo && marker <= hi)
    p.vline(marker, marker_label);
  else if (std::isfinite(marker))
    p.xlabel(xlabel + "  (" + marker_label + " is off this scale)");
  return p.render();
}

std::string training_curves(const Study& s) {
  SvgPlot p;
  p.title("Validation CE during training").xlabel("step").ylabel("validation CE (nats/token)");
  for (size_t i = 0; i < s.groups.size(); ++i) {
    bool labelled = false;
    for (const RunData* r : s.groups[i].runs) {
      const RunMetrics& m = r->metrics;
      if (m.val_step.empty()) continue;
      p.line(labelled ? "" : plot_label(s.groups[i]), m.val_step, m.val_ce, series_color(static_cast<int>(i)));
      labelled = true;
    }
  }
  return p.render();
}

}  // namespace

std::string run_curves_svg(const RunMetrics& m, const std::string& run_name, double lambda) {
  SvgPlot p;
  p.title("Training curves: " + run_name).xlabel("step").ylabel("nats/token");
  p.line("training CE", m.train_step, m.train_ce);
  if (lambda > 0)
    p.line("loss CE + " + format_general(lambda, 3) + " R", m.train_step, m.train_loss);
  if (!m.val_step.empty()) p.dotted_line("validation CE", m.val_step, m.val_ce);
  return p.render();
}

const std::vector<std::string>& report_plot_names() {
  static const std::vector<std::string> names = {"noise_vs_loss.svg", "noise_vs_change.svg",
                                                 "margins_hist.svg", "logdet_hist.svg",
                                                 "training_curves.svg"};
  return names;
}

std::vector<std::pair<std::string, std::string>> report_plots(const Study& s) {
  std::vector<std::pair<std::string, std::string>> out;
  out.emplace_back("noise_vs_loss.svg", noise_vs_loss(s));
  if (s.baseline >= 0) out.emplace_back("noise_vs_change.svg", noise_vs_change(s));
  out.emplace_back("margins_hist.svg",
                   group_histogram(s, &RunMargins::sigma_min, "Stability margins sigma_min(J_t) by lambda",
                                   "sigma_min(J_t)  (0 = degeneracy boundary)", s.tau,
                                   "tau = " + format_general(s.tau, 3), true));
  out.emplace_back("logdet_hist.svg",
                   group_histogram(s, &RunMargins::logdet, "log det J_t by lambda (the barrier's potential)",
                                   "log det J_t  (> 0: det J > 1, rewarded without bound)", 0.0,
                                   "det J = 1", false));
  out.emplace_back("training_curves.svg", training_curves(s));
  return out;
}

}  // namespace blm
