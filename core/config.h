// The run configuration: every setting a user can give in YAML or with --set.
// configs/README.md documents each key, its default and its meaning; keep the two in step.
//
// YAML layout (each section optional):
//   model:   {n_layer, n_head, d_model, seq_len, vocab_size}
//   barrier: {lambda, eps, layers, positions}
//   data:    {train, val, format, tokenizer, vocab, val_fraction}
//   train:   {batch_size, grad_accum, steps, lr, min_lr_ratio, warmup, schedule, weight_decay,
//             beta1, beta2, adam_eps, grad_clip, seed, log_interval, eval_interval, eval_batches,
//             checkpoint_interval, out_dir, run_name, init}
//   device:  {backend, precision, threads, gpus}
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"

namespace blm {

struct ModelConfig {
  int n_layer = 4;
  int n_head = 4;
  int d_model = 128;
  int seq_len = 128;     // longest context T; the size of the position table
  int vocab_size = 256;  // 0 in YAML means "take it from the tokenizer"
  int head_dim() const { return d_model / n_head; }
  bool operator==(const ModelConfig& o) const {
    return n_layer == o.n_layer && n_head == o.n_head && d_model == o.d_model &&
           seq_len == o.seq_len && vocab_size == o.vocab_size;
  }
  bool operator!=(const ModelConfig& o) const { return !(*this == o); }
};

struct BarrierConfig {
  double lambda = 0.0;      // weight of the barrier R in L = CE + lambda R; 0 disables it
  double eps = 1e-4;        // where phi switches from -log x to its quadratic extension
  std::vector<int> layers;  // barrier layers; empty means every layer
  int positions = 0;        // 0: exact, every position t >= 2; K > 0: K sampled per sequence
  bool enabled() const { return lambda != 0.0; }
  bool applies_to(int layer) const {
    if (layers.empty()) return true;
    for (int l : layers)
      if (l == layer) return true;
    return false;
  }
};

struct DataConfig {
  std::string train;              // path of the training data (text, or a .bin token shard)
  std::string val;                // validation data; empty: the last val_fraction of train
  std::string format = "auto";    // auto | text | bin   (auto: by the file's magic number)
  std::string tokenizer = "byte"; // byte | char (text only) | gpt2 (text or .bin shards)
  std::string vocab;              // gpt2: the directory of encoder.json and vocab.bpe
  double val_fraction = 0.1;
};

struct TrainConfig {
  int batch_size = 16;  // sequences per optimizer step (over all GPUs and micro-batches)
  int grad_accum = 1;   // micro-batches per step
  int steps = 1000;
  double lr = 1e-3;
  double min_lr_ratio = 0.1;         // cosine/linear schedules end at lr * min_lr_ratio
  int warmup = 100;                  // linear warmup steps
  std::string schedule = "cosine";   // cosine | linear | constant
  double weight_decay = 0.1;         // decoupled, on matrices only
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double grad_clip = 1.0;            // global-norm clip; 0 disables
  uint64_t seed = 1337;
  int log_interval = 10;
  int eval_interval = 100;           // 0 disables periodic validation
  int eval_batches = 20;
  int checkpoint_interval = 500;     // 0: only at the end (and on interrupt)
  int keep_checkpoints = 0;          // N > 0: every N-th step's also kept, checkpoint_STEP.bin
  std::string out_dir = "runs";
  std::string run_name;              // empty: a timestamp
  // Weights to start from instead of random ones (fine-tuning): a barrierlm checkpoint or run
  // directory, or a Hugging Face GPT-2 directory / .safetensors file (cmd/hf_gpt2.h); empty: none.
  std::string init;
};

struct DeviceConfig {
  std::string backend = "auto";    // cpu | cuda | auto
  std::string precision = "auto";  // fp32 | bf16 | fp64 (cpu) | auto (bf16 on GPU, fp32 on CPU)
  int threads = 0;                 // CPU threads; 0: all cores
  int gpus = 1;                    // data-parallel GPUs on this machine
};

struct Config {
  ModelConfig model;
  BarrierConfig barrier;
  DataConfig data;
  TrainConfig train;
  DeviceConfig device;
};

// Throws ConfigError naming the problem (key, value, file:line where known).
void validate(const ModelConfig& m);
// The message when data.tokenizer is gpt2 without data.vocab, else "" (also checked by
// open_dataset, which takes a DataConfig alone).
std::string gpt2_vocab_problem(const DataConfig& d);
void validate(const Config& c);

// Reads a YAML file. Unknown keys, wrong types and out-of-range values are errors that name the
// key and its line.  Missing keys keep their defaults.  The overrides ("section.key=value", as
// apply_override) are applied before the checks that involve two keys, so a --set can mend a
// pair the file gets wrong; such an error names the --set or the file's line of a key in it.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides = {});
// Applies one "section.key=value" override (the value is parsed as YAML).
void apply_override(Config& c, const std::string& assignment);
// The whole config as YAML; parse_config(config_to_yaml(c)) == c.
std::string config_to_yaml(const Config& c);

}  // namespace blm
