// The one interface every backend implements: the CPU reference (core/cpu_backend.cpp) and the
// CUDA backend (cuda/).  A backend owns the parameters, gradients and AdamW moments of one model
// in the layout of core/params.h; the host sees them only through get_/set_ calls.
//
// One training step, as the trainer drives it:
//   terms = backend.forward_backward(batch, opts);    // gradients of (CE + lambda R) * grad_scale
//   norm  = backend.grad_norm();                       // global L2 norm
//   backend.adamw_step(hyper, lr, clip_scale);         // clip_scale = min(1, clip / (norm + 1e-6))
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/error.h"

namespace blm {

// A batch of B sequences of length T, row-major [B, T], on the host.
struct Batch {
  int B = 0, T = 0;
  const int32_t* inputs = nullptr;
  const int32_t* targets = nullptr;  // may be null for forward-only calls that need no loss
};

struct ForwardOptions {
  // Evaluation noise (spec section 6): e_t += N(0, noise_std^2), drawn as
  // noise_std * normal01(noise_seed, (b*T + t)*d + i), so every backend draws the same noise.
  double noise_std = 0.0;
  uint64_t noise_seed = 0;
  // Sampled barrier estimator: [B, T] mask of the query positions that count (barrier.positions
  // > 0).  Null: every position t >= 2 counts (the exact barrier).
  const uint8_t* barrier_mask = nullptr;
  // Compute the barrier term even when lambda = 0 (for reporting); it then adds no gradient.
  bool report_barrier = false;
  // forward_backward only: gradients are of (loss * grad_scale), added to the existing gradient
  // buffer when accumulate is true, else written over it.
  float grad_scale = 1.0f;
  bool accumulate = false;
  // forward_backward with a data-parallel backend (set_data_parallel): average the gradient
  // buffer over the workers during this call's backward (buckets start while backward runs).
  // Set it false on every micro-batch of a step but the last.  No effect on a single worker.
  bool reduce_gradients = true;
};

struct LossTerms {
  double loss = 0;      // ce + lambda * barrier
  double ce = 0;        // mean cross-entropy over targets, nats/token
  double barrier = 0;   // R: mean of phi(det J_t) over batch x barrier layers x heads x positions
  double min_logdet = 0;  // smallest log det J_t among the counted terms (0 when none computed)
  int64_t tokens = 0;   // number of targets
  int64_t correct = 0;  // targets that are the argmax of the logits
  int64_t barrier_terms = 0;  // N_R
};

struct AdamWHyper {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

// Stability margins (spec section 5) of every (sequence, layer, head, position), all layers.
struct Margins {
  int B = 0, L = 0, H = 0, T = 0;
  std::vector<float> sigma_min;  // [B, L, H, T]  smallest singular value of J_t
  std::vector<float> logdet;     // [B, L, H, T]  log det J_t (-inf where det J_t <= 0)
  float& at(std::vector<float>& v, int b, int l, int h, int t) const {
    return v[((static_cast<size_t>(b) * L + l) * H + h) * T + t];
  }
  float at(const std::vector<float>& v, int b, int l, int h, int t) const {
    return v[((static_cast<size_t>(b) * L + l) * H + h) * T + t];
  }
};

// Data parallelism: the workers of one run (one per GPU) and the collectives the trainer needs
// on the host.  cuda/nccl_comm.h implements it with NCCL; a backend that supports it reduces its
// gradients through it (Backend::set_data_parallel).  Every worker holds the same parameters and
// computes the gradient of the mean loss over its own rows; with equal row counts per worker the
// average of those gradients is the gradient of the mean over all rows (see cmd/trainer.cpp).
class DataParallel {
 public:
  enum class Op { kSum, kMax };
  virtual ~DataParallel() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // values[0..n) := the sum (or max) over all workers, in place; every worker gets the result.
  virtual void allreduce(double* values, int n, Op op) = 0;
  // What the workers communicate through, for the run's header ("NCCL 2.28.9").
  virtual std::string description() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;  // e.g. "cpu-fp32", "cuda-bf16 (NVIDIA H200)"

  virtual void set_parameters(const std::vector<float>& params) = 0;
  virtual void get_parameters(std::vector<float>& params) = 0;
  // AdamW moments m, v and the step count t used for bias correction.
  virtual void set_optimizer_state(const std::vector<float>& m, const std::vector<float>& v,
                                   int64_t t) = 0;
  virtual void get_optimizer_state(std::vector<float>& m, std::vector<float>& v, int64_t& t) = 0;
  virtual void get_gradients(std::vector<float>& grads) = 0;

  // Loss only (evaluation).  batch.targets must be set.
  virtual LossTerms forward(const Batch& batch, const ForwardOptions& opts) = 0;
  // Loss and gradients.
  virtual LossTerms forward_backward(const Batch& batch, const ForwardOptions& opts) = 0;
  virtual double grad_norm() = 0;
  // One AdamW step on every parameter with gradient g * clip_scale (decoupled weight decay on the
  // tensors whose TensorSpec::decay is set, as torch.optim.AdamW: p -= lr*wd*p; then the update).
  virtual void adamw_step(const AdamWHyper& hyper, double lr, double clip_scale) = 0;

  // Logits of the last position of each sequence: [B, V] (for sampling).
  virtual void last_logits(const Batch& batch, std::vector<float>& logits) = 0;
  // Logits [V] of the last of tokens (one sequence, at most seq_len), for sampling token by
  // token: a backend may keep the keys and values of the previous call's tokens and compute only
  // what was appended to them (the CPU backend does).  By default, last_logits of the whole.
  virtual void next_logits(const std::vector<int32_t>& tokens, std::vector<float>& logits) {
    last_logits(Batch{1, static_cast<int>(tokens.size()), tokens.data(), nullptr}, logits);
  }
  // Margins and log-determinants of every layer and head (no gradient, any lambda).
  virtual Margins margins(const Batch& batch) = 0;

  // Joins a data-parallel run: from now on forward_backward averages the gradients over the
  // workers (ForwardOptions::reduce_gradients).  dp must outlive the backend's use of it; null
  // leaves the run.  Backends without support refuse a run of several workers.
  virtual void set_data_parallel(DataParallel* dp) {
    if (dp != nullptr && dp->world_size() > 1)
      throw DeviceError("the " + name() + " backend cannot train on several workers; data-parallel "
                        "training needs the CUDA backend (device.backend=cuda)");
  }
};

// Makes the backend the config asks for ("auto": CUDA when built and a GPU is present).
// Throws DeviceError with a clear message when the request cannot be met.
// `setting` names how the user chose the backend, for the messages ("device.backend", or a
// command's "--backend").
std::unique_ptr<Backend> make_backend(const Config& cfg,
                                      const std::string& setting = "device.backend");
// The CPU reference; precision "fp64" runs it in double.
std::unique_ptr<Backend> make_cpu_backend(const ModelConfig& m, const BarrierConfig& b,
                                          const std::string& precision, int threads);

}  // namespace blm
