// Tests of the study pipeline (issue 7) and `barrierlm report`:
//   - the JSON reader (data/json_reader.h): every value kind, escapes, the number grammar, error
//     positions, and round trips of JsonWriter's numbers (bit for bit);
//   - the statistics (cmd/report_stats.h) on hand-made runs with random CE values, against
//     formulas written out here: pooled mean and spread, degradation, the change against the
//     baseline paired by (seed, draw), the unpaired fallback, seeds lower, margin quantiles and
//     counts, the last-fifth convergence figure, config-difference notes;
//   - configs/paper/: the four configs differ only in barrier.lambda and the run name;
//   - the CPU-sized study end to end: STUDY_SIZE=tiny scripts/study.sh (2 lambdas x 2 seeds,
//     tiny model, generated text) trains, evaluates and reports; report.md / report.json hold
//     every lambda and sigma row with the numbers of the eval JSON inputs; the plots are
//     well-formed SVG; a second call redoes nothing;
//   - `barrierlm report` on bad input: one line naming the file (and line), non-zero exit, no
//     report written.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "cmd/json.h"
#include "data/json_reader.h"
#include "cmd/report_render.h"
#include "cmd/report_runs.h"
#include "cmd/report_stats.h"
#include "cmd/util.h"
#include "core/config.h"
#include "core/rng.h"
#include "tests/catch.h"
#include "tests/cli_util.h"

namespace fs = std::filesystem;
using namespace blm;
using namespace blm::test;

namespace {

// ------------------------------------------------------------------ helpers

std::string env_or_fail(const char* name) {
  const char* v = std::getenv(name);
  REQUIRE(v != nullptr);  // set by tests/CMakeLists.txt
  return v;
}

// Whether text is one well-formed SVG element tree: every tag closed in order, nothing outside
// the root.  (Enough to catch a truncated or interleaved document; attribute values are not
// parsed beyond skipping quoted text.)
bool well_formed_svg(const std::string& text, std::string* why) {
  std::vector<std::string> stack;
  size_t i = 0, roots = 0;
  while ((i = text.find('<', i)) != std::string::npos) {
    size_t j = i + 1;
    bool in_quote = false;
    while (j < text.size() && (in_quote || text[j] != '>')) {
      if (text[j] == '"') in_quote = !in_quote;
      ++j;
    }
    if (j >= text.size()) return *why = "unterminated tag", false;
    const std::string tag = text.substr(i + 1, j - i - 1);
    i = j + 1;
    if (tag.empty() || tag[0] == '?' || tag[0] == '!') continue;
    if (tag[0] == '/') {
      const std::string name = tag.substr(1);
      if (stack.empty() || stack.back() != name) return *why = "unbalanced </" + name + ">", false;
      stack.pop_back();
      continue;
    }
    const std::string name = tag.substr(0, tag.find_first_of(" \t\n/"));
    if (stack.empty()) ++roots;
    if (tag.back() != '/') stack.push_back(name);
  }
  if (!stack.empty()) return *why = "unclosed <" + stack.back() + ">", false;
  if (roots != 1) return *why = std::to_string(roots) + " root elements", false;
  return text.rfind("<svg", 0) == 0 || (*why = "does not start with <svg", false);
}

// The message of the blm::Error that f throws, "<no error>" when it throws none.  (Plain string
// checks: Catch2 2 and 3 name their string matchers differently.)
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

double pooled_mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}
double pooled_sd(const std::vector<double>& v) {
  const double m = pooled_mean(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return v.size() > 1 ? std::sqrt(s / static_cast<double>(v.size() - 1)) : 0.0;
}

// ------------------------------------------------------------------ hand-made runs

// A run with random per-draw CE (clean around 2, growing with sigma) and accuracy.
RunData fake_run(double lambda, uint64_t seed, int draws, Rng& rng, int64_t eval_seed = 1234) {
  RunData r;
  r.dir = "runs/lam" + format_general(lambda) + "-seed" + std::to_string(seed);
  r.name = r.dir.substr(5);
  r.config.barrier.lambda = lambda;
  r.config.train.seed = seed;
  r.config.train.steps = 100;  // finished: metrics.last_step below
  r.eval.present = true;
  r.eval.tokenizer = "byte";
  r.eval.tokens_per_byte = 1.0;
  r.eval.seed = eval_seed;
  r.eval.tokens_per_draw = 4096;
  r.eval.data = "the run's validation data";
  for (double sigma : {0.0, 0.1, 0.4}) {
    EvalLevel l;
    l.sigma = sigma;
    for (int d = 0; d < (sigma == 0 ? 1 : draws); ++d) {
      l.ce.push_back(2.0 + 3 * sigma + 0.2 * rng.uniform());
      l.acc.push_back(0.3 + 0.1 * rng.uniform());
    }
    r.eval.levels.push_back(l);
  }
  for (int s = 1; s <= 10; ++s) {
    r.metrics.val_step.push_back(10.0 * s);
    r.metrics.val_ce.push_back(3.0 - 0.1 * s + 0.01 * rng.uniform());
  }
  r.metrics.last_step = 100;
  return r;
}

}  // namespace

// ====================================================================== JSON reader

TEST_CASE("report JSON reader: values, escapes and nesting", "[study][json]") {
  const std::string text =
      "{\n  \"a\": [1, -2.5e3, 0, true, false, null],\n"
      "  \"s\": \"x\\\"y\\\\z\\n\\t\\u00e9\\ud83d\\ude00/\\/\",\n"
      "  \"o\": {\"k\": {}, \"e\": []}, \"neg\": -0.125E-2\n}\n";
  const JsonValue v = parse_json(text, "t.json");
  REQUIRE(v.is_object());
  const auto& a = json_get_array(v, "a", "t.json");
  REQUIRE(a.size() == 6);
  CHECK(a[0].as_number() == 1);
  CHECK(a[1].as_number() == -2500);
  CHECK(a[2].as_number() == 0);
  CHECK((a[3].kind() == JsonValue::Kind::Bool && a[3].as_bool()));
  CHECK((a[4].kind() == JsonValue::Kind::Bool && !a[4].as_bool()));
  CHECK(a[5].is_null());
  CHECK(std::isnan(a[5].number_or_nan()));
  CHECK(json_get_string(v, "s", "t.json") == "x\"y\\z\n\t\xC3\xA9\xF0\x9F\x98\x80//");
  const JsonValue& o = json_member(v, "o", "t.json");
  CHECK(json_member(o, "k", "t.json", "o").is_object());
  CHECK(json_get_array(o, "e", "t.json", "o").empty());
  CHECK(json_get_number(v, "neg", "t.json") == -0.00125);
  // Member order is kept.
  REQUIRE(v.members().size() == 4);
  CHECK(v.members()[0].first == "a");
  CHECK(v.members()[3].first == "neg");
}

TEST_CASE("report JSON reader: errors name the source, line and column", "[study][json]") {
  const auto error_of = [](const std::string& text) {
    return ::error_of([&] { parse_json(text, "f.json"); });
  };
  CHECK(error_of("{\"a\": [1, 2") == "f.json:1:12: expected ',' or ']' in an array but the text ends");
  CHECK(error_of("{\n  \"a\": 1,\n  \"b\" 2\n}") == "f.json:3:7: expected ':' after a key but found '2'");
  CHECK(error_of("[1] x").find("f.json:1:5: unexpected text") == 0);
  CHECK(error_of("\"abc").find("unterminated string") != std::string::npos);
  CHECK(error_of("\"a\nb\"").find("control character") != std::string::npos);
  CHECK(error_of("\"\\x\"").find("unknown escape") != std::string::npos);
  CHECK(error_of("{a: 1}").find("f.json:1:2: expected a quoted key") == 0);
  // The number grammar is JSON's, stricter than strtod.
  for (const char* bad : {"01", "1.", "-", "1e", "+1", ".5", "nan", "inf", "0x10", "1e+"}) {
    INFO(bad);
    CHECK(error_of(bad) != "<no error>");
  }
  for (const char* good : {"0", "-0", "1.5", "1e5", "1E-5", "-12.5e+3"}) {
    INFO(good);
    CHECK(error_of(good) == "<no error>");
  }
  // Lines of a .jsonl file keep their line numbers.
  try {
    parse_json("{\"kind\": }", "m.jsonl", 7);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).rfind("m.jsonl:7:10: expected a JSON value", 0) == 0);
  }
  // Typed access names the key.
  const JsonValue v = parse_json("{\"levels\": [{\"noise\": \"x\"}]}", "e.json");
  try {
    json_get_number(json_get_array(v, "levels", "e.json")[0], "noise", "e.json", "levels[0]");
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()) == "e.json: 'levels[0].noise' is not a number");
  }
  CHECK_THROWS_WITH(json_member(v, "missing", "e.json"), "e.json: key 'missing' is missing");
  // Deep nesting is refused, not a stack overflow.
  CHECK(error_of(std::string(100000, '[')).find("nesting deeper") != std::string::npos);
}

TEST_CASE("report JSON reader reads JsonWriter's numbers back bit for bit", "[study][json]") {
  Rng rng(20261128);
  std::vector<double> xs;
  for (int i = 0; i < 2000; ++i) {
    const double mant = rng.uniform() * 2 - 1;
    const int exp = static_cast<int>(rng.below(80)) - 40;
    xs.push_back(std::ldexp(mant, exp));
  }
  xs.push_back(0.1);
  xs.push_back(-0.0);
  xs.push_back(5e-324);
  xs.push_back(1.7976931348623157e308);
  JsonWriter w(true);
  w.begin_object().key("xs").numbers(xs).kv("text", std::string("a\x01\"\xff")).end_object();
  const JsonValue v = parse_json(w.str(), "w.json");
  const std::vector<double> back = json_get_numbers(v, "xs", "w.json");
  REQUIRE(back.size() == xs.size());
  size_t mismatches = 0;
  for (size_t i = 0; i < xs.size(); ++i) mismatches += back[i] != xs[i];
  CHECK(mismatches == 0);
  CHECK(std::signbit(back[xs.size() - 3]));  // -0 stays negative
  // Malformed UTF-8 was written as U+FFFD; the control character as \u0001.
  CHECK(json_get_string(v, "text", "w.json") == "a\x01\"\xEF\xBF\xBD");
}

// ====================================================================== statistics

TEST_CASE("report statistics: pooled spread, degradation and the paired change", "[study][stats]") {
  Rng rng(7);
  const int draws = 3;
  std::vector<RunData> runs;
  for (double lambda : {0.1, 0.0})
    for (uint64_t seed : {2, 1}) runs.push_back(fake_run(lambda, seed, draws, rng));
  const Study s = build_study(runs, 0.25);

  REQUIRE(s.groups.size() == 2);
  CHECK(s.groups[0].lambda == 0.0);
  CHECK(s.groups[1].lambda == 0.1);
  CHECK(s.baseline == 0);
  CHECK(s.with_bpb);
  CHECK(s.sigmas == std::vector<double>{0.0, 0.1, 0.4});
  // Runs within a group by seed.
  CHECK(s.groups[1].runs[0]->seed() == 1);
  CHECK(s.groups[1].runs[1]->seed() == 2);

  for (size_t gi = 0; gi < 2; ++gi) {
    const Group& g = s.groups[gi];
    for (size_t li = 0; li < s.sigmas.size(); ++li) {
      const double sigma = s.sigmas[li];
      INFO("group " << gi << " sigma " << sigma);
      const NoiseRow& row = g.noise[li];
      std::vector<double> ce, acc, degr, change;
      int lower = 0;
      for (const RunData* r : g.runs) {
        const EvalLevel& l = *r->eval.level(sigma);
        const double clean = r->eval.level(0.0)->ce[0];
        const RunData* base = nullptr;
        for (const RunData* b : s.groups[0].runs)
          if (b->seed() == r->seed()) base = b;
        REQUIRE(base != nullptr);
        double seed_change = 0;
        for (size_t d = 0; d < l.ce.size(); ++d) {
          ce.push_back(l.ce[d]);
          acc.push_back(l.acc[d]);
          if (sigma > 0) degr.push_back(100 * (l.ce[d] / clean - 1));
          const double ref = base->eval.level(sigma)->ce[d];
          change.push_back(100 * (l.ce[d] - ref) / ref);
          seed_change += change.back() / static_cast<double>(l.ce.size());
        }
        lower += seed_change < 0;
      }
      CHECK(row.runs == 2);
      CHECK(row.ce.n == static_cast<int>(ce.size()));
      CHECK(row.ce.n == (sigma == 0 ? 2 : 2 * draws));
      CHECK(row.ce.mean == Approx(pooled_mean(ce)).epsilon(1e-13));
      CHECK(row.ce.sd == Approx(pooled_sd(ce)).epsilon(1e-10));
      CHECK(row.acc.mean == Approx(pooled_mean(acc)).epsilon(1e-13));
      CHECK(row.bpb.mean == Approx(pooled_mean(ce) / std::log(2.0)).epsilon(1e-13));
      if (sigma == 0) {
        CHECK(row.degradation_pct.n == 0);
      } else {
        CHECK(row.degradation_pct.mean == Approx(pooled_mean(degr)).epsilon(1e-12));
        CHECK(row.degradation_pct.sd == Approx(pooled_sd(degr)).epsilon(1e-10));
      }
      if (gi == 0) {
        CHECK(!row.have_change);
        CHECK(verdict(row) == "n/a");
        continue;
      }
      REQUIRE(row.have_change);
      CHECK(row.paired);
      CHECK(row.change_pct.n == static_cast<int>(change.size()));
      CHECK(row.change_pct.mean == Approx(pooled_mean(change)).epsilon(1e-12));
      CHECK(row.change_pct.sd == Approx(pooled_sd(change)).epsilon(1e-10));
      CHECK(row.seeds_compared == 2);
      CHECK(row.seeds_lower == lower);
    }
  }
  // Nothing to complain about: same configs, every run paired.
  CHECK(s.notes.empty());
}

TEST_CASE("report statistics: bits per byte from each run's tokens per byte", "[study][stats]") {
  Rng rng(11);
  std::vector<RunData> runs = {fake_run(0.0, 1, 2, rng), fake_run(0.0, 2, 2, rng)};
  // Two GPT-2 runs whose validation texts differ: each draw is scaled by its own run's ratio.
  runs[0].eval.tokenizer = runs[1].eval.tokenizer = "gpt2";
  runs[0].eval.tokens_per_byte = 0.25;
  runs[1].eval.tokens_per_byte = 0.5;
  const Study s = build_study(runs, 0.25);
  REQUIRE(s.with_bpb);
  for (size_t li = 0; li < s.sigmas.size(); ++li) {
    std::vector<double> bpb;
    for (const RunData& r : runs)
      for (double ce : r.eval.level(s.sigmas[li])->ce)
        bpb.push_back(ce / std::log(2.0) * r.eval.tokens_per_byte);
    const NoiseRow& row = s.groups[0].noise[li];
    CHECK(row.bpb.n == static_cast<int>(bpb.size()));
    CHECK(row.bpb.mean == Approx(pooled_mean(bpb)).epsilon(1e-13));
    CHECK(row.bpb.sd == Approx(pooled_sd(bpb)).epsilon(1e-10));
  }
  // One run without the ratio (shards read with the bin tokenizer): no bits per byte at all.
  runs[1].eval.tokens_per_byte = NAN;
  CHECK(!build_study(runs, 0.25).with_bpb);
}

TEST_CASE("report statistics: verdicts, unpaired fallback and config notes", "[study][stats]") {
  Rng rng(11);
  std::vector<RunData> runs;
  runs.push_back(fake_run(0.0, 1, 2, rng));
  runs.push_back(fake_run(0.03, 1, 2, rng));
  runs.push_back(fake_run(0.03, 5, 2, rng));  // no baseline with seed 5
  // A barrier run clearly better under noise, one clearly worse: their verdicts.
  for (EvalLevel& l : runs[1].eval.levels)
    if (l.sigma > 0)
      for (double& x : l.ce) x -= 1.0;
  runs[2].config.train.lr = 5e-4;  // a config difference the report must mention
  runs[1].config.train.keep_checkpoints = 100;  // ones it need not: which checkpoints were saved
  runs[2].config.train.checkpoint_interval = 7;
  const Study s = build_study(runs, 0.25);
  REQUIRE(s.groups.size() == 2);
  const Group& g = s.groups[1];
  const NoiseRow& row = g.noise[1];  // sigma 0.1
  REQUIRE(row.have_change);
  CHECK(!row.paired);
  // Unpaired: every draw against the baseline's mean at that sigma.
  const double base_mean = s.groups[0].noise[1].ce.mean;
  std::vector<double> change;
  for (const RunData* r : g.runs)
    for (double x : r->eval.level(0.1)->ce) change.push_back(100 * (x - base_mean) / base_mean);
  CHECK(row.change_pct.mean == Approx(pooled_mean(change)).epsilon(1e-12));
  CHECK(row.seeds_compared == 2);
  bool mentions_lr = false, mentions_unpaired = false;
  for (const std::string& n : s.notes) {
    CHECK(n.find("checkpoint") == std::string::npos);
    mentions_lr = mentions_lr || n.find("train.lr") != std::string::npos;
    mentions_unpaired = mentions_unpaired || n.find("baseline's mean") != std::string::npos;
  }
  CHECK(mentions_lr);
  CHECK(mentions_unpaired);

  NoiseRow r;
  r.have_change = true;
  r.seeds_compared = 2;
  r.seeds_lower = 2;
  r.change_pct = Stat{-3, 1, 4};
  CHECK(verdict(r) == "lower");
  r.seeds_lower = 1;
  r.seeds_higher = 1;
  CHECK(verdict(r) == "mixed");
  r.seeds_lower = 0;
  r.seeds_higher = 2;
  r.change_pct.mean = 2;
  CHECK(verdict(r) == "higher");

  // Different eval seeds mean different noise: no pairing even with equal train seeds.
  Rng rng2(3);
  std::vector<RunData> other = {fake_run(0.0, 1, 2, rng2), fake_run(0.1, 1, 2, rng2, 999)};
  const Study s2 = build_study(other, 0.25);
  CHECK(!s2.groups[1].noise[1].paired);

  // No baseline: no change, a note.
  std::vector<RunData> no_base = {fake_run(0.1, 1, 2, rng2)};
  const Study s3 = build_study(no_base, 0.25);
  CHECK(s3.baseline == -1);
  CHECK(!s3.groups[0].noise[1].have_change);
  REQUIRE(!s3.notes.empty());
  CHECK(s3.notes[0].find("no baseline") != std::string::npos);

  // Comparison level: the wanted one when evaluated, else the largest.
  CHECK(comparison_sigma(s, 0.1) == 0.1);
  CHECK(comparison_sigma(s, 0.2) == 0.4);
  CHECK_THROWS_AS(build_study({}, 0.25), Error);
}

TEST_CASE("report statistics: runs stopped before train.steps are named", "[study][stats]") {
  Rng rng(5);
  std::vector<RunData> runs = {fake_run(0.0, 1, 2, rng), fake_run(0.1, 1, 2, rng)};
  runs[1].name = "l0.1-s1";
  runs[0].config.train.steps = runs[1].config.train.steps = 40;
  runs[0].metrics.last_step = 40;
  runs[1].metrics.last_step = 15;  // --until 15, or Ctrl-C
  const Study s = build_study(runs, 0.25);
  REQUIRE(s.notes.size() == 1);
  CHECK(s.notes[0].rfind("l0.1-s1 stopped at step 15 of 40", 0) == 0);
  ReportContext c;
  c.compare_sigma = 0.1;
  CHECK(report_markdown(s, c).find("(1 run stopped earlier: see the notes)") != std::string::npos);
  // A finished run (the last step logged is train.steps) gets no note.
  runs[1].metrics.last_step = 40;
  CHECK(build_study(runs, 0.25).notes.empty());
}

TEST_CASE("report statistics: evaluation settings that differ between runs", "[study][stats]") {
  Rng rng(9);
  std::vector<RunData> runs = {fake_run(0.0, 1, 2, rng), fake_run(0.1, 1, 2, rng),
                               fake_run(0.0, 2, 2, rng)};
  for (RunData& r : runs) r.eval.batches = 4;
  ReportContext c;
  c.compare_sigma = 0.1;
  {
    const Study same = build_study(runs, 0.25);
    CHECK(same.notes.empty());
    CHECK(same.eval_differences.empty());
    CHECK(report_markdown(same, c).find("uses seed hash(1234, d) for every model") !=
          std::string::npos);
  }
  // One run evaluated with another seed, more batches, three draws, another noise grid and file.
  RunEval& odd = runs[2].eval;
  odd.seed = 99;
  odd.batches = 8;
  odd.tokens_per_draw *= 2;
  odd.data = "'other.txt'";
  odd.levels.pop_back();  // no sigma 0.4
  odd.levels[1].ce.push_back(2.5);
  odd.levels[1].acc.push_back(0.3);
  const Study s = build_study(runs, 0.25);
  CHECK(s.eval_differences == std::set<std::string>{"--data", "--batches", "tokens per draw",
                                                    "--seed", "--draws", "--noise"});
  const auto note_on = [&](const std::string& setting) {
    for (const std::string& n : s.notes)
      if (n.find("evaluated with different " + setting + ":") != std::string::npos) return n;
    return std::string("<no note>");
  };
  const std::string a = runs[0].name, b = runs[1].name, odd_name = runs[2].name;
  CHECK(note_on("--seed").find("1234 (" + a + ", " + b + "); 99 (" + odd_name + ")") !=
        std::string::npos);
  CHECK(note_on("--batches").find("4 (" + a + ", " + b + "); 8 (" + odd_name + ")") !=
        std::string::npos);
  CHECK(note_on("--draws").find("2 (" + a + ", " + b + "); 3 (" + odd_name + ")") !=
        std::string::npos);
  CHECK(note_on("--noise").find("0,0.1 (" + odd_name + "); 0,0.1,0.4 (" + a + ", " + b + ")") !=
        std::string::npos);
  CHECK(note_on("--data").find("'other.txt' (" + odd_name + ")") != std::string::npos);
  CHECK(note_on("tokens per draw") != "<no note>");
  // Setup does not state the first run's values as everyone's.
  const std::string all = report_markdown(s, c);
  const size_t setup = all.find("## Setup");
  const std::string md = all.substr(setup, all.find("\n## ", setup + 1) - setup);
  CHECK(md.find("hash(1234") == std::string::npos);
  CHECK(md.find("4096 evaluation tokens") == std::string::npos);
  CHECK(md.find("the run's validation data") == std::string::npos);
  CHECK(md.find("with each run's eval seed, which differs between runs") != std::string::npos);
  CHECK(md.find("different numbers of draws or noise levels") != std::string::npos);
  // Runs without an evaluation do not count as different.
  runs[2].eval = RunEval();
  CHECK(build_study(runs, 0.25).eval_differences.empty());
}

TEST_CASE("report: a run reached by several paths is read once", "[study]") {
  TempDir d;
  fs::create_directories(d / "st/l0-s1");
  fs::create_directories(d / "st/l0-s2");
  fs::create_directory_symlink("l0-s2", d / "st/latest");
  const std::string s1 = d / "st/l0-s1", s2 = d / "st/l0-s2", latest = d / "st/latest";
  std::vector<std::string> notes;
  // `report st/*`: the link to the newest run comes last and is skipped.
  CHECK(unique_run_dirs({s1, s2, latest}, &notes) == std::vector<std::string>{s1, s2});
  REQUIRE(notes.size() == 1);
  CHECK(notes[0] == "'" + latest + "' is the same run as '" + s2 + "': skipped as a duplicate");
  // Given first, the link still gives way to the run it points to, at the link's place.
  notes.clear();
  CHECK(unique_run_dirs({latest, s1, s2}, &notes) == std::vector<std::string>{s2, s1});
  REQUIRE(notes.size() == 1);
  CHECK(notes[0].find("'" + latest + "' is the same run as '" + s2 + "'") == 0);
  // The same directory spelled differently.
  notes.clear();
  const std::vector<std::string> spellings = {s1, s1 + "/", d / "st/./l0-s1",
                                              d / "st/l0-s2/../l0-s1"};
  CHECK(unique_run_dirs(spellings, &notes) == std::vector<std::string>{s1});
  CHECK(notes.size() == 3);
  // A link alone is read; directories that do not exist are left to load_run's error.
  notes.clear();
  CHECK(unique_run_dirs({latest + "/"}, &notes) == std::vector<std::string>{latest + "/"});
  CHECK(unique_run_dirs({d / "nowhere", d / "elsewhere"}, &notes).size() == 2);
  CHECK(notes.empty());
}

TEST_CASE("report statistics: margin quantiles, counts and the last fifth of training", "[study][stats]") {
  RunMargins m;
  m.present = true;
  // sigma_min 0.05, 0.15, ..., 0.95 in shuffled order; log det -0.45 ... 0.45.
  for (int i : {3, 7, 0, 9, 1, 5, 2, 8, 4, 6}) {
    m.sigma_min.push_back(0.05 + 0.1 * i);
    m.logdet.push_back(-0.45 + 0.1 * i);
  }
  m.token_margin = {0.4, 0.2, 0.3};
  m.sequence_margin = {0.2, 0.6};
  const std::vector<double> v = margin_values(m, 0.3);
  const auto& keys = report_margin_keys();
  REQUIRE(v.size() == keys.size());
  std::map<std::string, double> by;
  for (size_t k = 0; k < keys.size(); ++k) by[keys[k].key] = v[k];
  CHECK(by["sigma_min_min"] == Approx(0.05));
  // quantile q of 10 sorted values: position q * 9, linear interpolation.
  CHECK(by["sigma_min_q05"] == Approx(0.05 + 0.1 * 0.45));
  CHECK(by["sigma_min_q25"] == Approx(0.05 + 0.1 * 2.25));
  CHECK(by["sigma_min_q50"] == Approx(0.5));
  CHECK(by["sigma_min_q95"] == Approx(0.05 + 0.1 * 8.55));
  CHECK(by["under_tau"] == 3);  // 0.05, 0.15, 0.25
  CHECK(by["under_tau_pct"] == Approx(30));
  CHECK(by["logdet_min"] == Approx(-0.45));
  CHECK(by["logdet_max"] == Approx(0.45));
  CHECK(by["logdet_q50"] == Approx(0.0).margin(1e-12));
  CHECK(by["logdet_positive_pct"] == Approx(50));  // 0.05 ... 0.45
  CHECK(by["token_margin_min"] == Approx(0.2));
  CHECK(by["token_margin_q50"] == Approx(0.3));
  CHECK(by["sequence_margin_mean"] == Approx(0.4));
  CHECK(by["count"] == 10);
  // A run without margins: every value NaN.
  for (double x : margin_values(RunMargins(), 0.3)) CHECK(std::isnan(x));

  RunMetrics t;
  for (int s = 1; s <= 10; ++s) {
    t.val_step.push_back(100.0 * s);
    t.val_ce.push_back(4.0 - 0.1 * s);
  }
  const TrainingSummary ts = training_summary(t);
  CHECK(ts.final_val_ce == Approx(3.0));
  CHECK(ts.last_fifth_change_pct == Approx(100 * (3.0 - 3.2) / 3.2));  // step 800 -> 1000
}

TEST_CASE("report readers: metrics.jsonl, eval.json and margins files", "[study][stats]") {
  const RunMetrics m = parse_metrics(
      "{\"kind\":\"train\",\"step\":1,\"loss\":5.5,\"ce\":5.5,\"barrier\":null,\"elapsed\":0.5}\n"
      "\n"
      "{\"kind\":\"eval\",\"step\":10,\"val_ce\":4.25,\"val_bpb\":6.1,\"val_acc\":0.1,\"min_margin\":0.9}\n"
      "{\"kind\":\"train\",\"step\":10,\"loss\":4.5,\"ce\":4.4,\"barrier\":1.0,\"tokens_per_s\":900,\"elapsed\":2}\n",
      "m.jsonl");
  CHECK(m.train_step == std::vector<double>{1, 10});
  CHECK(std::isnan(m.train_barrier[0]));
  CHECK(m.train_barrier[1] == 1.0);
  CHECK(m.val_ce == std::vector<double>{4.25});
  CHECK(m.last_step == 10);
  CHECK(m.last_tokens_per_s == 900);
  CHECK(m.last_elapsed == 2);
  CHECK(error_of([] { parse_metrics("{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"train\",\"step\":", "m.jsonl"); })
            .rfind("m.jsonl:2:", 0) == 0);
  CHECK_THROWS_WITH(parse_metrics("{\"step\":1}\n", "m.jsonl"), "m.jsonl:1: key 'kind' is missing");

  const std::string eval =
      "{\"step\": 10, \"tokenizer\": \"byte\", \"data\": \"d\", \"seed\": 5, \"tokens_per_draw\": 64,\n"
      " \"levels\": [{\"noise\": 0, \"ce_per_draw\": [2.5], \"acc_per_draw\": [0.5]},\n"
      "            {\"noise\": 0.2, \"ce_per_draw\": [2.75, 3], \"acc_per_draw\": [0.25, 0.5]}]}";
  const RunEval e = parse_eval(eval, "e.json");
  REQUIRE(e.levels.size() == 2);
  CHECK(e.level(0.2)->ce == std::vector<double>{2.75, 3});
  CHECK(e.level(0.3) == nullptr);
  CHECK(e.seed == 5);
  // Bits per byte: eval's tokens_per_byte; files without it have it for the byte tokenizer only.
  CHECK(e.tokens_per_byte == 1.0);
  std::string gpt2 = eval;
  gpt2.replace(gpt2.find("\"byte\""), 6, "\"gpt2\"");
  CHECK(std::isnan(parse_eval(gpt2, "e.json").tokens_per_byte));
  gpt2.replace(gpt2.find("\"data\""), 0, "\"tokens_per_byte\": 0.25, ");
  CHECK(parse_eval(gpt2, "e.json").tokens_per_byte == 0.25);
  std::string bad_ratio = gpt2;
  bad_ratio.replace(bad_ratio.find("0.25"), 4, "null");
  CHECK_THROWS_WITH(parse_eval(bad_ratio, "e.json"),
                    "e.json: 'tokens_per_byte' must be a positive number");
  std::string no_clean = eval;
  no_clean.replace(no_clean.find("\"noise\": 0,"), 11, "\"noise\": 1,");
  CHECK_THROWS_WITH(parse_eval(no_clean, "e.json"), "e.json: no clean (noise 0) level");
  std::string short_acc = eval;
  short_acc.replace(short_acc.find("[0.25, 0.5]"), 11, "[0.25]");
  CHECK(error_of([&] { parse_eval(short_acc, "e.json"); }).find("levels[1]") != std::string::npos);

  const std::string mj =
      "{\"step\": 10, \"tau\": 0.5, \"n_layer\": 2, \"n_head\": 1, \"sequences\": 1, \"seq_len\": 4,\n"
      " \"barrier_layers\": [1], \"token_margins\": [{\"margin\": [null, null, 0.7, 0.4]}],\n"
      " \"sequence_margins\": [{\"margin\": 0.4}], \"support_tokens\": [{\"rank\": 1, \"sequence\": 0,\n"
      " \"position\": 3, \"layer\": 1, \"head\": 0, \"margin\": 0.4, \"logdet\": -0.5, \"text\": \"x\",\n"
      " \"before\": \"ab\", \"after\": \"\"}]}";
  const std::string csv =
      "b,l,h,t,token,sigma_min,logdet\n0,0,0,0,1,1,0\n0,0,0,2,1,0.1,-2\n0,1,0,1,1,1,0\n"
      "0,1,0,2,1,0.7,0.25\n0,1,0,3,1,0.4,-0.5\n";
  const RunMargins g = parse_margins(mj, "m.json", csv, "m.csv");
  // Layer 0 has no barrier and t < 2 has no margin: only layer 1, t = 2, 3.
  CHECK(g.sigma_min == std::vector<double>{0.7, 0.4});
  CHECK(g.logdet == std::vector<double>{0.25, -0.5});
  CHECK(g.token_margin == std::vector<double>{0.7, 0.4});
  REQUIRE(g.support.size() == 1);
  CHECK(g.support[0].position == 3);
  CHECK(g.support[0].before == "ab");
  CHECK_THROWS_WITH(parse_margins(mj, "m.json", "b,l,h,t,token,sigma_min,logdet\n0,1,0,2,1,x,0\n", "m.csv"),
                    "m.csv:2: expected 7 comma-separated numbers");
  CHECK(error_of([&] { parse_margins(mj, "m.json", "b,l,h\n", "m.csv"); }).rfind("m.csv:1:", 0) == 0);
}

// ====================================================================== scripts

// Every script a person runs answers -h and --help with its header comment (its usage) and
// exit 0, before it builds, downloads or checks for GPUs (scripts/help.sh).  gpus.sh, help.sh
// are sourced, not run; commit-id.sh prints an id for the banners.
TEST_CASE("every script answers --help with its usage", "[study]") {
  const std::string src = env_or_fail("BLM_SOURCE_DIR");
  int scripts = 0;
  for (const auto& e : fs::directory_iterator(src + "/scripts")) {
    const std::string name = e.path().filename().string();
    if (e.path().extension() != ".sh" || name == "gpus.sh" || name == "help.sh" ||
        name == "commit-id.sh")
      continue;
    ++scripts;
    std::string first_line;
    {
      std::ifstream in(e.path());
      std::getline(in, first_line);  // the shebang
      std::getline(in, first_line);  // the header's first line: "# What the script does ..."
    }
    REQUIRE(first_line.rfind("# ", 0) == 0);
    for (const char* flag : {"-h", "--help"}) {
      const Run r = run_shell(src, "bash '" + e.path().string() + "' " + flag);
      INFO(name << " " << flag << ": " << r.out << r.err);
      CHECK(r.rc == 0);
      CHECK(r.out.rfind(first_line.substr(2), 0) == 0);
    }
  }
  CHECK(scripts >= 10);
}

// ====================================================================== configs/paper

TEST_CASE("configs/paper: the paper's model, four lambdas, otherwise identical", "[study]") {
  const std::string src = env_or_fail("BLM_SOURCE_DIR");
  std::map<double, Config> by_lambda;
  for (const char* name : {"baseline", "lambda-0.01", "lambda-0.03", "lambda-0.1"}) {
    const Config c = load_config(src + "/configs/paper/" + std::string(name) + ".yaml");
    INFO(name);
    CHECK(c.model.n_layer == 6);
    CHECK(c.model.n_head == 6);
    CHECK(c.model.d_model == 384);
    CHECK(c.model.seq_len == 256);
    CHECK(c.train.batch_size == 64);
    CHECK(c.data.tokenizer == "byte");
    CHECK(c.device.precision == "auto");  // bf16 on the GPU (the study of docs/RESULTS.md), fp32 on a CPU
    CHECK(c.train.run_name == name);
    by_lambda[c.barrier.lambda] = c;
  }
  REQUIRE(by_lambda.size() == 4);
  CHECK(by_lambda.count(0.0) == 1);
  CHECK(by_lambda.count(0.01) == 1);
  CHECK(by_lambda.count(0.03) == 1);
  CHECK(by_lambda.count(0.1) == 1);
  // Everything else equal: same data, steps and order of batches for a given seed.
  Config ref = by_lambda[0.0];
  for (auto& kv : by_lambda) {
    Config c = kv.second;
    c.barrier.lambda = ref.barrier.lambda;
    c.train.run_name = ref.train.run_name;
    CHECK(config_to_yaml(c) == config_to_yaml(ref));
  }
  load_config(src + "/configs/paper/tiny.yaml");  // parses
}

// ====================================================================== end to end

TEST_CASE("the CPU-sized study runs end to end and its report matches its inputs", "[study][e2e]") {
  const std::string src = env_or_fail("BLM_SOURCE_DIR"), bin = env_or_fail("BLM_BINARY");
  TempDir d;
  write_file(d / "text.txt", generated_text(3, 40000));
  const std::string study = d / "study";
  const std::string cmd = "STUDY_SIZE=tiny BIN='" + bin + "' STUDY_DIR='" + study + "' STUDY_DATA='" +
                          (d / "text.txt") + "' LAMBDAS='0 0.1' SEEDS='1 2' STEPS=30 DRAWS=2 PARALLEL=2 "
                          "bash '" + src + "/scripts/study.sh'";
  const Run first = run_shell(d.path, cmd);
  INFO(first.out << first.err);
  REQUIRE(first.rc == 0);

  const std::vector<double> lambdas = {0, 0.1}, sigmas = {0, 0.05, 0.1, 0.2, 0.4};
  const std::vector<std::string> names = {"lam0-seed1", "lam0-seed2", "lam0.1-seed1", "lam0.1-seed2"};
  for (const std::string& n : names) {
    INFO(n);
    CHECK(fs::exists(study + "/" + n + "/checkpoint.bin"));
    CHECK(fs::exists(study + "/" + n + "/eval.json"));
    CHECK(fs::exists(study + "/" + n + "/margins/margins.json"));
    const Config c = load_config(study + "/" + n + "/config.yaml");
    CHECK(c.train.steps == 30);
  }

  // report.md: every lambda x sigma row, the margins table, the comparison with the paper, plots
  // linked relative to the markdown file.
  const std::string md = slurp(study + "/RESULTS.md");
  for (double lam : lambdas)
    for (double s : sigmas) {
      const std::string row = "| " + format_general(lam, 6) + " | " + format_general(s, 6) + " | ";
      INFO(row);
      CHECK(count_of(md, row) == 1);
    }
  CHECK(md.find("| statistic | lambda = 0 | lambda = 0.1 |") != std::string::npos);
  CHECK(md.find("log det J: median") != std::string::npos);
  CHECK(md.find("paper: +1.7%") != std::string::npos);
  CHECK(md.find("paper: -12%") != std::string::npos);
  CHECK(md.find("sigma = 0.1") != std::string::npos);
  CHECK(md.find("(report/noise_vs_loss.svg)") != std::string::npos);
  CHECK(md.find("STUDY_SIZE=tiny scripts/study.sh") != std::string::npos);

  // report.json: the CE of each (lambda, sigma) is the mean over the runs' eval.json draws; the
  // change against the baseline is the mean over (seed, draw) pairs.
  const JsonValue rep = parse_json(slurp(study + "/report/report.json"), "report.json");
  const auto& groups = json_get_array(rep, "groups", "report.json");
  REQUIRE(groups.size() == 2);
  std::map<std::string, JsonValue> evals;
  for (const std::string& n : names)
    evals[n] = parse_json(slurp(study + "/" + n + "/eval.json"), n + "/eval.json");
  const auto draws_of = [&](const std::string& run, double sigma) {
    for (const JsonValue& l : json_get_array(evals[run], "levels", run))
      if (json_get_number(l, "noise", run) == sigma) return json_get_numbers(l, "ce_per_draw", run);
    FAIL("no level " << sigma << " in " << run);
    return std::vector<double>();
  };
  for (size_t gi = 0; gi < 2; ++gi) {
    const std::string lam = gi == 0 ? "lam0" : "lam0.1";
    CHECK(json_get_number(groups[gi], "lambda", "r") == lambdas[gi]);
    const auto& noise = json_get_array(groups[gi], "noise", "r");
    REQUIRE(noise.size() == sigmas.size());
    for (size_t si = 0; si < sigmas.size(); ++si) {
      INFO("lambda " << lambdas[gi] << " sigma " << sigmas[si]);
      CHECK(json_get_number(noise[si], "sigma", "r") == sigmas[si]);
      std::vector<double> ce, change;
      for (const char* seed : {"-seed1", "-seed2"}) {
        const std::vector<double> mine = draws_of(lam + seed, sigmas[si]);
        const std::vector<double> base = draws_of(std::string("lam0") + seed, sigmas[si]);
        REQUIRE(mine.size() == (sigmas[si] == 0 ? 1u : 2u));
        for (size_t k = 0; k < mine.size(); ++k) {
          ce.push_back(mine[k]);
          change.push_back(100 * (mine[k] - base[k]) / base[k]);
        }
      }
      const JsonValue& ce_stat = json_member(noise[si], "ce", "r");
      CHECK(json_get_number(ce_stat, "mean", "r") == Approx(pooled_mean(ce)).epsilon(1e-12));
      CHECK(json_get_number(ce_stat, "sd", "r") == Approx(pooled_sd(ce)).epsilon(1e-9));
      CHECK(json_get_number(ce_stat, "n", "r") == ce.size());
      // The markdown shows the same number (4 decimals).
      const std::string row = "| " + format_general(lambdas[gi], 6) + " | " +
                              format_general(sigmas[si], 6) + " | " + format_fixed(pooled_mean(ce), 4);
      CHECK(md.find(row) != std::string::npos);
      if (gi == 1) {
        const JsonValue& ch = json_member(noise[si], "change_vs_baseline_pct", "r");
        CHECK(json_get_number(ch, "mean", "r") == Approx(pooled_mean(change)).epsilon(1e-9));
        CHECK(json_member(noise[si], "paired", "r").as_bool());
      }
    }
    // Margins: the pooled minimum over each run's margins.csv (barrier layers, t >= 2), averaged
    // over the seeds.
    std::vector<double> mins;
    for (const char* seed : {"-seed1", "-seed2"}) {
      std::istringstream csv(slurp(study + "/" + lam + seed + "/margins/margins.csv"));
      std::string line;
      std::getline(csv, line);
      double mn = INFINITY;
      while (std::getline(csv, line)) {
        int b, l, h, t, tok;
        double sm, ld;
        REQUIRE(std::sscanf(line.c_str(), "%d,%d,%d,%d,%d,%lf,%lf", &b, &l, &h, &t, &tok, &sm, &ld) == 7);
        if (t >= 2) mn = std::min(mn, sm);
      }
      mins.push_back(mn);
    }
    const JsonValue& mm = json_member(json_member(groups[gi], "margins", "r"), "sigma_min_min", "r");
    CHECK(json_get_number(mm, "mean", "r") == Approx(pooled_mean(mins)).epsilon(1e-6));
  }

  // The plots: well-formed SVG, with a series per lambda.
  for (const char* plot : {"noise_vs_loss.svg", "noise_vs_change.svg", "margins_hist.svg",
                           "logdet_hist.svg", "training_curves.svg"}) {
    INFO(plot);
    const std::string svg = slurp(study + "/report/" + plot);
    std::string why;
    CHECK(well_formed_svg(svg, &why));
    INFO(why);
    CHECK(svg.find("<polyline") != std::string::npos);
  }
  CHECK(slurp(study + "/report/noise_vs_loss.svg").find("\xCE\xBB = 0.1") != std::string::npos);

  // A second call redoes nothing: no training, no evaluation, the same numbers.
  const auto mtime = [&](const std::string& p) { return fs::last_write_time(p); };
  const auto metrics_time = mtime(study + "/lam0.1-seed2/metrics.jsonl");
  const auto eval_time = mtime(study + "/lam0.1-seed2/eval.json");
  const std::string json_before = slurp(study + "/report/report.json");
  const Run second = run_shell(d.path, cmd);
  INFO(second.out << second.err);
  REQUIRE(second.rc == 0);
  CHECK(count_of(second.out, "done already") == 8);  // 4 trainings, 4 evaluations
  CHECK(mtime(study + "/lam0.1-seed2/metrics.jsonl") == metrics_time);
  CHECK(mtime(study + "/lam0.1-seed2/eval.json") == eval_time);
  CHECK(slurp(study + "/report/report.json") == json_before);

  // Changing the step count of an existing study is refused.
  const Run other = run_shell(d.path, "STEPS=31 " + cmd.substr(0, cmd.find("STEPS=30")) +
                                      cmd.substr(cmd.find("STEPS=30") + 9));
  CHECK(other.rc != 0);
  CHECK(other.err.find("STEPS=30") != std::string::npos);
}

// `barrierlm report ARGS` run in d (ARGS as a shell would split them).
static Run run_report(const TempDir& d, const std::string& args) {
  return run_shell(d.path, "cd '" + d.path + "' && '" + env_or_fail("BLM_BINARY") + "' report " +
                               args);
}

TEST_CASE("barrierlm report: bad input is one line naming the file, and nothing is written",
          "[study][e2e]") {
  TempDir d;
  const auto report = [&](const std::string& args) { return run_report(d, args); };
  check_error(report("nowhere --out rep"), 1, {"run directory 'nowhere' does not exist"});
  fs::create_directories(d / "empty");
  check_error(report("empty --out rep"), 1, {"empty/config.yaml' is missing"});

  // A minimal run directory: config, metrics, then a broken eval.json.
  fs::create_directories(d / "r1");
  write_file(d / "r1/config.yaml", "barrier: {lambda: 0}\n");
  write_file(d / "r1/metrics.jsonl", "{\"kind\":\"eval\",\"step\":5,\"val_ce\":3}\n{\"kind\":\"train\",\"step\":5,\n");
  check_error(report("r1 --out rep"), 1, {"r1/metrics.jsonl:2:"});
  write_file(d / "r1/metrics.jsonl", "{\"kind\":\"eval\",\"step\":5,\"val_ce\":3}\n");
  write_file(d / "r1/eval.json", "{\n  \"step\": 5,\n  \"levels\": [\n");
  check_error(report("r1 --out rep"), 1, {"r1/eval.json:4:1:"});
  check_error(report("r1 r1 --out rep"), 1, {"r1/eval.json"});
  fs::remove(d / "r1/eval.json");
  check_error(report("r1 --out rep --compare-sigma 0"), 2, {"--compare-sigma"});
  CHECK(!fs::exists(d / "rep"));

  // Without eval or margins the report still comes out, and says what is missing.
  const Run ok = report("r1 --out rep");
  INFO(ok.out << ok.err);
  REQUIRE(ok.rc == 0);
  const std::string md = slurp(d / "rep/report.md");
  CHECK(md.find("no r1/eval.json") != std::string::npos);
  CHECK(md.find("No margins.json was found") != std::string::npos);
  CHECK(fs::exists(d / "rep/report.json"));

  // Usage: no run directory.
  const Run none = report("--out rep");
  CHECK(none.rc == 2);
}

namespace {

// A minimal run directory for `barrierlm report`: config.yaml, metrics.jsonl up to last_step and
// an eval.json of that step with the noise seed eval_seed (no margins).
void write_minimal_run(const std::string& dir, double lambda, int seed, int steps, int last_step,
                       int eval_seed = 1234) {
  fs::create_directories(dir);
  write_file(dir + "/config.yaml", "barrier: {lambda: " + format_general(lambda) + "}\n" +
                                       "train: {seed: " + std::to_string(seed) + ", steps: " +
                                       std::to_string(steps) + "}\n");
  const std::string step = std::to_string(last_step);
  write_file(dir + "/metrics.jsonl", "{\"kind\":\"eval\",\"step\":" + step + ",\"val_ce\":3}\n");
  write_file(dir + "/eval.json",
             "{\"step\": " + step + ", \"tokenizer\": \"byte\", \"data\": \"d\", \"batches\": 2, "
             "\"tokens_per_draw\": 64, \"seed\": " + std::to_string(eval_seed) + ", \"levels\": ["
             "{\"noise\": 0, \"ce_per_draw\": [3], \"acc_per_draw\": [0.1]}, "
             "{\"noise\": 0.1, \"ce_per_draw\": [3.5, " + std::to_string(3.5 + lambda) +
             "], \"acc_per_draw\": [0.1, 0.1]}]}\n");
}

// The runs report.json lists, as "lambda/name".
std::vector<std::string> reported_runs(const std::string& json_path) {
  const JsonValue rep = parse_json(slurp(json_path), json_path);
  std::vector<std::string> out;
  for (const JsonValue& g : json_get_array(rep, "groups", json_path))
    for (const JsonValue& r : json_get_array(g, "runs", json_path))
      out.push_back(format_general(json_get_number(g, "lambda", json_path)) + "/" +
                    json_get_string(r, "name", json_path));
  return out;
}

}  // namespace

TEST_CASE("barrierlm report: a run given twice is counted once, with a note", "[study][e2e]") {
  TempDir d;
  const auto report = [&](const std::string& args) { return run_report(d, args); };
  write_minimal_run(d / "st/l0-s1", 0, 1, 5, 5);
  write_minimal_run(d / "st/l0.1-s1", 0.1, 1, 5, 5);
  fs::create_directory_symlink("l0.1-s1", d / "st/latest");

  // `report st/*`: st/latest is the newest run again.
  const Run glob = report("st/* --out rep");
  INFO(glob.out << glob.err);
  REQUIRE(glob.rc == 0);
  CHECK(reported_runs(d / "rep/report.json") == std::vector<std::string>{"0/l0-s1", "0.1/l0.1-s1"});
  const std::string note = "'st/latest' is the same run as 'st/l0.1-s1': skipped as a duplicate";
  CHECK(glob.err == "barrierlm: note: " + note + "\n");
  const std::string md = slurp(d / "rep/report.md");
  CHECK(md.find("- 2 runs; lambda: 0 (seeds 1); 0.1 (seeds 1).") != std::string::npos);
  CHECK(md.find("- " + note) != std::string::npos);
  CHECK(slurp(d / "rep/report.json").find(note) != std::string::npos);

  // One directory spelled two ways is one seed, not two.
  const Run twice = report("st/l0-s1 st/l0-s1/ --out rep2");
  INFO(twice.out << twice.err);
  REQUIRE(twice.rc == 0);
  CHECK(reported_runs(d / "rep2/report.json") == std::vector<std::string>{"0/l0-s1"});
  CHECK(twice.err.find("'st/l0-s1/' is the same run as 'st/l0-s1'") != std::string::npos);
}

TEST_CASE("barrierlm report: unfinished runs and different evaluations are noted",
          "[study][e2e]") {
  TempDir d;
  write_minimal_run(d / "l0-s1", 0, 1, 40, 40);
  write_minimal_run(d / "l0.1-s1", 0.1, 1, 40, 15, 99);  // --until 15; another noise seed
  const Run r =
      run_report(d, "l0-s1 l0.1-s1 --out rep");
  INFO(r.out << r.err);
  REQUIRE(r.rc == 0);
  const std::string md = slurp(d / "rep/report.md");
  CHECK(md.find("- l0.1-s1 stopped at step 15 of 40 (train.steps)") != std::string::npos);
  CHECK(md.find("40 steps (1 run stopped earlier: see the notes)") != std::string::npos);
  CHECK(md.find("evaluated with different --seed: 1234 (l0-s1); 99 (l0.1-s1)") !=
        std::string::npos);
  CHECK(md.find("hash(1234") == std::string::npos);
  CHECK(r.out.find("note: l0.1-s1 stopped at step 15 of 40") != std::string::npos);
}

TEST_CASE("barrierlm report: --out reused keeps only this report's plots", "[study][e2e]") {
  TempDir d;
  const auto report = [&](const std::string& args) { return run_report(d, args); };
  write_minimal_run(d / "l0-s1", 0, 1, 5, 5);
  write_minimal_run(d / "l0.1-s1", 0.1, 1, 5, 5);
  const Run with_baseline = report("l0-s1 l0.1-s1 --out rep");
  INFO(with_baseline.out << with_baseline.err);
  REQUIRE(with_baseline.rc == 0);
  CHECK(fs::exists(d / "rep/noise_vs_change.svg"));
  write_file(d / "rep/mine.svg", "<svg/>");  // not the report's: left alone

  const Run without = report("l0.1-s1 --out rep");
  INFO(without.out << without.err);
  REQUIRE(without.rc == 0);
  CHECK(!fs::exists(d / "rep/noise_vs_change.svg"));
  CHECK(slurp(d / "rep/report.md").find("noise_vs_change.svg") == std::string::npos);
  CHECK(fs::exists(d / "rep/mine.svg"));
  for (const char* plot : {"noise_vs_loss.svg", "margins_hist.svg", "logdet_hist.svg",
                           "training_curves.svg"})
    CHECK(fs::exists(d / "rep/" + plot));
}

TEST_CASE("barrierlm report: a file given as a run is not a directory", "[study][e2e]") {
  TempDir d;
  write_minimal_run(d / "r1", 0, 1, 5, 5);
  write_file(d / "a.txt", "text\n");
  const Run r = run_report(d, "r1 a.txt --out rep");
  check_error(r, 1, {"run directory 'a.txt' is not a directory"});
  CHECK(!fs::exists(d / "rep"));
}

TEST_CASE("barrierlm report refuses outputs over the files it reads or writes", "[study][e2e]") {
  TempDir d;
  write_minimal_run(d / "r1", 0, 1, 5, 5);
  const std::string metrics = slurp_required(d / "r1/metrics.jsonl");
  const std::string eval = slurp_required(d / "r1/eval.json");
  // --markdown over a run's metrics, by its name and by another.
  check_error(run_report(d, "r1 --markdown r1/metrics.jsonl --out rep"), 1,
              {"--markdown 'r1/metrics.jsonl' is a run's metrics 'r1/metrics.jsonl'",
               "choose another --markdown"});
  check_error(run_report(d, "r1 --markdown ./r1/../r1/config.yaml --out rep"), 1,
              {"is a run's config 'r1/config.yaml'"});
  // --out's files over a run's eval file (--eval-file names it inside the run).
  write_file(d / "r1/report.json", eval);
  check_error(run_report(d, "r1 --out r1 --eval-file report.json"), 1,
              {"--out 'r1/report.json' is a run's eval file 'r1/report.json'",
               "choose another --out"});
  // --markdown over another output: the report's JSON, a plot.
  check_error(run_report(d, "r1 --out rep --markdown rep/report.json"), 1,
              {"--markdown 'rep/report.json' is the report's JSON 'rep/report.json'"});
  check_error(run_report(d, "r1 --out rep --markdown rep/noise_vs_loss.svg"), 1,
              {"is a plot of the report 'rep/noise_vs_loss.svg'"});
  CHECK(slurp(d / "r1/metrics.jsonl") == metrics);
  CHECK(slurp(d / "r1/report.json") == eval);
  CHECK(!fs::exists(d / "rep"));
  // A run directory as --out is fine when no file collides.
  const Run ok = run_report(d, "r1 --out r1");
  INFO(ok.out << ok.err);
  CHECK(ok.rc == 0);
}

namespace {

// A run directory for load_run whose eval.json ran `micro_batches` batches of `micro_rows`
// sequences (what eval writes as "batches" and "batch_size") under train.batch_size and
// train.grad_accum.
void write_run_evaluated(const std::string& dir, double lambda, int batch_size, int grad_accum,
                         int micro_batches, int micro_rows) {
  write_minimal_run(dir, lambda, 1, 5, 5);
  write_file(dir + "/config.yaml",
             "barrier: {lambda: " + format_general(lambda) + "}\n" +
                 "model: {seq_len: 16}\n"
                 "train: {seed: 1, steps: 5, batch_size: " + std::to_string(batch_size) +
                 ", grad_accum: " + std::to_string(grad_accum) + "}\n");
  const int sequences = micro_batches * micro_rows;
  write_file(dir + "/eval.json",
             "{\"step\": 5, \"tokenizer\": \"byte\", \"data\": \"d\", \"batches\": " +
                 std::to_string(micro_batches) + ", \"batch_size\": " +
                 std::to_string(micro_rows) + ", \"seq_len\": 16, \"tokens_per_draw\": " +
                 std::to_string(sequences * 16) + ", \"seed\": 7, \"levels\": ["
                 "{\"noise\": 0, \"ce_per_draw\": [3], \"acc_per_draw\": [0.1]}, "
                 "{\"noise\": 0.1, \"ce_per_draw\": [3.5], \"acc_per_draw\": [0.1]}]}\n");
}

}  // namespace

TEST_CASE("report: --batches in eval's unit, batches of train.batch_size sequences",
          "[study][stats]") {
  TempDir d;
  // eval --batches 4 with batch_size 8: 4 batches of 8 without grad_accum, 8 micro-batches of 4
  // with grad_accum 2.  The same 32 windows: the same --batches.
  write_run_evaluated(d / "a", 0, 8, 1, 4, 8);
  write_run_evaluated(d / "b", 0.1, 8, 2, 8, 4);
  CHECK(load_run(d / "a").eval.batches == 4);
  CHECK(load_run(d / "b").eval.batches == 4);
  // Capped by short data: 5 micro-batches of 4, 20 sequences, all that --batches 3 or more reads.
  write_run_evaluated(d / "c", 0.1, 8, 2, 5, 4);
  CHECK(load_run(d / "c").eval.batches == 3);
  // The file alone does not say train.batch_size: unknown, not micro-batches taken for batches.
  CHECK(parse_eval(slurp_required(d / "b/eval.json"), "e.json").batches == 0);

  const Run r = run_report(d, "a b --out rep");
  INFO(r.out << r.err);
  REQUIRE(r.rc == 0);
  const std::string md = slurp_required(d / "rep/report.md");
  CHECK(md.find("evaluated with different --batches") == std::string::npos);
  CHECK(md.find("eval --batches 4, batches of train.batch_size sequences") != std::string::npos);
}

// A 2-step run of a one-layer model in d (runs/r, config cfg.yaml), on text.txt (written here)
// with the config's data and train sections as given.
static void train_tiny_run(const TempDir& d, uint64_t text_seed, const std::string& data,
                    const std::string& train) {
  write_file(d / "text.txt", generated_text(text_seed, 20000));
  write_file(d / "cfg.yaml",
             "model: {n_layer: 1, n_head: 2, d_model: 16, seq_len: 16, vocab_size: 0}\n"
             "data: {" + data + "}\n"
             "train: {batch_size: 4, steps: 2, eval_interval: 0" + train + "}\n"
             "device: {backend: cpu, threads: 1}\n");
  const Run tr = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "-q"});
  INFO(tr.out << tr.err);
  REQUIRE(tr.rc == 0);
}

TEST_CASE("barrierlm eval's --batches reads back as the report's", "[study][e2e]") {
  TempDir d;
  train_tiny_run(d, 5, "train: text.txt", ", grad_accum: 2");
  const Run ev = run(d.path, {"eval", "runs/r", "--batches", "3", "--noise", "0,0.1", "--out",
                              "runs/r/eval.json", "--backend", "cpu"});
  INFO(ev.out << ev.err);
  REQUIRE(ev.rc == 0);
  const std::string js = slurp_required(d / "runs/r/eval.json");
  REQUIRE(number(js, "batches") == 6);  // micro-batches of batch_size / grad_accum = 2
  CHECK(load_run(d / "runs/r").eval.batches == 3);
}

TEST_CASE("margins refuses an --out whose files would replace what it reads", "[study][e2e]") {
  TempDir d;
  fs::create_directories(d / "m");
  const std::string data = generated_text(8, 4000);
  write_file(d / "m/margins.csv", data);  // a data file under margins' name
  train_tiny_run(d, 6, "train: text.txt, val: m/margins.csv", "");
  const std::vector<std::string> quick = {"--sequences", "1", "--backend", "cpu"};
  const auto margins = [&](std::vector<std::string> args) {
    args.insert(args.begin(), "margins");
    args.insert(args.end(), quick.begin(), quick.end());
    return run(d.path, args);
  };
  // --data's file, by its name and through a link to the directory.
  check_error(margins({"runs/r", "--data", "m/margins.csv", "--out", "m"}), 1,
              {"--out 'm/margins.csv' is the data file 'm/margins.csv'", "choose another --out"});
  fs::create_directory_symlink("m", d / "m-link");
  check_error(margins({"runs/r", "--data", "m/margins.csv", "--out", "m-link"}), 1,
              {"--out 'm-link/margins.csv' is the data file 'm/margins.csv'"});
  // The run's validation data, which margins reads without --data.
  check_error(margins({"runs/r", "--out", "./m"}), 1,
              {"--out './m/margins.csv' is the run's validation data 'm/margins.csv'"});
  // The checkpoint, under one of margins' names.
  fs::copy_file(d / "runs/r/checkpoint.bin", d / "m/margins.json");
  check_error(margins({"m/margins.json", "--data", "text.txt", "--out", "m"}), 1,
              {"--out 'm/margins.json' is the checkpoint 'm/margins.json'"});
  CHECK(slurp(d / "m/margins.csv") == data);
  CHECK(!fs::exists(d / "m/margins_hist.svg"));
  // Elsewhere it writes.
  const Run ok = margins({"runs/r", "--data", "m/margins.csv", "--out", "out"});
  INFO(ok.out << ok.err);
  CHECK(ok.rc == 0);
  CHECK(fs::exists(d / "out/margins.csv"));
}
