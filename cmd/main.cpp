// barrierlm: the command line (CLI11).  Subcommands train, eval, margins, sample, tokenize,
// export, bench, report, and the developer tool gradients.
//
// Exit status: 0 success; 1 an error the user can fix (one line "barrierlm: error: ..."), which
// includes a diverged training run; 2 a usage error (CLI11's message); 130 training interrupted
// by SIGINT / SIGTERM after saving a checkpoint.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "cmd/cli_checks.h"
#include "cmd/commands.h"
#include "cmd/commands_bench.h"
#include "cmd/commands_dev.h"
#include "cmd/commands_report.h"
#include "cmd/trainer.h"
#include "cmd/util.h"
#include "core/error.h"

namespace {

using namespace blm;

const char* kDescription =
    "barrierlm: train and evaluate GPT-style language models with the support-token / "
    "stability-margin barrier objective L = CE + lambda * mean(phi(det J_t)).";

// reads_data: the command takes --data (a Hugging Face directory has no data of its own).
void add_model_options(CLI::App* cmd, ModelOptions& m, bool checkpoint_optional,
                       bool reads_data = true) {
  const std::string hf = std::string("Hugging Face GPT-2 directory (config.json and "
                                     "model.safetensors, with its tokenizer files when it has "
                                     "them") + (reads_data ? "; evaluated with --data)" : ")");
  auto* ck = cmd->add_option("CHECKPOINT", m.checkpoint,
                             "checkpoint file, a run directory holding checkpoint.bin, or a " + hf)
                ->check(non_empty_path());
  if (checkpoint_optional) {
    cmd->add_option("--runs", m.runs_dir,
                    "where to find the latest run when no CHECKPOINT is given (default: runs)")
        ->check(non_empty_path());
  } else {
    ck->required();
  }
  cmd->add_option("--backend", m.backend, "cpu, cuda or auto (default: auto)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cmd->add_option("--threads", m.threads, "CPU threads (default: 0 = all cores)")
      ->check(non_negative_number());
}

CLI::App* add_train(CLI::App& app, TrainOptions& o, std::string& config_flag) {
  auto* cmd = app.add_subcommand(
      "train",
      "Train a model from a YAML config.  Writes out_dir/run_name/ (config.yaml, metrics.jsonl, "
      "curves.svg, checkpoint.bin) and points out_dir/latest at it.  Ctrl-C finishes the current "
      "step, saves a checkpoint and exits 130; --resume continues exactly where it stopped.");
  cmd->add_option("CONFIG", o.config_path,
                  "YAML config (configs/README.md lists every key); may be left out with "
                  "--resume RUN_DIR, which then uses the run's own config.yaml");
  cmd->add_option("--config", config_flag, "the same as CONFIG");
  cmd->add_option("--set", o.overrides,
                  "override one config key, e.g. --set train.lr=3e-4 (repeatable)")
      ->allow_extra_args(false);
  cmd->add_option("--resume", o.resume_from,
                  "continue a run from its checkpoint: a run directory or checkpoint file; with "
                  "no value, out_dir/run_name when the config names one, else out_dir/latest.  "
                  "Model keys must match the checkpoint; the losses repeat the uninterrupted run's "
                  "bit for bit")
      ->expected(0, 1);
  cmd->add_flag("--rewind", o.rewind,
                "with --resume CHECKPOINT older than its run's checkpoint.bin (a kept "
                "checkpoint_STEP.bin): go back to it, replacing checkpoint.bin and the metrics "
                "after its step");
  cmd->add_option("--until", o.until,
                  "stop after this optimizer step and save (continue later with --resume)")
      ->check(positive_number());
  cmd->add_flag("--quiet,-q", o.quiet, "no progress lines; only the final summary");
  cmd->add_option("--gpus", o.gpus,
                  "train data-parallel on N GPUs of this machine, one worker process per GPU "
                  "(the same as --set device.gpus=N; README: Multi-GPU and multi-node)")
      ->check(CLI::Range(1, 1024));
  return cmd;
}

CLI::App* add_eval(CLI::App& app, EvalOptions& o) {
  auto* cmd = app.add_subcommand(
      "eval",
      "Evaluate a checkpoint under embedding noise: e_t += N(0, s^2) for each noise level s. "
      "Reports cross-entropy (nats/token), bits per byte (from the text of the tokens scored), "
      "top-1 accuracy, their spread over noise draws with fixed seeds, and the degradation "
      "against clean data.  With no "
      "CHECKPOINT it evaluates the latest run in runs/ (see --runs).");
  add_model_options(cmd, o.model, true);
  cmd->add_option("--noise", o.noise,
                  "comma-separated noise standard deviations, each at most 1e6 (default: "
                  "0,0.05,0.1,0.2); the clean level 0 is always included");
  cmd->add_option("--draws", o.draws, "noise draws per level (default: 5)")
      ->check(positive_number());
  cmd->add_option("--data", o.data,
                  "evaluate on this file (text or .bin) instead of the run's validation data")
      ->check(non_empty_path());
  cmd->add_option("--batches", o.batches,
                  "evaluation batches of train.batch_size sequences, the unit of "
                  "train.eval_batches whatever train.grad_accum (default: the run's "
                  "train.eval_batches)")
      ->check(positive_number());
  cmd->add_option("--seed", o.seed, "seed of the noise draws (default: 1234)")
      ->check(no_minus_sign());
  cmd->add_flag("--json", o.json, "write the results as JSON to stdout (or to --out)");
  cmd->add_option("--out", o.out, "write the JSON results to this file (atomically)")
      ->check(non_empty_path());
  cmd->add_option("--plot", o.plot,
                  "also draw CE against the noise level into this SVG file (mean over the "
                  "draws, with their smallest and largest)")
      ->check(non_empty_path());
  return cmd;
}

CLI::App* add_margins(CLI::App& app, MarginsOptions& o, CLI::Option*& text_opt) {
  auto* cmd = app.add_subcommand(
      "margins",
      "Stability margins of a checkpoint: for every layer, head and position the margin "
      "sigma_min(J_t) (distance to the degeneracy boundary det J_t = 0) and log det J_t; token "
      "margins (min over barrier layers and heads), support tokens (the smallest) and sequence "
      "margins.  Writes margins.json, margins.csv, margins_hist.svg and margins_strip.html.");
  add_model_options(cmd, o.model, false);
  auto* data = cmd->add_option("--data", o.data,
                               "analyse this file (default: the run's validation data)")
                   ->check(non_empty_path());
  text_opt = cmd->add_option("--text", o.text, "analyse this text instead of a file");
  data->excludes(text_opt);
  cmd->add_option("--sequences", o.sequences, "sequences of seq_len tokens (default: 8)")
      ->check(positive_number());
  cmd->add_option("--top", o.top, "support tokens to list (default: 20)")
      ->check(non_negative_number());
  cmd->add_option("--tau", o.tau, "margin threshold: positions below it are listed (default: 0.25)")
      ->check(non_negative_number());
  cmd->add_option("--out", o.out, "output directory (default: margins/ next to the checkpoint)")
      ->check(non_empty_path());
  return cmd;
}

CLI::App* add_sample(CLI::App& app, SampleOptions& o) {
  auto* cmd = app.add_subcommand("sample", "Generate text from a checkpoint.");
  add_model_options(cmd, o.model, false, /*reads_data=*/false);
  cmd->add_option("--prompt", o.prompt, "text to continue (default: start from a newline)");
  cmd->add_option("--tokens", o.tokens, "tokens to generate (default: 200)")
      ->check(non_negative_number());
  cmd->add_option("--temperature", o.temperature, "softmax temperature, 0 = greedy (default: 0.8)")
      ->check(non_negative_number());
  cmd->add_option("--top-k", o.top_k, "sample among the k most likely tokens, 0 = all (default: 0)")
      ->check(non_negative_number());
  cmd->add_option("--seed", o.seed, "sampling seed (default: 1)")->check(no_minus_sign());
  cmd->add_flag("--ignore-eot", o.ignore_eot,
                "gpt2 tokenizer: go on past <|endoftext|> (by default the text ends there; with "
                "no --prompt it starts after one)");
  return cmd;
}

CLI::App* add_tokenize(CLI::App& app, TokenizeOptions& o) {
  auto* cmd = app.add_subcommand(
      "tokenize",
      "Encode text files into .bin token shards (the llm.c / nanoGPT format data.train and "
      "data.val read), once, on every core: each file is one document, with GPT-2's tokenizer "
      "preceded by <|endoftext|>.  Shards are written atomically; with --shard-tokens N they are "
      "OUT_000000.bin, OUT_000001.bin, ... of N tokens (the last one shorter), which the "
      "pattern OUT_*.bin reads in order.");
  cmd->add_option("INPUT", o.inputs,
                  "text files, in the order their tokens are written; - is standard input "
                  "(e.g. zstd -dc corpus.zst | barrierlm tokenize - -o OUT.bin)")
      ->required();
  cmd->add_option("--out,-o", o.out, "the .bin file to write (or the stem of the shards)")
      ->required()
      ->check(non_empty_path());
  cmd->add_option("--tokenizer", o.tokenizer, "gpt2 or byte (default: gpt2)");
  cmd->add_option("--vocab", o.vocab,
                  "gpt2: the directory of encoder.json and vocab.bpe (default: data/gpt2, "
                  "where scripts/get-data.sh --gpt2-vocab puts them)")
      ->check(non_empty_path());
  cmd->add_option("--shard-tokens", o.shard_tokens,
                  "tokens a shard (e.g. 100000000); default 0: one file")
      ->check(non_negative_number());
  cmd->add_flag("--no-eot", o.no_eot, "gpt2: no <|endoftext|> before each file");
  cmd->add_option("--threads", o.threads, "encoding threads (default: 0 = all cores)")
      ->check(non_negative_number());
  cmd->add_flag("--quiet,-q", o.quiet, "no progress line; only the summary");
  return cmd;
}

CLI::App* add_export(CLI::App& app, ExportOptions& o) {
  auto* cmd = app.add_subcommand(
      "export",
      "Write a checkpoint as a Hugging Face GPT-2 model directory (config.json, "
      "model.safetensors, and with the gpt2 tokenizer vocab.json and merges.txt) that "
      "transformers' GPT2LMHeadModel.from_pretrained and tools built on it read: barrierlm's "
      "model is GPT-2's architecture.  With no CHECKPOINT it exports the latest run in runs/.");
  cmd->add_option("CHECKPOINT", o.checkpoint,
                  "checkpoint file, a run directory holding checkpoint.bin, or a Hugging Face "
                  "GPT-2 directory (written again, e.g. in bfloat16)")
      ->check(non_empty_path());
  cmd->add_option("--runs", o.runs_dir,
                  "where to find the latest run when no CHECKPOINT is given (default: runs)")
      ->check(non_empty_path());
  cmd->add_option("--out,-o", o.out, "the directory to write (created when missing)")
      ->required()
      ->check(non_empty_path());
  cmd->add_option("--dtype", o.dtype, "float32 or bfloat16 (default: float32)");
  return cmd;
}

// `train --resume config.yaml` makes CLI11 take the config as the resume value.
void fix_resume_swallowing_config(TrainOptions& o) {
  const std::string& r = o.resume_from;
  const auto ends_with = [&](const char* suffix) {
    const std::string s(suffix);
    return r.size() >= s.size() && r.compare(r.size() - s.size(), s.size(), s) == 0;
  };
  if (o.config_path.empty() && (ends_with(".yaml") || ends_with(".yml"))) {
    o.config_path = r;
    o.resume_from.clear();
  }
}

int run(int argc, char** argv) {
  CLI::App app{kDescription, "barrierlm"};
  app.require_subcommand(1);
  TrainOptions train;
  std::string config_flag;  // train --config FILE, an alias of the CONFIG positional
  EvalOptions eval;
  MarginsOptions margins;
  SampleOptions sample;
  CLI::Option* text_opt = nullptr;
  auto* train_cmd = add_train(app, train, config_flag);
  auto* resume_opt = train_cmd->get_option("--resume");
  auto* eval_cmd = add_eval(app, eval);
  auto* margins_cmd = add_margins(app, margins, text_opt);
  auto* sample_cmd = add_sample(app, sample);
  TokenizeOptions tokenize;
  auto* tokenize_cmd = add_tokenize(app, tokenize);
  ExportOptions export_options;
  auto* export_cmd = add_export(app, export_options);
  BenchOptions bench;  // step timing (cmd/commands_bench.h)
  auto* bench_cmd = add_bench_command(app, bench);
  ReportOptions report;  // the study report (cmd/commands_report.h)
  auto* report_cmd = add_report_command(app, report);
  GradientsOptions gradients;  // developer tool (cmd/commands_dev.h): listed last in --help
  auto* gradients_cmd = add_gradients_command(app, gradients);
  // CLI11 would answer "A subcommand is required" to a misspelt command; name it instead.  The
  // list comes from the registered commands, in --help's order, so that it cannot miss one.
  std::vector<std::string> commands;
  for (const CLI::App* c : static_cast<const CLI::App&>(app).get_subcommands({}))
    commands.push_back(c->get_name());
  const std::string first = argc > 1 ? argv[1] : "";
  if (!first.empty() && first[0] != '-' &&
      std::find(commands.begin(), commands.end(), first) == commands.end()) {
    std::string names;
    for (size_t i = 0; i < commands.size(); ++i)
      names += (i == 0 ? "" : i + 1 == commands.size() ? " or " : ", ") + commands[i];
    std::fprintf(stderr,
                 "barrierlm: error: unknown command '%s' (expected %s)\n"
                 "Run with --help for more information.\n",
                 argv[1], names.c_str());
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints help (rc 0) or the usage error
    return rc == 0 ? 0 : 2;
  }
  try {
    if (train_cmd->parsed()) {
      if (!config_flag.empty()) {
        if (!train.config_path.empty() && train.config_path != config_flag)
          throw UsageError("two configs given: '" + train.config_path + "' and --config '" +
                           config_flag + "'");
        train.config_path = config_flag;
      }
      train.resume = resume_opt->count() > 0;
      fix_resume_swallowing_config(train);
      return run_train(train);
    }
    if (eval_cmd->parsed()) return run_eval(eval);
    if (margins_cmd->parsed()) {
      margins.have_text = text_opt->count() > 0;
      return run_margins(margins);
    }
    if (sample_cmd->parsed()) return run_sample(sample);
    if (tokenize_cmd->parsed()) return run_tokenize(tokenize);
    if (export_cmd->parsed()) return run_export(export_options);
    if (gradients_cmd->parsed()) return run_gradients(gradients);
    if (report_cmd->parsed()) return run_report(report);
    if (bench_cmd->parsed()) return run_bench(bench);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "barrierlm: error: %s\nRun with --help for more information.\n", e.what());
    return 2;
  } catch (const Error& e) {
    std::fprintf(stderr, "barrierlm: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "barrierlm: error: out of memory (try a smaller model or batch)\n");
    return 1;
  } catch (const std::exception& e) {
    // Not a blm::Error: a bug or an unexpected library failure; still one line.
    std::fprintf(stderr, "barrierlm: error: internal error: %s\n", e.what());
    return 1;
  }
  return 2;
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }
