// The data-parallel pieces of `barrierlm train` (the loop itself is in cmd/trainer.cpp):
//
// Rows.  A step's global batch of train.batch_size rows (a pure function of seed, step and row,
// data/dataset.h) is split evenly: rank r owns rows [r B/N, (r+1) B/N), and micro-batch i of
// rank r is rows [r B/N + i Bm, r B/N + (i+1) Bm) with Bm = B / (N grad_accum).  Every rank thus
// reads its own shard of every global batch, and the union over ranks and micro-batches is the
// one-GPU batch.
//
// Why N GPUs give the one-GPU gradient.  Each rank's forward_backward computes the gradient of
// its own mean loss over its Bm T tokens: CE/(Bm T) and lambda R/N_R(rank), where N_R(rank) =
// Bm x (barrier positions per row) x barrier layers x heads.  The positions per row are the
// same for every row (T - 2 for the exact barrier, K for the sampled estimator, whose K positions
// per row are drawn from (seed, step, row) alone), so N_R(rank) = N_R(global) / N and
//   (1/N) sum_r grad[CE_r/(Bm T) + lambda sum_{terms of r} phi / N_R(rank)]
//     = grad[CE/(B T) + lambda sum_{all terms} phi / N_R(global)],
// the one-GPU gradient of the global mean.  grad_accum divides once more by the micro-batch
// count (grad_scale = 1/grad_accum), and the all-reduce uses ncclAvg (the 1/N).  The reported
// loss, CE and barrier are the same averages of the ranks' values (summed with an all-reduce),
// and min_logdet the minimum; they equal the one-GPU numbers up to rounding.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/config.h"
#include "core/dist_control.h"
#include "core/dist_env.h"

namespace blm {

// Rows of each rank and micro-batch (see the top of this file).
struct ShardPlan {
  int world = 1, accum = 1;
  int rank_rows = 0;   // B / N
  int micro_rows = 0;  // B / (N grad_accum)
  int row0(int rank, int micro) const { return rank * rank_rows + micro * micro_rows; }
};
// Throws ConfigError when train.batch_size is not a multiple of grad_accum x world.
ShardPlan shard_rows(int batch_size, int grad_accum, int world);

// Number of visible CUDA devices (0 without the CUDA backend), the reason in *why when none.
int visible_gpus(std::string* why);
// The GPU of this rank: its local rank, or 0 when the launcher left a single device visible
// (CUDA_VISIBLE_DEVICES per task).  Throws DeviceError when there is no such device.
int worker_gpu(const LaunchEnv& env);

// Joins the run's rendezvous (settings compared); rank 0 makes the NCCL unique id, which every
// rank then finds in payload().
std::unique_ptr<ControlChannel> join_rendezvous(const LaunchEnv& env, const std::string& settings);
// The NCCL communicator of this rank on `gpu` (blocks until every rank has joined).
std::unique_ptr<DataParallel> make_nccl_comm(const ControlChannel& channel, const LaunchEnv& env,
                                             int gpu);

// Throws ConfigError when device.backend is 'cpu', which has no NCCL.  Checked before the
// rendezvous, so that every rank says so at once instead of waiting for the others.
void check_worker_backend(const Config& cfg, const LaunchEnv& env);
// The CUDA backend on `gpu` for a worker (check_worker_backend has passed).
std::unique_ptr<Backend> make_worker_backend(const Config& cfg, int gpu);

// A fast 64-bit hash of the parameters: the ranks compare it at checkpoints to prove their
// replicas are identical.
uint64_t replica_hash(const std::vector<float>& params);

}  // namespace blm
