// The control plane of a data-parallel run (the data plane, gradients, goes through NCCL):
//
// Rendezvous.  Rank 0 listens on MASTER_ADDR:MASTER_PORT (or on a free port that it publishes in
// BLM_RENDEZVOUS_FILE, a file on a shared file system).  Every other rank connects (retrying
// until BLM_RENDEZVOUS_TIMEOUT) and sends its rank, world size and settings text (the resolved
// config and the like).  Rank 0 checks that every rank runs the same settings; a difference ends
// every rank with one message naming the key ("train.lr is 0.002 on rank 1 but 0.001 on rank
// 0").  Once all have joined, rank 0 sends each the payload (the NCCL unique id).
//
// Control channel.  The rendezvous connections stay open (a star around rank 0) for:
//   - liveness: heartbeats every second both ways; a connection that closes without a goodbye
//     ("rank 2 exited unexpectedly") or stays silent for BLM_NCCL_TIMEOUT seconds ("rank 2
//     stopped responding") ends the run on every rank within seconds;
//   - failure notices: a rank whose training fails tells the others, which exit naming it;
//   - barriers: rank 0 checkpoints and validates alone while the others wait here (not inside a
//     collective, which would time out); a barrier also compares a value across ranks (the hash of
//     the parameters: replicas that drift apart are caught);
//   - progress: each rank's count of issued collectives rides on the heartbeats, so a stalled
//     collective can name the rank that never reached it.
//
// The fatal path (dist_fatal) prints one line, runs the abort hooks (tell the other ranks, abort
// the NCCL communicator; at most 10 s) and exits with status 1: a rank that dies or hangs ends
// the run within BLM_NCCL_TIMEOUT seconds plus a few, never a silent hang.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "core/dist_env.h"

namespace blm {

// ------------------------------------------------------------------ the fatal path

// Registers a hook the fatal path runs (in registration order: the control channel, made first,
// tells the other ranks before the NCCL communicator is aborted); returns its id.  Hooks must not
// block for long and must not call add/remove_abort_hook.
int add_abort_hook(std::function<void()> hook);
void remove_abort_hook(int id);
// Prints "barrierlm: error: <message>; aborting" to stderr, runs the hooks (at most 10 s), and
// exits with status 1.  The first caller wins; a concurrent second caller waits for the exit.
[[noreturn]] void dist_fatal(const std::string& message);

// This rank's number of issued collectives (NCCL calls); sent with the heartbeats.
void dist_note_progress(int64_t issued);
// Why collective number `waiting_for` (1-based) has not completed after `seconds`, naming the
// rank that has not issued it when the heartbeats tell: "rank 1 stopped responding (no progress
// for 30 s: it issued 240 collectives, rank 0 waits on #245)".
std::string dist_describe_stall(int64_t waiting_for, double seconds);

// ------------------------------------------------------------------ rendezvous and control

class ControlChannel {
 public:
  // Joins the run (see the top of this file).  make_payload runs on rank 0 once every rank has
  // joined with the same settings; its result reaches every rank as payload().  Throws
  // ConfigError (different settings, bad world size, duplicate rank) or Error (cannot listen,
  // cannot reach rank 0, timeout) with one line naming the problem; every rank that already
  // joined gets the same message.
  static std::unique_ptr<ControlChannel> join(const LaunchEnv& env, const std::string& settings,
                                              const std::function<std::string()>& make_payload);
  // A clean goodbye: the others do not mistake this exit for a failure.
  ~ControlChannel();
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  const std::string& payload() const;
  int rank() const;
  int world_size() const;

  // Waits until every rank has called barrier (the n-th call on each rank meets the n-th call on
  // the others; `what` names it in messages) and compares `value` across ranks.  Returns "" when
  // every rank passed the same value, else one line naming the first rank that differs.  Peers
  // that die meanwhile end the run through the fatal path; a barrier not met within
  // `timeout_s` throws Error.
  std::string barrier(const std::string& what, uint64_t value, double timeout_s = 3600);

  // Tells every rank this one failed (they end with "rank r failed: <message>").
  void announce_failure(const std::string& message);

  struct Impl;

 private:
  explicit ControlChannel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace blm
