// `barrierlm gradients` (developer tool): the loss terms and the full parameter gradient of one
// forward_backward, on a fixed batch, for cross-checking a backend against an independent
// implementation (scripts/crosscheck.py recomputes them with PyTorch autograd in float64).
//
// The batch is evaluation batch 0 of the file (data/dataset.h eval_batch): its first B
// non-overlapping windows, window r = tokens [r*T, r*T + T] (inputs the first T, targets the last
// T), tokenized with the checkpoint's tokenizer.  The objective is the checkpoint's,
// L = CE + lambda R with the exact barrier (every position t >= 2 counts, barrier.positions is
// ignored), lambda optionally replaced by --lambda; R is computed and reported even at
// lambda = 0 (it then adds no gradient).  Output files: see cmd/commands_dev.h.
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "cmd/cli_checks.h"
#include "cmd/commands.h"
#include "cmd/commands_dev.h"
#include "cmd/config_json.h"
#include "cmd/json.h"
#include "cmd/runs.h"
#include "cmd/util.h"
#include "core/backend.h"
#include "core/checkpoint.h"
#include "core/error.h"
#include "core/params.h"
#include "data/dataset.h"

namespace fs = std::filesystem;

namespace blm {

namespace {

// The batch the gradient is taken on: inputs and targets [B, T].
struct FixedBatch {
  int B = 0, T = 0;
  std::vector<int32_t> inputs, targets;
};

void check_options(const GradientsOptions& o) {
  if (o.data.empty()) throw UsageError("--data FILE is required (the text or .bin file to take the batch from)");
  if (o.out.empty()) throw UsageError("--out DIR is required (where batch.bin, grads.bin, result.json go)");
  if (o.batch < 1) throw UsageError("--batch must be at least 1, got " + std::to_string(o.batch));
  if (o.seq_len < 0) throw UsageError("--seq-len must be positive, got " + std::to_string(o.seq_len));
  if (o.have_lambda && !(std::isfinite(o.lambda) && o.lambda >= 0))
    throw UsageError("--lambda must be a finite number >= 0, got " + format_general(o.lambda, 6));
}

// The checkpoint's config with the command line's overrides: backend, precision, lambda, and the
// exact barrier (a sampled estimator would make the gradient depend on the sample).
Config gradients_config(const GradientsOptions& o, const Checkpoint& ck) {
  Config cfg = ck.config;
  cfg.device.backend = o.backend;
  cfg.device.precision = o.precision;
  cfg.device.threads = o.threads;
  cfg.device.gpus = 1;
  if (o.have_lambda) cfg.barrier.lambda = o.lambda;
  cfg.barrier.positions = 0;
  validate(cfg);
  return cfg;
}

int sequence_length(const GradientsOptions& o, const ModelConfig& m) {
  if (o.seq_len == 0) return m.seq_len;
  if (o.seq_len > m.seq_len)
    throw UsageError("--seq-len " + std::to_string(o.seq_len) + " exceeds the model's seq_len " +
                     std::to_string(m.seq_len) + " (the size of its position table)");
  return o.seq_len;
}

// Evaluation batch 0 of the file: its first B windows of T + 1 tokens.
FixedBatch first_batch(const GradientsOptions& o, const Checkpoint& ck, int T) {
  DataConfig dc = ck.config.data;
  dc.train = o.data;
  dc.val = o.data;  // the whole file; nothing is split off
  dc.format = "auto";
  const Dataset data = open_dataset(dc, T, ck.tokenizer);
  FixedBatch fb;
  fb.B = o.batch;
  fb.T = T;
  if (!eval_batch(*data.val, T, fb.B, 0, fb.inputs, fb.targets)) {
    const size_t windows = (data.val->size() - 1) / static_cast<size_t>(T);
    throw DataError("data file '" + o.data + "' holds " + std::to_string(windows) + " window" +
                    (windows == 1 ? "" : "s") + " of " + std::to_string(T) + " + 1 tokens; --batch " +
                    std::to_string(fb.B) + " needs " + std::to_string(fb.B) +
                    " (use a smaller --batch or --seq-len, or a longer file)");
  }
  return fb;
}

// 32-bit values as little-endian bytes, whatever the host's byte order.
void append_le32(std::string& out, uint32_t bits) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((bits >> (8 * i)) & 0xFFu));
}

std::string int32_bytes(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  std::string out;
  out.reserve(4 * (a.size() + b.size()));
  for (int32_t v : a) append_le32(out, static_cast<uint32_t>(v));
  for (int32_t v : b) append_le32(out, static_cast<uint32_t>(v));
  return out;
}

std::string float32_bytes(const std::vector<float>& v) {
  std::string out;
  out.reserve(4 * v.size());
  for (float x : v) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    append_le32(out, bits);
  }
  return out;
}

std::string result_json(const GradientsOptions& o, const std::string& ck_path, const Checkpoint& ck,
                        const Config& cfg, const Backend& backend, const FixedBatch& fb,
                        const LossTerms& t, double grad_norm) {
  const ModelConfig& m = cfg.model;
  JsonWriter j(true);
  j.begin_object()
      .kv("tool", "barrierlm gradients")
      .kv("checkpoint", ck_path)
      .kv("step", ck.step)
      .kv("data", o.data)
      .kv("backend", backend.name())
      .kv("precision", o.precision)
      .kv("B", fb.B)
      .kv("T", fb.T)
      .kv("loss", t.loss)
      .kv("ce", t.ce)
      .kv("barrier", t.barrier)
      .kv("min_logdet", t.barrier_terms > 0 ? t.min_logdet : NAN)  // none counted: null
      .kv("barrier_terms", t.barrier_terms)
      .kv("tokens", t.tokens)
      .kv("lambda", cfg.barrier.lambda)
      .kv("eps", cfg.barrier.eps);
  j.key("barrier_layers").numbers(barrier_layer_list(cfg));
  j.kv("grad_norm", grad_norm);
  model_shape_json(j.key("model"), m);
  j.kv("batch_file", "batch.bin").kv("grads_file", "grads.bin");
  const ParamLayout layout(m);
  j.kv("num_params", static_cast<int64_t>(layout.total()));
  j.key("layout").begin_array();
  for (const TensorSpec& s : layout.tensors()) {
    std::vector<double> shape(s.shape.begin(), s.shape.end());
    j.begin_object().kv("name", s.name);
    j.key("shape").numbers(shape);
    j.kv("offset", static_cast<int64_t>(s.offset)).end_object();
  }
  j.end_array().end_object();
  return j.str() + "\n";
}

void make_output_dir(const std::string& dir) {
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw Error("--out '" + dir + "' exists and is not a directory");
  fs::create_directories(dir, ec);
  if (ec) throw Error("cannot create output directory '" + dir + "': " + ec.message());
}

}  // namespace

CLI::App* add_gradients_command(CLI::App& app, GradientsOptions& o) {
  auto* cmd = app.add_subcommand(
      "gradients",
      "Developer tool for cross-checks: one forward_backward of a checkpoint's model on the first "
      "--batch windows of a file (exact barrier, the checkpoint's lambda or --lambda); writes "
      "DIR/batch.bin (int32 inputs then targets, [B, T] each), DIR/grads.bin (float32 gradient in "
      "the parameter layout) and DIR/result.json (loss terms, config, layout).  "
      "scripts/crosscheck.py compares them with PyTorch autograd.");
  cmd->add_option("CHECKPOINT", o.checkpoint, "checkpoint file, or a run directory holding checkpoint.bin")
      ->required();
  cmd->add_option("--data", o.data, "text or .bin file; the batch is its first B windows (required)")
      ->required();
  cmd->add_option("--batch", o.batch, "sequences B (default: 4)")->check(positive_number());
  cmd->add_option("--seq-len", o.seq_len, "sequence length T (default: the model's seq_len)")
      ->check(positive_number());
  cmd->add_option_function<double>(
      "--lambda", [&o](const double& v) { o.lambda = v; o.have_lambda = true; },
      "barrier weight (default: the checkpoint's barrier.lambda)");
  cmd->add_option("--backend", o.backend, "cpu or cuda (default: cpu)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--precision", o.precision, "fp32 or fp64 (fp64: CPU only; default: fp32)")
      ->check(CLI::IsMember({"fp32", "fp64"}));
  cmd->add_option("--threads", o.threads, "CPU threads (default: 0 = all cores)")
      ->check(non_negative_number());
  cmd->add_option("--out", o.out, "output directory (created when missing; required)")->required();
  return cmd;
}

int run_gradients(const GradientsOptions& o) {
  check_options(o);
  const std::string ck_path = resolve_checkpoint_path(o.checkpoint);
  const Checkpoint ck = load_checkpoint(ck_path);
  const Config cfg = gradients_config(o, ck);
  const int T = sequence_length(o, cfg.model);
  FixedBatch fb = first_batch(o, ck, T);
  make_output_dir(o.out);

  std::unique_ptr<Backend> backend = make_backend(cfg);
  backend->set_parameters(ck.params);
  ForwardOptions opts;
  opts.report_barrier = true;  // R and min log det also at lambda = 0
  const LossTerms terms =
      backend->forward_backward(Batch{fb.B, fb.T, fb.inputs.data(), fb.targets.data()}, opts);
  const double norm = backend->grad_norm();
  std::vector<float> grads;
  backend->get_gradients(grads);

  write_file_atomic(join_path(o.out, "batch.bin"), int32_bytes(fb.inputs, fb.targets));
  write_file_atomic(join_path(o.out, "grads.bin"), float32_bytes(grads));
  write_file_atomic(join_path(o.out, "result.json"),
                    result_json(o, ck_path, ck, cfg, *backend, fb, terms, norm));
  std::printf("barrierlm gradients: %s on %d x %d tokens (%s), lambda %s\n", ck_path.c_str(), fb.B,
              fb.T, backend->name().c_str(), format_general(cfg.barrier.lambda, 6).c_str());
  std::printf("loss %s  ce %s  barrier %s  min log det %s  |grad| %s\n",
              format_general(terms.loss, 10).c_str(), format_general(terms.ce, 10).c_str(),
              format_general(terms.barrier, 10).c_str(),
              terms.barrier_terms > 0 ? format_general(terms.min_logdet, 6).c_str() : "-",
              format_general(norm, 6).c_str());
  std::printf("wrote %s (batch.bin, grads.bin, result.json)\n", dir_display(o.out).c_str());
  return 0;
}

}  // namespace blm
