// Helpers of the whole-backend GPU tests (test_cuda_backend.cpp, test_bf16.cpp): a model case,
// random parameters that make the barrier matter, the CUDA backend's config for a case, and a
// random batch with its own storage.
//
// The random models are not GPT-2's 0.02-std initialisation: biases and LayerNorm parameters are
// random (never 0 / 1), and the qkv weights are scaled so the heads' Jacobians J_t = I - C_t are
// well away from I (spectral radius of C ~ 0.2), so the barrier and its gradient are large enough
// to be tested.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/config.h"
#include "core/params.h"
#include "core/rng.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/model_config.h"

namespace blm {
namespace gputest {

struct ModelCase {
  const char* name;
  ModelConfig model;
  int B, T;
  std::vector<int> barrier_layers;  // empty: every layer
  bool mask;                        // a random barrier position mask (the sampled estimator)
};

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Random parameters for testing (see the top of this file).
inline std::vector<float> test_params(const ParamLayout& layout, uint64_t seed) {
  std::vector<float> p = init_parameters(layout, seed);
  const int d = layout.config().d_model;
  const double qkv_std = std::sqrt(0.2 / d);  // |C| ~ qkv_std^2 * d
  for (size_t ti = 0; ti < layout.tensors().size(); ++ti) {
    const TensorSpec& t = layout.tensors()[ti];
    const uint64_t s = hash2(seed + 17, ti);
    for (size_t i = 0; i < t.size; ++i) {
      float& x = p[t.offset + i];
      const double r = normal01(s, i);
      if (ends_with(t.name, "attn.qkv.w")) x = static_cast<float>(qkv_std * r);
      else if (t.name == "wte" || t.name == "wpe") x = static_cast<float>(0.1 * r);
      else if (ends_with(t.name, "ln1.w") || ends_with(t.name, "ln2.w") || t.name == "lnf.w")
        x = static_cast<float>(1.0 + 0.1 * r);
      else if (t.shape.size() == 1) x = static_cast<float>(0.05 * r);  // biases, LN shifts
    }
  }
  return p;
}

// The CUDA backend's config for a case: barrier weight lambda, precision "fp32" or "bf16".
inline Config cuda_config(const ModelCase& c, double lambda, const char* precision = "fp32") {
  Config cfg;
  cfg.model = c.model;
  cfg.barrier.lambda = lambda;
  cfg.barrier.layers = c.barrier_layers;
  cfg.device.backend = "cuda";
  cfg.device.precision = precision;
  return cfg;
}

// A batch with its own storage.
struct HostBatch {
  int B = 0, T = 0;
  std::vector<int32_t> inputs, targets;  // [B, T]
  std::vector<uint8_t> mask;             // [B, T] or empty
  Batch view() const { return Batch{B, T, inputs.data(), targets.data()}; }
};

// Random tokens below V, and with_mask a random barrier position mask.
inline HostBatch make_batch(int B, int T, int V, uint64_t seed, bool with_mask) {
  HostBatch hb;
  hb.B = B;
  hb.T = T;
  hb.inputs = randint(static_cast<size_t>(B) * T, seed, V);
  hb.targets = randint(static_cast<size_t>(B) * T, seed + 1, V);
  if (with_mask) {
    const std::vector<int32_t> bits = randint(static_cast<size_t>(B) * T, seed + 2, 2);
    hb.mask.assign(bits.begin(), bits.end());
  }
  return hb;
}

// A case's own batch.
inline HostBatch make_batch(const ModelCase& c, uint64_t seed) {
  return make_batch(c.B, c.T, c.model.vocab_size, seed, c.mask);
}

inline ForwardOptions options_for(const HostBatch& hb) {
  ForwardOptions o;
  o.barrier_mask = hb.mask.empty() ? nullptr : hb.mask.data();
  return o;
}

// forward()'s terms against forward_backward()'s for the same batch and parameters.  They share
// every kernel but the barrier's linear algebra: forward() takes log det from an LU
// (barrier_linalg_det), the training step from its Gauss-Jordan inverse, which on the diagonal
// runs two steps per sweep: the same pivot rows, other fp32 roundings (about D u per log det;
// measured 1.7e-8 in the barrier term and 1e-9 relative in the loss of a dh 64 case at lambda
// 0.5).  So CE is the same bits, the barrier term within 1e-6 (absolute: a mean of -log det, near
// 0 for det near 1) and the loss within 1e-6 relative.
inline void check_forward_matches(const LossTerms& f, const LossTerms& t) {
  CHECK(f.ce == t.ce);
  CHECK(std::fabs(f.barrier - t.barrier) <= 1e-6);
  CHECK(std::fabs(f.loss - t.loss) <= 1e-6 * std::fabs(t.loss));
}

}  // namespace gputest
}  // namespace blm
