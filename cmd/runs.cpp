// Run directories (the `latest` link, finding a run's checkpoint) and loading a trained model
// into a backend, for runs.h.
#include "cmd/runs.h"

#include "cmd/commands.h"

#include <sys/file.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "cmd/hf_gpt2.h"
#include "cmd/util.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace blm {

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return (fs::path(dir) / name).string();
}

std::string dir_display(const std::string& dir) {
  if (dir.empty()) return "./";
  return dir.back() == '/' ? dir : dir + "/";
}

std::string resolve_checkpoint_path(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    const std::string inside = join_path(path, kCheckpointFile);
    if (!fs::exists(inside, ec))
      throw CheckpointError("'" + dir_display(path) + "' holds no " + kCheckpointFile +
                            " (the run has not saved one yet)");
    return inside;
  }
  if (!fs::exists(path, ec)) throw CheckpointError("checkpoint '" + path + "' does not exist");
  return path;
}

namespace {

// Takes the exclusive lock on the open RUN/.lock `fd`, or closes fd and throws naming the holder.
void lock_or_refuse(int fd, const std::string& run_dir) {
  if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return;
  char holder[32] = {};
  const ssize_t n = ::pread(fd, holder, sizeof holder - 1, 0);
  ::close(fd);
  const std::string pid = n > 0 ? std::string(holder, static_cast<size_t>(n)) : "";
  throw ConfigError("run directory '" + dir_display(run_dir) + "' is in use by another " +
                    "barrierlm" + (pid.empty() ? "" : " (pid " + pid + ")") +
                    "; wait for it to end, or choose another train.run_name");
}

}  // namespace

void RunDirLock::check_free(const std::string& run_dir) {
  const std::string path = join_path(run_dir, ".lock");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;  // no lock file: no training has held this directory
  lock_or_refuse(fd, run_dir);
  ::close(fd);  // releases the probe's lock at once
}

std::vector<NamedFile> model_input_files(const std::string& checkpoint, const std::string& data) {
  std::vector<NamedFile> inputs;
  if (is_hf_gpt2_dir(checkpoint)) {
    std::vector<std::string> names = {"config.json", "model.safetensors", "barrierlm.json"};
    names.insert(names.end(), hf_vocabulary_files().begin(), hf_vocabulary_files().end());
    for (const std::string& name : names)
      inputs.push_back({"a file of the model", join_path(checkpoint, name)});
  } else {
    inputs.push_back({"the checkpoint", checkpoint});
  }
  if (!data.empty())
    for (const std::string& file : expand_data_files(data, "--data"))
      inputs.push_back({"the data file", file});
  return inputs;
}

RunDirLock::RunDirLock(const std::string& run_dir) {
  const std::string path = join_path(run_dir, ".lock");
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd_ < 0) throw Error("cannot create '" + path + "': " + std::strerror(errno));
  const int fd = fd_;
  fd_ = -1;  // closed by lock_or_refuse when it throws
  lock_or_refuse(fd, run_dir);
  fd_ = fd;
  const std::string pid = std::to_string(::getpid());
  if (::ftruncate(fd_, 0) == 0 && ::pwrite(fd_, pid.data(), pid.size(), 0) < 0) {
    // The pid is for the message above only; the lock holds without it.
  }
}

RunDirLock::~RunDirLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the lock
}

std::string claim_new_directory(const std::string& out_dir, const std::string& base) {
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw Error("cannot create directory '" + out_dir + "': " + ec.message());
  for (int i = 1;; ++i) {
    const std::string name = i == 1 ? base : base + "-" + std::to_string(i);
    if (fs::create_directory(fs::path(out_dir) / name, ec)) return name;
    if (ec) throw Error("cannot create run directory '" + join_path(out_dir, name) + "': " +
                        ec.message());
  }
}

std::string find_latest_run(const std::string& out_dir) {
  const fs::path link = fs::path(out_dir) / kLatestLink;
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(link, ec);
  if (ec || !fs::exists(st)) return "";
  std::string name;
  if (fs::is_symlink(st)) {
    name = fs::read_symlink(link, ec).string();
    if (ec) return "";
  } else if (fs::is_regular_file(st)) {
    name = read_text_file(link.string());
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' '))
      name.pop_back();
  } else {
    return "";
  }
  if (name.empty()) return "";
  const fs::path run = fs::path(name).is_absolute() ? fs::path(name) : fs::path(out_dir) / name;
  return run.string();
}

void set_latest_run(const std::string& out_dir, const std::string& run_name) {
  const fs::path link = fs::path(out_dir) / kLatestLink;
  const fs::path tmp = fs::path(out_dir) / (std::string(".latest.tmp.") + std::to_string(getpid()));
  std::error_code ec;
  fs::remove(tmp, ec);
  // A relative symlink keeps working when the whole out_dir is moved.
  if (symlink(run_name.c_str(), tmp.c_str()) == 0) {
    if (std::rename(tmp.c_str(), link.c_str()) == 0) return;
    const std::string why = std::strerror(errno);
    fs::remove(tmp, ec);
    throw Error("cannot update '" + link.string() + "': " + why);
  }
  write_file_atomic(link.string(), run_name + "\n");  // no symlinks here: a file naming the run
}

void check_latest_link(const std::string& out_dir) {
  const fs::path link = fs::path(out_dir) / kLatestLink;
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(link, ec);
  if (ec || !fs::exists(st) || fs::is_symlink(st) || fs::is_regular_file(st)) return;
  throw ConfigError("'" + link.string() + "' is " +
                    (fs::is_directory(st) ? "a directory" : "not a link") +
                    "; barrierlm keeps a link to the newest run there: move it away or choose "
                    "another train.out_dir");
}

std::string latest_checkpoint(const std::string& out_dir) {
  const std::string run = find_latest_run(out_dir);
  std::error_code ec;
  if (run.empty())
    throw Error("no run found in '" + dir_display(out_dir) +
                "'; train one first (barrierlm train config.yaml) or pass a checkpoint");
  if (!fs::is_directory(run, ec))
    throw Error("'" + (fs::path(out_dir) / kLatestLink).string() + "' points at '" + run +
                "', which is gone (moved or removed?); pass a checkpoint or run directory");
  const std::string ckpt = join_path(run, kCheckpointFile);
  if (!fs::exists(ckpt, ec))
    throw Error("the latest run '" + dir_display(run) + "' has no " + kCheckpointFile +
                " yet; wait for its first save or pass a checkpoint");
  return ckpt;
}

std::string checkpoint_for(const ModelOptions& o) {
  if (is_hf_gpt2_dir(o.checkpoint)) return o.checkpoint;
  if (!o.checkpoint.empty()) return resolve_checkpoint_path(o.checkpoint);
  const std::string path = latest_checkpoint(o.runs_dir);
  std::fprintf(stderr, "barrierlm: using the latest run: %s\n", path.c_str());
  return path;
}

Checkpoint load_model_checkpoint(const std::string& path) {
  return is_hf_gpt2_dir(path) ? checkpoint_from_hf_dir(path) : load_checkpoint(path);
}

TrainedModel load_trained_model(const std::string& checkpoint_path, const std::string& backend,
                                int threads) {
  TrainedModel m;
  m.path = checkpoint_path;
  m.checkpoint = load_model_checkpoint(checkpoint_path);
  m.tokenizer = make_tokenizer(m.checkpoint.tokenizer);
  Config cfg = m.checkpoint.config;
  cfg.device.backend = backend;
  cfg.device.threads = threads;
  // A model trained in bf16 on a GPU is evaluated on the CPU in the CPU's precision.
  if (backend == "cpu" && cfg.device.precision == "bf16") cfg.device.precision = "fp32";
  cfg.device.gpus = 1;
  // Evaluation needs CE, logits and margins only: with lambda 0 a backend skips the barrier term
  // (margins are computed for any lambda; the barrier layers come from the checkpoint's config).
  cfg.barrier.lambda = 0;
  m.backend = make_backend(cfg, "--backend");
  m.backend->set_parameters(m.checkpoint.params);
  // The backend holds the weights now; the checkpoint's copies and AdamW moments are not needed.
  std::vector<float>().swap(m.checkpoint.params);
  std::vector<float>().swap(m.checkpoint.adam_m);
  std::vector<float>().swap(m.checkpoint.adam_v);
  return m;
}

namespace {

// A run's data paths are as `train` was given them: relative ones are relative to the directory
// it ran in, which eval, margins and sample may not run in.  When such a path does not exist
// from here, look for the run's data under the checkpoint's directory and its ancestors (a run
// trained in the repository root, runs/NAME/checkpoint.bin, finds the root two levels up), and
// say which directory was taken.  Paths that exist from here are left alone.
void find_run_data(DataConfig& dc, const std::string& checkpoint) {
  const auto missing = [](const std::string& p) {
    std::error_code ec;
    return !p.empty() && fs::path(p).is_relative() && !fs::exists(p, ec);
  };
  if (!missing(dc.train) && !missing(dc.val)) return;
  std::error_code ec;
  fs::path dir = fs::weakly_canonical(fs::absolute(checkpoint, ec), ec).parent_path();
  constexpr int kLevels = 4;  // the run directory, out_dir, and two more
  for (int up = 0; up < kLevels && !dir.empty(); ++up, dir = dir.parent_path()) {
    const auto at = [&](const std::string& p) {
      return p.empty() || fs::path(p).is_absolute() ? p : (dir / p).string();
    };
    const std::string train = at(dc.train), val = at(dc.val);
    if ((train.empty() || fs::exists(train, ec)) && (val.empty() || fs::exists(val, ec))) {
      std::fprintf(stderr, "barrierlm: note: the run's data paths are relative to where it was "
                           "trained; found them under '%s'\n", dir.string().c_str());
      dc.train = train;
      dc.val = val;
      return;
    }
    if (dir == dir.parent_path()) break;  // the root
  }
}

}  // namespace

Dataset open_model_data(const TrainedModel& model, const std::string& data_file) {
  const Config& cfg = model.checkpoint.config;
  DataConfig dc = cfg.data;
  if (data_file.empty() && dc.train.empty())
    throw DataError("'" + model.path + "' is a Hugging Face model, with no run data of its own: "
                    "pass --data FILE");
  if (!data_file.empty()) {
    // A pattern that matches nothing is named as the option, not as data.train, the key the
    // file takes below.
    expand_data_files(data_file, "--data");
    // The whole file is the evaluation text.
    dc.train = data_file;
    dc.val = data_file;
    dc.format = "auto";
  } else if (!dc.val.empty()) {
    // Only the validation text is read: a run copied without its (large) training corpus
    // evaluates all the same.
    dc.train = dc.val;
    find_run_data(dc, model.path);
  } else {
    find_run_data(dc, model.path);  // the validation part split off the training text
  }
  try {
    return open_dataset(dc, cfg.model.seq_len, model.checkpoint.tokenizer);
  } catch (const DataError& e) {
    if (!data_file.empty()) throw;
    throw DataError(std::string(e.what()) +
                    " (the run's data; pass --data FILE to evaluate on another file)");
  }
}

}  // namespace blm
