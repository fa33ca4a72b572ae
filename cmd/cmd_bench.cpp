// `barrierlm bench`: times the training step (forward_backward + grad_norm + adamw_step) on
// random tokens and reports step time, tokens/s, FLOP rate and the device memory the backend
// holds.  What a step is and what each figure means: cmd/commands_bench.h.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#if BLM_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include "cmd/cli_checks.h"
#include "cmd/commands_bench.h"
#include "cmd/config_json.h"
#include "cmd/json.h"
#include "cmd/positions.h"
#include "cmd/util.h"
#include "core/backend.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/error.h"
#include "core/optim.h"
#include "core/params.h"
#include "core/rng.h"

namespace blm {

namespace {

// Distinct random batches the steps cycle through (generated before timing starts).
constexpr int kBatches = 4;
// Separates the token stream from the parameter initialiser's for the same seed.
constexpr uint64_t kTokenStream = 0x62656e63;  // "benc"

// ------------------------------------------------------------------ device memory
// Bytes in use on device 0 (total - free), or -1 when there is no usable CUDA device.  Reading
// it also creates the CUDA context, so the first call is the baseline that excludes the context.
int64_t device_bytes_in_use() {
#if BLM_HAVE_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();  // "no device" is an answer here, not a failure to carry along
    return -1;
  }
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return static_cast<int64_t>(total_b - free_b);
#else
  return -1;
#endif
}

// Waits for every queued kernel, so a wall-clock interval covers the device work of the step.
// (adamw_step already synchronises the backend's stream; this also covers any other stream.)
void device_synchronize() {
#if BLM_HAVE_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) == cudaSuccess && n > 0) {
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess)
      throw DeviceError(std::string("cudaDeviceSynchronize after a bench step: ") +
                        cudaGetErrorString(e));
  } else {
    cudaGetLastError();
  }
#endif
}

// ------------------------------------------------------------------ setup
Config bench_config(const BenchOptions& o) {
  if (o.steps < 1) throw UsageError("--steps must be at least 1, got " + std::to_string(o.steps));
  if (o.warmup < 0) throw UsageError("--warmup must be >= 0, got " + std::to_string(o.warmup));
  Config cfg = load_config(o.config_path, o.overrides);
  if (cfg.model.vocab_size == 0) {
    // "From the tokenizer": only the byte tokenizer's size is known without reading data.
    if (cfg.data.tokenizer != "byte")
      throw ConfigError(o.config_path + ": model.vocab_size is 0 (from the tokenizer); bench "
                        "reads no data, so set it, e.g. --set model.vocab_size=" +
                        (cfg.data.tokenizer == "gpt2" ? "50257" : "256"));
    cfg.model.vocab_size = 256;
  }
  validate(cfg);
  validate_schedule(cfg.train);
  return cfg;
}

// Batches of random token ids in [0, V): inputs and targets [B, T] each, kBatches of them.
struct RandomBatches {
  int B = 0, T = 0;
  std::vector<std::vector<int32_t>> inputs, targets;
};

RandomBatches make_batches(const ModelConfig& m, int B, uint64_t seed) {
  RandomBatches rb;
  rb.B = B;
  rb.T = m.seq_len;
  const size_t n = static_cast<size_t>(B) * m.seq_len;
  const uint64_t key = hash2(seed, kTokenStream);
  for (int k = 0; k < kBatches; ++k) {
    std::vector<int32_t> in(n), tg(n);
    for (size_t i = 0; i < n; ++i) {
      in[i] = static_cast<int32_t>(hash2(key, (2 * k) * n + i) % static_cast<uint64_t>(m.vocab_size));
      tg[i] = static_cast<int32_t>(hash2(key, (2 * k + 1) * n + i) % static_cast<uint64_t>(m.vocab_size));
    }
    rb.inputs.push_back(std::move(in));
    rb.targets.push_back(std::move(tg));
  }
  return rb;
}

// ------------------------------------------------------------------ one step
struct StepRecord {
  double seconds = 0;
  double loss = 0, ce = 0, barrier = 0, grad_norm = 0;
};

// One optimizer step as the trainer takes it (cmd/trainer.cpp Trainer::step), timed.
StepRecord timed_step(Backend& backend, const Config& cfg, const RandomBatches& rb, int64_t step) {
  const int accum = cfg.train.grad_accum, T = rb.T;
  const int Bm = rb.B / accum;
  std::vector<uint8_t> mask;
  StepRecord r;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < accum; ++i) {
    const int k = static_cast<int>((step * accum + i) % kBatches);
    const size_t row0 = static_cast<size_t>(i) * Bm * T;
    ForwardOptions fo;
    if (cfg.barrier.positions > 0 && cfg.barrier.enabled()) {
      sample_barrier_mask(cfg.train.seed, step, i * Bm, Bm, T, cfg.barrier.positions, mask);
      fo.barrier_mask = mask.data();
    }
    fo.grad_scale = 1.0f / static_cast<float>(accum);
    fo.accumulate = i > 0;
    const LossTerms lt = backend.forward_backward(
        Batch{Bm, T, rb.inputs[k].data() + row0, rb.targets[k].data() + row0}, fo);
    r.loss += lt.loss / accum;
    r.ce += lt.ce / accum;
    r.barrier += lt.barrier / accum;
  }
  r.grad_norm = backend.grad_norm();
  AdamWHyper h;
  h.beta1 = cfg.train.beta1;
  h.beta2 = cfg.train.beta2;
  h.eps = cfg.train.adam_eps;
  h.weight_decay = cfg.train.weight_decay;
  backend.adamw_step(h, cfg.train.lr, clip_scale(r.grad_norm, cfg.train.grad_clip));
  device_synchronize();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!std::isfinite(r.loss) || !std::isfinite(r.grad_norm))
    throw DivergenceError("bench step " + std::to_string(step + 1) + ": loss " +
                          format_general(r.loss) + ", gradient norm " +
                          format_general(r.grad_norm) +
                          " (not finite: the timings would mean nothing; lower train.lr)");
  return r;
}

// ------------------------------------------------------------------ results
struct BenchResult {
  Config cfg;
  std::string backend;
  std::vector<StepRecord> steps;  // the timed ones
  double median_s = 0, min_s = 0, max_s = 0, mean_s = 0;
  int64_t tokens_per_step = 0;
  double tokens_per_s = 0;
  double flops_per_token = 0, tflops = 0, mfu = 0;
  int64_t params = 0;
  int64_t mem_baseline = -1, mem_peak = -1;  // device bytes in use; -1: no CUDA device
};

// 6N + 6 L d T: forward + backward of every parameter (6N) and causal attention's QK^T and PV
// products (12 L d T for full attention, halved by the causal mask).
double flops_per_token(const ModelConfig& m) {
  return 6.0 * static_cast<double>(count_parameters(m)) +
         6.0 * m.n_layer * static_cast<double>(m.d_model) * m.seq_len;
}

void summarise(BenchResult& r, double peak_tflops) {
  std::vector<double> t;
  for (const StepRecord& s : r.steps) t.push_back(s.seconds);
  std::sort(t.begin(), t.end());
  r.median_s = quantile_sorted(t, 0.5);
  r.min_s = t.front();
  r.max_s = t.back();
  r.mean_s = mean_of(t);
  r.tokens_per_step = static_cast<int64_t>(r.cfg.train.batch_size) * r.cfg.model.seq_len;
  r.tokens_per_s = r.tokens_per_step / r.median_s;
  r.params = static_cast<int64_t>(count_parameters(r.cfg.model));
  r.flops_per_token = flops_per_token(r.cfg.model);
  r.tflops = r.flops_per_token * r.tokens_per_s / 1e12;
  r.mfu = peak_tflops > 0 ? r.tflops / peak_tflops : 0;
}

std::string result_json(const BenchOptions& o, const BenchResult& r) {
  const ModelConfig& m = r.cfg.model;
  JsonWriter j(true);
  j.begin_object()
      .kv("tool", "barrierlm bench")
      .kv("config", o.config_path)
      .kv("backend", r.backend)
      .kv("precision", r.cfg.device.precision);
  model_shape_json(j.key("model"), m);
  j.kv("batch_size", r.cfg.train.batch_size)
      .kv("grad_accum", r.cfg.train.grad_accum)
      .kv("lambda", r.cfg.barrier.lambda)
      .kv("positions", r.cfg.barrier.positions)
      .kv("barrier_eps", r.cfg.barrier.eps);
  j.key("barrier_layers").numbers(barrier_layer_list(r.cfg));
  j.kv("lr", r.cfg.train.lr)
      .kv("beta1", r.cfg.train.beta1)
      .kv("beta2", r.cfg.train.beta2)
      .kv("adam_eps", r.cfg.train.adam_eps)
      .kv("weight_decay", r.cfg.train.weight_decay)
      .kv("grad_clip", r.cfg.train.grad_clip)
      .kv("seed", o.seed)
      .kv("warmup_steps", o.warmup)
      .kv("steps", static_cast<int>(r.steps.size()))
      .kv("step_ms_median", r.median_s * 1e3)
      .kv("step_ms_min", r.min_s * 1e3)
      .kv("step_ms_max", r.max_s * 1e3)
      .kv("step_ms_mean", r.mean_s * 1e3)
      .kv("tokens_per_step", r.tokens_per_step)
      .kv("tokens_per_s", r.tokens_per_s)
      .kv("params", r.params)
      .kv("flops_per_token", r.flops_per_token)
      .kv("tflops", r.tflops);
  if (o.peak_tflops > 0) j.kv("peak_tflops", o.peak_tflops).kv("mfu", r.mfu);
  if (r.mem_peak >= 0)
    j.kv("peak_memory_bytes", r.mem_peak - r.mem_baseline).kv("device_bytes_in_use", r.mem_peak);
  else
    j.key("peak_memory_bytes").null();
  std::vector<double> ms, loss, barrier;
  for (const StepRecord& s : r.steps) {
    ms.push_back(s.seconds * 1e3);
    loss.push_back(s.loss);
    barrier.push_back(s.barrier);
  }
  j.key("step_ms").numbers(ms);
  j.key("loss").numbers(loss);
  if (r.cfg.barrier.enabled()) j.key("barrier").numbers(barrier);
  j.end_object();
  return j.str() + "\n";
}

void print_summary(const BenchOptions& o, const BenchResult& r) {
  const ModelConfig& m = r.cfg.model;
  std::printf("barrierlm bench: %s\n", r.backend.c_str());
  std::printf("  model     L=%d H=%d d=%d T=%d V=%d (%s parameters), batch %d (grad_accum %d)\n",
              m.n_layer, m.n_head, m.d_model, m.seq_len, m.vocab_size,
              format_rate(static_cast<double>(r.params)).c_str(), r.cfg.train.batch_size,
              r.cfg.train.grad_accum);
  if (r.cfg.barrier.enabled())
    std::printf("  barrier   lambda %g, %s\n", r.cfg.barrier.lambda,
                barrier_positions_label(r.cfg.barrier.positions, m.seq_len).c_str());
  else
    std::printf("  barrier   off (lambda 0)\n");
  std::printf("  steps     %zu timed after %d warmup; loss %s -> %s\n", r.steps.size(), o.warmup,
              format_general(r.steps.front().loss, 6).c_str(),
              format_general(r.steps.back().loss, 6).c_str());
  std::printf("  step      median %.3f ms (min %.3f, max %.3f, mean %.3f)\n", r.median_s * 1e3,
              r.min_s * 1e3, r.max_s * 1e3, r.mean_s * 1e3);
  std::printf("  speed     %s tokens/s, %.1f TFLOP/s model (%s FLOP/token)",
              format_rate(r.tokens_per_s).c_str(), r.tflops,
              format_general(r.flops_per_token, 4).c_str());
  if (o.peak_tflops > 0) std::printf(", MFU %.1f%% of %g TFLOP/s", 100 * r.mfu, o.peak_tflops);
  std::printf("\n");
  if (r.mem_peak >= 0)
    std::printf("  memory    %.3f GiB held by the backend (%.3f GiB in use on the device)\n",
                (r.mem_peak - r.mem_baseline) / 1073741824.0, r.mem_peak / 1073741824.0);
}

}  // namespace

CLI::App* add_bench_command(CLI::App& app, BenchOptions& o) {
  auto* cmd = app.add_subcommand(
      "bench",
      "Time the training step (forward_backward + gradient norm + AdamW, as train does) on "
      "random tokens with the config's model, barrier, batch and device; prints the median step "
      "time, tokens/s, model TFLOP/s (6N + 6LdT FLOPs per token) and the device memory held.  "
      "scripts/bench.sh compares it with PyTorch.");
  cmd->add_option("CONFIG", o.config_path, "YAML config (configs/README.md)")->required();
  cmd->add_option("--set", o.overrides, "override one config key, e.g. --set device.precision=fp32")
      ->allow_extra_args(false);
  cmd->add_option("--steps", o.steps, "timed steps (default: 20)")->check(positive_number());
  cmd->add_option("--warmup", o.warmup, "untimed steps first (default: 5)")
      ->check(non_negative_number());
  cmd->add_option("--peak-tflops", o.peak_tflops,
                  "the device's measured peak TFLOP/s: also report MFU")
      ->check(non_negative_number());
  cmd->add_option("--seed", o.seed, "seed of the random tokens and parameters (default: 1)")
      ->check(no_minus_sign());
  cmd->add_flag("--json", o.json, "write the results as JSON to stdout instead of the summary");
  cmd->add_option("--out", o.out, "also write the JSON results to this file (atomically)")
      ->check(non_empty_path());
  return cmd;
}

int run_bench(const BenchOptions& o) {
  BenchResult r;
  r.cfg = bench_config(o);
  if (!o.out.empty()) check_output_file(o.out);  // before the timed steps, not after them
  refuse_output_over("--out", o.out, {{"the config", o.config_path}});
  if (r.cfg.train.batch_size % r.cfg.train.grad_accum != 0)
    throw ConfigError("train.batch_size " + std::to_string(r.cfg.train.batch_size) +
                      " is not a multiple of train.grad_accum " +
                      std::to_string(r.cfg.train.grad_accum));
  const RandomBatches rb = make_batches(r.cfg.model, r.cfg.train.batch_size, o.seed);
  r.mem_baseline = device_bytes_in_use();  // also creates the CUDA context (not counted)
  std::unique_ptr<Backend> backend = make_backend(r.cfg);
  r.backend = backend->name();
  const bool on_gpu = r.backend.rfind("cuda", 0) == 0;
  if (!on_gpu) r.mem_baseline = -1;
  backend->set_parameters(init_parameters(ParamLayout(r.cfg.model), o.seed));
  for (int64_t s = 0; s < o.warmup + o.steps; ++s) {
    const StepRecord rec = timed_step(*backend, r.cfg, rb, s);
    if (s >= o.warmup) r.steps.push_back(rec);
    if (on_gpu && r.mem_baseline >= 0) r.mem_peak = std::max(r.mem_peak, device_bytes_in_use());
  }
  summarise(r, o.peak_tflops);
  const std::string json = result_json(o, r);
  if (!o.out.empty()) write_file_atomic(o.out, json);
  if (o.json)
    std::fputs(json.c_str(), stdout);
  else
    print_summary(o, r);
  return 0;
}

}  // namespace blm
