// End-to-end tests of the barrierlm program (cmd/): they run the built binary ($BLM_BINARY) in a
// temporary directory on a tiny model and a generated text, and check what a user sees and gets:
//   - train / eval / margins / sample work and write what they promise, with numbers that agree
//     across commands (eval's clean CE equals the run's last validation CE; margins.json agrees
//     with margins.csv; bits per byte = CE / ln 2);
//   - --resume repeats the uninterrupted run bit for bit (metrics and final parameters);
//   - SIGINT finishes the step, saves a checkpoint and exits 130;
//   - every kind of bad input gives one line "barrierlm: error: ..." naming the problem, a
//     non-zero exit, and no files left behind; an --out that cannot be written fails at once;
//   - on a terminal the updating progress line fits the terminal's width.
// Also unit checks of the pieces of cmd/ that are pure functions (barrier position sampling,
// JSON numbers and escapes, SVG ticks, number formatting), compiled into this test from their
// sources.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cmd/evaluation.h"
#include "cmd/json.h"
#include "cmd/positions.h"
#include "cmd/svg.h"
#include "cmd/util.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "tests/catch.h"
#include "tests/cli_util.h"
#include "tests/gpt2_vocab.h"


namespace fs = std::filesystem;
using namespace blm;
using namespace blm::test;

namespace {

// ------------------------------------------------------------------ fixtures

// A tiny model that trains in milliseconds per step on one thread.  `train` replaces or adds
// keys of the train section, `barrier` of the barrier section.
std::string tiny_config(const std::map<std::string, std::string>& train = {},
                        const std::map<std::string, std::string>& barrier = {}) {
  std::map<std::string, std::string> t = {
      {"batch_size", "4"},   {"steps", "20"},         {"lr", "0.003"},         {"warmup", "4"},
      {"log_interval", "5"}, {"eval_interval", "10"}, {"eval_batches", "3"},
      {"checkpoint_interval", "10"}};
  std::map<std::string, std::string> b = {{"lambda", "0.05"}};
  for (const auto& kv : train) t[kv.first] = kv.second;
  for (const auto& kv : barrier) b[kv.first] = kv.second;
  const auto flow = [](const std::map<std::string, std::string>& m) {
    std::string s = "{";
    for (const auto& kv : m) s += (s.size() > 1 ? ", " : "") + kv.first + ": " + kv.second;
    return s + "}";
  };
  return "model: {n_layer: 2, n_head: 2, d_model: 16, seq_len: 16, vocab_size: 0}\n"
         "barrier: " + flow(b) + "\n"
         "data: {train: text.txt}\n"
         "train: " + flow(t) + "\n"
         "device: {backend: cpu, threads: 1}\n";
}

// margins' support-token table in its terminal output: the header line, then its rows.
struct SupportTable {
  std::string header;
  std::vector<std::string> rows;
};
SupportTable support_table(const std::string& out) {
  const std::vector<std::string> lines = lines_of(out);
  size_t i = 0;
  while (i < lines.size() &&
         (lines[i].rfind("rank ", 0) != 0 || lines[i].find(" margin ") == std::string::npos))
    ++i;
  REQUIRE(i < lines.size());
  SupportTable t{lines[i], {}};
  for (++i; i < lines.size() && lines[i].rfind("wrote ", 0) != 0; ++i) t.rows.push_back(lines[i]);
  return t;
}

void make_workspace(const TempDir& d, const std::string& config = tiny_config()) {
  write_file(d / "text.txt", generated_text(7, 30000));  // ~30 kB
  write_file(d / "cfg.yaml", config);
}

// The text of a field's value in a metrics line (compared as text: bit for bit).
std::string field_text(const std::string& line, const std::string& key) {
  const std::string k = "\"" + key + "\":";
  const size_t p = line.find(k);
  if (p == std::string::npos) return "<absent>";
  const size_t start = p + k.size();
  return line.substr(start, line.find_first_of(",}", start) - start);
}

// Train lines as "step loss ce barrier min_logdet lr grad_norm" text, eval lines likewise.
std::vector<std::string> deterministic_fields(const std::string& metrics) {
  std::vector<std::string> out;
  for (const std::string& line : lines_of(metrics)) {
    std::string s;
    for (const char* key : {"kind", "step", "loss", "ce", "barrier", "min_logdet", "lr",
                            "grad_norm", "tokens", "val_ce", "val_acc", "min_margin"})
      s += field_text(line, key) + " ";
    out.push_back(s);
  }
  return out;
}

}  // namespace

// ------------------------------------------------------------------ the happy path

TEST_CASE("train, eval, margins and sample work end to end and agree with each other", "[cli]") {
  TempDir d;
  make_workspace(d);
  const Run tr = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r1"});
  INFO(tr.out << tr.err);
  REQUIRE(tr.rc == 0);
  CHECK(tr.out.find("step 20/20") != std::string::npos);
  CHECK(tr.out.find("bits/byte") != std::string::npos);

  // The run directory and `latest`.
  for (const char* f : {"config.yaml", "metrics.jsonl", "checkpoint.bin", "curves.svg"})
    CHECK(fs::exists(d / ("runs/r1/" + std::string(f))));
  REQUIRE(fs::is_symlink(d / "runs/latest"));
  CHECK(fs::read_symlink(d / "runs/latest").string() == "r1");

  // The checkpoint and the resolved config.
  const Checkpoint ck = load_checkpoint(d / "runs/r1/checkpoint.bin");
  CHECK(ck.step == 20);
  CHECK(ck.tokens_seen == 20 * 4 * 16);
  CHECK(ck.config.model.vocab_size == 256);  // 0 in the config: the byte tokenizer's
  CHECK(config_to_yaml(load_config(d / "runs/r1/config.yaml")) == config_to_yaml(ck.config));

  // metrics.jsonl: train lines at steps 1, 5, 10, 15, 20; eval lines at 10 and 20.
  const std::vector<std::string> ms = lines_of(slurp(d / "runs/r1/metrics.jsonl"));
  std::vector<int> train_steps, eval_steps;
  double last_val_ce = NAN;
  for (const std::string& l : ms) {
    if (l.find("\"kind\":\"train\"") != std::string::npos) {
      train_steps.push_back(static_cast<int>(number(l, "step")));
      CHECK(std::isfinite(number(l, "loss")));
      // L = CE + lambda R, to the rounding of the sum of the backend's float terms.
      CHECK(number(l, "loss") ==
            Approx(number(l, "ce") + 0.05 * number(l, "barrier")).epsilon(1e-6).margin(1e-6));
      CHECK(number(l, "lr") > 0);
      CHECK(number(l, "grad_norm") > 0);
      CHECK(number(l, "tokens_per_s") > 0);
    } else {
      eval_steps.push_back(static_cast<int>(number(l, "step")));
      last_val_ce = number(l, "val_ce");
      CHECK(number(l, "val_bpb") == Approx(last_val_ce / std::log(2.0)).epsilon(1e-12));
      CHECK(number(l, "val_acc") >= 0);
      CHECK(number(l, "val_acc") <= 1);
      CHECK(number(l, "min_margin") > 0);
    }
  }
  CHECK(train_steps == std::vector<int>{1, 5, 10, 15, 20});
  CHECK(eval_steps == std::vector<int>{10, 20});
  // curves.svg: the training CE and loss as lines, the validation CE as a line with a dot at each
  // of its two evaluations.
  const std::string curves = slurp(d / "runs/r1/curves.svg");
  CHECK(curves.rfind("<svg", 0) == 0);
  for (const char* label : {"Training curves: r1", "training CE", "loss CE + 0.05 R",
                            "validation CE"})
    CHECK(curves.find(label) != std::string::npos);
  CHECK(count_of(curves, "<polyline") == 3);
  CHECK(count_of(curves, "<circle") == 2);
  // It learnt something: the last loss is well below the first (ln 256 = 5.55 at the start).
  CHECK(number(ms.back(), "val_ce") < number(ms.front(), "loss") - 0.5);

  SECTION("eval finds the latest run; its clean CE is the run's last validation CE") {
    // One thread, as in training, so the sums run in the same order.
    const Run ev = run(d.path, {"eval", "--noise", "0,0.5", "--draws", "3", "--json", "--out",
                                "eval.json", "--threads", "1", "--plot", "noise.svg"});
    INFO(ev.out << ev.err);
    REQUIRE(ev.rc == 0);
    CHECK(ev.err.find("using the latest run: runs/r1/checkpoint.bin") != std::string::npos);
    CHECK(ev.out.find("(clean)") != std::string::npos);
    const std::string js = slurp(d / "eval.json");
    const size_t second = js.find("\"noise\": 0.5");
    REQUIRE(second != std::string::npos);
    const std::string clean = js.substr(0, second), noisy = js.substr(second);
    // Same batches, same backend, same weights: the same number.
    CHECK(number(clean, "ce_mean") == Approx(last_val_ce).epsilon(1e-12));
    CHECK(number(clean, "ce_std") == 0);
    CHECK(number(clean, "bpb_mean") == Approx(last_val_ce / std::log(2.0)).epsilon(1e-12));
    // Noise 0.5 on embeddings of scale ~0.02 wrecks the model; three draws differ.
    CHECK(number(noisy, "ce_mean") > number(clean, "ce_mean") + 0.05);
    CHECK(number(noisy, "ce_std") > 0);
    CHECK(number(noisy, "ce_abs_degradation") ==
          Approx(number(noisy, "ce_mean") - number(clean, "ce_mean")).epsilon(1e-12));
    CHECK(number(noisy, "ce_rel_degradation") ==
          Approx(number(noisy, "ce_abs_degradation") / number(clean, "ce_mean")).epsilon(1e-12));
    CHECK(count_of(js, "\"ce_per_draw\"") == 2);
    // --plot: the mean CE over the two levels with a dot at each, the smallest and largest draw
    // as two dashed lines.
    const std::string plot = slurp(d / "noise.svg");
    CHECK(plot.find("CE under embedding noise: runs/r1/checkpoint.bin") != std::string::npos);
    CHECK(count_of(plot, "<circle") == 2);
    CHECK(count_of(plot, "<polyline") == 3);
    CHECK(count_of(plot, "stroke-dasharray=\"5 3\"") == 2);
    CHECK(ev.out.find("wrote noise.svg") != std::string::npos);

    // Fixed seeds: the same command gives the same numbers; another seed other noise.
    const Run again = run(d.path, {"eval", "runs/r1", "--noise", "0.5", "--draws", "3", "--json"});
    REQUIRE(again.rc == 0);
    const std::string a = again.out.substr(again.out.find("\"noise\": 0.5"));
    CHECK(number(a, "ce_mean") == number(noisy, "ce_mean"));
    const Run other = run(d.path, {"eval", "runs/r1", "--noise", "0.5", "--draws", "3", "--json",
                                   "--seed", "99"});
    REQUIRE(other.rc == 0);
    CHECK(number(other.out.substr(other.out.find("\"noise\": 0.5")), "ce_mean") !=
          number(noisy, "ce_mean"));
  }

  SECTION("margins writes json, csv, svg and html that agree") {
    const Run mr = run(d.path, {"margins", "runs/r1/checkpoint.bin", "--sequences", "3", "--top",
                                "4", "--tau", "2"});
    INFO(mr.out << mr.err);
    REQUIRE(mr.rc == 0);
    const std::string dir = d / "runs/r1/margins/";
    CHECK(mr.out.find("runs/r1/margins") != std::string::npos);
    const std::vector<std::string> csv = lines_of(slurp(dir + "margins.csv"));
    REQUIRE(csv.size() == 1 + 3 * 2 * 2 * 16);  // header + one row per (b, l, h, t)
    CHECK(csv[0] == "b,l,h,t,token,sigma_min,logdet");
    // Smallest sigma_min over t >= 2 (every layer is a barrier layer here), from the csv.
    double csv_min = INFINITY;
    int csv_past = 0;  // det J_t <= 0: log det -inf
    for (size_t i = 1; i < csv.size(); ++i) {
      int b, l, h, t, tok;
      double sigma, logdet;
      REQUIRE(std::sscanf(csv[i].c_str(), "%d,%d,%d,%d,%d,%lf,%lf", &b, &l, &h, &t, &tok, &sigma,
                          &logdet) == 7);
      if (t < 2) {
        CHECK(sigma == 1.0);  // J = I before two predecessors
        CHECK(logdet == 0.0);
      } else {
        csv_min = std::min(csv_min, sigma);
        csv_past += std::isinf(logdet) && logdet < 0;
        CHECK(sigma > 0);
      }
    }
    const std::string js = slurp(dir + "margins.json");
    const size_t support = js.find("\"support_tokens\"");
    REQUIRE(support != std::string::npos);
    const std::string first_support = js.substr(support);
    CHECK(number(first_support, "rank") == 1);
    CHECK(number(first_support, "margin") == Approx(csv_min).epsilon(1e-6));
    CHECK(count_of(first_support.substr(0, first_support.find("\"below_tau\"")), "\"rank\"") == 4);
    // tau = 2 is above every margin: all 3 x 14 positions are listed below it.
    const std::string below = js.substr(js.find("\"below_tau\""));
    CHECK(count_of(below.substr(0, below.find("\"sequence_margins\"")), "[") == 1 + 3 * 14);
    CHECK(count_of(js, "\"q95\"") == 2 * 2 * 2);  // sigma_min and logdet per (layer, head)
    // Positions past the boundary, per (layer, head): together the csv's -inf log dets.
    CHECK(count_of(js, "\"past_boundary\"") == 2 * 2);
    int json_past = 0;
    for (size_t at = js.find("\"past_boundary\""); at != std::string::npos;
         at = js.find("\"past_boundary\"", at + 1))
      json_past += static_cast<int>(number(js.substr(at), "past_boundary"));
    CHECK(json_past == csv_past);

    const std::string svg = slurp(dir + "margins_hist.svg");
    CHECK(svg.rfind("<svg", 0) == 0);
    CHECK(svg.find("</svg>") != std::string::npos);
    CHECK(count_of(svg, "<polyline") == 2);  // one histogram per layer
    CHECK(svg.find("layer 1") != std::string::npos);
    const std::string html = slurp(dir + "margins_strip.html");
    CHECK(count_of(html, "<span style=\"background:") == 3 * 16);  // one span per token
    CHECK(html.find("title=\"t=5: margin ") != std::string::npos);

    const Run text = run(d.path, {"margins", "runs/r1", "--text", "the quick brown fox",
                                  "--out", "m2"});
    INFO(text.err);
    REQUIRE(text.rc == 0);
    CHECK(lines_of(slurp(d / "m2/margins.csv")).size() == 1 + 2 * 2 * 16);
  }

  SECTION("margins says when --sequences is capped; the columns fit 5-digit ranks and 4-digit "
          "sequences") {
    // text.txt holds 30000 / 16 = 1875 windows of 16 tokens: fewer than asked for.
    // (--backend cpu: on a GPU machine auto would add a line, "the GPU cannot run this model".)
    const Run mr = run(d.path, {"margins", "runs/r1", "--data", "text.txt", "--sequences",
                                "100000", "--top", "12000", "--tau", "0", "--out", "m3",
                                "--backend", "cpu"});
    INFO(mr.err);
    REQUIRE(mr.rc == 0);
    const std::vector<std::string> notes = lines_of(mr.err);
    REQUIRE(notes.size() == 1);
    const std::string note = "barrierlm: note: --sequences 100000 capped to ";
    REQUIRE(notes[0].rfind(note, 0) == 0);
    const int used = std::atoi(notes[0].c_str() + note.size());
    CHECK(used > 1000);
    CHECK(notes[0].find("'text.txt' holds " + std::to_string(used) + " sequences of 16 tokens") !=
          std::string::npos);
    CHECK(lines_of(slurp(d / "m3/margins.csv")).size() ==
          1 + static_cast<size_t>(used) * 2 * 2 * 16);
    // Each support-token row has its margin and pos columns where the header has them: after a
    // rank column as wide as the largest rank, and a seq column as wide as the largest sequence
    // number.
    const SupportTable table = support_table(mr.out);
    REQUIRE(table.rows.size() == 12000);
    const size_t margin_col = table.header.find("margin");
    const size_t seq_col = table.header.find("seq"), pos_col = table.header.find("pos");
    CHECK(margin_col == 5 + 2);         // "12000" and two spaces
    CHECK(pos_col - seq_col == 4 + 2);  // "1874" and two spaces
    int wide_seqs = 0;
    for (const std::string& row : table.rows) {
      INFO(row);
      REQUIRE(row.size() > pos_col);
      for (const size_t col : {margin_col, pos_col}) {
        CHECK(std::isdigit(static_cast<unsigned char>(row[col])));
        CHECK(row[col - 1] == ' ');
      }
      wide_seqs += std::isdigit(static_cast<unsigned char>(row[seq_col + 3])) ? 1 : 0;
    }
    CHECK(wide_seqs > 0);  // some rows have 4-digit sequence numbers
    // Asking for no more than there are: no note.
    const Run exact = run(d.path, {"margins", "runs/r1", "--sequences", "2", "--out", "m4",
                                   "--backend", "cpu"});
    CHECK(exact.rc == 0);
    CHECK(exact.err.empty());
  }

  SECTION("sample continues a prompt, repeatably for a seed") {
    const std::vector<std::string> args = {"sample", "runs/r1", "--prompt", "the ", "--tokens",
                                           "30", "--seed", "5"};
    const Run s1 = run(d.path, args), s2 = run(d.path, args);
    INFO(s1.err);
    REQUIRE(s1.rc == 0);
    CHECK(s1.out.rfind("the ", 0) == 0);
    CHECK(s1.out.size() == 4 + 30 + 1);  // prompt, 30 byte tokens, newline
    CHECK(s1.out == s2.out);
    const Run greedy = run(d.path, {"sample", "runs/r1", "--tokens", "10", "--temperature", "0"});
    CHECK(greedy.rc == 0);
  }
}

// ------------------------------------------------------------------ resume and interrupt

TEST_CASE("--resume repeats the uninterrupted run bit for bit", "[cli]") {
  TempDir d;
  // Gradient accumulation and sampled barrier positions: both must be counter-based on the step.
  // The file says 20 steps; both runs take 24 from --set.
  make_workspace(d, tiny_config({{"grad_accum", "2"}, {"steps", "20"}, {"log_interval", "1"},
                                 {"eval_interval", "6"}, {"checkpoint_interval", "0"}},
                                {{"positions", "3"}}));
  const Run whole = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=whole", "--set",
                                 "train.steps=24", "--set", "barrier.layers=[0, 1]", "-q"});
  REQUIRE(whole.rc == 0);
  const Run part = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=split", "--set",
                                "train.steps=24", "--set", "barrier.layers=[0, 1]", "--until",
                                "11", "-q"});
  INFO(part.out << part.err);
  REQUIRE(part.rc == 0);
  // The command it prints repeats the overrides (quoted for the shell where needed).
  const std::string hint = "resume with: barrierlm train cfg.yaml --set train.run_name=split "
                           "--set train.steps=24 --set 'barrier.layers=[0, 1]' --resume runs/split";
  CHECK(part.out.find(hint) != std::string::npos);
  CHECK(load_checkpoint(d / "runs/split/checkpoint.bin").step == 11);
  // A hard kill (SIGKILL) in the middle of a write leaves a last line cut short: the resume drops
  // it (below, the metrics equal the uninterrupted run's) rather than append onto it.
  {
    std::ofstream m(d / "runs/split/metrics.jsonl", std::ios::app | std::ios::binary);
    m << "{\"kind\":\"train\",\"st";
  }

  // A resume with nothing to do leaves the run directory as it was (config.yaml included).
  const std::string config_before = slurp(d / "runs/split/config.yaml");
  const std::string metrics_before = slurp(d / "runs/split/metrics.jsonl");
  const Run noop = run(d.path, {"train", "cfg.yaml", "--resume", "runs/split", "--until", "5"});
  INFO(noop.out << noop.err);
  CHECK(noop.rc == 0);
  // The reason is --until, not train.steps (which --until cannot raise).
  CHECK(noop.out.find("the run is at step 11 of its 20; --until 5 stops at or before that") !=
        std::string::npos);
  CHECK(slurp(d / "runs/split/config.yaml") == config_before);
  CHECK(slurp(d / "runs/split/metrics.jsonl") == metrics_before);

  // The printed command, as a shell runs it, continues the same run to its 24 steps.
  const Run rest = run_shell(d.path, "cd '" + d.path + "' && '" + binary() + "'" +
                                         hint.substr(hint.find(" train ")) + " -q");
  INFO(rest.out << rest.err);
  REQUIRE(rest.rc == 0);

  const std::vector<std::string> a = deterministic_fields(slurp(d / "runs/whole/metrics.jsonl"));
  const std::vector<std::string> b = deterministic_fields(slurp(d / "runs/split/metrics.jsonl"));
  CHECK(a.size() == 24 + 4);
  CHECK(a == b);
  // The plot shows the whole run, both sessions: the same as the uninterrupted run's but for
  // the run name in its title.
  std::string curves_split = slurp(d / "runs/split/curves.svg");
  const std::string title = "Training curves: split";
  REQUIRE(curves_split.find(title) != std::string::npos);
  curves_split.replace(curves_split.find(title), title.size(), "Training curves: whole");
  CHECK(curves_split == slurp(d / "runs/whole/curves.svg"));
  for (const std::string& l : lines_of(slurp(d / "runs/split/metrics.jsonl")))
    CHECK(count_of(l, "{") == 1);  // the cut line is gone, not glued to the next one
  const Checkpoint ca = load_checkpoint(d / "runs/whole/checkpoint.bin");
  const Checkpoint cb = load_checkpoint(d / "runs/split/checkpoint.bin");
  CHECK(ca.step == 24);
  CHECK(cb.step == 24);
  // Finished: only a larger train.steps continues it.
  const Run finished = run(d.path, {"train", "--resume", "runs/split"});
  CHECK(finished.rc == 0);
  CHECK(finished.out.find("the run has already done 24 of its 24 steps; raise train.steps to "
                          "continue it (e.g. --set train.steps=48)") != std::string::npos);
  CHECK(ca.params == cb.params);
  CHECK(ca.adam_m == cb.adam_m);
  CHECK(ca.adam_v == cb.adam_v);
  CHECK(ca.adam_t == cb.adam_t);

  // The sampled positions matter: without them the run is different.
  const Run exact = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=exact", "--set",
                                 "barrier.positions=0", "-q", "--until", "3"});
  REQUIRE(exact.rc == 0);
  const auto c = deterministic_fields(slurp(d / "runs/exact/metrics.jsonl"));
  CHECK(c[1] != a[1]);
}

// Starts a long training run named `name` in d and returns once it has logged 3 steps (failing
// at once if the program ended instead).
pid_t spawn_training(const TempDir& d, const std::string& name) {
  make_workspace(d, tiny_config({{"steps", "1000000"}, {"log_interval", "1"},
                                 {"eval_interval", "0"}, {"checkpoint_interval", "0"}}));
  const pid_t pid = spawn(d.path, {"train", "cfg.yaml", "--set", "train.run_name=" + name});
  const auto t0 = std::chrono::steady_clock::now();
  while (lines_of(slurp(d / ("runs/" + name + "/metrics.jsonl"))).size() < 3) {
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid)
      FAIL("barrierlm ended before the interrupt: " << slurp(d / ".stderr"));
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(30)) {
      kill(pid, SIGKILL);
      finish(d.path, pid);
      FAIL("no steps logged within 30 s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pid;
}

// Sends `sig` to a training run named `name` once it has logged 3 steps: it must finish the
// step, save, say how to resume and exit 130.  Returns the checkpoint it saved.
Checkpoint interrupted_run(const TempDir& d, const std::string& name, int sig) {
  const pid_t pid = spawn_training(d, name);
  REQUIRE(kill(pid, sig) == 0);
  const Run r = finish(d.path, pid);
  INFO(r.out << r.err);
  CHECK(r.rc == 130);
  CHECK(r.out.find("interrupted after step") != std::string::npos);
  CHECK(r.out.find("resume with: barrierlm train cfg.yaml --set train.run_name=" + name +
                   " --resume runs/" + name) != std::string::npos);
  const Checkpoint ck = load_checkpoint(d / ("runs/" + name + "/checkpoint.bin"));
  CHECK(ck.step >= 3);
  return ck;
}

TEST_CASE("SIGINT finishes the step, saves a checkpoint and exits 130", "[cli]") {
  TempDir d;
  const Checkpoint ck = interrupted_run(d, "int", SIGINT);
  const std::vector<std::string> ms = lines_of(slurp(d / "runs/int/metrics.jsonl"));
  CHECK(number(ms.back(), "step") == ck.step);  // the step in flight was finished and logged
  CHECK(fs::read_symlink(d / "runs/latest").string() == "int");

  // And it continues from there.
  const Run more = run(d.path, {"train", "cfg.yaml", "--resume", "--set", "train.run_name=int",
                                "--until", std::to_string(ck.step + 2), "-q"});
  INFO(more.out << more.err);
  CHECK(more.rc == 0);
  CHECK(load_checkpoint(d / "runs/int/checkpoint.bin").step == ck.step + 2);
}

TEST_CASE("SIGHUP (a closed terminal or SSH session) saves like SIGINT", "[cli]") {
  TempDir d;
  interrupted_run(d, "hup", SIGHUP);
}

// ------------------------------------------------------------------ what a resume refuses

TEST_CASE("a resume keeps the run's tokenizer and history and name or says why not", "[cli]") {
  TempDir d;
  make_workspace(d);
  const std::vector<std::string> base = {"train", "cfg.yaml", "--set", "train.run_name=r",
                                         "--set", "train.keep_checkpoints=5", "-q"};
  REQUIRE(run(d.path, base).rc == 0);  // 20 steps; checkpoint_000005.bin, _000010.bin kept
  const std::string finished = slurp(d / "runs/r/checkpoint.bin");
  const size_t lines = lines_of(slurp(d / "runs/r/metrics.jsonl")).size();
  const auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    return run(d.path, args);
  };

  // The checkpoint's tokenizer is the one a resume uses: a config naming another is refused.
  check_error(with({"--set", "data.tokenizer=char", "--set", "train.steps=30", "--resume"}), 1,
              {"data.tokenizer = byte but the config has char"});

  // A kept checkpoint older than checkpoint.bin: going back needs --rewind.
  check_error(with({"--resume", "runs/r/checkpoint_000005.bin"}), 1,
              {"is at step 5, before its run's", "(step 20)", "--rewind"});
  CHECK(slurp(d / "runs/r/checkpoint.bin") == finished);
  CHECK(lines_of(slurp(d / "runs/r/metrics.jsonl")).size() == lines);
  const Run back = with({"--resume", "runs/r/checkpoint_000005.bin", "--rewind", "--until", "7"});
  INFO(back.out << back.err);
  REQUIRE(back.rc == 0);
  CHECK(back.err.find("rewinding: runs/r/checkpoint.bin (step 20)") != std::string::npos);
  CHECK(load_checkpoint(d / "runs/r/checkpoint.bin").step == 7);

  // Through the `latest` link the run keeps its own name (no link to itself).
  const Run latest = run(d.path, {"train", "cfg.yaml", "--resume", "runs/latest", "-q"});
  INFO(latest.out << latest.err);
  REQUIRE(latest.rc == 0);
  CHECK(slurp(d / "runs/r/config.yaml").find("run_name: \"r\"\n") != std::string::npos);
  CHECK(fs::read_symlink(d / "runs/latest").string() == "r");

  // A checkpoint.bin that links elsewhere: the run stays in its directory.
  fs::create_directories(d / "store");
  fs::rename(d / "runs/r/checkpoint.bin", d / "store/ck.bin");
  fs::create_symlink("../../store/ck.bin", d / "runs/r/checkpoint.bin");
  const Run linked = run(d.path, {"train", "cfg.yaml", "--resume", "runs/r", "--set",
                                  "train.steps=21", "-q"});
  INFO(linked.out << linked.err);
  REQUIRE(linked.rc == 0);
  CHECK(load_checkpoint(d / "runs/r/checkpoint.bin").step == 21);
  CHECK(!fs::exists(d / "store/config.yaml"));
  CHECK(fs::read_symlink(d / "runs/latest").string() == "r");

  // A run directory without config.yaml resumes with the checkpoint's config.
  fs::remove(d / "runs/r/config.yaml");
  const Run bare = run(d.path, {"train", "--resume", "runs/r", "--set", "train.steps=22", "-q"});
  INFO(bare.out << bare.err);
  CHECK(bare.rc == 0);
  CHECK(bare.err.find("using the config inside runs/r/checkpoint.bin") != std::string::npos);
  CHECK(load_checkpoint(d / "runs/r/checkpoint.bin").step == 22);
  check_error(run(d.path, {"train", "--resume", "runs/none"}), 1,
              {"--resume 'runs/none': no such run directory or checkpoint"});

  // A `latest` that barrierlm cannot replace is refused before training, not after it.
  fs::create_directories(d / "other/latest");
  check_error(run(d.path, {"train", "cfg.yaml", "--set", "train.out_dir=other"}), 1,
              {"'other/latest' is a directory"});
  CHECK(fs::is_empty(d / "other/latest"));
}

TEST_CASE("train says when lambda has no effect and when it starts over in a run directory",
          "[cli]") {
  TempDir d;
  make_workspace(d);
  const Run short_window = run(d.path, {"train", "cfg.yaml", "--set", "model.seq_len=2", "--set",
                                        "train.run_name=s", "--set", "train.steps=2", "-q"});
  REQUIRE(short_window.rc == 0);
  CHECK(short_window.err.find("seq_len 2 has no position t >= 2") != std::string::npos);
  // A directory with metrics but no checkpoint (a run that died before its first save).
  fs::create_directories(d / "runs/died");
  write_file(d / "runs/died/metrics.jsonl", "");
  const Run again = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=died", "--set",
                                 "train.steps=2", "-q"});
  REQUIRE(again.rc == 0);
  CHECK(again.err.find("holds a run that saved no checkpoint") != std::string::npos);
  // bf16 asked of `auto` where no GPU runs it: the CPU's fp32, said.
  const Run bf16 = run(d.path, {"train", "cfg.yaml", "--set", "device.backend=auto", "--set",
                                "device.precision=bf16", "--set", "train.run_name=b", "--set",
                                "train.steps=1"});
  REQUIRE(bf16.rc == 0);
  if (bf16.out.find("cpu-fp32") != std::string::npos)
    CHECK(bf16.err.find("device.precision bf16 is for GPUs") != std::string::npos);
}

// Before a resumed run validates again, its summary (and its progress line's margin) shows the
// last validation of its kept metrics, with that validation's step.
TEST_CASE("a resumed run shows its last validation until it validates again", "[cli]") {
  TempDir d;
  make_workspace(d, tiny_config({{"steps", "10"}, {"eval_interval", "10"}}));
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=v", "-q"}).rc == 0);
  double val_ce = 0;
  for (const std::string& line : lines_of(slurp(d / "runs/v/metrics.jsonl")))
    if (line.find("\"kind\":\"eval\"") != std::string::npos)
      REQUIRE(json_find_number(line, "val_ce", &val_ce));
  REQUIRE(val_ce > 0);
  const Run more = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=v", "--set",
                                "train.steps=12", "--set", "train.eval_interval=0", "--resume"});
  INFO(more.out << more.err);
  REQUIRE(more.rc == 0);
  char expected[96];
  std::snprintf(expected, sizeof expected, "validation (at step 10): ce %.4f nats/token", val_ce);
  CHECK(more.out.find(expected) != std::string::npos);
}

TEST_CASE("two trainings never share a run directory", "[cli]") {
  TempDir d;
  const pid_t first = spawn_training(d, "busy");  // running, no checkpoint saved yet
  const Run second = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=busy", "--set",
                                  "train.steps=5", "-q"});
  // A resume of it too, by directory or by run name, before anything about its checkpoint (it
  // has saved none yet) or its steps is said.
  const Run resume_dir = run(d.path, {"train", "--resume", "runs/busy", "-q"});
  const Run resume_name = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=busy",
                                       "--set", "train.steps=1", "--resume", "-q"});
  kill(first, SIGKILL);
  finish(d.path, first);
  const std::string in_use = "run directory 'runs/busy/' is in use by another barrierlm (pid ";
  check_error(second, 1, {in_use});
  check_error(resume_dir, 1, {in_use});
  check_error(resume_name, 1, {in_use});
  // Unnamed runs started at once get a directory each (a timestamp, then -2, -3).
  std::vector<pid_t> pids;
  for (int i = 0; i < 3; ++i) {
    const std::string log = d / ("log" + std::to_string(i));
    pids.push_back(spawn_barrierlm(d.path, {"train", "cfg.yaml", "--set", "train.run_name=",
                                            "--set", "train.out_dir=many", "--set",
                                            "train.steps=3", "-q"},
                                   log, log));
  }
  for (pid_t p : pids) {
    int status = 0;
    REQUIRE(waitpid(p, &status, 0) == p);
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  }
  int runs = 0;
  for (const auto& e : fs::directory_iterator(d / "many"))
    runs += e.is_directory() && !e.is_symlink() && fs::exists(e.path() / "checkpoint.bin");
  CHECK(runs == 3);
}

TEST_CASE("a metrics line that cannot be written stops the run with the file named", "[cli]") {
  TempDir d;
  make_workspace(d, tiny_config({{"steps", "100000"}, {"log_interval", "1"},
                                 {"eval_interval", "0"}, {"checkpoint_interval", "0"}}));
  // Files may not grow past 16 KiB (SIGXFSZ ignored, so the write fails with EFBIG): metrics.jsonl
  // reaches that after about 70 steps.  Before, the stream dropped every later line silently.
  const Run r = run_shell(d.path, "cd '" + d.path + "' && (trap '' XFSZ; ulimit -f 16; exec '" +
                                      binary() + "' train cfg.yaml --set train.run_name=f -q)");
  INFO(r.out << r.err);
  CHECK(r.rc == 1);
  CHECK(r.err.find("barrierlm: error: cannot write 'runs/f/metrics.jsonl': File too large") == 0);
  const std::vector<std::string> lines = lines_of(slurp(d / "runs/f/metrics.jsonl"));
  REQUIRE(lines.size() > 10);
  for (size_t i = 0; i + 1 < lines.size(); ++i)  // the last one may be cut short
    CHECK(number(lines[i], "step") == static_cast<double>(i + 1));
}

TEST_CASE("validation covers the same windows whatever train.grad_accum", "[cli]") {
  TempDir d;
  make_workspace(d);
  double val_ce[2] = {0, 0};
  for (int accum : {1, 2}) {
    const std::string name = "a" + std::to_string(accum);
    REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=" + name, "--set",
                         "train.grad_accum=" + std::to_string(accum), "--set", "train.steps=10",
                         "-q"})
                .rc == 0);
    const std::vector<std::string> ms = lines_of(slurp(d / ("runs/" + name + "/metrics.jsonl")));
    val_ce[accum - 1] = number(ms.back(), "val_ce");
  }
  CHECK(val_ce[1] == Approx(val_ce[0]).epsilon(1e-6));
}

// ------------------------------------------------------------------ bad input

TEST_CASE("bad input: one line naming the problem, non-zero exit, no files left", "[cli]") {
  TempDir d;
  make_workspace(d);
  // A failed `train` must not leave a run directory behind.
  const auto train_fails = [&](const std::string& config_text, const std::vector<std::string>& parts,
                               std::vector<std::string> extra = {}) {
    write_file(d / "bad.yaml", config_text);
    std::vector<std::string> args = {"train", "bad.yaml"};
    args.insert(args.end(), extra.begin(), extra.end());
    check_error(run(d.path, args), 1, parts);
    CHECK(!fs::exists(d / "runs"));
  };

  SECTION("malformed YAML") {
    train_fails("model: {n_layer: 2\n", {"bad.yaml:", "invalid YAML"});
  }
  SECTION("unknown key, with its line") {
    train_fails("model:\n  n_layer: 2\n  n_layers: 3\n", {"bad.yaml:3", "'model.n_layers'"});
  }
  SECTION("wrong type") {
    train_fails("train:\n  steps: many\n", {"bad.yaml:2", "train.steps", "many"});
  }
  SECTION("out of range") {
    train_fails("train:\n  lr: -1\n", {"bad.yaml:2", "train.lr"});
  }
  SECTION("d_model not divisible by n_head") {
    train_fails("model: {d_model: 30, n_head: 4}\n", {"model.d_model (30)", "model.n_head (4)"});
  }
  SECTION("unknown --set key") {
    train_fails(tiny_config(), {"--set", "train.stepz"}, {"--set", "train.stepz=3"});
  }
  SECTION("missing data file") {
    train_fails(tiny_config(), {"nothere.txt"}, {"--set", "data.train=nothere.txt"});
  }
  SECTION("data file too short for one sequence") {
    write_file(d / "short.txt", "tiny text");
    train_fails(tiny_config(), {"short.txt", "17"}, {"--set", "data.train=short.txt"});
  }
  SECTION("eval with no run yet") {
    check_error(run(d.path, {"eval", "--noise", "0.1"}), 1,
                {"no run found in 'runs/'; train one first (barrierlm train config.yaml) or pass "
                 "a checkpoint"});
    // A `latest` whose run was moved away is named as such.
    fs::create_directories(d / "runs");
    fs::create_symlink("gone", d / "runs/latest");
    check_error(run(d.path, {"eval", "--noise", "0.1"}), 1,
                {"'runs/latest' points at 'runs/gone', which is gone"});
  }
  SECTION("usage errors exit 2") {
    CHECK(run(d.path, {"train", "cfg.yaml", "--bogus"}).rc == 2);
    const Run unknown = run(d.path, {"frobnicate"});
    CHECK(unknown.rc == 2);
    // Every command --help lists, the developer tool included, in --help's order.
    CHECK(unknown.err.rfind("barrierlm: error: unknown command 'frobnicate' (expected train, "
                            "eval, margins, sample, tokenize, export, bench, report or "
                            "gradients)\n",
                            0) == 0);
    const Run help = run(d.path, {"--help"});
    CHECK(help.rc == 0);
    size_t at = 0;
    for (const char* c : {"train", "eval", "margins", "sample", "bench", "report", "gradients"}) {
      INFO(c << " in " << help.out);
      at = help.out.find(std::string("\n  ") + c + " ", at);
      CHECK(at != std::string::npos);
    }
    CHECK(run(d.path, {}).rc == 2);
    check_error(run(d.path, {"eval", "x.bin", "--noise", "0,abc"}), 2, {"--noise", "'abc'"});
    // Out-of-range numbers name the option, the bound and the value (CLI11's own check said
    // "Value 0 not in range 0.000000 to 1797693134862315708145...").
    const auto usage_error = [&](const std::vector<std::string>& args, const std::string& text) {
      const Run r = run(d.path, args);
      INFO(r.err);
      CHECK(r.rc == 2);
      CHECK(r.err.rfind(text, 0) == 0);
    };
    usage_error({"eval", "--draws", "0"}, "--draws: must be >= 1, got 0\n");
    usage_error({"margins", "x.bin", "--sequences", "-3"}, "--sequences: must be >= 1, got -3\n");
    usage_error({"sample", "x.bin", "--threads", "-2"}, "--threads: must be >= 0, got -2\n");
    usage_error({"sample", "x.bin", "--temperature", "inf"},
                "--temperature: must be a finite number >= 0, got inf");
    usage_error({"eval", "x.bin", "--seed", "99999999999999999999999"},
                "--seed: must be an integer below 2^64, got 99999999999999999999999\n");
    usage_error({"train", "cfg.yaml", "--until", "0"}, "--until: must be >= 1, got 0\n");
    // A uint64 seed would take -5 as 2^64 - 5.
    usage_error({"eval", "x.bin", "--seed", "-5"}, "--seed: must be an integer >= 0, got -5\n");
    usage_error({"sample", "x.bin", "--seed", "-1"}, "--seed: must be an integer >= 0, got -1\n");
    // An empty path (an unset shell variable) is not taken as the option left out.
    usage_error({"eval", "x.bin", "--data", ""}, "--data: an empty path\n");
    usage_error({"margins", "x.bin", "--out", ""}, "--out: an empty path\n");
    usage_error({"sample", ""}, "CHECKPOINT: an empty path\n");
    usage_error({"export", "x.bin", "-o", ""}, "--out: an empty path\n");
    usage_error({"tokenize", "a.txt", "-o", ""}, "--out: an empty path\n");
    CHECK(run(d.path, {"train", "--help"}).rc == 0);
    CHECK(!fs::exists(d / "runs"));
  }

  SECTION("corrupted and truncated checkpoints, mismatched resume, divergence") {
    REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=good", "-q"}).rc == 0);
    const std::string good = slurp(d / "runs/good/checkpoint.bin");
    std::string flipped = good;
    flipped[flipped.size() / 2] ^= 0x10;
    write_file(d / "flipped.bin", flipped);
    write_file(d / "short.bin", good.substr(0, good.size() - 100));
    check_error(run(d.path, {"eval", "flipped.bin"}), 1, {"flipped.bin"});
    check_error(run(d.path, {"margins", "short.bin"}), 1, {"short.bin"});
    check_error(run(d.path, {"sample", "missing.bin"}), 1, {"missing.bin"});
    CHECK(!fs::exists(d / "margins"));

    // --backend cuda where it cannot run is named as the flag, not as a config key.
    const Run cuda = run(d.path, {"eval", "runs/good", "--noise", "0", "--backend", "cuda"});
    if (cuda.rc != 0) check_error(cuda, 1, {"use --backend cpu"});

    // A different architecture cannot resume the run; the run is left as it was.
    check_error(run(d.path, {"train", "cfg.yaml", "--resume", "runs/good", "--set",
                             "model.d_model=32", "--set", "train.steps=30"}),
                1, {"model.d_model", "16", "32"});
    CHECK(slurp(d / "runs/good/checkpoint.bin") == good);

    // A new run into a directory holding a run is refused.
    check_error(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=good"}), 1,
                {"runs/good", "--resume"});

    // A huge learning rate: non-finite loss, exit 1, the last good checkpoint untouched.
    const Run nan = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=nan", "--set",
                                 "train.lr=1e30", "--set", "train.warmup=0", "--set",
                                 "train.checkpoint_interval=1", "-q"});
    check_error(nan, 1, {"training diverged at step ", "(try a lower train.lr)"});
    const int bad_step = std::atoi(nan.err.c_str() + nan.err.find("at step ") + 8);
    REQUIRE(bad_step >= 2);  // the first update has to happen before anything overflows
    const Checkpoint last = load_checkpoint(d / "runs/nan/checkpoint.bin");
    CHECK(last.step == bad_step - 1);
    for (float p : last.params) REQUIRE(std::isfinite(p));
  }
}

TEST_CASE("an --out that cannot be written fails at once, naming the path", "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "-q"}).rc == 0);
  write_file(d / "afile", "not a directory\n");
  const auto fails_first = [&](const std::vector<std::string>& args,
                               const std::vector<std::string>& parts) {
    const Run r = run(d.path, args);
    check_error(r, 1, parts);
    CHECK(r.out.empty());  // before the work: eval's and bench's tables are printed before writing
  };
  fails_first({"eval", "runs/r", "--out", "missing/dir/x.json"},
              {"cannot write 'missing/dir/x.json': directory 'missing/dir' does not exist"});
  fails_first({"eval", "runs/r", "--out", "runs"}, {"cannot write 'runs': it is a directory"});
  fails_first({"eval", "runs/r", "--plot", "afile/n.svg"},
              {"cannot write 'afile/n.svg': 'afile' is not a directory"});
  fails_first({"bench", "cfg.yaml", "--steps", "1", "--warmup", "0", "--out", "afile/b.json"},
              {"cannot write 'afile/b.json': 'afile' is not a directory"});
  // margins and report create their output directories, but not below a file.
  // (--backend cpu: margins loads the model first, and on a GPU machine auto warns that the GPU
  // cannot run this one, a line before the error.)
  fails_first({"margins", "runs/r", "--out", "afile/m", "--backend", "cpu"},
              {"cannot create output directory 'afile/m': 'afile' is not a directory"});
  fails_first({"report", "runs/r", "--out", "afile/rep"},
              {"cannot create output directory 'afile/rep'", "'afile' is not a directory"});
  fails_first({"report", "runs/r", "--out", "rep", "--markdown", "afile/r.md"},
              {"cannot write 'afile/r.md': 'afile' is not a directory"});
  CHECK(!fs::exists(d / "rep"));  // nothing was created before the failure
  CHECK(!fs::exists(d / "runs/r/margins"));
  // Directories they may create: several levels of them.
  const Run m = run(d.path, {"margins", "runs/r", "--sequences", "1", "--out", "new/a/b"});
  CHECK(m.rc == 0);
  CHECK(fs::exists(d / "new/a/b/margins.json"));
  const Run e = run(d.path, {"eval", "runs/r", "--noise", "0", "--out", "e.json"});
  CHECK(e.rc == 0);
  CHECK(fs::exists(d / "e.json"));
}

TEST_CASE("eval's --out and --plot never replace a file it reads, nor each other", "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "-q"}).rc == 0);
  fs::copy_file(d / "runs/r/checkpoint.bin", d / "c.bin");
  fs::create_symlink("c.bin", d / "link.bin");
  const std::string checkpoint = slurp(d / "c.bin"), text = slurp(d / "text.txt");
  // Before, each of these wrote its JSON or SVG over the file and exited 0.
  const auto refused = [&](std::vector<std::string> args, const std::string& what) {
    args.insert(args.end(), {"--noise", "0", "--backend", "cpu"});
    const Run r = run(d.path, args);
    check_error(r, 1, {what, "choose another"});
    CHECK(r.out.empty());  // before the evaluation and its table
  };
  refused({"eval", "c.bin", "--data", "text.txt", "--out", "c.bin"},
          "--out 'c.bin' is the checkpoint 'c.bin'");
  refused({"eval", "c.bin", "--data", "text.txt", "--out", "./c.bin"},
          "--out './c.bin' is the checkpoint 'c.bin'");
  refused({"eval", "link.bin", "--data", "text.txt", "--plot", "c.bin"},
          "--plot 'c.bin' is the checkpoint 'link.bin'");
  refused({"eval", "runs/r", "--out", "runs/r/checkpoint.bin"},
          "--out 'runs/r/checkpoint.bin' is the checkpoint 'runs/r/checkpoint.bin'");
  refused({"eval", "c.bin", "--data", "te*.txt", "--out", "text.txt"},
          "--out 'text.txt' is the data file 'text.txt'");
  refused({"eval", "runs/r", "--out", "runs/../text.txt"},
          "--out 'runs/../text.txt' is the run's training data 'text.txt'");
  refused({"eval", "runs/r", "--out", "x.json", "--plot", "./x.json"},
          "--plot './x.json' is the file of --out 'x.json'");
  CHECK(slurp(d / "c.bin") == checkpoint);
  CHECK(slurp(d / "text.txt") == text);
  CHECK(!fs::exists(d / "x.json"));
  // A Hugging Face directory's files are the model too.
  REQUIRE(run(d.path, {"export", "c.bin", "-o", "hf"}).rc == 0);
  const std::string weights = slurp(d / "hf/model.safetensors");
  refused({"eval", "hf", "--data", "text.txt", "--out", "hf/model.safetensors"},
          "--out 'hf/model.safetensors' is a file of the model 'hf/model.safetensors'");
  CHECK(slurp(d / "hf/model.safetensors") == weights);
  // A device is written to, not replaced: both may go there.
  CHECK(run(d.path, {"eval", "c.bin", "--data", "text.txt", "--noise", "0", "--out", "/dev/null",
                     "--plot", "/dev/null", "--backend", "cpu"})
            .rc == 0);
}

TEST_CASE("eval --noise is refused above 1e6, where fp32 loses the embedding", "[cli]") {
  TempDir d;
  // Before, 1e20 gave the same CE at every level and 1e38 a NaN CE, with exit 0.
  for (const std::string& level : {"2e6", "1e20", "1e38"})
    check_error(run(d.path, {"eval", "missing.bin", "--noise", "0," + level}), 2,
                {"--noise: '" + level + "' is above 1e6, the largest noise level"});
  // 1e6 itself passes the check: the error is the missing checkpoint's.
  check_error(run(d.path, {"eval", "missing.bin", "--noise", "0,1e6"}), 1, {"missing.bin"});
  const Run help = run(d.path, {"eval", "--help"});
  CHECK(help.out.find("each at most 1e6") != std::string::npos);
}

TEST_CASE("eval --data that matches no file is named as --data", "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "-q"}).rc == 0);
  // Before: "data.train: no file matches the pattern", a key the user never wrote.
  for (const char* command : {"eval", "margins"})
    check_error(run(d.path, {command, "runs/r", "--data", "zz*.txt", "--backend", "cpu"}), 1,
                {"--data: no file matches the pattern 'zz*.txt'"});
}

TEST_CASE("eval --batches counts batches of train.batch_size, as train.eval_batches does",
          "[cli]") {
  TempDir d;
  make_workspace(d);  // eval_batches 3, batch_size 4
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=a2", "--set",
                       "train.grad_accum=2", "--set", "train.steps=2", "-q"})
              .rc == 0);
  const auto eval_json = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {"eval", "runs/a2", "--noise", "0", "--json", "--threads",
                                     "1", "--backend", "cpu"};
    args.insert(args.end(), extra.begin(), extra.end());
    const Run r = run(d.path, args);
    INFO(r.err);
    REQUIRE(r.rc == 0);
    return r.out;
  };
  const std::string by_default = eval_json({}), three = eval_json({"--batches", "3"});
  // Before, --batches 3 meant 3 micro-batches of 2 sequences: half the default's windows.
  CHECK(number(three, "tokens_per_draw") == 3 * 4 * 16);
  CHECK(number(three, "tokens_per_draw") == number(by_default, "tokens_per_draw"));
  CHECK(number(three, "ce_mean") == number(by_default, "ce_mean"));
  const Run help = run(d.path, {"eval", "--help"});
  CHECK(help.out.find("batches of train.batch_size sequences") != std::string::npos);
}

TEST_CASE("eval's note on a capped --batches says exactly how many sequences are used",
          "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "--set",
                       "train.steps=2", "-q"})
              .rc == 0);
  // The validation part: the last 10% of the text's bytes; windows of 16 tokens plus 1.
  const size_t val_tokens = slurp(d / "text.txt").size() / 10;
  const size_t windows = (val_tokens - 1) / 16, used = windows / 4 * 4;
  REQUIRE(used < windows);  // some windows do not fill a whole batch
  const Run r = run(d.path, {"eval", "runs/r", "--noise", "0", "--batches", "100000",
                             "--backend", "cpu"});
  REQUIRE(r.rc == 0);
  // Before: "capped at N, all the windows of ...", though the last windows were left out.
  CHECK(r.err.find("barrierlm: note: --batches 100000 (400000 sequences) capped at " +
                   std::to_string(used / 4) + " batches of 4, " + std::to_string(used) +
                   " of the " + std::to_string(windows) + " sequences of 16 tokens that the "
                   "run's validation data holds (whole batches only)\n") != std::string::npos);
}

TEST_CASE("margins' support-token table stays aligned with 10 or more layers", "[cli]") {
  TempDir d;
  make_workspace(d);
  // The barrier on layer 10 only: every token's margin is then that layer's ("L10 H.").
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=deep", "--set",
                       "model.n_layer=11", "--set", "barrier.layers=[10]", "--set",
                       "train.steps=2", "-q"}).rc == 0);
  const Run m = run(d.path, {"margins", "runs/deep", "--sequences", "2", "--top", "400",
                             "--backend", "cpu"});
  INFO(m.err);
  REQUIRE(m.rc == 0);
  const SupportTable table = support_table(m.out);
  const size_t seq_col = table.header.find("seq");
  int two_digit_layers = 0;
  for (const std::string& row : table.rows) {
    INFO(row);
    REQUIRE(row.size() > seq_col);
    CHECK(std::isdigit(static_cast<unsigned char>(row[seq_col])));  // the seq column starts here
    CHECK(row[seq_col - 1] == ' ');
    two_digit_layers += row.find(" L10 H") != std::string::npos ? 1 : 0;
  }
  CHECK(two_digit_layers > 0);  // rows of layer 10 were listed
}

TEST_CASE("train removes the temporary files of a killed earlier process, and only those",
          "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "--until", "10", "-q"})
              .rc == 0);
  // A pid that is surely gone: a child that has exited and been reaped.
  const pid_t gone = fork();
  if (gone == 0) _exit(0);
  REQUIRE(gone > 0);
  waitpid(gone, nullptr, 0);
  const fs::path stale = d / ("runs/r/checkpoint.bin.tmp." + std::to_string(gone) + ".0");
  const fs::path live = d / ("runs/r/checkpoint.bin.tmp." + std::to_string(getpid()) + ".0");
  write_file(stale, "half a checkpoint");
  write_file(live, "being written by a running process (this test)");
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--resume", "runs/r", "--until", "12", "-q"}).rc == 0);
  CHECK(!fs::exists(stale));
  CHECK(fs::exists(live));
  CHECK(load_checkpoint(d / "runs/r/checkpoint.bin").step == 12);
}

TEST_CASE("eval and margins find a run's relative data paths from another directory", "[cli]") {
  TempDir d;
  make_workspace(d);  // data: {train: text.txt}, relative to d, where train runs
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "-q"}).rc == 0);
  fs::create_directories(d / "elsewhere/deeper");
  const std::string note = "barrierlm: note: the run's data paths are relative to where it was "
                           "trained; found them under '";
  // From a directory where text.txt is not: found under the checkpoint's ancestors (d), said.
  const Run here = run(d.path, {"eval", "runs/r", "--noise", "0", "--draws", "1", "--json"});
  const Run there = run(d / "elsewhere/deeper",
                        {"eval", "../../runs/r", "--noise", "0", "--draws", "1", "--json"});
  INFO(there.err);
  REQUIRE(there.rc == 0);
  CHECK(here.err.find(note) == std::string::npos);  // the paths exist from d: no note
  CHECK(there.err.find(note) != std::string::npos);
  CHECK(number(there.out, "ce_mean") == number(here.out, "ce_mean"));  // the same data and loss
  const Run m = run(d / "elsewhere",
                    {"margins", "../runs/r", "--sequences", "1", "--backend", "cpu"});
  INFO(m.err);
  CHECK(m.rc == 0);
  // A checkpoint copied where none of its ancestors holds the data: the error as before.
  fs::create_directories(d / "elsewhere/copy");
  fs::copy_file(d / "runs/r/checkpoint.bin", d / "elsewhere/copy/checkpoint.bin");
  fs::rename(d / "text.txt", d / "moved.txt");
  // (--backend cpu: on a GPU machine auto would add a warning line before the error.)
  const Run lost = run(d / "elsewhere", {"eval", "copy", "--noise", "0", "--backend", "cpu"});
  check_error(lost, 1, {"text.txt", "pass --data FILE"});
}

TEST_CASE("eval and margins read only the validation file of a run that names one", "[cli]") {
  TempDir d;
  make_workspace(d);
  write_file(d / "val.txt", generated_text(8, 4000));
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "data.val=val.txt", "--set",
                       "train.run_name=r", "--set", "train.steps=4", "-q"})
              .rc == 0);
  const Run before = run(d.path, {"eval", "runs/r", "--noise", "0", "--draws", "1", "--json"});
  REQUIRE(before.rc == 0);
  // The run copied without its training corpus evaluates the same.
  fs::remove(d / "text.txt");
  const Run after = run(d.path, {"eval", "runs/r", "--noise", "0", "--draws", "1", "--json"});
  INFO(after.err);
  REQUIRE(after.rc == 0);
  CHECK(number(after.out, "ce_mean") == number(before.out, "ce_mean"));
  const Run m = run(d.path, {"margins", "runs/r", "--sequences", "1", "--backend", "cpu"});
  INFO(m.err);
  CHECK(m.rc == 0);
}

TEST_CASE("data.tokenizer gpt2: train on text; sample and margins show text without the files",
          "[cli]") {
  TempDir d;
  // A synthetic GPT-2 vocabulary in which each word of the generated text is one token.
  const Gpt2Vocab vocab = write_word_vocab(
      d / "vocab", {"the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and",
                    "cat", "sat", "on", "mat", "with", "hat", "margin", "token", "support",
                    "barrier"});
  std::string config = tiny_config();
  const std::string data = "data: {train: text.txt}";
  config.replace(config.find(data), data.size(),
                 "data: {train: text.txt, tokenizer: gpt2, vocab: vocab}");
  make_workspace(d, config);

  const Run tr = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=g"});
  INFO(tr.out << tr.err);
  REQUIRE(tr.rc == 0);
  CHECK(tr.out.find("(gpt2 tokenizer)") != std::string::npos);
  // Bits per byte from the validation text's bytes: a token is a word here, so fewer bits a
  // byte than CE / ln 2.
  std::string eval_line;
  for (const std::string& line : lines_of(slurp(d / "runs/g/metrics.jsonl")))
    if (line.find("\"kind\":\"eval\"") != std::string::npos) eval_line = line;
  REQUIRE(!eval_line.empty());
  const double val_ce = number(eval_line, "val_ce"), val_bpb = number(eval_line, "val_bpb");
  CHECK(val_bpb > 0.1 * val_ce / std::log(2.0));
  CHECK(val_bpb < 0.5 * val_ce / std::log(2.0));
  CHECK(tr.out.find("bits/byte") != std::string::npos);
  const std::string resolved = slurp(d / "runs/g/config.yaml");
  CHECK(resolved.find("  tokenizer: \"gpt2\"\n  vocab: \"vocab\"\n") != std::string::npos);
  CHECK(resolved.find("  vocab_size: 387\n") != std::string::npos);  // 256 + 130 merges + 1

  // The checkpoint holds the whole vocabulary: sample, margins and eval need no files.
  fs::remove_all(d / "vocab");
  const Run s = run(d.path, {"sample", "runs/g", "--prompt", "the quick", "--tokens", "20",
                             "--temperature", "0"});
  INFO(s.out << s.err);
  REQUIRE(s.rc == 0);
  CHECK(s.out.rfind("the quick", 0) == 0);
  CHECK(s.out.find('<') == std::string::npos);  // no "<id>"
  for (const char* alphabet : {"\xC4\xA0", "\xC4\x8A"})  // nor the byte alphabet's space, newline
    CHECK(s.out.find(alphabet) == std::string::npos);
  // margins encodes its text with the checkpoint's tokenizer (one token a word) and shows each
  // token's text.
  const std::vector<std::string> text_words = {"the", " quick", " brown", " fox", " jumps",
                                               " over", " a", " lazy", " dog"};
  std::string text;
  for (const std::string& w : text_words) text += w;
  const Run m =
      run(d.path, {"margins", "runs/g", "--text", text, "--out", "m", "--backend", "cpu"});
  INFO(m.out << m.err);
  REQUIRE(m.rc == 0);
  std::vector<int32_t> ids;  // the tokens of layer 0, head 0, in position order
  for (const std::string& line : lines_of(slurp(d / "m/margins.csv")))
    if (line.rfind("0,0,0,", 0) == 0)  // b,l,h,t,token,...
      ids.push_back(std::atoi(line.c_str() + line.find(',', 6) + 1));
  std::vector<int32_t> expect;
  for (const std::string& w : text_words) expect.push_back(vocab.id_of(w));
  CHECK(ids == expect);
  const std::string strip = slurp(d / "m/margins_strip.html");
  for (const std::string& w : text_words)
    CHECK(strip.find("\">" + w + "</span>") != std::string::npos);
  for (const std::string& row : support_table(m.out).rows)
    CHECK(row.find('<') == std::string::npos);
  const Run e = run(d.path, {"eval", "runs/g", "--noise", "0", "--draws", "1", "--json"});
  INFO(e.out << e.err);
  CHECK(e.rc == 0);
  CHECK(e.out.find("\"gpt2\"") != std::string::npos);
  // eval's bits per byte: its CE over ln 2, times the tokens a byte of the text it evaluated
  // (the run's validation windows: the same value as train's last validation).
  const double per_byte = number(e.out, "tokens_per_byte");
  CHECK(per_byte > 0.1);
  CHECK(per_byte < 0.5);
  CHECK(number(e.out, "bpb_mean") ==
        Approx(number(e.out, "ce_mean") / std::log(2.0) * per_byte).epsilon(1e-12));
  CHECK(number(e.out, "bpb_mean") == Approx(val_bpb).epsilon(1e-9));

  // A new run without the files, or without data.vocab, says what it needs.
  check_error(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=h"}), 1,
              {"vocab/encoder.json", "No such file or directory", "--gpt2-vocab"});
  std::string no_vocab = config;
  no_vocab.erase(no_vocab.find(", vocab: vocab"), 14);
  write_file(d / "novocab.yaml", no_vocab);
  check_error(run(d.path, {"train", "novocab.yaml"}), 1,
              {"novocab.yaml:3:", "data.vocab is empty", "encoder.json and vocab.bpe"});
  CHECK(!fs::exists(d / "runs/h"));
}

TEST_CASE("tokenize writes .bin shards that train reads through a pattern", "[cli]") {
  TempDir d;
  write_word_vocab(d / "vocab");
  const auto tok = make_gpt2_tokenizer(d / "vocab");
  const int32_t eot = static_cast<int32_t>(tok->vocab_size()) - 1;  // the vocabulary's last
  REQUIRE(tok->decode_token(eot) == "<|endoftext|>");
  std::vector<int32_t> expect;  // each file: <|endoftext|>, then its tokens
  std::vector<std::string> args = {"tokenize"};
  for (int i = 0; i < 3; ++i) {
    const std::string name = "doc" + std::to_string(i) + ".txt", text = generated_text(i, 9000);
    write_file(d / name, text);
    args.push_back(name);
    expect.push_back(eot);
    for (int32_t id : tok->encode(text)) expect.push_back(id);
  }
  std::vector<std::string> sharded = args;
  sharded.insert(sharded.end(), {"--vocab", "vocab", "-o", "shards/train.bin", "--shard-tokens",
                                 "1000", "--threads", "2"});
  const Run t = run(d.path, sharded);
  INFO(t.out << t.err);
  REQUIRE(t.rc == 0);
  const size_t shards = (expect.size() + 999) / 1000;
  REQUIRE(shards >= 3);
  CHECK(t.out.find("wrote " + std::to_string(shards) + " shards") != std::string::npos);
  CHECK(t.out.find("data.train or data.val: shards/train_*.bin") != std::string::npos);
  // Full shards of 1000 tokens, the last shorter; together the documents' tokens in order.
  std::vector<int32_t> got;
  for (size_t k = 0; k < shards; ++k) {
    char name[32];
    std::snprintf(name, sizeof name, "shards/train_%06zu.bin", k);
    const std::string bytes = slurp_required(d / name);
    const size_t n = (bytes.size() - 1024) / 2;
    CHECK(n == (k + 1 < shards ? 1000 : expect.size() - 1000 * k));
    CHECK(bytes == encode_bin_shard(std::vector<int32_t>(expect.begin() + got.size(),
                                                         expect.begin() + got.size() + n)));
    got.insert(got.end(), expect.begin() + got.size(), expect.begin() + got.size() + n);
  }
  CHECK(!fs::exists(d / ("shards/train_" + std::string(6 - std::to_string(shards).size(), '0') +
                         std::to_string(shards) + ".bin")));
  // One file, no <|endoftext|>, the byte tokenizer.
  std::vector<std::string> one = args;
  one.insert(one.end(), {"--vocab", "vocab", "-o", "val.bin", "--no-eot", "-q"});
  REQUIRE(run(d.path, one).rc == 0);
  std::vector<int32_t> plain;
  for (int32_t id : expect)
    if (id != eot) plain.push_back(id);
  CHECK(slurp(d / "val.bin") == encode_bin_shard(plain));
  REQUIRE(run(d.path, {"tokenize", "doc0.txt", "--tokenizer", "byte", "-o", "b.bin"}).rc == 0);
  const std::string doc0 = slurp(d / "doc0.txt");
  CHECK(slurp(d / "b.bin") ==
        encode_bin_shard(std::vector<int32_t>(doc0.begin(), doc0.end())));  // ASCII text

  // Standard input ("-"), read in blocks cut where the pieces cannot change, and a file read in
  // small slices, give the ids of the file read whole (their tokens cross many slices).
  write_file(d / "all.txt", slurp(d / "doc0.txt") + slurp(d / "doc1.txt"));
  REQUIRE(run(d.path, {"tokenize", "all.txt", "--vocab", "vocab", "-o", "whole.bin"}).rc == 0);
  const std::string in_dir = "cd '" + d.path + "' && ";  // run_shell keeps the test's directory
  const Run piped =
      run_shell(d.path, in_dir + "cat doc0.txt doc1.txt | BLM_TOKENIZE_SLICE_BYTES=700 " +
                            binary() + " tokenize - --vocab vocab -o piped.bin");
  INFO(piped.out << piped.err);
  REQUIRE(piped.rc == 0);
  CHECK(slurp_required(d / "piped.bin") == slurp_required(d / "whole.bin"));
  REQUIRE(run_shell(d.path, in_dir + "BLM_TOKENIZE_SLICE_BYTES=500 " + binary() +
                                " tokenize all.txt --vocab vocab -o sliced.bin")
              .rc == 0);
  CHECK(slurp_required(d / "sliced.bin") == slurp_required(d / "whole.bin"));
  check_error(run_shell(d.path, in_dir + binary() + " tokenize - --vocab vocab -o x.bin < val.bin"),
              1, {"input '-' is already a .bin shard"});

  // train reads the shards through the pattern, val from the one file.
  std::string config = tiny_config();
  const std::string data = "data: {train: text.txt}";
  config.replace(config.find(data), data.size(),
                 "data: {train: 'shards/train_*.bin', val: val.bin, tokenizer: gpt2, "
                 "vocab: vocab}");
  write_file(d / "cfg.yaml", config);
  const Run tr = run(d.path, {"train", "cfg.yaml", "--set", "train.steps=3"});
  INFO(tr.out << tr.err);
  CHECK(tr.rc == 0);
  CHECK(tr.out.find("shards/train_*.bin (" + std::to_string(shards) + " files): " +
                    format_rate(static_cast<double>(expect.size())) + " train / " +
                    format_rate(static_cast<double>(plain.size())) + " val") != std::string::npos);

  // Bad input: each names its problem, and nothing is written.
  sharded.push_back("-q");
  check_error(run(d.path, sharded), 1,
              {"shards/train_000000.bin' exists (and " + std::to_string(shards - 1) + " more)",
               "shards/train_*.bin", "another --out"});
  check_error(run(d.path, {"tokenize", "doc0.txt", "-o", "x.bin", "--vocab", "nowhere"}), 1,
              {"--vocab 'nowhere' does not exist", "--gpt2-vocab", "--gpt2-model"});
  check_error(run(d.path, {"tokenize", "val.bin", "-o", "x.bin", "--vocab", "vocab"}), 1,
              {"input 'val.bin' is already a .bin shard"});
  check_error(run(d.path, {"tokenize", "missing.txt", "-o", "x.bin", "--vocab", "vocab"}), 1,
              {"cannot open data file 'missing.txt'"});
  write_file(d / "empty.txt", "");
  check_error(run(d.path, {"tokenize", "empty.txt", "-o", "x.bin", "--tokenizer", "byte"}), 1,
              {"the inputs hold no text"});
  check_error(run(d.path, {"tokenize", "doc0.txt", "-o", "x.bin", "--tokenizer", "char"}), 2,
              {"--tokenizer: unknown tokenizer 'char'"});
  CHECK(!fs::exists(d / "x.bin"));
}

TEST_CASE("sample with GPT-2's tokenizer starts after <|endoftext|> and stops at the next",
          "[cli]") {
  TempDir d;
  write_word_vocab(d / "vocab");
  // Short documents, each ended by the text <|endoftext|> (one token): a model learns to end.
  std::string text;
  for (int i = 0; i < 600; ++i) text += generated_text(i, 30) + "<|endoftext|>";
  write_file(d / "docs.txt", text);
  std::string config = tiny_config({{"steps", "60"}, {"eval_interval", "0"}});
  const std::string data = "data: {train: text.txt}";
  config.replace(config.find(data), data.size(),
                 "data: {train: docs.txt, tokenizer: gpt2, vocab: vocab}");
  write_file(d / "cfg.yaml", config);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=g", "-q"}).rc == 0);
  int ended = 0;
  for (int seed = 1; seed <= 6; ++seed) {
    const std::vector<std::string> args = {"sample", "runs/g", "--tokens", "150", "--temperature",
                                           "1", "--seed", std::to_string(seed)};
    const Run stopped = run(d.path, args);
    std::vector<std::string> on = args;
    on.push_back("--ignore-eot");
    const Run all = run(d.path, on);
    REQUIRE(stopped.rc == 0);
    REQUIRE(all.rc == 0);
    CHECK(stopped.out.find("<|endoftext|>") == std::string::npos);
    const size_t end = all.out.find("<|endoftext|>");
    if (end == std::string::npos) continue;
    ++ended;  // the same draws up to the end, then nothing more
    CHECK(stopped.out == all.out.substr(0, end) + "\n");
  }
  CHECK(ended >= 3);
}

TEST_CASE("tokens_per_byte: the scored targets over the bytes of their text", "[cli]") {
  // The char tokenizer of "a" and "é" (2 bytes in UTF-8): ids 0 and 1.
  const auto chars = make_char_tokenizer("a\xC3\xA9");
  const EvalPlan plan{2, 3, 8};  // B 2, 3 batches, T 8: 48 targets
  const auto all = [](int32_t id) { return make_memory_stream(std::vector<int32_t>(100, id)); };
  CHECK(tokens_per_byte(*all(0), plan, *chars) == 1.0);
  CHECK(tokens_per_byte(*all(1), plan, *chars) == 0.5);
  // Half and half, by position parity: the windows start at multiples of T (even), so each
  // window's 8 targets (positions 1..8 of it) hold four of each.
  std::vector<int32_t> alternating(100);
  for (size_t i = 0; i < alternating.size(); ++i) alternating[i] = static_cast<int32_t>(i % 2);
  CHECK(tokens_per_byte(*make_memory_stream(alternating), plan, *chars) == 48.0 / 72.0);
  CHECK(tokens_per_byte(*all(7), plan, *make_byte_tokenizer()) == 1.0);
  CHECK(std::isnan(tokens_per_byte(*all(7), plan, *make_bin_tokenizer(10))));
}

TEST_CASE("resume drops a last metrics line without a step, even one ending in a newline",
          "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "--until", "10", "-q"})
              .rc == 0);
  const std::string before = slurp(d / "runs/r/metrics.jsonl");
  write_file(d / "runs/r/metrics.jsonl", before + "{\"kind\":\"tr\n");
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--resume", "runs/r", "--until", "15", "-q"}).rc == 0);
  const std::string after = slurp(d / "runs/r/metrics.jsonl");
  REQUIRE(after.size() > before.size());
  CHECK(after.substr(0, before.size()) == before);
  for (const std::string& l : lines_of(after)) CHECK(number(l, "step") <= 15);
}

TEST_CASE("a checkpoint trained in bf16 on a GPU evaluates, samples and shows margins on the CPU",
          "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "--until", "2", "-q"})
              .rc == 0);
  Checkpoint ck = load_checkpoint(d / "runs/r/checkpoint.bin");
  ck.config.device.backend = "cuda";  // as a GPU run saves it
  ck.config.device.precision = "bf16";
  save_checkpoint(d / "gpu.bin", ck);
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"eval", "gpu.bin", "--noise", "0", "--draws", "1"},
        std::vector<std::string>{"margins", "gpu.bin", "--out", "m"},
        std::vector<std::string>{"sample", "gpu.bin", "--tokens", "5"}}) {
    std::vector<std::string> on_cpu = args;
    on_cpu.insert(on_cpu.end(), {"--backend", "cpu"});
    const Run r = run(d.path, on_cpu);
    INFO(args[0] << ": " << r.out << r.err);
    CHECK(r.rc == 0);
  }
}

TEST_CASE("train.keep_checkpoints keeps every N-th step's checkpoint beside the latest", "[cli]") {
  TempDir d;
  make_workspace(d);
  const std::vector<std::string> args = {"train", "cfg.yaml", "--set", "train.run_name=k",
                                         "--set", "train.steps=12", "--set",
                                         "train.keep_checkpoints=5", "-q"};
  std::vector<std::string> first = args;
  first.insert(first.end(), {"--until", "7"});
  REQUIRE(run(d.path, first).rc == 0);
  CHECK(load_checkpoint(d / "runs/k/checkpoint_000005.bin").step == 5);
  CHECK(!fs::exists(d / "runs/k/checkpoint_000007.bin"));  // the stop's save is not kept
  // Resumed to the end: step 10 kept; the final step 12 is checkpoint.bin only.
  std::vector<std::string> rest = args;
  rest.insert(rest.end(), {"--resume", "runs/k"});
  REQUIRE(run(d.path, rest).rc == 0);
  const Checkpoint five = load_checkpoint(d / "runs/k/checkpoint_000005.bin"),
                   ten = load_checkpoint(d / "runs/k/checkpoint_000010.bin"),
                   last = load_checkpoint(d / "runs/k/checkpoint.bin");
  CHECK(five.step == 5);  // still step 5's bytes after later saves replaced checkpoint.bin
  CHECK(ten.step == 10);
  CHECK(last.step == 12);
  CHECK(five.params != ten.params);
  int kept = 0;
  for (const auto& e : fs::directory_iterator(d / "runs/k"))
    kept += e.path().filename().string().rfind("checkpoint_", 0) == 0;
  CHECK(kept == 2);  // no temporary left
  // A kept step is a checkpoint like any other.
  CHECK(run(d.path, {"margins", "runs/k/checkpoint_000010.bin", "--out", "m10"}).rc == 0);
  check_error(run(d.path, {"train", "cfg.yaml", "--set", "train.keep_checkpoints=-1"}), 1,
              {"train.keep_checkpoints: must be >= 0, got -1"});
}

TEST_CASE("a run resumed where it was moved records its own directory", "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "--until", "4", "-q"})
              .rc == 0);
  fs::rename(d / "runs", d / "moved");
  // The config still says out_dir: runs; the run lives in moved/r and continues there.
  const Run r = run(d.path, {"train", "cfg.yaml", "--resume", "moved/r", "--until", "6", "-q"});
  INFO(r.out << r.err);
  REQUIRE(r.rc == 0);
  CHECK(!fs::exists(d / "runs"));
  const std::string config = slurp(d / "moved/r/config.yaml");
  CHECK(config.find("out_dir: \"moved\"\n") != std::string::npos);
  CHECK(config.find("run_name: \"r\"\n") != std::string::npos);
  CHECK(fs::read_symlink(d / "moved/latest").string() == "r");
  // So the run's own config, with no other, finds and continues it.
  const Run more = run(d.path, {"train", "--resume", "moved/r", "--until", "8", "-q"});
  INFO(more.out << more.err);
  REQUIRE(more.rc == 0);
  CHECK(load_checkpoint(d / "moved/r/checkpoint.bin").step == 8);
}

// ------------------------------------------------------------------ the progress line

namespace {

// Runs barrierlm in dir with stdout (and stderr, when stderr_too) on a pseudo-terminal `columns`
// wide (0: its size left unset, as a new one has it) and returns what the terminal received.
std::string run_on_terminal(const std::string& dir, const std::vector<std::string>& args,
                            int columns, bool stderr_too = false) {
  const int master = posix_openpt(O_RDWR | O_NOCTTY);
  REQUIRE(master >= 0);
  REQUIRE(grantpt(master) == 0);
  REQUIRE(unlockpt(master) == 0);
  const std::string slave = ptsname(master);
  if (columns > 0) {
    winsize ws{};
    ws.ws_row = 24;
    ws.ws_col = static_cast<unsigned short>(columns);
    REQUIRE(ioctl(master, TIOCSWINSZ, &ws) == 0);
  }
  // Held open here too, so that reading the master never sees a hang-up before the child opens
  // the terminal or after it exits.
  const int held = open(slave.c_str(), O_RDWR | O_NOCTTY);
  REQUIRE(held >= 0);
  const pid_t pid = spawn_barrierlm(dir, args, slave, stderr_too ? slave : dir + "/.stderr");
  std::string screen;
  bool exited = false;
  int status = 0;
  for (;;) {
    pollfd p{master, POLLIN, 0};
    if (poll(&p, 1, exited ? 0 : 50) > 0 && (p.revents & POLLIN) != 0) {
      char buf[4096];
      const ssize_t n = read(master, buf, sizeof buf);
      if (n > 0) {
        screen.append(buf, static_cast<size_t>(n));
        continue;
      }
    }
    if (exited) break;
    exited = waitpid(pid, &status, WNOHANG) == pid;
  }
  close(held);
  close(master);
  INFO(screen << slurp(dir + "/.stderr"));
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  return screen;
}

// What the terminal shows as separate lines: split at "\r" and "\n", "clear line" removed.
std::vector<std::string> screen_lines(std::string s) {
  for (size_t p; (p = s.find("\033[K")) != std::string::npos;) s.erase(p, 3);
  for (char& c : s)
    if (c == '\r') c = '\n';
  return lines_of(s);
}

}  // namespace

TEST_CASE("on a terminal the updating progress line fits its width; in a file it is whole",
          "[cli]") {
  TempDir d;
  make_workspace(d);
  const auto step_lines = [](const std::vector<std::string>& lines) {
    std::vector<std::string> out;
    for (const std::string& l : lines)
      if (l.rfind("step ", 0) == 0) out.push_back(l);
    return out;
  };
  for (const int columns : {40, 60, 0}) {
    const std::string name = "w" + std::to_string(columns);
    const std::vector<std::string> args = {"train", "cfg.yaml", "--set", "train.run_name=" + name};
    const std::vector<std::string> steps =
        step_lines(screen_lines(run_on_terminal(d.path, args, columns)));
    INFO("columns " << columns);
    REQUIRE(steps.size() >= 5);  // steps 1, 5, 10, 15, 20 at least
    const size_t room = (columns > 0 ? columns : 80) - 1;  // unknown size: 80 columns
    for (const std::string& l : steps) {
      INFO(l);
      CHECK(l.size() <= room);
      CHECK(l.find("loss ") != std::string::npos);  // the important fields stay
    }
  }
  // Wide enough for everything.
  const std::vector<std::string> wide = step_lines(screen_lines(
      run_on_terminal(d.path, {"train", "cfg.yaml", "--set", "train.run_name=w200"}, 200)));
  REQUIRE(!wide.empty());
  CHECK(wide.back().find(" tok/s  ETA ") != std::string::npos);
  CHECK(wide.back().find("  lr ") != std::string::npos);
  // Not a terminal (a log file): every field, however long the line.
  const Run file = run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=file"});
  REQUIRE(file.rc == 0);
  const std::vector<std::string> logged = step_lines(lines_of(file.out));
  REQUIRE(logged.size() == 5);
  for (const std::string& l : logged) {
    INFO(l);
    size_t at = 0;
    for (const char* f : {"step ", "  loss ", "  ce ", "  barrier ", "  logdet ", "  margin ",
                          "  lr ", " tok/s  ETA "}) {
      at = l.find(f, at);
      CHECK(at != std::string::npos);
    }
    CHECK(l.find("-0.000") == std::string::npos);
  }
}

// ------------------------------------------------------------------ pure helpers

TEST_CASE("eval on a terminal says which draw and batch it is at", "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "-q"}).rc == 0);
  const std::vector<std::string> lines = screen_lines(run_on_terminal(
      d.path, {"eval", "runs/r", "--noise", "0,0.1", "--draws", "2", "--batches", "3"}, 100, true));
  // 3 batches clean, then 2 draws of 3: 9 in all, counted across the draws.
  std::vector<std::string> progress;
  for (const std::string& l : lines)
    if (l.find(": batch ") != std::string::npos) progress.push_back(l);
  REQUIRE(!progress.empty());
  CHECK(progress.front() == "noise 0, draw 1/1: batch 0/9");
  CHECK(progress.back().rfind("noise 0.1, draw 2/2: batch 9/9", 0) == 0);
  bool eta = false;
  for (const std::string& l : progress) eta = eta || l.find(" tok/s, ETA ") != std::string::npos;
  CHECK(eta);
  // In a file, no progress line.
  const Run file = run(d.path, {"eval", "runs/r", "--noise", "0,0.1", "--draws", "2"});
  REQUIRE(file.rc == 0);
  CHECK(file.err.find("batch") == std::string::npos);
}

TEST_CASE("margins on a terminal says which sequence it is at", "[cli]") {
  TempDir d;
  make_workspace(d);
  REQUIRE(run(d.path, {"train", "cfg.yaml", "--set", "train.run_name=r", "-q"}).rc == 0);
  const std::vector<std::string> lines = screen_lines(
      run_on_terminal(d.path, {"margins", "runs/r", "--sequences", "3", "--out", "m"}, 100, true));
  std::vector<std::string> progress;
  for (const std::string& l : lines)
    if (l.rfind("margins: sequence ", 0) == 0) progress.push_back(l);
  REQUIRE(progress.size() == 3);
  CHECK(progress[0] == "margins: sequence 1/3");
  CHECK(progress[2].rfind("margins: sequence 3/3, ETA ", 0) == 0);
  // In a file, no progress line, and the same margins.
  const Run file = run(d.path, {"margins", "runs/r", "--sequences", "3", "--out", "m2"});
  REQUIRE(file.rc == 0);
  CHECK(file.err.find("sequence") == std::string::npos);
  CHECK(slurp(d / "m2/margins.csv") == slurp(d / "m/margins.csv"));
  // More sequences go in 8 parts: 16 in twos.
  progress.clear();
  for (const std::string& l : screen_lines(run_on_terminal(
           d.path, {"margins", "runs/r", "--sequences", "16", "--out", "m3"}, 100, true)))
    if (l.rfind("margins: sequence ", 0) == 0) progress.push_back(l);
  REQUIRE(progress.size() == 8);
  CHECK(progress[1].rfind("margins: sequence 3/16, ETA ", 0) == 0);
  CHECK(progress[7].rfind("margins: sequence 15/16, ETA ", 0) == 0);
  // Every sequence's rows (a header, then one per b, l, h, t), the same as in a file.
  const size_t rows3 = lines_of(slurp(d / "m/margins.csv")).size() - 1,
               rows16 = lines_of(slurp(d / "m3/margins.csv")).size() - 1;
  CHECK(rows16 * 3 == rows3 * 16);
  REQUIRE(run(d.path, {"margins", "runs/r", "--sequences", "16", "--out", "m4"}).rc == 0);
  CHECK(slurp(d / "m4/margins.csv") == slurp(d / "m3/margins.csv"));
}

TEST_CASE("format_fixed: values that round to zero print without a minus sign", "[cli]") {
  CHECK(format_fixed(-0.0004, 3) == "0.000");
  CHECK(format_fixed(-0.0, 3) == "0.000");
  CHECK(format_fixed(-1e-300, 4) == "0.0000");
  CHECK(format_fixed(-0.4, 0) == "0");
  CHECK(format_fixed(-0.0005001, 3) == "-0.001");  // not zero after rounding: keeps its sign
  CHECK(format_fixed(-0.6, 0) == "-1");
  CHECK(format_fixed(-10.0, 3) == "-10.000");
  CHECK(format_fixed(-0.05, 3) == "-0.050");
  CHECK(format_fixed(0.0004, 3) == "0.000");
  CHECK(format_fixed(2.5, 1) == "2.5");
  CHECK(format_fixed(-INFINITY, 3) == "-inf");
  CHECK(format_fixed(NAN, 3) == "nan");
}

TEST_CASE("barrier positions: K distinct in [2, T), a pure function of (seed, step, row)", "[cli]") {
  const int T = 12, K = 3;
  std::vector<uint8_t> mask(T), again(T);
  std::vector<int64_t> hits(T, 0);
  const int draws = 20000;
  std::set<std::vector<uint8_t>> distinct_rows;
  for (int i = 0; i < draws; ++i) {
    const int64_t step = i / 7;
    const int row = i % 7;
    sample_barrier_positions(42, step, row, T, K, mask.data());
    sample_barrier_positions(42, step, row, T, K, again.data());
    REQUIRE(mask == again);
    int count = 0;
    for (int t = 0; t < T; ++t) {
      count += mask[t];
      hits[t] += mask[t];
    }
    REQUIRE(count == K);
    REQUIRE(mask[0] == 0);
    REQUIRE(mask[1] == 0);
    if (i < 50) distinct_rows.insert(mask);
  }
  CHECK(distinct_rows.size() > 30);  // rows and steps draw differently
  // Uniform over the 10 candidates: each is chosen with probability K / 10; chi-square with
  // 9 degrees of freedom stays below 30 with probability > 0.999.
  const double expect = static_cast<double>(draws) * K / (T - 2);
  double chi2 = 0;
  for (int t = 2; t < T; ++t) chi2 += (hits[t] - expect) * (hits[t] - expect) / expect;
  CHECK(chi2 < 30);
  // A [B, T] mask of rows r0.. is the rows' own draws (data-parallel ranks agree).
  std::vector<uint8_t> batch;
  sample_barrier_mask(42, 5, 3, 4, T, K, batch);
  for (int b = 0; b < 4; ++b) {
    sample_barrier_positions(42, 5, 3 + b, T, K, mask.data());
    CHECK(std::equal(mask.begin(), mask.end(), batch.begin() + b * T));
  }
  // K >= T - 2: every position from 2 on (the exact barrier).
  sample_barrier_positions(1, 0, 0, T, 50, mask.data());
  for (int t = 0; t < T; ++t) CHECK(mask[t] == (t >= 2));
  // ... and the run headers say so, rather than "50 sampled positions".
  CHECK(barrier_positions_label(0, T) == "exact (every position)");
  CHECK(barrier_positions_label(T - 3, T) == std::to_string(T - 3) + " sampled positions/sequence");
  CHECK(barrier_positions_label(T - 2, T) ==
        "exact (every position: positions " + std::to_string(T - 2) + " >= seq_len - 2)");
}

TEST_CASE("JSON numbers round-trip; strings escape control bytes and bad UTF-8", "[cli]") {
  Rng rng(3);
  for (int i = 0; i < 2000; ++i) {
    const double x = (rng.uniform() - 0.5) * std::pow(10.0, static_cast<double>(rng.below(40)) - 20);
    REQUIRE(std::strtod(json_number(x).c_str(), nullptr) == x);
    double back = 0;
    REQUIRE(json_find_number("{\"a\":1,\"x\":" + json_number(x) + "}", "x", &back));
    REQUIRE(back == x);
  }
  CHECK(json_number(NAN) == "null");
  CHECK(json_number(-INFINITY) == "null");
  CHECK(json_escape("a\"b\\c\n\x01") == "\"a\\\"b\\\\c\\n\\u0001\"");
  CHECK(json_escape("caf\xc3\xa9") == "\"caf\xc3\xa9\"");           // valid UTF-8 kept
  CHECK(json_escape("x\xc3") == "\"x\xef\xbf\xbd\"");               // cut character -> U+FFFD
  CHECK(json_escape("\xed\xa0\x80") == "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"");  // surrogate
  JsonWriter j;
  j.begin_object().kv("a", 1).key("b").begin_array().value(2.5).null().end_array().kv("c", "d");
  j.end_object();
  CHECK(j.str() == "{\"a\":1,\"b\":[2.5,null],\"c\":\"d\"}");
  // Seeds take the whole of [0, 2^64): eval --json wrote those >= 2^63 negative.
  JsonWriter seed;
  seed.begin_object().kv("seed", uint64_t{18446744073709551615u}).end_object();
  CHECK(seed.str() == "{\"seed\":18446744073709551615}");
}

TEST_CASE("SVG ticks are round, cover the range, and plots render their series", "[cli]") {
  Rng rng(11);
  for (int i = 0; i < 500; ++i) {
    const double lo = (rng.uniform() - 0.5) * std::pow(10.0, static_cast<double>(rng.below(8)) - 3);
    const double hi = lo + rng.uniform() * std::pow(10.0, static_cast<double>(rng.below(8)) - 3);
    const std::vector<double> t = nice_ticks(lo, hi, 6);
    INFO(lo << " " << hi);
    REQUIRE(t.size() >= 2);
    REQUIRE(t.size() <= 12);
    const double step = t[1] - t[0];
    const double mant = step / std::pow(10.0, std::floor(std::log10(step) + 1e-9));
    CHECK((std::fabs(mant - 1) < 1e-6 || std::fabs(mant - 2) < 1e-6 || std::fabs(mant - 5) < 1e-6));
    CHECK(t.front() >= lo - 1e-9 * step);
    CHECK(t.front() < lo + step);
    CHECK(t.back() <= hi + 1e-9 * step + std::fabs(hi) * 1e-12);
  }
  CHECK(nice_ticks(0, 1, 6) == std::vector<double>{0, 0.2, 0.4, 0.6, 0.8, 1});
  CHECK(nice_ticks(0.97, 1.003, 8) == std::vector<double>{0.97, 0.975, 0.98, 0.985, 0.99, 0.995, 1});
  SvgPlot p;
  p.title("t <&>").line("a", {0, 1, 2}, {1, NAN, 3}).histogram("h", {0, 1, 2}, {4, 5}).vline(1, "v");
  const std::string svg = p.render();
  CHECK(count_of(svg, "<polyline") == 3);  // the NaN splits "a" in two, plus the histogram
  CHECK(svg.find("t &lt;&amp;&gt;") != std::string::npos);
  CHECK(svg.find("stroke-dasharray=\"6 4\"") != std::string::npos);
  CHECK_THROWS_AS(SvgPlot().line("bad", {0, 1}, {0}).render(), Error);
}
