// Reading one run directory for `barrierlm report` (report_runs.h): config.yaml through the
// config parser, metrics.jsonl line by line, eval.json and margins.json through the JSON reader,
// margins.csv as a table with a known header.  Every problem names its file and line.
#include "cmd/report_runs.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <sstream>

#include "data/json_reader.h"
#include "cmd/runs.h"
#include "cmd/util.h"

namespace fs = std::filesystem;

namespace blm {

const EvalLevel* RunEval::level(double sigma) const {
  for (const EvalLevel& l : levels)
    if (l.sigma == sigma) return &l;
  return nullptr;
}

namespace {

double number_or_nan(const JsonValue& line, const char* key) {
  const JsonValue* v = line.find(key);
  return v ? v->number_or_nan() : NAN;
}

// One metrics.jsonl object into the columns.
void add_metrics_line(RunMetrics& m, const JsonValue& v, const std::string& where) {
  const std::string kind = json_get_string(v, "kind", where);
  const double step = json_get_number(v, "step", where);
  if (!std::isfinite(step)) throw Error(where + ": 'step' is not a number");
  m.last_step = std::max<int64_t>(m.last_step, static_cast<int64_t>(step));
  if (kind == "train") {
    m.train_step.push_back(step);
    m.train_ce.push_back(number_or_nan(v, "ce"));
    m.train_loss.push_back(number_or_nan(v, "loss"));
    m.train_barrier.push_back(number_or_nan(v, "barrier"));
    m.train_min_logdet.push_back(number_or_nan(v, "min_logdet"));
    m.last_tokens_per_s = number_or_nan(v, "tokens_per_s");
    m.last_elapsed = number_or_nan(v, "elapsed");
  } else if (kind == "eval") {
    m.val_step.push_back(step);
    m.val_ce.push_back(number_or_nan(v, "val_ce"));
    m.val_bpb.push_back(number_or_nan(v, "val_bpb"));
    m.val_acc.push_back(number_or_nan(v, "val_acc"));
    m.val_min_margin.push_back(number_or_nan(v, "min_margin"));
  }
  // Other kinds are skipped: later versions may log more.
}

int as_int(double x, const std::string& what) {
  if (!std::isfinite(x) || x != std::floor(x)) throw Error(what + " is not an integer");
  return static_cast<int>(x);
}

SupportToken support_token(const JsonValue& v, const std::string& src, const std::string& where) {
  SupportToken s;
  s.rank = as_int(json_get_number(v, "rank", src, where), src + ": " + where + ".rank");
  s.sequence = as_int(json_get_number(v, "sequence", src, where), src + ": " + where + ".sequence");
  s.position = as_int(json_get_number(v, "position", src, where), src + ": " + where + ".position");
  s.layer = as_int(json_get_number(v, "layer", src, where), src + ": " + where + ".layer");
  s.head = as_int(json_get_number(v, "head", src, where), src + ": " + where + ".head");
  s.margin = json_get_number(v, "margin", src, where);
  s.logdet = json_get_number(v, "logdet", src, where);
  s.text = json_get_string(v, "text", src, where);
  s.before = json_get_string(v, "before", src, where);
  s.after = json_get_string(v, "after", src, where);
  return s;
}

// margins.csv: "b,l,h,t,token,sigma_min,logdet"; keeps rows of barrier layers with t >= 2.
void read_margins_csv(RunMargins& m, const std::string& text, const std::string& src) {
  std::istringstream in(text);
  std::string line;
  int line_no = 0;
  if (!std::getline(in, line) || line != "b,l,h,t,token,sigma_min,logdet")
    throw Error(src + ":1: expected the header 'b,l,h,t,token,sigma_min,logdet'");
  ++line_no;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty()) continue;
    double f[7];
    const char* p = line.c_str();
    for (int i = 0; i < 7; ++i) {
      char* end = nullptr;
      f[i] = std::strtod(p, &end);
      if (end == p || (i < 6 && *end != ',') || (i == 6 && *end != '\0'))
        throw Error(src + ":" + std::to_string(line_no) + ": expected 7 comma-separated numbers");
      p = end + (i < 6 ? 1 : 0);
    }
    const int layer = static_cast<int>(f[1]), t = static_cast<int>(f[3]);
    if (t < 2) continue;  // J_t = I: no margin
    if (std::find(m.barrier_layers.begin(), m.barrier_layers.end(), layer) == m.barrier_layers.end())
      continue;
    m.sigma_min.push_back(f[5]);
    m.logdet.push_back(f[6]);
  }
}

// The path without a trailing separator ("run/" -> "run"), so that a link is seen as a link.
// (Not lexically normalised: "link/.." must be resolved through the link.)
fs::path without_trailing_slash(const std::string& dir) {
  fs::path p(dir);
  while (!p.has_filename() && p.has_relative_path()) p = p.parent_path();
  return p;
}

// What identifies a run directory however it is reached: its canonical absolute path.
std::string run_identity(const std::string& dir) {
  const fs::path p = fs::absolute(without_trailing_slash(dir));
  std::error_code ec;
  const fs::path canonical = fs::weakly_canonical(p, ec);
  return (ec ? p.lexically_normal() : canonical).string();
}

bool is_link(const std::string& dir) {
  std::error_code ec;
  return fs::is_symlink(without_trailing_slash(dir), ec);
}

std::string read_if_exists(const std::string& path, bool* exists) {
  std::error_code ec;
  *exists = fs::is_regular_file(path, ec);
  return *exists ? read_text_file(path) : std::string();
}

}  // namespace

RunMetrics parse_metrics(const std::string& text, const std::string& source) {
  RunMetrics m;
  std::istringstream in(text);
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = source + ":" + std::to_string(line_no);
    add_metrics_line(m, parse_json(line, source, line_no), where);
  }
  return m;
}

namespace {

// The eval JSON's "batches" counts the micro-batches the model ran, of "batch_size" =
// train.batch_size / train.grad_accum sequences; eval's --batches, and the report's, counts
// batches of train.batch_size sequences (plan_validation).  The JSON's sequences in that unit:
// the smallest --batches that evaluates them (a larger one, capped by short data, evaluates the
// same windows).  0 when the file does not say (or says nonsense).
int64_t batches_of_train_batch_size(const JsonValue& doc, const std::string& src,
                                    const TrainConfig& train) {
  if (!doc.find("batches") || !doc.find("batch_size") || train.batch_size < 1) return 0;
  const double sequences =
      json_get_number(doc, "batches", src) * json_get_number(doc, "batch_size", src);
  if (!(sequences > 0) || !std::isfinite(sequences)) return 0;
  return static_cast<int64_t>(std::ceil(sequences / train.batch_size));
}

// An eval JSON without its batches, which only the run's train.batch_size gives in the unit of
// --batches (load_run).
RunEval eval_of(const JsonValue& doc, const std::string& src) {
  RunEval e;
  e.present = true;
  e.path = src;
  e.step = static_cast<int64_t>(json_get_number(doc, "step", src));
  e.tokenizer = json_get_string(doc, "tokenizer", src);
  e.data = json_get_string(doc, "data", src);
  const JsonValue* per_byte = doc.find("tokens_per_byte");
  if (per_byte) e.tokens_per_byte = json_get_number(doc, "tokens_per_byte", src);
  else if (e.tokenizer == "byte") e.tokens_per_byte = 1.0;
  if (per_byte && !(e.tokens_per_byte > 0))  // also NaN
    throw Error(src + ": 'tokens_per_byte' must be a positive number");
  // eval writes the seed in [0, 2^64); files of earlier versions wrote seeds >= 2^63 negative.
  // (Read through a double, seeds near 2^64 round up to it: they read back as UINT64_MAX.)
  const double seed = json_get_number(doc, "seed", src);
  e.seed = seed < 0 ? static_cast<uint64_t>(static_cast<int64_t>(seed))
                    : seed < 0x1p64 ? static_cast<uint64_t>(seed) : UINT64_MAX;
  e.tokens_per_draw = static_cast<int64_t>(json_get_number(doc, "tokens_per_draw", src));
  const auto& levels = json_get_array(doc, "levels", src);
  for (size_t i = 0; i < levels.size(); ++i) {
    const std::string where = "levels[" + std::to_string(i) + "]";
    EvalLevel l;
    l.sigma = json_get_number(levels[i], "noise", src, where);
    l.ce = json_get_numbers(levels[i], "ce_per_draw", src, where);
    l.acc = json_get_numbers(levels[i], "acc_per_draw", src, where);
    if (!std::isfinite(l.sigma) || l.sigma < 0)
      throw Error(src + ": '" + where + ".noise' is not a noise level");
    if (l.ce.empty() || l.ce.size() != l.acc.size())
      throw Error(src + ": '" + where + "' has " + std::to_string(l.ce.size()) + " CE and " +
                  std::to_string(l.acc.size()) + " accuracy draws");
    if (e.level(l.sigma)) throw Error(src + ": noise level " + format_general(l.sigma) + " appears twice");
    e.levels.push_back(std::move(l));
  }
  if (!e.level(0.0)) throw Error(src + ": no clean (noise 0) level");
  return e;
}

}  // namespace

RunEval parse_eval(const std::string& text, const std::string& src) {
  return eval_of(parse_json(text, src), src);
}

RunMargins parse_margins(const std::string& json_text, const std::string& json_src,
                         const std::string& csv_text, const std::string& csv_src) {
  const JsonValue doc = parse_json(json_text, json_src);
  RunMargins m;
  m.present = true;
  m.step = static_cast<int64_t>(json_get_number(doc, "step", json_src));
  m.tau = json_get_number(doc, "tau", json_src);
  m.n_layer = as_int(json_get_number(doc, "n_layer", json_src), json_src + ": n_layer");
  m.n_head = as_int(json_get_number(doc, "n_head", json_src), json_src + ": n_head");
  m.sequences = as_int(json_get_number(doc, "sequences", json_src), json_src + ": sequences");
  m.seq_len = as_int(json_get_number(doc, "seq_len", json_src), json_src + ": seq_len");
  for (double l : json_get_numbers(doc, "barrier_layers", json_src))
    m.barrier_layers.push_back(as_int(l, json_src + ": barrier_layers"));
  const auto& tms = json_get_array(doc, "token_margins", json_src);
  for (size_t b = 0; b < tms.size(); ++b) {
    const std::string where = "token_margins[" + std::to_string(b) + "]";
    for (double v : json_get_numbers(tms[b], "margin", json_src, where))
      if (!std::isnan(v)) m.token_margin.push_back(v);  // NaN: t < 2
  }
  const auto& seqs = json_get_array(doc, "sequence_margins", json_src);
  for (size_t b = 0; b < seqs.size(); ++b) {
    const double v = json_get_number(seqs[b], "margin", json_src, "sequence_margins[" + std::to_string(b) + "]");
    if (!std::isnan(v)) m.sequence_margin.push_back(v);
  }
  const auto& sup = json_get_array(doc, "support_tokens", json_src);
  for (size_t k = 0; k < sup.size(); ++k)
    m.support.push_back(support_token(sup[k], json_src, "support_tokens[" + std::to_string(k) + "]"));
  read_margins_csv(m, csv_text, csv_src);
  return m;
}

std::vector<std::string> unique_run_dirs(const std::vector<std::string>& dirs,
                                         std::vector<std::string>* notes) {
  // The arguments of each run, runs in the order of their first argument.
  std::vector<std::string> identities;
  std::map<std::string, std::vector<std::string>> arguments;
  for (const std::string& dir : dirs) {
    const std::string id = run_identity(dir);
    if (!arguments.count(id)) identities.push_back(id);
    arguments[id].push_back(dir);
  }
  std::vector<std::string> kept;
  for (const std::string& id : identities) {
    const std::vector<std::string>& args = arguments[id];
    auto keep = std::find_if(args.begin(), args.end(),
                             [](const std::string& d) { return !is_link(d); });
    if (keep == args.end()) keep = args.begin();
    kept.push_back(*keep);
    for (auto it = args.begin(); it != args.end(); ++it)
      if (it != keep)
        notes->push_back("'" + *it + "' is the same run as '" + *keep +
                         "': skipped as a duplicate");
  }
  return kept;
}

RunData load_run(const std::string& dir, const RunFiles& files) {
  RunData r;
  r.dir = dir;
  r.name = fs::path(dir).lexically_normal().filename().string();
  if (r.name.empty() || r.name == ".") r.name = fs::path(dir).lexically_normal().parent_path().filename().string();
  std::error_code ec;
  if (!fs::exists(dir, ec)) throw Error("run directory '" + dir + "' does not exist");
  if (!fs::is_directory(dir, ec)) throw Error("run directory '" + dir + "' is not a directory");
  const std::string config_path = join_path(dir, kConfigFile);
  if (!fs::is_regular_file(config_path, ec))
    throw Error("'" + config_path + "' is missing: '" + dir + "' is not a barrierlm run directory");
  r.config = load_config(config_path);

  const std::string metrics_path = join_path(dir, kMetricsFile);
  if (!fs::is_regular_file(metrics_path, ec))
    throw Error("'" + metrics_path + "' is missing: train the run first");
  r.metrics = parse_metrics(read_text_file(metrics_path), metrics_path);

  bool have = false;
  const std::string eval_path = join_path(dir, files.eval_file);
  const std::string eval_text = read_if_exists(eval_path, &have);
  if (have) {
    const JsonValue doc = parse_json(eval_text, eval_path);
    r.eval = eval_of(doc, eval_path);
    r.eval.batches = batches_of_train_batch_size(doc, eval_path, r.config.train);
    if (r.eval.step != r.metrics.last_step)
      r.notes.push_back(eval_path + " is of step " + std::to_string(r.eval.step) +
                        " but the run logged step " + std::to_string(r.metrics.last_step) +
                        ": re-run barrierlm eval");
  } else {
    r.notes.push_back("no " + eval_path + " (barrierlm eval " + dir + " --out " + eval_path + ")");
  }

  const std::string mdir = join_path(dir, files.margins_dir);
  const std::string mjson = join_path(mdir, "margins.json"), mcsv = join_path(mdir, "margins.csv");
  const std::string json_text = read_if_exists(mjson, &have);
  if (have) {
    bool have_csv = false;
    const std::string csv_text = read_if_exists(mcsv, &have_csv);
    if (!have_csv) throw Error("'" + mcsv + "' is missing next to '" + mjson + "'");
    r.margins = parse_margins(json_text, mjson, csv_text, mcsv);
    r.margins.dir = mdir;
    if (r.margins.step != r.metrics.last_step)
      r.notes.push_back(mjson + " is of step " + std::to_string(r.margins.step) +
                        " but the run logged step " + std::to_string(r.metrics.last_step) +
                        ": re-run barrierlm margins");
  } else {
    r.notes.push_back("no " + mjson + " (barrierlm margins " + dir + " --out " + mdir + ")");
  }
  return r;
}

}  // namespace blm
