// checkpoint.bin: everything needed to resume a run bit for bit, or to evaluate it.
//
// File layout (little-endian):
//   header (24 bytes): magic "BLMCKPT\0" (8 bytes), format version u32, header length u32 (= 24),
//                      file length u64 (the whole file, trailer included: detects truncation)
//   sections, each: tag (4 chars), length u64, payload
//     "CONF"  the run config as YAML (config_to_yaml)
//     "TOKN"  the tokenizer (Tokenizer::serialize)
//     "STAT"  step i64, adam_t i64, tokens_seen i64, rng seed u64
//     "TENS"  named tensors: count u32, then per tensor: name length u32, name, rank u32,
//             dims u64 x rank, data (float32 x product of dims); exactly the tensors of
//             ParamLayout(config.model), in its order
//     "ADAM"  n u64 (0, or the parameter count), then m and v, n float32 each, in the layout
//     "META"  free-form JSON (backend, date, metrics at save time)
//   Readers skip sections with other tags (room for later additions).
//   trailer: "END!", length u64 (= 8), the FNV-1a 64 checksum of every byte before it
// Written atomically: a temp file in the same directory, fsync, rename, fsync of the directory.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace blm {

constexpr uint32_t kCheckpointVersion = 1;

struct Checkpoint {
  Config config;
  std::string tokenizer;   // Tokenizer::serialize()
  int64_t step = 0;        // optimizer steps done
  int64_t adam_t = 0;
  int64_t tokens_seen = 0;
  uint64_t seed = 0;
  std::vector<float> params;  // ParamLayout(config.model) order
  std::vector<float> adam_m, adam_v;  // empty when the checkpoint has no optimizer state
  std::string meta_json;
};

// Throws CheckpointError (naming the file) on any I/O failure; never leaves a partial file.
// ck must be consistent: validate(ck.config) passes, model.vocab_size is resolved (>= 2),
// params has ParamLayout(ck.config.model).total() values, adam_m/adam_v none or as many.
void save_checkpoint(const std::string& path, const Checkpoint& ck);
// Throws CheckpointError naming the file and the problem: truncated, wrong magic, unsupported
// version, checksum mismatch, tensor names/shapes that disagree with the config.
Checkpoint load_checkpoint(const std::string& path);
// The config, tokenizer, step, counts and metadata of a checkpoint, without its tensors and
// moments (params, adam_m, adam_v stay empty) and without reading the whole file for the
// checksum: for a look at a checkpoint that may be gigabytes (its step, its config).
Checkpoint load_checkpoint_summary(const std::string& path);

// Writes a file atomically (temp + fsync + rename); throws blm::Error naming the path.  A path
// that is a symbolic link writes the file the link names; a device or pipe (/dev/null, a FIFO)
// is written in place, never replaced.  (save_checkpoint instead replaces a link by the new file:
// a link to another run's checkpoint must not overwrite it.)
void write_file_atomic(const std::string& path, const std::string& contents);

// Removes the temporary files "<name>.tmp.<pid>[.<n>]" of atomic writes in dir whose name starts
// with `prefix` ("": all) and whose process is gone: a write cut short by SIGKILL (or a second
// Ctrl-C) leaves its temporary file, while the file it was replacing stays whole.  A file of a
// process still running (another barrierlm writing there) is left alone.  Every atomic write
// does this for its own file; train does it for the whole run directory.
void remove_stale_temporaries(const std::string& dir, const std::string& prefix = "");

}  // namespace blm
