// The statistics of `barrierlm report` (report_stats.h): grouping by lambda, noise rows with
// spread and baseline pairing, margin statistics, training summaries, comparability notes.
#include "cmd/report_stats.h"

#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include "cmd/evaluation.h"
#include "cmd/util.h"
#include "core/config.h"

namespace blm {

Stat stat_of(const std::vector<double>& xs) {
  std::vector<double> finite;
  for (double x : xs)
    if (std::isfinite(x)) finite.push_back(x);
  Stat s;
  s.n = static_cast<int>(finite.size());
  if (s.n == 0) return s;
  s.mean = mean_of(finite);
  s.sd = stddev_of(finite);
  return s;
}

// ------------------------------------------------------------------ margins

const std::vector<MarginKey>& report_margin_keys() {
  static const std::vector<MarginKey> keys = {
      {"sigma_min_min", "sigma_min: min"},
      {"sigma_min_q05", "sigma_min: 5% quantile"},
      {"sigma_min_q25", "sigma_min: 25% quantile"},
      {"sigma_min_q50", "sigma_min: median"},
      {"sigma_min_q95", "sigma_min: 95% quantile"},
      {"under_tau", "count with sigma_min < tau"},
      {"under_tau_pct", "% with sigma_min < tau"},
      {"logdet_min", "log det J: min"},
      {"logdet_q05", "log det J: 5% quantile"},
      {"logdet_q50", "log det J: median"},
      {"logdet_q95", "log det J: 95% quantile"},
      {"logdet_max", "log det J: max"},
      {"logdet_positive_pct", "% with log det J > 0 (det > 1)"},
      {"token_margin_min", "token margin m_t: min"},
      {"token_margin_q05", "token margin m_t: 5% quantile"},
      {"token_margin_q50", "token margin m_t: median"},
      {"sequence_margin_mean", "sequence margin min_t m_t: mean"},
      {"count", "(sequence, layer, head, position) count"},
  };
  return keys;
}

namespace {

std::vector<double> sorted_finite(const std::vector<double>& v) {
  std::vector<double> s;
  for (double x : v)
    if (std::isfinite(x)) s.push_back(x);
  std::sort(s.begin(), s.end());
  return s;
}

double q(const std::vector<double>& sorted, double p) {
  return sorted.empty() ? NAN : quantile_sorted(sorted, p);
}

}  // namespace

std::vector<double> margin_values(const RunMargins& m, double tau) {
  const size_t nk = report_margin_keys().size();
  if (!m.present) return std::vector<double>(nk, NAN);
  const std::vector<double> sig = sorted_finite(m.sigma_min), ld = sorted_finite(m.logdet),
                            tok = sorted_finite(m.token_margin);
  const double under = static_cast<double>(std::lower_bound(sig.begin(), sig.end(), tau) - sig.begin());
  const double positive = static_cast<double>(ld.end() - std::upper_bound(ld.begin(), ld.end(), 0.0));
  const double n = static_cast<double>(sig.size());
  std::vector<double> v = {
      sig.empty() ? NAN : sig.front(), q(sig, 0.05), q(sig, 0.25), q(sig, 0.5), q(sig, 0.95),
      std::isfinite(tau) ? under : NAN,
      std::isfinite(tau) && n > 0 ? 100 * under / n : NAN,
      ld.empty() ? NAN : ld.front(), q(ld, 0.05), q(ld, 0.5), q(ld, 0.95),
      ld.empty() ? NAN : ld.back(),
      ld.empty() ? NAN : 100 * positive / static_cast<double>(ld.size()),
      tok.empty() ? NAN : tok.front(), q(tok, 0.05), q(tok, 0.5),
      m.sequence_margin.empty() ? NAN : mean_of(m.sequence_margin),
      n};
  return v;
}

// ------------------------------------------------------------------ training

TrainingSummary training_summary(const RunMetrics& m) {
  TrainingSummary t;
  t.train_seconds = m.last_elapsed;
  t.tokens_per_s = m.last_tokens_per_s;
  if (m.val_ce.empty()) return t;
  t.final_val_ce = m.val_ce.back();
  if (m.val_ce.size() < 2) return t;
  // The validation point nearest to 80% of the way: how much the last fifth still moved.
  const double target = 0.8 * m.val_step.back();
  size_t best = 0;
  for (size_t i = 0; i + 1 < m.val_step.size(); ++i)
    if (std::fabs(m.val_step[i] - target) < std::fabs(m.val_step[best] - target)) best = i;
  t.last_fifth_change_pct = 100 * (m.val_ce.back() - m.val_ce[best]) / m.val_ce[best];
  return t;
}

// ------------------------------------------------------------------ noise rows

std::string Group::label() const {
  return "lambda = " + format_general(lambda, 6) + (lambda == 0 ? " (baseline)" : "");
}

namespace {

// Whether two evaluations saw the same inputs and the same noise draws.
bool same_noise(const RunEval& a, const RunEval& b) {
  return a.seed == b.seed && a.tokens_per_draw == b.tokens_per_draw && a.data == b.data;
}

const RunData* baseline_partner(const RunData& r, const Group& base) {
  for (const RunData* b : base.runs)
    if (b->seed() == r.seed() && b->eval.present && same_noise(b->eval, r.eval)) return b;
  return nullptr;
}

void fill_levels(NoiseRow& row, const Group& g, bool with_bpb) {
  std::vector<double> ce, bpb, acc, degr;
  for (const RunData* r : g.runs) {
    if (!r->eval.present) continue;
    const EvalLevel* l = r->eval.level(row.sigma);
    if (!l) continue;
    ++row.runs;
    const double clean = mean_of(r->eval.level(0.0)->ce);
    for (size_t d = 0; d < l->ce.size(); ++d) {
      ce.push_back(l->ce[d]);
      bpb.push_back(bits_per_byte(l->ce[d], r->eval.tokens_per_byte));
      acc.push_back(l->acc[d]);
      if (row.sigma > 0) degr.push_back(100 * (l->ce[d] - clean) / clean);
    }
  }
  row.ce = stat_of(ce);
  row.acc = stat_of(acc);
  row.degradation_pct = stat_of(degr);
  if (with_bpb) row.bpb = stat_of(bpb);
}

// Change against the baseline: per (seed, draw) when every run has a partner with the same seed,
// equal noise and as many draws; otherwise each draw against the baseline's mean.
void fill_change(NoiseRow& row, const Group& g, const Group& base, const NoiseRow& base_row) {
  if (base_row.runs == 0 || row.runs == 0) return;
  bool paired = true;
  for (const RunData* r : g.runs) {
    if (!r->eval.present || !r->eval.level(row.sigma)) continue;
    const RunData* b = baseline_partner(*r, base);
    const EvalLevel* bl = b ? b->eval.level(row.sigma) : nullptr;
    paired = paired && bl && bl->ce.size() == r->eval.level(row.sigma)->ce.size();
  }
  std::vector<double> changes;
  for (const RunData* r : g.runs) {
    if (!r->eval.present || !r->eval.level(row.sigma)) continue;
    const std::vector<double>& ce = r->eval.level(row.sigma)->ce;
    std::vector<double> mine;
    for (size_t d = 0; d < ce.size(); ++d) {
      const double ref = paired ? baseline_partner(*r, base)->eval.level(row.sigma)->ce[d]
                                : base_row.ce.mean;
      mine.push_back(100 * (ce[d] - ref) / ref);
    }
    const double seed_change = mean_of(mine);
    ++row.seeds_compared;
    row.seeds_lower += seed_change < 0;
    row.seeds_higher += seed_change > 0;
    changes.insert(changes.end(), mine.begin(), mine.end());
  }
  row.have_change = true;
  row.paired = paired;
  row.change_pct = stat_of(changes);
}

// section.key -> value of a config, from its YAML form.
std::map<std::string, std::string> flat_config(const Config& c) {
  std::map<std::string, std::string> out;
  std::istringstream in(config_to_yaml(c));
  std::string line, section;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line[0] != ' ') {
      section = line.substr(0, line.find(':'));
      continue;
    }
    const size_t colon = line.find(':');
    const size_t a = line.find_first_not_of(' ');
    out[section + "." + line.substr(a, colon - a)] = colon + 2 <= line.size() ? line.substr(colon + 2) : "";
  }
  return out;
}

// Keys allowed to differ between runs of one study: the two factors, where runs live, how they
// ran (device settings do not change the maths) and which checkpoints they saved.
bool is_study_factor(const std::string& key) {
  return key == "barrier.lambda" || key == "train.seed" || key == "train.run_name" ||
         key == "train.out_dir" || key == "train.checkpoint_interval" ||
         key == "train.keep_checkpoints" || key.rfind("device.", 0) == 0;
}

void note_config_differences(Study& s, const std::vector<RunData>& runs) {
  std::map<std::string, std::set<std::string>> values;
  for (const RunData& r : runs)
    for (const auto& kv : flat_config(r.config)) values[kv.first].insert(kv.second);
  for (const auto& kv : values) {
    if (kv.second.size() < 2 || is_study_factor(kv.first)) continue;
    std::string vs;
    for (const std::string& v : kv.second) vs += (vs.empty() ? "" : ", ") + v;
    s.notes.push_back("the runs differ in " + kv.first + " (" + vs +
                      "): their numbers are not directly comparable");
  }
}

// Names the runs whose evaluations used each value of each setting that is not the same for all.
void note_eval_differences(Study& s, const std::vector<RunData>& runs) {
  // setting -> value -> the runs evaluated with it
  std::map<std::string, std::map<std::string, std::vector<std::string>>> runs_by_value;
  for (const RunData& r : runs)
    if (r.eval.present)
      for (const auto& kv : eval_settings(r.eval))
        runs_by_value[kv.first][kv.second].push_back(r.name);
  for (const auto& setting : eval_settings(RunEval())) {  // in display order
    const auto& values = runs_by_value[setting.first];
    if (values.size() < 2) continue;
    s.eval_differences.insert(setting.first);
    std::string which;
    for (const auto& kv : values) {
      std::string names;
      for (const std::string& n : kv.second) names += (names.empty() ? "" : ", ") + n;
      which += (which.empty() ? "" : "; ") + kv.first + " (" + names + ")";
    }
    s.notes.push_back("the runs were evaluated with different " + setting.first + ": " + which +
                      ": their numbers under noise are not directly comparable");
  }
}

// A run stopped by --until or Ctrl-C is pooled as it is: the reader must know.
void note_unfinished_runs(Study& s, const std::vector<RunData>& runs) {
  for (const RunData& r : runs)
    if (r.stopped_early())
      s.notes.push_back(r.name + " stopped at step " + std::to_string(r.metrics.last_step) +
                        " of " + std::to_string(r.config.train.steps) +
                        " (train.steps): its numbers are those of an unfinished model");
}

}  // namespace

std::vector<std::pair<std::string, std::string>> eval_settings(const RunEval& e) {
  std::vector<double> sigmas;
  std::set<size_t> draw_counts;
  for (const EvalLevel& l : e.levels) {
    sigmas.push_back(l.sigma);
    if (l.sigma > 0) draw_counts.insert(l.ce.size());
  }
  std::sort(sigmas.begin(), sigmas.end());
  std::string grid, draws;
  for (double x : sigmas) grid += (grid.empty() ? "" : ",") + format_general(x, 6);
  for (size_t d : draw_counts) draws += (draws.empty() ? "" : ",") + std::to_string(d);
  return {{"--data", e.data},
          {"--batches", e.batches > 0 ? std::to_string(e.batches) : "unknown"},
          {"tokens per draw", std::to_string(e.tokens_per_draw)},
          {"--seed", std::to_string(e.seed)},
          {"--draws", draws.empty() ? "none" : draws},
          {"--noise", grid.empty() ? "none" : grid}};
}

Study build_study(const std::vector<RunData>& runs, double tau) {
  if (runs.empty()) throw Error("report: no run directories given");
  Study s;
  std::set<std::string> dirs;
  for (const RunData& r : runs)
    if (!dirs.insert(r.dir).second) throw Error("report: run directory '" + r.dir + "' given twice");

  // Groups by lambda; runs within a group by seed, then name.
  std::map<double, Group> by_lambda;
  for (const RunData& r : runs) {
    Group& g = by_lambda[r.lambda()];
    g.lambda = r.lambda();
    g.runs.push_back(&r);
  }
  for (auto& kv : by_lambda) {
    std::sort(kv.second.runs.begin(), kv.second.runs.end(), [](const RunData* a, const RunData* b) {
      return a->seed() != b->seed() ? a->seed() < b->seed() : a->name < b->name;
    });
    s.groups.push_back(kv.second);
  }
  for (size_t i = 0; i < s.groups.size(); ++i)
    if (s.groups[i].lambda == 0) s.baseline = static_cast<int>(i);

  // Noise levels, tokenizer, tau.
  std::set<double> sigmas;
  bool any_eval = false;
  s.with_bpb = true;
  for (const RunData& r : runs) {
    if (r.eval.present) {
      any_eval = true;
      s.with_bpb = s.with_bpb && !std::isnan(r.eval.tokens_per_byte);
      for (const EvalLevel& l : r.eval.levels) sigmas.insert(l.sigma);
    }
    if (std::isnan(tau) && r.margins.present) tau = r.margins.tau;
  }
  s.with_bpb = s.with_bpb && any_eval;
  s.sigmas.assign(sigmas.begin(), sigmas.end());
  s.tau = tau;

  for (Group& g : s.groups)
    for (double sigma : s.sigmas) {
      NoiseRow row;
      row.sigma = sigma;
      fill_levels(row, g, s.with_bpb);
      g.noise.push_back(row);
    }
  if (s.baseline >= 0) {
    const Group& base = s.groups[s.baseline];
    for (Group& g : s.groups) {
      if (&g == &base) continue;
      for (size_t i = 0; i < s.sigmas.size(); ++i) fill_change(g.noise[i], g, base, base.noise[i]);
    }
  } else {
    s.notes.push_back("no baseline run (lambda = 0) among the runs: no change against a baseline");
  }

  // Margins and training, over each group's runs.
  const size_t nk = report_margin_keys().size();
  for (Group& g : s.groups) {
    std::vector<std::vector<double>> per_key(nk);
    std::vector<double> val, fifth;
    for (const RunData* r : g.runs) {
      const std::vector<double> v = margin_values(r->margins, s.tau);
      for (size_t k = 0; k < nk; ++k) per_key[k].push_back(v[k]);
      const TrainingSummary t = training_summary(r->metrics);
      val.push_back(t.final_val_ce);
      fifth.push_back(t.last_fifth_change_pct);
    }
    for (size_t k = 0; k < nk; ++k) g.margins.push_back(stat_of(per_key[k]));
    g.final_val_ce = stat_of(val);
    g.last_fifth_change_pct = stat_of(fifth);
  }

  note_config_differences(s, runs);
  note_eval_differences(s, runs);
  note_unfinished_runs(s, runs);
  for (const RunData& r : runs)
    for (const std::string& n : r.notes) s.notes.push_back(n);
  for (const Group& g : s.groups)
    if (s.baseline >= 0 && &g != &s.groups[s.baseline])
      for (const NoiseRow& row : g.noise)
        if (row.have_change && !row.paired) {
          s.notes.push_back(g.label() + ": some runs have no baseline run with the same seed and "
                            "noise draws; their change is against the baseline's mean");
          break;
        }
  return s;
}

double comparison_sigma(const Study& s, double wanted) {
  for (double x : s.sigmas)
    if (x == wanted && x > 0) return x;
  return s.sigmas.empty() || s.sigmas.back() == 0 ? NAN : s.sigmas.back();
}

std::string verdict(const NoiseRow& row) {
  if (!row.have_change || row.seeds_compared == 0) return "n/a";
  if (row.seeds_lower == row.seeds_compared && row.change_pct.mean < 0) return "lower";
  if (row.seeds_higher == row.seeds_compared && row.change_pct.mean > 0) return "higher";
  return "mixed";
}

}  // namespace blm
