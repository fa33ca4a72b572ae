// The training loop of trainer.h.
//
// One optimizer step s (0-based; "step s+1" to the user, and in metrics.jsonl):
//   lr = lr_at(s)                                       (core/optim.h)
//   for micro-batch i in [0, grad_accum):              rows [i*Bm, (i+1)*Bm) of step s
//     grads (+)= d(CE + lambda R)/dparams / grad_accum
//   norm = ||grads||;  adamw_step(lr, clip_scale(norm, grad_clip))
// Batches and sampled barrier positions are pure functions of (seed, step, row), and the
// checkpoint holds the parameters, the AdamW state and the step, so a resumed run repeats the
// uninterrupted one exactly.
//
// Data parallel (N workers, cmd/data_parallel.h): worker r takes its rows of each micro-batch,
// the gradients are averaged over the workers during the last micro-batch's backward, and the
// step's loss terms and stop request are all-reduced, so every worker takes the same AdamW step
// and stops at the same step.  Rank 0 alone writes the run directory, logs, validates and
// checkpoints; meanwhile the others wait at a barrier of the control channel (not inside a
// collective, whose watchdog would take the wait for a hang), which also checks that the
// replicas' parameters are identical.
#include "cmd/trainer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <signal.h>
#include <unistd.h>

#include "cmd/data_parallel.h"
#include "cmd/evaluation.h"
#include "cmd/hf_gpt2.h"
#include "cmd/json.h"
#include "cmd/launcher.h"
#include "cmd/positions.h"
#include "cmd/report_render.h"
#include "cmd/report_runs.h"
#include "cmd/runs.h"
#include "cmd/signals.h"
#include "cmd/util.h"
#include "core/backend.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/dist_control.h"
#include "core/dist_env.h"
#include "core/error.h"
#include "core/optim.h"
#include "core/params.h"
#include "data/dataset.h"

namespace fs = std::filesystem;

namespace blm {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ------------------------------------------------------------------ setup

// The checkpoint --resume names: a run directory or a file; with no value, the config's run
// (out_dir/run_name) when it names one, else out_dir/latest.  With check_lock (the process that
// will lock the run directory: rank 0), a run still training there is refused first, naming its
// process (it may not have saved a checkpoint yet).
std::string resume_checkpoint_path(const TrainOptions& o, const Config& cfg, bool check_lock) {
  std::string target;  // the run directory or checkpoint file to resume
  if (!o.resume_from.empty()) target = o.resume_from;
  else if (!cfg.train.run_name.empty()) target = join_path(cfg.train.out_dir, cfg.train.run_name);
  else target = find_latest_run(cfg.train.out_dir);
  std::error_code ec;
  if (check_lock && !target.empty())
    RunDirLock::check_free(fs::is_directory(target, ec) ? target
                                                        : fs::path(target).parent_path().string());
  if (o.resume_from.empty() && cfg.train.run_name.empty())
    return latest_checkpoint(cfg.train.out_dir);
  return resolve_checkpoint_path(target);
}

// A run directory whose config.yaml is gone still has its config inside the checkpoint.
Config config_of_checkpoint(const std::string& resume_from, const std::string& missing_yaml) {
  const std::string ckpt = resolve_checkpoint_path(resume_from);
  static bool said = false;  // read_config runs twice (the launcher's look, then the run's)
  if (!said)
    std::fprintf(stderr, "barrierlm: %s is missing; using the config inside %s\n",
                 missing_yaml.c_str(), ckpt.c_str());
  said = true;
  return load_checkpoint_summary(ckpt).config;
}

// Under a launcher each rank drives one GPU, so the launcher's world size is the number of GPUs.
// device.gpus may say so (a config shared with `--gpus N` runs) or keep its default 1; another
// value is refused rather than overwritten, as the run would not be the one the config describes.
// The batch must split over the ranks.
void fit_gpus_to_launch(Config& cfg, const LaunchEnv& env) {
  const std::string world = std::to_string(env.world);
  const std::string variable = env.world_variable + "=" + world;
  if (cfg.device.gpus != 1 && cfg.device.gpus != env.world)
    throw ConfigError("device.gpus is " + std::to_string(cfg.device.gpus) + " but under a " +
                      env.launcher + " launch each rank drives one GPU, so the launcher's world "
                      "size (" + variable + ") is the number of GPUs; set device.gpus to 1 or " +
                      world);
  const long long accum = cfg.train.grad_accum, parts = accum * env.world;
  // A grad_accum or batch_size that is not positive is validate()'s to name.
  if (accum > 0 && cfg.train.batch_size > 0 && cfg.train.batch_size % parts != 0)
    throw ConfigError("train.batch_size (" + std::to_string(cfg.train.batch_size) +
                      ") must be divisible by train.grad_accum x the launcher's world size (" +
                      std::to_string(accum) + " x " + world + " = " + std::to_string(parts) +
                      ", " + variable + ")");
  cfg.device.gpus = env.world;
}

// The config of the run; --gpus overrides device.gpus, and under a launcher of several ranks
// (`launch`) device.gpus becomes its world size (fit_gpus_to_launch).
Config read_config(const TrainOptions& o, const LaunchEnv* launch) {
  std::string path = o.config_path;
  if (path.empty()) {
    // `train --resume RUN` without a config: the run's own resolved config.
    if (!o.resume || o.resume_from.empty())
      throw UsageError("train needs a CONFIG file (or --resume RUN_DIR to continue a run)");
    std::error_code ec;
    if (!fs::exists(o.resume_from, ec))
      throw ConfigError("--resume '" + o.resume_from + "': no such run directory or checkpoint");
    const std::string dir = fs::is_directory(o.resume_from, ec)
                                ? o.resume_from
                                : fs::path(o.resume_from).parent_path().string();
    path = join_path(dir, kConfigFile);
  }
  // A run directory's config records the GPUs the run last had, not a request: a launcher's
  // world replaces it (a checkpoint resumes on any number of GPUs).  A --set may still ask.
  std::vector<std::string> overrides = o.overrides;
  if (launch && o.config_path.empty()) overrides.insert(overrides.begin(), "device.gpus=1");
  Config cfg;
  if (o.config_path.empty() && !fs::exists(path)) {
    cfg = config_of_checkpoint(o.resume_from, path);
    for (const std::string& a : overrides) apply_override(cfg, a);
  } else {
    cfg = load_config(path, overrides);  // two-key checks after the overrides: --set can mend
  }
  if (o.gpus > 0) cfg.device.gpus = o.gpus;
  if (launch) fit_gpus_to_launch(cfg, *launch);
  validate(cfg);
  return cfg;
}

// Fills model.vocab_size from the tokenizer when it is 0, and checks it covers the tokenizer.
void resolve_vocab(Config& cfg, const Tokenizer& tok) {
  if (cfg.model.vocab_size == 0) {
    cfg.model.vocab_size = tok.vocab_size();
    return;
  }
  if (cfg.model.vocab_size < tok.vocab_size())
    throw ConfigError("model.vocab_size (" + std::to_string(cfg.model.vocab_size) +
                      ") is smaller than the " + tok.kind() + " tokenizer's vocabulary (" +
                      std::to_string(tok.vocab_size()) + "); set it to 0 to take the tokenizer's");
}

// A resumed run keeps its architecture and its tokenizer (the checkpoint's is the one used, so a
// config naming another would be recorded in config.yaml but not be true): the first key that
// differs is an error.
void check_resumable(const Config& ck, const Config& cfg, const std::string& path) {
  const ModelConfig &a = ck.model, &b = cfg.model;
  const struct {
    const char* key;
    std::string theirs, ours;
  } keys[] = {{"model.n_layer", std::to_string(a.n_layer), std::to_string(b.n_layer)},
              {"model.n_head", std::to_string(a.n_head), std::to_string(b.n_head)},
              {"model.d_model", std::to_string(a.d_model), std::to_string(b.d_model)},
              {"model.seq_len", std::to_string(a.seq_len), std::to_string(b.seq_len)},
              {"model.vocab_size", std::to_string(a.vocab_size), std::to_string(b.vocab_size)},
              {"data.tokenizer", ck.data.tokenizer, cfg.data.tokenizer}};
  for (const auto& k : keys)
    if (k.theirs != k.ours)
      throw ConfigError("cannot resume '" + path + "': it was trained with " + k.key + " = " +
                        k.theirs + " but the config has " + k.ours +
                        " (the model and its tokenizer cannot change when resuming)");
}

// Resuming from a checkpoint older than its run's checkpoint.bin (a kept checkpoint_STEP.bin)
// replaces that checkpoint and drops the metrics after the older step: only with --rewind.  A
// checkpoint.bin that cannot be read does not stop it (resuming a kept file is the way back
// from a damaged one).
void check_rewind(const std::string& resumed_from, int64_t step, bool rewind) {
  const fs::path run_ckpt = fs::path(resumed_from).parent_path() / kCheckpointFile;
  std::error_code ec;
  if (!fs::exists(run_ckpt, ec) || fs::equivalent(run_ckpt, resumed_from, ec)) return;
  int64_t later = -1;
  try {
    later = load_checkpoint_summary(run_ckpt.string()).step;
  } catch (const CheckpointError&) {
    return;
  }
  if (later <= step) return;
  const std::string what = run_ckpt.string() + " (step " + std::to_string(later) +
                           ") and the metrics after step " + std::to_string(step);
  if (!rewind)
    throw ConfigError("--resume '" + resumed_from + "' is at step " + std::to_string(step) +
                      ", before its run's " + what + ", which resuming would replace; pass " +
                      "--rewind to go back, or copy it into a new run directory to branch off");
  std::fprintf(stderr, "barrierlm: rewinding: %s are replaced\n", what.c_str());
}

// out_dir/run_name for a new run; refuses to mix two runs in one directory.
std::string new_run_dir(Config& cfg) {
  // Two runs started within one second get distinct names: the directory is created here.
  if (cfg.train.run_name.empty())
    cfg.train.run_name = claim_new_directory(cfg.train.out_dir, timestamp_now());
  const std::string dir = join_path(cfg.train.out_dir, cfg.train.run_name);
  std::error_code ec;
  // A directory with metrics but no checkpoint is a run that died before its first save:
  // nothing there can be resumed, so a new run may start over in it.
  if (fs::exists(join_path(dir, kCheckpointFile), ec))
    throw ConfigError("run directory '" + dir_display(dir) + "' already holds a run; continue it " +
                      "with --resume " + shell_quote(dir) + " or choose another train.run_name");
  return dir;
}

// Keeps the metrics of steps <= step (a run killed after its last checkpoint logged steps the
// resumed run will log again).  Also drops a last line that a hard kill cut short (no newline at
// its end, or no step in it): the resumed run's first line would be appended onto it.  Returns
// the lines kept.
std::string truncate_metrics(const std::string& path, int64_t step) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return "";
  std::istringstream in(read_text_file(path));
  std::string line, kept;
  bool dropped = false;
  while (std::getline(in, line)) {
    double s;
    if (line.empty()) continue;
    const bool has_step = json_find_number(line, "step", &s);
    const bool cut = in.eof() || (!has_step && in.peek() == EOF);  // eof: no newline after it
    if (cut || (has_step && s > static_cast<double>(step))) {
      dropped = true;
      continue;
    }
    kept += line + "\n";
  }
  if (dropped) write_file_atomic(path, kept);
  return kept;
}

// ------------------------------------------------------------------ the trainer

struct ValResult {
  double ce = NAN, bpb = NAN, acc = NAN, margin = NAN;
  int64_t step = -1;  // the step it was made at
};

// The last validation among a resumed run's kept metrics (truncate_metrics' lines), into *v;
// false when there is none.  Until the run validates again, the progress line's margin and the
// end's summary show it.
bool last_validation_in(const std::string& metrics, ValResult* v) {
  std::istringstream in(metrics);
  std::string line, last;
  while (std::getline(in, line))
    if (line.find("\"kind\":\"eval\"") != std::string::npos) last = line;
  if (last.empty()) return false;
  ValResult r;  // a null (non-finite) value stays NaN
  double step = -1;
  json_find_number(last, "step", &step);
  r.step = static_cast<int64_t>(step);
  json_find_number(last, "val_ce", &r.ce);
  json_find_number(last, "val_bpb", &r.bpb);
  json_find_number(last, "val_acc", &r.acc);
  json_find_number(last, "min_margin", &r.margin);
  *v = r;
  return true;
}

std::string host_name_for_header() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

struct StepResult {
  double loss = 0, ce = 0, barrier = NAN, min_logdet = NAN, grad_norm = 0, lr = 0;
};

class Trainer {
 public:
  Trainer(const TrainOptions& o, const LaunchEnv& env)
      : opts_(o), env_(env), lead_(env.rank == 0), silent_(env.rank != 0) {}
  int run();

 private:
  int run_steps();
  void setup();
  void join_workers(const Checkpoint& ck);  // rendezvous, NCCL, backend on this rank's GPU
  std::string settings_text(const Checkpoint& ck) const;
  // Waits for every rank (after rank 0's validation / checkpoint); with check_params, proves
  // that the replicas hold identical parameters.
  void sync_ranks(const std::string& what, bool check_params);
  void reduce_step(StepResult& r, double barrier_sum, bool have_barrier, double min_logdet);
  bool stop_requested() const { return par_dp_ ? stop_all_ : interrupted(); }
  void open_inputs(Checkpoint& ck);  // config, checkpoint (when resuming), data
  void plan_validation();
  void restore(const Checkpoint& ck);  // weights, AdamW state, step
  void prepare_run_dir();              // config.yaml, metrics.jsonl
  void print_header() const;
  // Runs steps until `stop` (or an interrupt); `done` tracks the steps completed.  Returns the
  // seconds spent in training steps.
  double train_until(int64_t stop, int64_t& done);
  int save_initial_weights();  // train.steps 0 on a new run
  void say_next();
  void warn_if_other_tokenizer(const std::string& source) const;
  int encode_threads() const;
  StepResult step(int64_t s);
  ValResult validate_now();
  void validation(int64_t done);  // validate, log, print
  void save(int64_t steps_done);  // checkpoint.bin, and `latest` after the first save
  void keep_checkpoint(int64_t steps_done);  // checkpoint.bin also as checkpoint_STEP.bin
  void write_curves(int64_t steps_done);  // curves.svg from metrics.jsonl, once a step
  void point_latest_here();
  void log_step(int64_t steps_done, const StepResult& r, double tokens_per_s);
  void log_eval(int64_t steps_done, const ValResult& v);
  void append_metrics(const std::string& line);
  void progress(int64_t steps_done, const StepResult& r, double tokens_per_s, bool permanent);
  void say(const std::string& line);  // a permanent line (clears an updating one first)
  void summary(int64_t steps_done, double train_seconds);
  bool is_log_step(int64_t steps_done) const;
  // The step this session stops after: train.steps, or --until when smaller.
  int64_t stop_step() const {
    const int64_t total = cfg_.train.steps;
    return opts_.until > 0 ? std::min<int64_t>(opts_.until, total) : total;
  }
  std::string resume_command() const;

  TrainOptions opts_;
  LaunchEnv env_;
  bool lead_ = true;     // rank 0: writes the run directory, logs, validates, checkpoints
  bool silent_ = false;  // prints nothing (ranks other than 0)
  ShardPlan shard_;
  bool stop_all_ = false;  // some rank was interrupted: every rank stops after this step
  Config cfg_;
  Dataset data_;
  // Declared before the backend, which uses them: destroyed after it.
  std::unique_ptr<ControlChannel> channel_;
  std::unique_ptr<DataParallel> par_dp_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<BatchSampler> sampler_;
  std::vector<float> init_params_;  // train.init's weights until setup hands them to the backend
  double val_tokens_per_byte_ = NAN;  // of the validation windows: bits per byte from CE
  EvalPlan eval_plan_, margin_plan_;
  std::string run_dir_, ckpt_path_, resumed_from_;
  std::ofstream metrics_;
  std::unique_ptr<RunDirLock> run_dir_lock_;  // held while this process writes run_dir_
  int64_t start_step_ = 0, tokens_seen_ = 0;
  double elapsed_before_ = 0;  // seconds of earlier sessions of this run (from the checkpoint)
  Clock::time_point t_start_;
  bool terminal_ = false, line_open_ = false;
  StepResult last_;
  ValResult last_val_;
  bool have_val_ = false;
  bool latest_set_ = false;
  bool curves_failed_ = false;  // write_curves failed once: no more attempts
  int64_t curves_step_ = -1;    // the step curves.svg was last drawn at
};

void Trainer::setup() {
  // Everything that can fail on bad input happens before any file is written.
  Checkpoint ck;
  open_inputs(ck);
  shard_ = shard_rows(cfg_.train.batch_size, cfg_.train.grad_accum, env_.world);
  plan_validation();
  if (env_.distributed())
    join_workers(ck);
  else
    backend_ = make_backend(cfg_);
  if (opts_.resume) {
    restore(ck);
  } else {
    if (lead_) run_dir_ = new_run_dir(cfg_);
    // Every rank initialises the same way (train.init's file, or deterministic in the seed);
    // sync_ranks checks it.
    backend_->set_parameters(init_params_.empty()
                                 ? init_parameters(ParamLayout(cfg_.model), cfg_.train.seed)
                                 : std::move(init_params_));
  }
  ckpt_path_ = join_path(run_dir_, kCheckpointFile);
  // A resumed run with no step left to take (train.steps or --until at or below the
  // checkpoint's step) trains nothing: its config.yaml and metrics stay the run's own.
  const bool nothing_to_do = opts_.resume && start_step_ >= stop_step();
  if (lead_ && !nothing_to_do) prepare_run_dir();
  if (par_dp_) sync_ranks("the start of training", true);
}

void Trainer::join_workers(const Checkpoint& ck) {
  channel_ = join_rendezvous(env_, settings_text(ck));
  const int gpu = worker_gpu(env_);
  par_dp_ = make_nccl_comm(*channel_, env_, gpu);
  backend_ = make_worker_backend(cfg_, gpu);
  backend_->set_data_parallel(par_dp_.get());
}

// What every rank must agree on: the resolved config (the run name is rank 0's to choose), where
// a resumed run starts, where it stops, and the sizes of the data it reads.
std::string Trainer::settings_text(const Checkpoint& ck) const {
  Config c = cfg_;
  if (!opts_.resume) c.train.run_name.clear();
  std::string s = config_to_yaml(c);
  s += "run:\n";
  s += "  resume_step: " + std::to_string(opts_.resume ? ck.step : int64_t(0)) + "\n";
  s += "  until: " + std::to_string(opts_.until) + "\n";
  s += "  train_tokens: " + std::to_string(data_.train->size()) + "\n";
  s += "  val_tokens: " + std::to_string(data_.val->size()) + "\n";
  return s;
}

void Trainer::sync_ranks(const std::string& what, bool check_params) {
  uint64_t value = 0;
  if (check_params) {
    std::vector<float> params;
    backend_->get_parameters(params);
    value = replica_hash(params);
  }
  const std::string diff = channel_->barrier(what, value);
  if (!diff.empty())
    throw Error("the data-parallel replicas differ at " + what + " (" + diff + ")" +
                (check_params ? ": their parameters are not identical" : ""));
}

void Trainer::open_inputs(Checkpoint& ck) {
  cfg_ = read_config(opts_, env_.distributed() ? &env_ : nullptr);
  if (opts_.resume) {
    resumed_from_ = resume_checkpoint_path(opts_, cfg_, lead_);
    ck = load_checkpoint(resumed_from_);
    data_ = open_dataset(cfg_.data, cfg_.model.seq_len, ck.tokenizer,  // the run's tokenizer
                         encode_threads());
  } else {
    data_ = open_dataset(cfg_.data, cfg_.model.seq_len, encode_threads());
  }
  resolve_vocab(cfg_, *data_.tokenizer);
  validate(cfg_);
  if (cfg_.barrier.lambda > 0 && cfg_.model.seq_len < 3)
    std::fprintf(stderr,
                 "barrierlm: note: seq_len %d has no position t >= 2, the only ones with a "
                 "barrier term: the barrier is 0 (lambda has no effect)\n",
                 cfg_.model.seq_len);
  if (opts_.resume) {
    check_resumable(ck.config, cfg_, resumed_from_);
    check_rewind(resumed_from_, ck.step, opts_.rewind);
    if (ck.seed != cfg_.train.seed)
      std::fprintf(stderr,
                   "barrierlm: warning: train.seed is %llu but the checkpoint's run used %llu; "
                   "the batches will differ from the original run's\n",
                   static_cast<unsigned long long>(cfg_.train.seed),
                   static_cast<unsigned long long>(ck.seed));
  }
  // train.init's weights are read (and checked against the model) before anything is written.
  if (!opts_.resume && !cfg_.train.init.empty()) {
    InitialWeights init = initial_weights(cfg_.train.init, cfg_.model);
    init_params_ = std::move(init.params);
    warn_if_other_tokenizer(init.tokenizer);
  }
  sampler_ = std::make_unique<BatchSampler>(data_.train, cfg_.model.seq_len, cfg_.train.seed);
}

// Threads to encode GPT-2 text with: the machine's cores shared by its data-parallel workers,
// each of which encodes the whole text (`barrierlm tokenize` once is cheaper still).
int Trainer::encode_threads() const {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, cores / std::max(1, env_.local_world));
}

// The weights of train.init read token ids as the tokenizer they were trained with: another one
// (the data's) would give each row of wte to a different token.  Said, not refused: the ids
// may still be right (a vocabulary extended at its end), and only the user knows.
void Trainer::warn_if_other_tokenizer(const std::string& source) const {
  if (source.empty() || source == data_.tokenizer->serialize()) return;
  const auto describe = [](const Tokenizer& tok) {
    return tok.kind() + " of " + std::to_string(tok.vocab_size()) + " tokens";
  };
  std::string theirs = "unreadable";
  try {
    theirs = describe(*make_tokenizer(source));
  } catch (const Error&) {
  }
  const std::string ours = describe(*data_.tokenizer);
  std::fprintf(stderr,
               "barrierlm: warning: train.init '%s' comes with another tokenizer (%s) than the "
               "data's (%s%s): its embeddings belong to that tokenizer's ids\n",
               cfg_.train.init.c_str(), theirs.c_str(), ours.c_str(),
               theirs == ours ? ", the same size but other tokens" : "");
}

void Trainer::plan_validation() {
  // Rank 0 validates alone, in batches of a GPU's micro-batch (blm::plan_validation).
  const int micro_B = cfg_.train.batch_size / cfg_.train.grad_accum;
  eval_plan_ = blm::plan_validation(*data_.val, cfg_.model.seq_len, cfg_.train, shard_.world,
                                    "the validation data");
  // The margin probe takes an SVD per (b, l, h, t): up to 4 sequences, fewer for big models so
  // that it stays near 64k of them (one sequence at least).
  const int64_t per_sequence =
      static_cast<int64_t>(cfg_.model.n_layer) * cfg_.model.n_head * cfg_.model.seq_len;
  const EvalPlan single = plan_eval(*data_.val, cfg_.model.seq_len, micro_B, 1, "the validation data");
  val_tokens_per_byte_ = tokens_per_byte(*data_.val, eval_plan_, *data_.tokenizer);
  margin_plan_ = eval_plan_;
  margin_plan_.B = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({single.B, 4, 65536 / per_sequence})));
  margin_plan_.batches = 1;
}

void Trainer::restore(const Checkpoint& ck) {
  backend_->set_parameters(ck.params);
  if (!ck.adam_m.empty()) backend_->set_optimizer_state(ck.adam_m, ck.adam_v, ck.adam_t);
  start_step_ = ck.step;
  tokens_seen_ = ck.tokens_seen;
  json_find_number(ck.meta_json, "elapsed", &elapsed_before_);
  // The run continues in the checkpoint's directory, whatever the config's out_dir and
  // run_name say; its config.yaml records that directory, so out_dir/run_name names the run
  // even when it was moved (and `latest` beside it points at it).  Links are resolved:
  // `--resume runs/latest` continues the run `latest` points at, under that run's name.
  // (The directory's links, not the file's: a checkpoint.bin that links elsewhere stays in its
  // run, and the next save replaces the link.)
  std::error_code ec;
  const fs::path given = fs::absolute(resumed_from_).lexically_normal().parent_path();
  fs::path dir = fs::weakly_canonical(given, ec);
  if (ec) dir = given;
  const auto as_given = [&](const fs::path& p) {  // relative when --resume was
    const fs::path q = fs::path(resumed_from_).is_absolute()
                           ? p
                           : p.lexically_relative(fs::current_path());
    return q.empty() ? std::string(".") : q.string();
  };
  run_dir_ = as_given(dir);
  cfg_.train.run_name = dir.filename().string();
  cfg_.train.out_dir = as_given(dir.parent_path());
}

void Trainer::prepare_run_dir() {
  check_latest_link(cfg_.train.out_dir);
  std::error_code ec;
  fs::create_directories(run_dir_, ec);
  if (ec) throw Error("cannot create run directory '" + run_dir_ + "': " + ec.message());
  run_dir_lock_ = std::make_unique<RunDirLock>(run_dir_);
  if (!opts_.resume && fs::exists(join_path(run_dir_, kMetricsFile), ec))
    std::fprintf(stderr,
                 "barrierlm: note: '%s' holds a run that saved no checkpoint (it failed or was "
                 "killed first); starting over in it\n",
                 dir_display(run_dir_).c_str());
  remove_stale_temporaries(run_dir_);
  write_file_atomic(join_path(run_dir_, kConfigFile), config_to_yaml(cfg_));
  const std::string metrics_path = join_path(run_dir_, kMetricsFile);
  if (opts_.resume) {
    have_val_ = last_validation_in(truncate_metrics(metrics_path, start_step_), &last_val_);
  }
  metrics_.open(metrics_path, opts_.resume ? std::ios::app : std::ios::trunc);
  if (!metrics_) throw Error("cannot write '" + metrics_path + "'");
}

void Trainer::point_latest_here() {
  // `latest` names the run when its directory is inside out_dir (always, unless the run
  // directory was given as "." or through a link).
  std::error_code ec;
  fs::path parent = fs::path(run_dir_).parent_path();
  if (parent.empty()) parent = ".";
  if (!fs::equivalent(parent, cfg_.train.out_dir, ec)) return;
  try {
    set_latest_run(cfg_.train.out_dir, fs::path(run_dir_).filename().string());
  } catch (const Error& e) {  // the run itself is whole: said, not failed
    std::fprintf(stderr, "barrierlm: warning: %s\n", e.what());
  }
}

void Trainer::print_header() const {
  if (opts_.quiet || silent_) return;
  const ModelConfig& m = cfg_.model;
  const TrainConfig& t = cfg_.train;
  const double params = static_cast<double>(count_parameters(m));
  std::printf("barrierlm train: run %s\n", dir_display(run_dir_).c_str());
  if (!resumed_from_.empty())
    std::printf("  resuming  %s at step %lld\n", resumed_from_.c_str(),
                static_cast<long long>(start_step_));
  std::printf("  model     %d layers, %d heads, d_model %d, seq_len %d, vocab %d: %s parameters\n",
              m.n_layer, m.n_head, m.d_model, m.seq_len, m.vocab_size, format_rate(params).c_str());
  std::printf("  data      %s%s: %s train / %s val tokens (%s tokenizer)\n",
              cfg_.data.train.c_str(),
              data_.train_files > 1 ? (" (" + std::to_string(data_.train_files) + " files)").c_str()
                                    : "",
              format_rate(double(data_.train->size())).c_str(),
              format_rate(double(data_.val->size())).c_str(), data_.tokenizer->kind().c_str());
  if (!cfg_.train.init.empty() && resumed_from_.empty())
    std::printf("  init      the weights of %s (the optimizer starts afresh)\n",
                cfg_.train.init.c_str());
  if (cfg_.barrier.enabled())
    std::printf("  barrier   lambda %g, eps %g, %s, %s\n", cfg_.barrier.lambda, cfg_.barrier.eps,
                cfg_.barrier.layers.empty() ? "every layer" : "some layers",
                barrier_positions_label(cfg_.barrier.positions, m.seq_len).c_str());
  else
    std::printf("  barrier   off (lambda 0): cross-entropy only\n");
  std::printf("  train     %d steps x %d sequences x %d tokens (grad_accum %d); lr %g %s, "
              "warmup %d%s\n",
              t.steps, t.batch_size, m.seq_len, t.grad_accum, t.lr, t.schedule.c_str(), t.warmup,
              t.warmup >= t.steps ? " (not below steps: the run ends inside the warmup)" : "");
  if (par_dp_)
    std::printf("  device    %s x %d GPUs, data-parallel over %s (%s launch; rank 0 on %s)\n",
                backend_->name().c_str(), env_.world, par_dp_->description().c_str(),
                env_.launcher.c_str(), host_name_for_header().c_str());
  else
    std::printf("  device    %s\n", backend_->name().c_str());
  std::fflush(stdout);
}

StepResult Trainer::step(int64_t s) {
  const int T = cfg_.model.seq_len, accum = cfg_.train.grad_accum;
  const int Bm = shard_.micro_rows;  // batch_size / accum on one GPU
  StepResult r;
  r.lr = lr_at(s, cfg_.train);
  std::vector<int32_t> inputs, targets;
  std::vector<uint8_t> mask;
  double barrier_sum = 0, min_logdet = INFINITY;
  bool have_barrier = false;
  for (int i = 0; i < accum; ++i) {
    const int row0 = shard_.row0(env_.rank, i);  // this rank's rows of the global batch
    sampler_->sample(s, row0, Bm, inputs, targets);
    ForwardOptions fo;
    if (cfg_.barrier.positions > 0 && cfg_.barrier.enabled()) {
      sample_barrier_mask(cfg_.train.seed, s, row0, Bm, T, cfg_.barrier.positions, mask);
      fo.barrier_mask = mask.data();
    }
    fo.grad_scale = 1.0f / static_cast<float>(accum);
    fo.accumulate = i > 0;
    fo.reduce_gradients = i == accum - 1;  // averaged over the GPUs once, with the last
    const LossTerms lt = backend_->forward_backward(Batch{Bm, T, inputs.data(), targets.data()}, fo);
    r.loss += lt.loss / accum;
    r.ce += lt.ce / accum;
    if (lt.barrier_terms > 0) {
      have_barrier = true;
      barrier_sum += lt.barrier / accum;
      min_logdet = std::min(min_logdet, lt.min_logdet);
    }
  }
  if (par_dp_) {
    reduce_step(r, barrier_sum, have_barrier, min_logdet);
  } else if (have_barrier) {
    r.barrier = barrier_sum;
    r.min_logdet = min_logdet;
  }
  const int64_t shown = s + 1;
  if (!std::isfinite(r.loss))
    throw DivergenceError("training diverged at step " + std::to_string(shown) + ": loss is " +
                          format_general(r.loss) + " (try a lower train.lr)");
  r.grad_norm = backend_->grad_norm();
  if (!std::isfinite(r.grad_norm))
    throw DivergenceError("training diverged at step " + std::to_string(shown) +
                          ": gradient norm is " + format_general(r.grad_norm) +
                          " (try a lower train.lr)");
  AdamWHyper h;
  h.beta1 = cfg_.train.beta1;
  h.beta2 = cfg_.train.beta2;
  h.eps = cfg_.train.adam_eps;
  h.weight_decay = cfg_.train.weight_decay;
  backend_->adamw_step(h, r.lr, clip_scale(r.grad_norm, cfg_.train.grad_clip));
  tokens_seen_ += static_cast<int64_t>(cfg_.train.batch_size) * T;
  return r;
}

// The step's numbers over every rank: loss, CE and barrier are means of equal-weight rank means
// (equal rows and barrier terms per rank), min_logdet the minimum; also whether any rank was
// interrupted, so that all stop after the same step.
void Trainer::reduce_step(StepResult& r, double barrier_sum, bool have_barrier, double min_logdet) {
  double sums[5] = {r.loss, r.ce, barrier_sum, have_barrier ? 1.0 : 0.0, interrupted() ? 1.0 : 0.0};
  par_dp_->allreduce(sums, 5, DataParallel::Op::kSum);
  double neg_min[1] = {have_barrier ? -min_logdet : -INFINITY};
  par_dp_->allreduce(neg_min, 1, DataParallel::Op::kMax);
  const double n = static_cast<double>(env_.world);
  r.loss = sums[0] / n;
  r.ce = sums[1] / n;
  if (sums[3] > 0) {
    r.barrier = sums[2] / sums[3];
    r.min_logdet = -neg_min[0];
  }
  stop_all_ = sums[4] > 0;
}

ValResult Trainer::validate_now() {
  ValResult v;
  const EvalResult e = evaluate(*backend_, *data_.val, eval_plan_, 0.0, 0);
  v.ce = e.ce;
  v.acc = e.accuracy;
  v.bpb = bits_per_byte(e.ce, val_tokens_per_byte_);  // NaN when the tokenizer has no text
  v.margin = smallest_margin(first_batch_margins(*backend_, *data_.val, margin_plan_), cfg_.barrier);
  return v;
}

void Trainer::save(int64_t steps_done) {
  Checkpoint ck;
  ck.config = cfg_;
  ck.tokenizer = data_.tokenizer->serialize();
  ck.step = steps_done;
  ck.tokens_seen = tokens_seen_;
  ck.seed = cfg_.train.seed;
  backend_->get_parameters(ck.params);
  backend_->get_optimizer_state(ck.adam_m, ck.adam_v, ck.adam_t);
  if (ck.adam_t == 0) {  // AdamW has not stepped: its moments are zero, as a resume starts them
    ck.adam_m.clear();   // (a step-0 save of GPT-2 small: 0.5 GB instead of 1.5)
    ck.adam_v.clear();
  }
  JsonWriter meta;
  meta.begin_object()
      .kv("backend", backend_->name())
      .kv("saved_at", iso_time_now())
      .kv("elapsed", elapsed_before_ + seconds_since(t_start_))
      .kv("train_loss", last_.loss);
  if (have_val_) meta.kv("val_ce", last_val_.ce).kv("val_acc", last_val_.acc);
  meta.end_object();
  ck.meta_json = meta.str();
  save_checkpoint(ckpt_path_, ck);
  // `latest` moves to this run once it has something to evaluate.
  if (!latest_set_) point_latest_here();
  latest_set_ = true;
  write_curves(steps_done);
}

// train.keep_checkpoints: the checkpoint just saved, also under its step's name.  A hard link:
// the next save replaces checkpoint.bin by a new file (write_file_atomic renames over it), so the
// link keeps this step's bytes.  Where links fail (some file systems), a copy.  Either is made
// under a temporary name and renamed, so a kept file is whole or absent.
void Trainer::keep_checkpoint(int64_t steps_done) {
  char name[64];
  std::snprintf(name, sizeof name, "checkpoint_%06lld.bin", static_cast<long long>(steps_done));
  const fs::path kept = fs::path(run_dir_) / name;
  const fs::path tmp =
      fs::path(run_dir_) / (std::string(name) + ".tmp." + std::to_string(getpid()));
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_hard_link(ckpt_path_, tmp, ec);
  if (ec) {
    ec.clear();
    fs::copy_file(ckpt_path_, tmp, ec);
  }
  if (!ec) fs::rename(tmp, kept, ec);
  if (ec) {
    const std::string why = ec.message();
    fs::remove(tmp, ec);
    throw Error("cannot keep the checkpoint of step " + std::to_string(steps_done) + " as '" +
                kept.string() + "': " + why);
  }
}

// The plot is a view of metrics.jsonl (the whole run's, resumed sessions included), redrawn at
// each validation and save (a save right after its step's validation adds no line: once a
// step).  A plot that cannot be written costs a note, never the run.
void Trainer::write_curves(int64_t steps_done) {
  if (!lead_ || curves_failed_ || steps_done == curves_step_) return;
  curves_step_ = steps_done;
  try {
    const std::string metrics_path = join_path(run_dir_, kMetricsFile);
    const RunMetrics m = parse_metrics(read_text_file(metrics_path), metrics_path);
    write_file_atomic(join_path(run_dir_, kCurvesFile),
                      run_curves_svg(m, cfg_.train.run_name, cfg_.barrier.lambda));
  } catch (const std::exception& e) {
    curves_failed_ = true;
    say(std::string("note: not writing ") + kCurvesFile + " any more: " + e.what());
  }
}

bool Trainer::is_log_step(int64_t steps_done) const {
  // A function of the step alone, so a resumed run logs the same steps as an uninterrupted one.
  return steps_done == 1 || steps_done % cfg_.train.log_interval == 0 ||
         steps_done == cfg_.train.steps;
}

void Trainer::log_step(int64_t steps_done, const StepResult& r, double tokens_per_s) {
  if (!lead_) return;
  JsonWriter j;
  j.begin_object()
      .kv("kind", "train")
      .kv("step", steps_done)
      .kv("loss", r.loss)
      .kv("ce", r.ce)
      .kv("barrier", r.barrier)
      .kv("min_logdet", r.min_logdet)
      .kv("lr", r.lr)
      .kv("grad_norm", r.grad_norm)
      .kv("tokens", tokens_seen_)
      .kv("tokens_per_s", tokens_per_s)
      .kv("elapsed", elapsed_before_ + seconds_since(t_start_))
      .end_object();
  append_metrics(j.str());
}

void Trainer::log_eval(int64_t steps_done, const ValResult& v) {
  if (!lead_) return;
  JsonWriter j;
  j.begin_object()
      .kv("kind", "eval")
      .kv("step", steps_done)
      .kv("val_ce", v.ce)
      .kv("val_bpb", v.bpb)
      .kv("val_acc", v.acc)
      .kv("min_margin", v.margin)
      .kv("elapsed", elapsed_before_ + seconds_since(t_start_))
      .end_object();
  append_metrics(j.str());
}

// One line of metrics.jsonl, flushed.  A write that fails (a full disk) stops the run: the
// stream would drop every later line without a word, and after a line written in part the next
// would run on in the same line.  The last checkpoint stays whole, and a resume drops the cut
// line.
void Trainer::append_metrics(const std::string& line) {
  errno = 0;
  metrics_ << line << '\n';
  metrics_.flush();
  if (metrics_) return;
  const int err = errno;
  throw Error("cannot write '" + join_path(run_dir_, kMetricsFile) +
              "': " + (err != 0 ? std::strerror(err) : "the write failed") +
              "; the run stopped (resume it from its last checkpoint once the file can be "
              "written)");
}

void Trainer::say(const std::string& line) {
  if (silent_) return;
  if (line_open_) std::printf("\r\033[K");
  line_open_ = false;
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

void Trainer::progress(int64_t steps_done, const StepResult& r, double tokens_per_s,
                       bool permanent) {
  if (opts_.quiet || silent_) return;
  const int64_t total = cfg_.train.steps;
  const int64_t done_here = steps_done - start_step_;
  // Time left until this session stops: --until, when given, stops it before train.steps.
  const double eta =
      done_here > 0 ? seconds_since(t_start_) / done_here * (stop_step() - steps_done) : NAN;
  const int width = static_cast<int>(std::to_string(total).size());
  char step_text[64], lr_text[32];
  std::snprintf(step_text, sizeof step_text, "step %*lld/%lld", width,
                static_cast<long long>(steps_done), static_cast<long long>(total));
  std::snprintf(lr_text, sizeof lr_text, "lr %.2e", r.lr);
  std::vector<std::string> fields = {
      step_text,
      "loss " + format_fixed(r.loss, 4),
      "ce " + format_fixed(r.ce, 4),
      "barrier " + (std::isnan(r.barrier) ? "-" : format_fixed(r.barrier, 4)),
      "logdet " + (std::isnan(r.min_logdet) ? "-" : format_fixed(r.min_logdet, 3)),
      "margin " + (have_val_ ? format_fixed(last_val_.margin, 3) : "-"),
      lr_text,
      format_rate(tokens_per_s) + " tok/s",
      "ETA " + format_duration(eta)};
  const auto joined = [&fields] {
    std::string line;
    for (const std::string& f : fields)
      if (!f.empty()) line += (line.empty() ? "" : "  ") + f;
    return line;
  };
  std::string line = joined();
  if (terminal_ && !permanent) {
    // A line as wide as the terminal wraps, and "\r" then redraws only its last row: drop the
    // least important fields (indices into `fields`), then cut what still does not fit.
    const size_t room = static_cast<size_t>(std::max(terminal_columns() - 1, 1));
    for (const int i : {6, 7, 3, 2, 5, 8, 4, 1}) {
      if (line.size() <= room) break;
      fields[static_cast<size_t>(i)].clear();
      line = joined();
    }
    if (line.size() > room) line.resize(room);
    std::printf("\r\033[K%s", line.c_str());
    line_open_ = true;
    std::fflush(stdout);
  } else {
    say(line);
  }
}

void Trainer::summary(int64_t steps_done, double train_seconds) {
  const double tokens = static_cast<double>(steps_done - start_step_) * cfg_.train.batch_size *
                        cfg_.model.seq_len;
  // A resumed run: the time and speed are this session's, so say how many steps it took.
  const std::string this_session =
      start_step_ > 0 ? " (" + std::to_string(steps_done - start_step_) + " in this session)" : "";
  char buf[512];
  std::snprintf(buf, sizeof buf, "done: %lld steps%s in %s (%s tok/s); final loss %.4f (ce %.4f)",
                static_cast<long long>(steps_done), this_session.c_str(),
                format_duration(train_seconds).c_str(),
                format_rate(train_seconds > 0 ? tokens / train_seconds : 0).c_str(), last_.loss,
                last_.ce);
  say(buf);
  if (have_val_) {
    // A resumed run that has not validated since shows its last validation, with its step.
    const std::string when =
        last_val_.step >= 0 && last_val_.step != steps_done
            ? " (at step " + std::to_string(last_val_.step) + ")"
            : "";
    std::string v = "validation" + when + ": ce " + format_fixed(last_val_.ce, 4) + " nats/token";
    if (!std::isnan(last_val_.bpb)) v += ", " + format_fixed(last_val_.bpb, 4) + " bits/byte";
    v += ", accuracy " + format_fixed(100 * last_val_.acc, 2) + "%, min margin " +
         format_fixed(last_val_.margin, 4);
    say(v);
  }
  say("run directory: " + dir_display(run_dir_) + " (" + kCheckpointFile + ", " + kMetricsFile +
      ", " + kCurvesFile + ", " + kConfigFile + ")");
  say_next();
}

int Trainer::run() {
  try {
    return run_steps();
  } catch (const std::exception& e) {
    // The other ranks would wait for this one in their next collective: tell them now.
    if (channel_) channel_->announce_failure(e.what());
    throw;
  }
}

// The command that continues this run with the settings it ran with: the config and the --set
// overrides (without them the config's own train.steps, lr, ... would apply) and --gpus.
std::string Trainer::resume_command() const {
  std::string how = "barrierlm train";
  if (!opts_.config_path.empty()) how += " " + shell_quote(opts_.config_path);
  for (const std::string& a : opts_.overrides) how += " --set " + shell_quote(a);
  if (opts_.gpus > 0) how += " --gpus " + std::to_string(opts_.gpus);
  return how + " --resume " + shell_quote(run_dir_);
}

// Why a resumed run takes no step: --until at or below its step (a larger --until helps), or
// train.steps reached (--until cannot go past it: only a larger train.steps helps).
std::string nothing_to_train_message(int64_t step, int64_t total, int64_t until) {
  const std::string at = std::to_string(step);
  if (until > 0 && until < total)
    return "the run is at step " + at + " of its " + std::to_string(total) + "; --until " +
           std::to_string(until) + " stops at or before that, so there is nothing to train "
           "(give --until above " + at + ")";
  return "the run has already done " + at + " of its " + std::to_string(total) +
         " steps; raise train.steps to continue it (e.g. --set train.steps=" +
         std::to_string(step + total) + ")";
}

int Trainer::run_steps() {
  setup();
  terminal_ = stdout_is_terminal();
  print_header();
  const int64_t total = cfg_.train.steps;
  const int64_t stop = stop_step();
  if (!opts_.resume && total == 0) return save_initial_weights();
  if (start_step_ >= stop) {
    say(nothing_to_train_message(start_step_, total, opts_.until));
    return 0;
  }
  install_interrupt_handlers();
  t_start_ = Clock::now();
  int64_t done = start_step_;
  double train_seconds = 0;
  try {
    train_seconds = train_until(stop, done);
  } catch (...) {
    if (line_open_) std::printf("\n");  // the error message starts on a line of its own
    remove_interrupt_handlers();
    throw;
  }
  remove_interrupt_handlers();
  if (done < total) {
    const std::string how = resume_command();
    say(std::string(stop_requested() ? "interrupted" : "stopped") + " after step " +
        std::to_string(done) + "/" + std::to_string(total) + ": checkpoint saved to " + ckpt_path_);
    say("resume with: " + how);
    return stop_requested() ? 130 : 0;
  }
  summary(done, train_seconds);
  return 0;
}

// What to run on the checkpoint next (not with --quiet).
void Trainer::say_next() {
  if (!opts_.quiet)
    say("next: barrierlm eval " + ckpt_path_ + " --noise 0,0.1   |   barrierlm margins " +
        ckpt_path_);
}

// A new run with train.steps 0: its initial weights (train.init's, or the seed's) validated and
// saved as step 0, so that eval and margins can look at a pretrained model as it is.
int Trainer::save_initial_weights() {
  t_start_ = Clock::now();
  if (lead_) {
    if (cfg_.train.eval_interval > 0) validation(0);
    save(0);
  }
  if (par_dp_) sync_ranks("the checkpoint at step 0", true);
  say("train.steps is 0: the initial weights" +
      (cfg_.train.init.empty() ? std::string(" (random, train.seed)") : " of " + cfg_.train.init) +
      " saved as step 0 to " + ckpt_path_);
  say_next();
  return 0;
}

double Trainer::train_until(int64_t stop, int64_t& done) {
  const int64_t total = cfg_.train.steps;
  const int64_t tokens_per_step = static_cast<int64_t>(cfg_.train.batch_size) * cfg_.model.seq_len;
  double train_seconds = 0, interval_seconds = 0;
  int64_t interval_tokens = 0;
  Clock::time_point last_update = Clock::now();
  for (int64_t s = start_step_; s < stop; ++s) {
    const auto t0 = Clock::now();
    last_ = step(s);
    done = s + 1;
    const double dt = seconds_since(t0);
    train_seconds += dt;
    interval_seconds += dt;
    interval_tokens += tokens_per_step;
    const double rate = interval_seconds > 0 ? interval_tokens / interval_seconds : 0;
    if (is_log_step(done)) {
      log_step(done, last_, rate);
      progress(done, last_, rate, !terminal_);
      interval_seconds = 0;
      interval_tokens = 0;
    } else if (terminal_ && seconds_since(last_update) > 0.1) {
      progress(done, last_, rate, false);  // at most ~10 redraws a second
      last_update = Clock::now();
    }
    // An interrupted run skips validation (the user is waiting) but always saves.
    const bool stopping = stop_requested() || done == stop;
    const int eval_every = cfg_.train.eval_interval;
    const bool validate =
        eval_every > 0 && (done % eval_every == 0 || done == total) && !stop_requested();
    const int ck_every = cfg_.train.checkpoint_interval, keep_every = cfg_.train.keep_checkpoints;
    const bool keep = keep_every > 0 && done % keep_every == 0;
    const bool checkpoint = stopping || keep || (ck_every > 0 && done % ck_every == 0);
    if (validate && lead_) validation(done);
    if (checkpoint && lead_) save(done);
    if (keep && lead_) keep_checkpoint(done);
    if (par_dp_ && (validate || checkpoint))
      sync_ranks((checkpoint ? "the checkpoint after step " : "the validation after step ") +
                     std::to_string(done),
                 checkpoint);
    if (stopping) break;
  }
  return train_seconds;
}

void Trainer::validation(int64_t done) {
  last_val_ = validate_now();
  last_val_.step = done;
  have_val_ = true;
  log_eval(done, last_val_);
  write_curves(done);
  if (opts_.quiet) return;
  std::string v = "val   step " + std::to_string(done) + ": ce " + format_fixed(last_val_.ce, 4);
  if (!std::isnan(last_val_.bpb)) v += "  " + format_fixed(last_val_.bpb, 4) + " bits/byte";
  v += "  acc " + format_fixed(100 * last_val_.acc, 2) + "%  min margin " +
       format_fixed(last_val_.margin, 4);
  say(v);
}

// How the GPUs of `cfg` were asked for, for messages: "--gpus 2", or "device.gpus = 2" (in the
// config or a --set).
std::string gpus_request(const TrainOptions& opts, const Config& cfg) {
  if (opts.gpus > 0) return "--gpus " + std::to_string(opts.gpus);
  return "device.gpus = " + std::to_string(cfg.device.gpus);
}

// `--gpus N` (or device.gpus = N) outside a launcher: start N workers of this program.
int launch_gpus(const Config& cfg, const TrainOptions& opts) {
  const int n = cfg.device.gpus;
  if (cfg.device.backend == "cpu")
    throw ConfigError("device.gpus = " + std::to_string(n) + " needs the CUDA backend but "
                      "device.backend is 'cpu'; use device.backend=cuda or auto, or --gpus 1");
  std::string why;
  const int visible = visible_gpus(&why);
  if (visible < n)
    throw DeviceError(gpus_request(opts, cfg) + ": only " + std::to_string(visible) +
                      " GPU(s) visible" + (visible == 0 ? " (" + why + ")" : "") +
                      "; check CUDA_VISIBLE_DEVICES or ask for fewer");
  LocalLaunch l;
  l.workers = n;
  return launch_local_workers(l);
}

// A launch of one task (`srun -n1`, `srun --pty bash`, a leftover RANK=0 WORLD_SIZE=1) is no
// data-parallel run: --gpus N may start its workers there, which get variables of their own.
void note_single_task_launch_ignored(const LaunchEnv& env, const TrainOptions& opts,
                                     const Config& cfg) {
  if (env.launcher.empty()) return;
  std::fprintf(stderr,
               "barrierlm: note: %s starts its own workers; the %s launch's single-task "
               "variables (%s) are ignored\n",
               gpus_request(opts, cfg).c_str(), env.launcher.c_str(), env.variables().c_str());
  std::fflush(stderr);
}

}  // namespace

int run_train(const TrainOptions& opts) {
  const LaunchEnv env = detect_launch(process_env());
  if (env.distributed()) {
    if (!env.spawned_by_gpus && opts.gpus > 1)
      throw UsageError("--gpus starts its own workers and cannot run under a launcher (" +
                       env.launcher + ": " + env.describe() + "); let the launcher start one "
                       "process per GPU instead");
    // Every rank refuses a config it cannot run before it waits for the others to join.
    check_worker_backend(read_config(opts, &env), env);
  } else {
    const Config cfg = read_config(opts, nullptr);
    if (cfg.device.gpus > 1) {
      note_single_task_launch_ignored(env, opts, cfg);
      return launch_gpus(cfg, opts);
    }
  }
  Trainer t(opts, env);
  return t.run();
}

}  // namespace blm
