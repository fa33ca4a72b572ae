// Where this process stands in a data-parallel run, read from the environment its launcher set:
//   torchrun-style   RANK, WORLD_SIZE, LOCAL_RANK [, LOCAL_WORLD_SIZE], MASTER_ADDR, MASTER_PORT
//                    (also what `barrierlm train --gpus N` gives each of its workers)
//   Open MPI         OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
//   MPICH / Hydra    PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
//   Slurm (srun)     SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; rank 0's host defaults
//                    to the first node of SLURM_STEP_NODELIST, the port to one derived from the
//                    job and step ids.  An sbatch script itself (no srun step) is one process.
// The first of these that is present wins (a set is present when its rank or its world variable
// is; Slurm's only when both are).  Another set present with more ranks than the winner is an
// error: a launcher started inside another (torchrun in an srun step) has at least as many
// ranks, so that set, or the winner, is left over from elsewhere.  Rank 0's rendezvous is
// MASTER_ADDR:MASTER_PORT, or a file on a shared file system named by BLM_RENDEZVOUS_FILE
// (core/dist_control.h).  Under torchrun (TORCHELASTIC_RUN_ID set), whose own store holds
// MASTER_PORT, it is MASTER_PORT + 1 (so MASTER_PORT 65535 is refused); BLM_RENDEZVOUS_PORT
// overrides the port in every case.
// Timeouts: BLM_NCCL_TIMEOUT (seconds without progress before a run is aborted, default 30) and
// BLM_RENDEZVOUS_TIMEOUT (seconds to wait for every rank to join, default 300).
//
// Also what the ranks compare at the rendezvous: a "settings text" (the resolved config and the
// like) whose first differing key first_difference names.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace blm {

// getenv, or a fake for tests: returns null for an unset variable.
using EnvLookup = std::function<const char*(const char*)>;
EnvLookup process_env();

struct LaunchEnv {
  int rank = 0, world = 1;              // this process's rank among `world` workers
  int local_rank = 0, local_world = 1;  // its index among the workers of its machine (its GPU)
  std::string master_addr;              // rank 0's host (empty with a rendezvous file)
  int master_port = 0;
  std::string rendezvous_file;  // BLM_RENDEZVOUS_FILE: rank 0 publishes its address there
  std::string launcher;         // "torchrun-style", "Open MPI", "MPICH", "Slurm", "" (none)
  std::string rank_variable, world_variable;  // the launcher's names: "RANK", "WORLD_SIZE"
  bool spawned_by_gpus = false;  // a worker of `barrierlm train --gpus N` (BLM_GPUS_WORKER=1)
  double timeout_s = 30;              // BLM_NCCL_TIMEOUT
  double rendezvous_timeout_s = 300;  // BLM_RENDEZVOUS_TIMEOUT
  bool distributed() const { return world > 1; }
  // "rank 1 of 4 (local rank 1), torchrun-style launch, rendezvous 127.0.0.1:29500"
  std::string describe() const;
  // "RANK=1, WORLD_SIZE=4": where rank and world came from ("" without a launcher).
  std::string variables() const;
};

// The variables that decide where the ranks of a run meet (rank 0's address and port, the
// rendezvous file, torchrun's port shift): `--gpus` sets or removes each of them for its workers.
const std::vector<std::string>& rendezvous_variables();

// Reads the launcher's variables.  Throws ConfigError naming the variable when one is missing,
// not a number, or out of range (e.g. "RANK=4 must be below WORLD_SIZE=4").
LaunchEnv detect_launch(const EnvLookup& env);

// The first host of a Slurm host list: "gpu[003-010,012],login" -> "gpu003",
// "rack[1-2]-n[07,9]" -> "rack1-n07".  Throws ConfigError for a malformed list.
std::string first_slurm_host(const std::string& nodelist);

// 64-bit FNV-1a of bytes (settings texts, parameter replicas); h continues an earlier hash.
uint64_t fnv1a64(const void* data, size_t bytes, uint64_t h = 0xcbf29ce484222325ull);

// The first line where two settings texts differ, as "train.lr is 0.002 on rank 1 but 0.001 on
// rank 0" (the YAML sections of config_to_yaml become "section.key"); "" when they are equal.
std::string first_difference(const std::string& a, const std::string& a_name,
                             const std::string& b, const std::string& b_name);

}  // namespace blm
