// `barrierlm eval`: robustness to embedding noise (spec section 6).  For each noise level s the
// model is evaluated with e_t += N(0, s^2) on fixed evaluation batches, over `draws` noise draws
// with fixed seeds (draw d uses seed hash2(seed, d), the same for every level and every model,
// so two models meet the same noise); reported: CE (nats/token), bits per byte (CE / ln 2 x the
// evaluated text's tokens per byte), top-1 accuracy, each as mean and sample std over draws, and
// the absolute and relative degradation of the mean against the clean (s = 0) evaluation.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "cmd/cli_checks.h"
#include "cmd/commands.h"
#include "cmd/evaluation.h"
#include "cmd/json.h"
#include "cmd/runs.h"
#include "cmd/svg.h"
#include "cmd/util.h"
#include "core/checkpoint.h"
#include "core/rng.h"

namespace blm {

namespace {

// The largest noise level: at s = 1e6 an embedding coordinate of about 0.1 is 1e-7 of the noise,
// fp32's resolution (2^-23 = 1.2e-7), so e_t + noise is the noise alone and every larger level
// gives the same CE; further up LayerNorm's squares overflow fp32 and CE becomes NaN.
constexpr double kMaxNoise = 1e6;
constexpr const char* kMaxNoiseText = "1e6";  // as the help and the message write it

struct LevelResult {
  double noise = 0;
  std::vector<double> ce, acc;  // one per draw
  double ce_mean() const { return mean_of(ce); }
  double ce_std() const { return stddev_of(ce); }
  double acc_mean() const { return mean_of(acc); }
  double acc_std() const { return stddev_of(acc); }
};

// Clean first: the degradations are relative to it.
std::vector<double> levels_with_clean(const std::vector<double>& given) {
  std::vector<double> out = {0.0};
  for (double s : given) {
    bool seen = false;
    for (double t : out) seen = seen || t == s;
    if (!seen) out.push_back(s);
  }
  return out;
}

std::string pm(double mean, double sd, int digits, double scale = 1) {
  std::string s = format_fixed(mean * scale, digits);
  if (sd > 0) s += " ± " + format_fixed(sd * scale, digits);
  return s;
}

std::string pad(const std::string& s, size_t width) {
  // Width in characters: "±" is two bytes but one column.
  size_t cols = 0;
  for (unsigned char c : s) cols += (c & 0xC0) != 0x80;
  return cols >= width ? s + " " : s + std::string(width - cols, ' ');
}

// per_byte: tokens per byte of the evaluated text (tokens_per_byte), NaN: no bits per byte.
void print_table(FILE* f, const std::vector<LevelResult>& rs, double per_byte) {
  const bool bytes = !std::isnan(per_byte);
  const double clean_ce = rs[0].ce_mean(), clean_acc = rs[0].acc_mean();
  std::fprintf(f, "%s%s%s%s%s%s\n", pad("noise", 8).c_str(), pad("CE (nats/token)", 20).c_str(),
               bytes ? pad("bits/byte", 20).c_str() : "", pad("accuracy %", 18).c_str(),
               pad("dCE", 10).c_str(), "dCE %   dacc (points)");
  for (const LevelResult& r : rs) {
    std::string line = pad(format_general(r.noise, 4), 8) + pad(pm(r.ce_mean(), r.ce_std(), 4), 20);
    if (bytes)
      line += pad(pm(bits_per_byte(r.ce_mean(), per_byte), bits_per_byte(r.ce_std(), per_byte), 4),
                  20);
    line += pad(pm(r.acc_mean(), r.acc_std(), 2, 100), 18);
    if (r.noise == 0) {
      line += "(clean)";
    } else {
      char buf[96];
      const double d = r.ce_mean() - clean_ce;
      std::snprintf(buf, sizeof buf, "%+-10.4f%+-8.2f%+.2f", d, 100 * d / clean_ce,
                    100 * (r.acc_mean() - clean_acc));
      line += buf;
    }
    std::fprintf(f, "%s\n", line.c_str());
  }
}

void write_level(JsonWriter& j, const LevelResult& r, const LevelResult& clean, double per_byte) {
  j.begin_object().kv("noise", r.noise).kv("draws", static_cast<int64_t>(r.ce.size()));
  j.kv("ce_mean", r.ce_mean()).kv("ce_std", r.ce_std());
  if (!std::isnan(per_byte))
    j.kv("bpb_mean", bits_per_byte(r.ce_mean(), per_byte))
        .kv("bpb_std", bits_per_byte(r.ce_std(), per_byte));
  j.kv("acc_mean", r.acc_mean()).kv("acc_std", r.acc_std());
  // Degradation: how much worse than clean, so positive is worse for both (CE up, accuracy down).
  const double d_ce = r.ce_mean() - clean.ce_mean(), d_acc = clean.acc_mean() - r.acc_mean();
  j.kv("ce_abs_degradation", d_ce).kv("ce_rel_degradation", d_ce / clean.ce_mean());
  j.kv("acc_abs_degradation", d_acc).kv("acc_rel_degradation", d_acc / clean.acc_mean());
  j.key("ce_per_draw").numbers(r.ce);
  j.key("acc_per_draw").numbers(r.acc);
  j.end_object();
}

// CE against the noise level: the mean over the draws, and their smallest and largest as thin
// dashed lines (the clean level has one draw).
std::string noise_plot(const std::vector<LevelResult>& results, const std::string& checkpoint) {
  std::vector<LevelResult> sorted = results;
  std::sort(sorted.begin(), sorted.end(),
            [](const LevelResult& a, const LevelResult& b) { return a.noise < b.noise; });
  std::vector<double> noise, mean, lo, hi;
  for (const LevelResult& r : sorted) {
    noise.push_back(r.noise);
    mean.push_back(r.ce_mean());
    lo.push_back(*std::min_element(r.ce.begin(), r.ce.end()));
    hi.push_back(*std::max_element(r.ce.begin(), r.ce.end()));
  }
  SvgPlot p;
  p.title("CE under embedding noise: " + checkpoint)
      .xlabel("noise standard deviation s (e_t += N(0, s^2))")
      .ylabel("cross-entropy (nats/token)");
  p.dotted_line("mean over draws", noise, mean, series_color(0));
  p.dashed_line("smallest / largest draw", noise, lo, series_color(0));
  p.dashed_line("", noise, hi, series_color(0));
  return p.render();
}

// The run's data files as its config names them (eval runs/r --out val.txt where val.txt is
// data.val).  Relative paths that open_model_data finds elsewhere are not covered.
std::vector<NamedFile> run_data_files(const EvalOptions& o, const Config& cfg) {
  if (!o.data.empty()) return {};
  return {{"the run's validation data", cfg.data.val}, {"the run's training data", cfg.data.train}};
}

// Neither --out nor --plot replaces a file eval reads, nor each other's file.
void refuse_overwriting(const EvalOptions& o, const std::vector<NamedFile>& inputs) {
  refuse_output_over("--out", o.out, inputs);
  std::vector<NamedFile> before_plot = inputs;
  before_plot.push_back({"the file of --out", o.out});
  refuse_output_over("--plot", o.plot, before_plot);
}

// --batches asked for more sequences than the data holds: say how many are evaluated, whole
// batches only, and how many the data holds.
void note_fewer_batches(const EvalOptions& o, const EvalPlan& plan, const TrainConfig& train,
                        const TokenStream& val, const std::string& what) {
  const int64_t asked = static_cast<int64_t>(o.batches) * train.batch_size;
  const int64_t used = static_cast<int64_t>(plan.batches) * plan.B;
  if (o.batches == 0 || used >= asked) return;
  std::fprintf(stderr, "barrierlm: note: --batches %d (%lld sequences) capped at %d batches of "
                       "%d, %lld of the %d sequences of %d tokens that %s holds (whole batches "
                       "only)\n",
               o.batches, static_cast<long long>(asked), plan.batches, plan.B,
               static_cast<long long>(used), eval_batch_count(val, plan.T, 1), plan.T,
               what.c_str());
}

}  // namespace

std::vector<double> parse_noise_list(const std::string& text) {
  std::vector<double> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t a = item.find_first_not_of(" \t"), b = item.find_last_not_of(" \t");
    const std::string t = a == std::string::npos ? "" : item.substr(a, b - a + 1);
    char* end = nullptr;
    const double v = std::strtod(t.c_str(), &end);
    if (t.empty() || *end != '\0' || !std::isfinite(v) || v < 0)
      throw UsageError("--noise: '" + t + "' is not a noise level (expected numbers >= 0, " +
                       "comma-separated, e.g. 0,0.05,0.1)");
    if (v > kMaxNoise)
      throw UsageError("--noise: '" + t + "' is above " + kMaxNoiseText +
                       ", the largest noise level accepted (beyond it fp32 cannot hold the "
                       "embedding beside the noise)");
    out.push_back(v);
  }
  if (out.empty()) throw UsageError("--noise: no noise levels given (e.g. --noise 0,0.1)");
  return out;
}

int run_eval(const EvalOptions& o) {
  if (o.draws < 1) throw UsageError("--draws must be at least 1, got " + std::to_string(o.draws));
  const std::vector<double> levels = levels_with_clean(parse_noise_list(o.noise));
  // Before the evaluation, not after it.
  if (!o.out.empty()) check_output_file(o.out);
  if (!o.plot.empty()) check_output_file(o.plot);
  const std::string checkpoint = checkpoint_for(o.model);
  // (Expanding --data here also names the option when its pattern matches nothing.)
  refuse_overwriting(o, model_input_files(checkpoint, o.data));
  TrainedModel model = load_trained_model(checkpoint, o.model.backend, o.model.threads);
  const Config& cfg = model.checkpoint.config;
  refuse_overwriting(o, run_data_files(o, cfg));  // the checkpoint names them
  const Dataset data = open_model_data(model, o.data);
  const std::string what = o.data.empty() ? "the run's validation data" : "'" + o.data + "'";
  const EvalPlan plan =
      plan_validation(*data.val, cfg.model.seq_len, cfg.train, 1, what, o.batches);
  note_fewer_batches(o, plan, cfg.train, *data.val, what);
  const double per_byte = tokens_per_byte(*data.val, plan, *data.tokenizer);  // NaN: no text
  // On a terminal, a line that says where the evaluation is: a draw of a model as large as
  // GPT-2 on a CPU takes minutes.
  const StatusLine status;
  const int64_t total = plan.batches * (1 + o.draws * static_cast<int64_t>(levels.size() - 1));
  int64_t done = 0;
  std::string where;
  const auto show = [&] {
    std::string text = where + ": batch " + std::to_string(done) + "/" + std::to_string(total);
    if (done > 0 && done < total)
      text += ", " + format_rate(static_cast<double>(done) * plan.B * plan.T / status.seconds()) +
              " tok/s";
    status.show(text, static_cast<double>(done), static_cast<double>(total));
  };
  const auto after_batch = [&] {
    ++done;
    show();
  };

  std::vector<LevelResult> results;
  for (double s : levels) {
    LevelResult r;
    r.noise = s;
    const int draws = s == 0 ? 1 : o.draws;  // clean evaluation is deterministic
    for (int d = 0; d < draws; ++d) {
      where = "noise " + format_general(s) + ", draw " + std::to_string(d + 1) + "/" +
              std::to_string(draws);
      show();
      const EvalResult e =
          evaluate(*model.backend, *data.val, plan, s, hash2(o.seed, d), after_batch);
      r.ce.push_back(e.ce);
      r.acc.push_back(e.accuracy);
    }
    results.push_back(std::move(r));
  }
  status.clear();

  // With --json and no --out, stdout holds the JSON alone; the table goes to stderr.
  FILE* table = o.json && o.out.empty() ? stderr : stdout;
  std::fprintf(table, "barrierlm eval: %s (step %lld, %s)\n", model.path.c_str(),
               static_cast<long long>(model.checkpoint.step), model.backend->name().c_str());
  std::fprintf(table, "data: %s, %d batches x %d sequences x %d tokens = %lld tokens; %d draws "
                      "per noise level (seed %llu)\n\n",
               what.c_str(), plan.batches, plan.B, plan.T, static_cast<long long>(plan.tokens()),
               o.draws, static_cast<unsigned long long>(o.seed));
  print_table(table, results, per_byte);

  if (o.json || !o.out.empty()) {
    JsonWriter j(true);
    j.begin_object()
        .kv("checkpoint", model.path)
        .kv("step", model.checkpoint.step)
        .kv("backend", model.backend->name())
        .kv("data", what)
        .kv("tokenizer", data.tokenizer->kind())
        .kv("batches", plan.batches)
        .kv("batch_size", plan.B)
        .kv("seq_len", plan.T)
        .kv("tokens_per_draw", plan.tokens())
        .kv("seed", o.seed);
    if (!std::isnan(per_byte)) j.kv("tokens_per_byte", per_byte);
    j.key("levels").begin_array();
    for (const LevelResult& r : results) write_level(j, r, results[0], per_byte);
    j.end_array().end_object();
    if (!o.out.empty()) {
      write_file_atomic(o.out, j.str() + "\n");
      std::fprintf(table, "\nwrote %s\n", o.out.c_str());
    } else {
      std::printf("%s\n", j.str().c_str());
    }
  }
  if (!o.plot.empty()) {
    write_file_atomic(o.plot, noise_plot(results, model.path));
    std::fprintf(table, "wrote %s\n", o.plot.c_str());
  }
  return 0;
}

}  // namespace blm
