// The CPU backend: core/backend.h over ReferenceModel<Real> (float for "fp32", double for "fp64")
// and the AdamW of core/optim.h.  Parameters, gradients and moments are kept in Real; the host
// exchanges them as float (core/params.h layout).
#include <omp.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/blas.h"
#include "core/decoder.h"
#include "core/error.h"
#include "core/optim.h"
#include "core/reference.h"

namespace blm {
namespace {

template <class Real>
class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& m, const BarrierConfig& b, std::string name)
      : model_(m, b),
        name_(std::move(name)),
        n_(model_.layout().total()),
        params_(n_, Real(0)) {}

  std::string name() const override { return name_; }

  void set_parameters(const std::vector<float>& p) override {
    check_size(p.size(), "set_parameters");
    decoded_.clear();  // the decoder's keys and values are of the old parameters
    std::copy(p.begin(), p.end(), params_.begin());
  }
  void get_parameters(std::vector<float>& p) override { to_float(params_, p); }

  void set_optimizer_state(const std::vector<float>& m, const std::vector<float>& v, int64_t t) override {
    allocate_training_state();
    if (m.empty() && v.empty()) {  // a checkpoint without optimizer state: fresh moments
      std::fill(m_.begin(), m_.end(), Real(0));
      std::fill(v_.begin(), v_.end(), Real(0));
    } else {
      check_size(m.size(), "set_optimizer_state (m)");
      check_size(v.size(), "set_optimizer_state (v)");
      std::copy(m.begin(), m.end(), m_.begin());
      std::copy(v.begin(), v.end(), v_.begin());
    }
    t_ = t;
  }
  void get_optimizer_state(std::vector<float>& m, std::vector<float>& v, int64_t& t) override {
    allocate_training_state();
    to_float(m_, m);
    to_float(v_, v);
    t = t_;
  }
  void get_gradients(std::vector<float>& g) override {
    allocate_training_state();
    to_float(grads_, g);
  }

  LossTerms forward(const Batch& batch, const ForwardOptions& opts) override {
    if (!batch.targets) throw Error("cpu backend: forward needs targets (evaluation computes the loss)");
    return model_.evaluate(params_.data(), batch, opts);
  }

  LossTerms forward_backward(const Batch& batch, const ForwardOptions& opts) override {
    if (!batch.targets) throw Error("cpu backend: forward_backward needs targets");
    allocate_training_state();
    return model_.forward_backward(params_.data(), batch, opts, grads_.data());
  }

  double grad_norm() override {
    allocate_training_state();
    return global_norm(grads_.data(), n_);
  }

  void adamw_step(const AdamWHyper& hyper, double lr, double clip_scale) override {
    allocate_training_state();
    blm::adamw_step(model_.layout(), params_.data(), grads_.data(), m_.data(), v_.data(), t_, hyper,
                    lr, clip_scale);
    decoded_.clear();
  }

  void last_logits(const Batch& batch, std::vector<float>& logits) override {
    Batch plain = batch;
    plain.targets = nullptr;
    model_.evaluate(params_.data(), plain, ForwardOptions());
    const int V = model_.layout().config().vocab_size;
    const std::vector<Real>& all = model_.logits();  // [B, T, V]
    logits.resize(static_cast<size_t>(batch.B) * V);
    for (int b = 0; b < batch.B; ++b) {
      const Real* row = all.data() + (static_cast<size_t>(b) * batch.T + batch.T - 1) * V;
      std::copy(row, row + V, logits.begin() + static_cast<size_t>(b) * V);
    }
  }

  // Incremental: when tokens extend the previous call's, only the new ones are computed (their
  // logits equal last_logits' up to the products' summation order); else from the start.
  void next_logits(const std::vector<int32_t>& tokens, std::vector<float>& logits) override {
    check_batch(Batch{1, static_cast<int>(tokens.size()), tokens.data(), nullptr},
                model_.layout().config());
    const size_t n = decoded_.size();
    const bool extends =
        n > 0 && tokens.size() > n && std::equal(decoded_.begin(), decoded_.end(), tokens.begin());
    if (!extends) {
      decoder_.reset();
      decoded_.clear();
    }
    const size_t from = decoded_.size();
    decoder_.append(params_.data(), tokens.data() + from, static_cast<int>(tokens.size() - from),
                    logits);
    decoded_ = tokens;
  }

  Margins margins(const Batch& batch) override { return model_.margins(params_.data(), batch); }

 private:
  // Gradients and AdamW moments exist once training asks for them: evaluation, sampling and
  // margins hold the parameters alone (at GPT-2 small 1.5 GB less in fp32).
  void allocate_training_state() {
    if (grads_.size() == n_) return;
    grads_.assign(n_, Real(0));
    m_.assign(n_, Real(0));
    v_.assign(n_, Real(0));
  }
  void check_size(size_t got, const char* what) const {
    if (got != n_)
      throw Error(std::string(what) + ": " + std::to_string(got) + " values, but the model has " +
                  std::to_string(n_) + " parameters");
  }
  static void to_float(const std::vector<Real>& src, std::vector<float>& dst) {
    dst.resize(src.size());
    std::copy(src.begin(), src.end(), dst.begin());
  }

  ReferenceModel<Real> model_;
  std::string name_;
  size_t n_;
  std::vector<Real> params_, grads_, m_, v_;
  int64_t t_ = 0;
  IncrementalDecoder<Real> decoder_{model_.layout()};
  std::vector<int32_t> decoded_;  // the tokens decoder_ holds
};

// threads = 0: every core.  OpenBLAS keeps its own pool; set it to the same count when the
// library is OpenBLAS (its cblas.h defines OPENBLAS_VERSION).
void set_threads(int threads) {
  const int n = threads > 0 ? threads : omp_get_num_procs();
  omp_set_num_threads(n);
#if defined(OPENBLAS_VERSION)
  openblas_set_num_threads(n);
#endif
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const ModelConfig& m, const BarrierConfig& b,
                                          const std::string& precision, int threads) {
  if (threads < 0)
    throw ConfigError("device.threads: " + std::to_string(threads) + " is negative (0 means all cores)");
  std::unique_ptr<Backend> backend;
  if (precision == "fp32") backend = std::make_unique<CpuBackend<float>>(m, b, "cpu-fp32");
  else if (precision == "fp64") backend = std::make_unique<CpuBackend<double>>(m, b, "cpu-fp64");
  else
    throw ConfigError("device.precision: '" + precision +
                      "' is not available on the CPU backend (use fp32 or fp64)");
  set_threads(threads);
  return backend;
}

}  // namespace blm
