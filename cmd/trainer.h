// `barrierlm train`: the training loop.  Reads a config, builds the data, the backend and the
// model, runs train.steps AdamW steps of L = CE + lambda R with gradient accumulation, validates
// every eval_interval steps, checkpoints every checkpoint_interval steps, at the end and on
// SIGINT / SIGTERM, and resumes a run bit for bit from its checkpoint.
//
// Data parallel: with --gpus N (or device.gpus = N) the program starts N workers of itself, one
// per GPU (cmd/launcher.h); under an external launcher (torchrun-style variables, mpirun, srun:
// core/dist_env.h) this process is one worker.  The workers split every global batch
// (cmd/data_parallel.h), average their gradients through NCCL, and rank 0 alone logs,
// validates and checkpoints.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace blm {

struct TrainOptions {
  std::string config_path;             // YAML config; may be empty when resuming a run dir
  std::vector<std::string> overrides;  // "section.key=value", applied in order
  bool resume = false;
  std::string resume_from;  // run directory or checkpoint; empty: the config's run, else latest
  bool rewind = false;      // resume_from may be older than its run's checkpoint.bin
  bool quiet = false;       // no progress lines, only the summary
  int64_t until = 0;        // stop (and save) after this step; 0: run to train.steps
  int gpus = 0;             // --gpus: data-parallel GPUs on this machine; 0: device.gpus
};

// Exit status: 0 when done (or stopped by `until`), 130 when interrupted by a signal.
// Throws blm::Error for bad input and DivergenceError when the loss or gradient goes non-finite.
int run_train(const TrainOptions& opts);

}  // namespace blm
