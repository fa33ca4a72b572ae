// Row sharding, GPU choice, joining a data-parallel run (rendezvous + NCCL) and the replica hash
// of cmd/data_parallel.h.
#include "cmd/data_parallel.h"

#include <cstring>

#include "core/error.h"
#include "core/rng.h"
#if BLM_HAVE_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/nccl_comm.h"
#endif

namespace blm {

ShardPlan shard_rows(int batch_size, int grad_accum, int world) {
  const long long parts = static_cast<long long>(grad_accum) * world;
  if (batch_size <= 0 || grad_accum <= 0 || world <= 0 || batch_size % parts != 0)
    throw ConfigError("train.batch_size (" + std::to_string(batch_size) +
                      ") must be divisible by train.grad_accum x the number of GPUs (" +
                      std::to_string(grad_accum) + " x " + std::to_string(world) + " = " +
                      std::to_string(parts) + ")");
  ShardPlan p;
  p.world = world;
  p.accum = grad_accum;
  p.rank_rows = batch_size / world;
  p.micro_rows = p.rank_rows / grad_accum;
  return p;
}

int visible_gpus(std::string* why) {
#if BLM_HAVE_CUDA
  return cuda_device_count(why);
#else
  if (why) *why = "this barrierlm was built without CUDA";
  return 0;
#endif
}

int worker_gpu(const LaunchEnv& env) {
  std::string why;
  const int n = visible_gpus(&why);
  if (n == 0)
    throw DeviceError("rank " + std::to_string(env.rank) + " sees no GPU (" + why +
                      "); data-parallel training needs one GPU per rank");
  if (n == 1) return 0;  // the launcher gave each task its own device
  if (env.local_rank >= n)
    throw DeviceError("rank " + std::to_string(env.rank) + " has local rank " +
                      std::to_string(env.local_rank) + " but only " + std::to_string(n) +
                      " GPUs are visible; start at most " + std::to_string(n) +
                      " ranks per machine");
  return env.local_rank;
}

std::unique_ptr<ControlChannel> join_rendezvous(const LaunchEnv& env, const std::string& settings) {
  // The rendezvous runs in every build, so a mismatched config is reported as such even where
  // the NCCL id cannot be made.
  return ControlChannel::join(env, settings, []() -> std::string {
#if BLM_HAVE_CUDA
    return cuda::NcclComm::unique_id();
#else
    throw DeviceError("data-parallel training needs the CUDA backend and NCCL, and this "
                      "barrierlm was built without CUDA");
#endif
  });
}

std::unique_ptr<DataParallel> make_nccl_comm(const ControlChannel& channel, const LaunchEnv& env,
                                             int gpu) {
#if BLM_HAVE_CUDA
  return std::make_unique<cuda::NcclComm>(channel.payload(), env.rank, env.world, gpu,
                                          env.timeout_s);
#else
  (void)channel;
  (void)env;
  (void)gpu;
  throw DeviceError("data-parallel training needs the CUDA backend and NCCL, and this barrierlm "
                    "was built without CUDA");
#endif
}

void check_worker_backend(const Config& cfg, const LaunchEnv& env) {
  if (cfg.device.backend != "cpu") return;
  throw ConfigError("device.backend is 'cpu' but data-parallel training (" + env.world_variable +
                    "=" + std::to_string(env.world) + ": a " + env.launcher + " launch of " +
                    std::to_string(env.world) + " ranks) needs the CUDA backend and NCCL; use "
                    "device.backend=cuda or auto");
}

// (A cpu backend was refused before the rendezvous: check_worker_backend, in run_train.)
std::unique_ptr<Backend> make_worker_backend(const Config& cfg, int gpu) {
#if BLM_HAVE_CUDA
  const std::string unsupported = cuda_unsupported_reason(cfg);
  if (!unsupported.empty())
    throw DeviceError("data-parallel training needs the CUDA backend, which cannot run this model (" +
                      unsupported + ")");
  return make_cuda_backend(cfg, gpu);
#else
  (void)gpu;
  throw DeviceError("data-parallel training needs the CUDA backend, and this barrierlm was built "
                    "without CUDA");
#endif
}

uint64_t replica_hash(const std::vector<float>& params) {
  // Word-wise: 8 bytes per round keeps a 124M-parameter model under a tenth of a second.
  uint64_t h = 0x9E3779B97F4A7C15ull ^ params.size();
  const size_t words = params.size() / 2;
  const unsigned char* p = reinterpret_cast<const unsigned char*>(params.data());
  for (size_t i = 0; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, p + 8 * i, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  if (params.size() % 2) {
    uint32_t w;
    std::memcpy(&w, &params.back(), 4);
    h = mix64(h ^ w);
  }
  return mix64(h);
}

}  // namespace blm
