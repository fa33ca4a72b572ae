// NCCL data parallelism on the GPUs of this machine (needs 2 or more; with fewer the cases say
// so and pass nothing off as tested): one thread per GPU, each with its own NcclComm and
// CudaBackend, as the workers of `barrierlm train --gpus N` would be.
//
//   - every rank's averaged gradient equals one GPU's full-batch gradient (same parameters, the
//     union of the ranks' rows): rel. error per tensor <= 1e-5 (fp32; only the order of the
//     token sums differs), exact barrier and K sampled positions per row, grad_accum 1 and 2, buckets
//     of every layer (tiny BLM_BUCKET_MB) and one bucket for everything (huge);
//   - the ranks' gradients are bit-identical to each other, and a second run repeats them bit
//     for bit (the all-reduce is deterministic);
//   - the ranks' summed losses equal the full batch's loss (rel. 1e-6), host all-reduce sum and
//     max are exact on integers;
//   - the bucket plan covers the gradient buffer exactly once, from the end, layer-aligned;
//   - on one GPU too: no gradient is written after its bucket's all-reduce started (a one-rank
//     communicator with a bucket probe; the last case).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cmd/positions.h"
#include "core/backend.h"
#include "core/params.h"
#include "core/rng.h"
#include "cuda/cuda_backend.h"
#include "cuda/nccl_comm.h"
#include "tests/catch.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

int gpus_for_test() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return std::min(n, 4);
}

Config dp_config() {
  Config cfg;
  cfg.model.vocab_size = 67;
  cfg.model.d_model = 64;
  cfg.model.n_head = 2;  // head size 32
  cfg.model.n_layer = 3;
  cfg.model.seq_len = 16;
  cfg.barrier.lambda = 0.5;
  cfg.device.backend = "cuda";
  cfg.device.precision = "fp32";
  return cfg;
}

// Parameters whose barrier gradient is large (qkv scaled so J_t is far from I).
std::vector<float> dp_params(const ParamLayout& layout, uint64_t seed) {
  std::vector<float> p = init_parameters(layout, seed);
  const double qkv_std = std::sqrt(0.2 / layout.config().d_model);
  for (size_t ti = 0; ti < layout.tensors().size(); ++ti) {
    const TensorSpec& t = layout.tensors()[ti];
    for (size_t i = 0; i < t.size; ++i) {
      const double r = normal01(hash2(seed, ti), i);
      if (t.name.find("attn.qkv.w") != std::string::npos) p[t.offset + i] = float(qkv_std * r);
      else if (t.shape.size() == 1) p[t.offset + i] += float(0.05 * r);
    }
  }
  return p;
}

struct Rows {
  int B, T;
  std::vector<int32_t> in, tgt;
  std::vector<uint8_t> mask;  // empty: exact barrier
  Rows slice(int row0, int n) const {
    Rows r{n, T, {}, {}, {}};
    const size_t a = static_cast<size_t>(row0) * T, b = a + static_cast<size_t>(n) * T;
    r.in.assign(in.begin() + a, in.begin() + b);
    r.tgt.assign(tgt.begin() + a, tgt.begin() + b);
    if (!mask.empty()) r.mask.assign(mask.begin() + a, mask.begin() + b);
    return r;
  }
};

struct RankResult {
  std::vector<float> grads;
  double loss_sum = 0;  // all-reduced sum of the ranks' mean losses
  double max_check = 0;
  std::string error;
};

// Gradient accumulation as the trainer runs it: rows [first, first + count) of `rows` in `accum`
// micro-batches (the first writes the gradients, the others add, the last reduces across ranks);
// returns the mean of their losses.
double accumulate_micro_batches(Backend& be, const Rows& rows, int first, int count, int accum) {
  const int micro = count / accum;
  double loss = 0;
  for (int i = 0; i < accum; ++i) {
    const Rows part = rows.slice(first + i * micro, micro);
    ForwardOptions fo;
    fo.barrier_mask = part.mask.empty() ? nullptr : part.mask.data();
    fo.grad_scale = 1.0f / accum;
    fo.accumulate = i > 0;
    fo.reduce_gradients = i == accum - 1;
    loss += be.forward_backward(Batch{micro, rows.T, part.in.data(), part.tgt.data()}, fo).loss /
            accum;
  }
  return loss;
}

// One data-parallel step on `world` GPUs: rank r takes rows [r B/N, (r+1) B/N) in `accum`
// micro-batches, as the trainer does.
std::vector<RankResult> dp_step(const Config& cfg, const std::vector<float>& params,
                                const Rows& rows, int world, int accum) {
  const std::string id = cuda::NcclComm::unique_id();
  std::vector<RankResult> out(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        cuda::NcclComm comm(id, r, world, r, 60);
        std::unique_ptr<Backend> be = make_cuda_backend(cfg, r);
        be->set_parameters(params);
        be->set_data_parallel(&comm);
        const int per_rank = rows.B / world;
        const double loss = accumulate_micro_batches(*be, rows, r * per_rank, per_rank, accum);
        be->get_gradients(out[r].grads);
        double v[1] = {loss};
        comm.allreduce(v, 1, DataParallel::Op::kSum);
        out[r].loss_sum = v[0];
        double m[1] = {static_cast<double>(r * 10 + 3)};
        comm.allreduce(m, 1, DataParallel::Op::kMax);
        out[r].max_check = m[0];
        be->set_data_parallel(nullptr);
      } catch (const std::exception& e) {
        out[r].error = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return out;
}

}  // namespace

TEST_CASE("nccl: N GPUs average to the one-GPU gradient, bit-identical across ranks",
          "[gpu][nccl]") {
  const int world = gpus_for_test();
  if (world < 2) GPU_SKIP("only " << world << " GPU: the NCCL data-parallel cases need 2 or more");
  const Config cfg = dp_config();
  const ParamLayout layout(cfg.model);
  const std::vector<float> params = dp_params(layout, 3);
  const int T = cfg.model.seq_len, B = 8;
  for (bool masked : {false, true}) {
    Rows rows{B, T, randint(size_t(B) * T, 41, cfg.model.vocab_size),
              randint(size_t(B) * T, 42, cfg.model.vocab_size), {}};
    // The sampled estimator: K positions in every row (the identity needs equal counts per row,
    // which the trainer's sampler guarantees).
    if (masked) sample_barrier_mask(/*seed=*/43, /*step=*/2, 0, B, T, /*K=*/5, rows.mask);
    // One GPU, the whole batch.
    std::unique_ptr<Backend> one = make_cuda_backend(cfg, 0);
    one->set_parameters(params);
    ForwardOptions fo;
    fo.barrier_mask = rows.mask.empty() ? nullptr : rows.mask.data();
    const LossTerms full = one->forward_backward(Batch{B, T, rows.in.data(), rows.tgt.data()}, fo);
    std::vector<float> ref;
    one->get_gradients(ref);
    one.reset();
    for (const char* bucket_mb : {"0.0001", "100000"})
      for (int accum : {1, 2}) {
        ScopedEnv bucket("BLM_BUCKET_MB", bucket_mb);
        INFO((masked ? "masked" : "exact") << " barrier, " << world << " GPUs, grad_accum "
                                           << accum << ", BLM_BUCKET_MB " << bucket_mb);
        const std::vector<RankResult> got = dp_step(cfg, params, rows, world, accum);
        for (int r = 0; r < world; ++r) REQUIRE(got[r].error.empty());
        for (const TensorSpec& t : layout.tensors()) {
          const Comparison c = compare(got[0].grads.data() + t.offset, ref.data() + t.offset, t.size);
          INFO(describe("gradient " + t.name, c, 1e-5));
          CHECK(c.rel <= 1e-5);
        }
        for (int r = 1; r < world; ++r) CHECK(got[r].grads == got[0].grads);
        GPU_CHECK_SCALAR("mean loss", got[0].loss_sum / world, full.loss, 1e-6, 1e-3);
        CHECK(got[0].max_check == 10.0 * (world - 1) + 3);
        // Deterministic: the same step again gives the same bits.
        const std::vector<RankResult> again = dp_step(cfg, params, rows, world, accum);
        REQUIRE(again[0].error.empty());
        CHECK(again[0].grads == got[0].grads);
      }
  }
}

TEST_CASE("nccl: the bucket plan covers the gradients once, layer-aligned, from the end",
          "[gpu][nccl]") {
  const int world = gpus_for_test();
  if (world < 2) GPU_SKIP("only " << world << " GPU: the bucket plan case needs 2 or more");
  const Config cfg = dp_config();
  const ParamLayout layout(cfg.model);
  const std::string id = cuda::NcclComm::unique_id();
  std::vector<std::vector<std::pair<size_t, size_t>>> plans(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      cuda::NcclComm comm(id, r, 2, r, 60);
      std::vector<size_t> begins;
      for (int l = 0; l < cfg.model.n_layer; ++l) begins.push_back(layout.layer(l).ln1_w);
      const size_t layer = begins[1] - begins[0];
      // A bucket of 1.5 layers: layers pair up from the end.
      comm.set_gradient_layout(nullptr, begins, layout.total(), layer + layer / 2);
      plans[r] = comm.bucket_plan();
    });
  for (auto& t : threads) t.join();
  const auto& plan = plans[0];
  CHECK(plans[1] == plan);
  REQUIRE(plan.size() >= 2);
  CHECK(plan.front().second == layout.total());
  CHECK(plan.back().first == 0);
  for (size_t i = 1; i < plan.size(); ++i) CHECK(plan[i].second == plan[i - 1].first);
  // Interior boundaries are layer starts.
  for (size_t i = 0; i + 1 < plan.size(); ++i) {
    bool aligned = false;
    for (int l = 0; l < cfg.model.n_layer; ++l) aligned = aligned || plan[i].first == layout.layer(l).ln1_w;
    CHECK(aligned);
  }
}

// The order of the buckets, on one GPU.  A one-rank communicator with a bucket probe makes the
// backend reduce as it does with N ranks (the all-reduce is then an identity), and the probe
// copies each bucket's range on the compute stream at the moment its all-reduce is queued: what
// NCCL will read.  A kernel that writes a gradient after its bucket started (a contribution made
// too late: the barrier's dq, dk added in a later layer's pass, a bias column sum, the tied
// embedding's rows) leaves that copy different from the final gradient.  Both precisions (bf16
// runs the flash barrier, which computes its gradient during the forward and adds dq, dk in the
// backward), the exact and the sampled barrier, a bucket per layer and one for everything,
// gradient accumulation 1 and 2.  The gradients must also equal the same backend's without data
// parallelism, bit for bit (no CUDA graphs there either: they are off with data parallelism).
TEST_CASE("nccl, one GPU: every gradient is final when its bucket's all-reduce starts",
          "[gpu][nccl]") {
  if (gpus_for_test() < 1) GPU_SKIP("no GPU");
  ScopedEnv no_graphs("BLM_CUDA_GRAPHS", "0");
  for (const char* precision : {"fp32", "bf16"})
    for (bool masked : {false, true}) {
      Config cfg = dp_config();
      cfg.model.d_model = 128;  // head size 64: the bf16 flash barrier's main case
      cfg.device.precision = precision;
      const ParamLayout layout(cfg.model);
      const std::vector<float> params = dp_params(layout, 5);
      const int T = cfg.model.seq_len, B = 4;
      Rows rows{B, T, randint(size_t(B) * T, 51, cfg.model.vocab_size),
                randint(size_t(B) * T, 52, cfg.model.vocab_size), {}};
      if (masked) sample_barrier_mask(/*seed=*/53, /*step=*/1, 0, B, T, /*K=*/5, rows.mask);
      for (int accum : {1, 2}) {
        auto run = [&](Backend& be) { accumulate_micro_batches(be, rows, 0, B, accum); };
        // Without data parallelism: the same micro-batches, accumulated.
        std::vector<float> ref;
        {
          std::unique_ptr<Backend> one = make_cuda_backend(cfg, 0);
          one->set_parameters(params);
          run(*one);
          one->get_gradients(ref);
        }
        for (const char* bucket_mb : {"0.0001", "100000"}) {
          ScopedEnv buckets("BLM_BUCKET_MB", bucket_mb);
          INFO(precision << ", " << (masked ? "sampled" : "exact") << " barrier, grad_accum "
                         << accum << ", BLM_BUCKET_MB " << bucket_mb);
          cuda::NcclComm comm(cuda::NcclComm::unique_id(), 0, 1, 0, 60);
          DeviceArray<float> seen(layout.total());
          poison(seen);  // NaN: a range no bucket copied fails below
          std::vector<std::pair<size_t, size_t>> launched;
          comm.set_bucket_probe([&](const float* grads, size_t begin, size_t end, cudaStream_t s) {
            launched.push_back({begin, end});
            CUDA_CHECK(cudaMemcpyAsync(seen.get() + begin, grads + begin,
                                       (end - begin) * sizeof(float), cudaMemcpyDeviceToDevice, s));
          });
          std::unique_ptr<Backend> be = make_cuda_backend(cfg, 0);
          be->set_parameters(params);
          be->set_data_parallel(&comm);
          run(*be);
          std::vector<float> final_grads;
          be->get_gradients(final_grads);
          be->set_data_parallel(nullptr);
          // The buckets: the communicator's plan, once per reducing step, in that order.
          CHECK(launched == comm.bucket_plan());
          // A bucket per layer, the first with lnf, and wte, wpe last; or one for everything.
          const size_t buckets_expected = std::string(bucket_mb) == "100000" ? 1 : cfg.model.n_layer + 1;
          CHECK(launched.size() == buckets_expected);
          const std::vector<float> at_launch = seen.download();
          for (const TensorSpec& t : layout.tensors()) {
            INFO("gradient " << t.name);
            CHECK(std::memcmp(at_launch.data() + t.offset, final_grads.data() + t.offset,
                              t.size * sizeof(float)) == 0);
            CHECK(std::memcmp(final_grads.data() + t.offset, ref.data() + t.offset,
                              t.size * sizeof(float)) == 0);
          }
        }
      }
    }
}
