// Run directories and trained models.
//
// A training run lives in out_dir/run_name:
//   config.yaml     the resolved config (every key, vocab_size filled in)
//   metrics.jsonl   one JSON object per logged step and per validation
//   checkpoint.bin  the latest checkpoint (core/checkpoint.h)
//   .lock           held (flock) by the training that writes the directory
// and out_dir/latest names the most recent run (a relative symlink, or a file holding the name
// where the file system has no symlinks).  eval/margins/sample find a run's checkpoint here.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/checkpoint.h"
#include "data/dataset.h"

namespace blm {

constexpr const char* kCheckpointFile = "checkpoint.bin";
constexpr const char* kMetricsFile = "metrics.jsonl";
constexpr const char* kConfigFile = "config.yaml";
constexpr const char* kCurvesFile = "curves.svg";
constexpr const char* kLatestLink = "latest";

// A file a command reads or writes, in words for messages: {"the checkpoint", "c.bin"}.
struct NamedFile {
  std::string role, path;
};

// The files a command that loads `checkpoint` reads, known before the model is loaded: the
// checkpoint, or a Hugging Face directory's model and tokenizer files; and the files of `data`
// (a --data pattern, expanded: one that matches nothing is an error naming --data).  For the
// checks that no output replaces an input (cli_checks.h, refuse_output_over).
std::vector<NamedFile> model_input_files(const std::string& checkpoint,
                                         const std::string& data = "");

std::string join_path(const std::string& dir, const std::string& name);

// The claim of a training on its run directory: an exclusive flock on RUN/.lock, released when
// the process ends (even killed), so a second training there (the same run_name, or a resume
// of a run still training) is refused instead of interleaving metrics and checkpoints.  Throws
// ConfigError naming the directory and the process that holds it.
class RunDirLock {
 public:
  explicit RunDirLock(const std::string& run_dir);
  ~RunDirLock();
  // Throws as the constructor does when another process holds run_dir's lock; takes nothing and
  // creates nothing (a directory without RUN/.lock is held by no one).  For a resume, before its
  // checkpoint is looked at: a run still training may not have saved one yet.
  static void check_free(const std::string& run_dir);
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;

 private:
  int fd_ = -1;
};

// A new directory in out_dir named `base`, or base-2, base-3, ... when that exists, created here
// (so two runs started in the same second cannot take the same name); returns its name.
std::string claim_new_directory(const std::string& out_dir, const std::string& base);
// "runs" -> "runs/" (for messages about directories).
std::string dir_display(const std::string& dir);

// The checkpoint a user named: the file itself, or DIR/checkpoint.bin for a run directory.
// (checkpoint_for, commands.h, also takes a Hugging Face GPT-2 directory as it is.)
// Throws CheckpointError naming the path when neither exists.
std::string resolve_checkpoint_path(const std::string& path);

// The run directory out_dir/latest names, or "" when there is none.
std::string find_latest_run(const std::string& out_dir);
// Points out_dir/latest at out_dir/run_name (atomically replaced).
void set_latest_run(const std::string& out_dir, const std::string& run_name);
// Throws ConfigError when out_dir/latest exists as something set_latest_run cannot replace (a
// directory): checked before training, not found out after it.
void check_latest_link(const std::string& out_dir);
// The latest run's checkpoint; throws Error "no run found in 'runs/'; train one first ..."
// when there is no run, or the run has no checkpoint yet.
std::string latest_checkpoint(const std::string& out_dir);

// The checkpoint at path, or a Hugging Face GPT-2 directory read as one (cmd/hf_gpt2.h).
Checkpoint load_model_checkpoint(const std::string& path);

// A trained model ready to evaluate: its checkpoint, tokenizer and a backend holding its weights.
struct TrainedModel {
  std::string path;       // the checkpoint file
  Checkpoint checkpoint;  // its config, tokenizer and step (params and moments: freed)
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Backend> backend;
};
// backend: cpu | cuda | auto (the checkpoint's own device settings are not used: a model trained
// on a GPU is often evaluated elsewhere); threads: CPU threads, 0 for all.
TrainedModel load_trained_model(const std::string& checkpoint_path, const std::string& backend,
                                int threads);

// The evaluation data of a trained model: data_file (text or .bin, tokenized with the model's
// tokenizer) when given, else the validation data of the run's config (its relative paths, when
// they do not exist from here, looked for under the checkpoint's directory and its ancestors).
Dataset open_model_data(const TrainedModel& model, const std::string& data_file);

}  // namespace blm
