// `barrierlm train CONFIG --gpus N` on one machine: runs this same program N times, one worker per
// GPU, each with the torchrun-style variables RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
// MASTER_ADDR=127.0.0.1, MASTER_PORT=<a free port>, BLM_GPUS_WORKER=1 and NCCL_NVLS_ENABLE=0
// (unless set), so the workers take exactly the code path of an external launcher
// (core/dist_env.h).  The parent's other rendezvous variables (BLM_RENDEZVOUS_FILE,
// BLM_RENDEZVOUS_PORT, TORCHELASTIC_RUN_ID, ...: rendezvous_variables()) are not passed on.
// The parent only supervises:
//   - SIGINT / SIGTERM are forwarded to every worker (they stop together after the current step,
//     rank 0 saves, all exit 130); the workers have their own process group, so a Ctrl-C in the
//     terminal reaches them once, through the parent;
//   - when a worker dies (non-zero status or a signal) the parent names it ("rank 1 (pid 4242)
//     was killed by signal 9 (Killed)"), gives the others a few seconds to exit on their own
//     (their control channel sees the death), then kills what is left;
//   - the workers get SIGTERM if the parent dies (PR_SET_PDEATHSIG).
#pragma once
#include <string>
#include <vector>

namespace blm {

struct LocalLaunch {
  int workers = 2;
  std::string program = "/proc/self/exe";  // what each worker runs
  std::vector<std::string> args;            // argv[1...] of each worker; empty: this process's
  double grace_s = 5;  // after a worker dies: how long the others get before SIGKILL
};

// Starts the workers and waits for them.  Returns 0 when every worker succeeded, 130 when they
// were interrupted (and none failed), 1 when one failed (its rank and status printed to stderr).
// Throws Error when a worker cannot be started.
int launch_local_workers(const LocalLaunch& launch);

// This process's argv[1...] (from /proc/self/cmdline).
std::vector<std::string> own_arguments();

// A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice).
int free_local_port();

// "exited with status 1", "was killed by signal 9 (Killed)" for a waitpid status.
std::string describe_exit(int wait_status);

}  // namespace blm
