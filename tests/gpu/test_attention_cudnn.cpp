// cuDNN attention (cuda/attention_cudnn.h, BLM_ATTENTION=cudnn) against a float64 causal attention
// on the same bf16-rounded inputs, plus the refusals, the BLM_ATTENTION selection and one bf16
// training step of the whole backend with cuDNN vs the flash kernels.  Every case SKIPs visibly
// (a warning naming the reason) when cuDNN is not available at run time.
//
// Reference: q, k, v and dout are rounded to bf16 on the host exactly as the wrapper rounds them
// (round to nearest even), then out, lse and dq, dk, dv are computed in double.  What is left is
// cuDNN's own rounding, hence the tolerances (relative L2 over the tensor):
//   - out 1e-2: P is rounded to bf16 (<= 2^-8 relative) before P V, and out is stored in bf16
//     (another <= 2^-8); over a row these average to ~2-3e-3; 1e-2 as the other bf16 attention paths.
//     Measured (H200, cuDNN 9.14): <= 1.9e-3 (0 at T = 1: out = v exactly).
//   - lse 1e-5: fp32 scores of exact bf16 products, fp32 max / exp / log: ~1e-7 relative (measured
//     <= 2.0e-7); 1e-5 leaves room for exp2-based evaluation with the scale folded in.
//   - each of the dq, dk, dv blocks 2e-2, relative to the larger of its norm and the norm of the
//     whole gradient (at T = 1 dq, dk are exactly 0): dP, dS rounded to bf16 as product operands,
//     D from the bf16-stored out, outputs stored in bf16; 2e-2 as the other bf16 paths.
//     Measured <= 1.6e-3.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "core/backend.h"
#include "core/error.h"
#include "core/params.h"
#include "cuda/attention.h"
#include "cuda/attention_bf16.h"
#include "cuda/attention_cudnn.h"
#include "cuda/kernels.h"
#include "cuda/cuda_backend.h"
#include "tests/catch.h"
#include "tests/gpu/backend_test_util.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

#define BLM_SKIP_CUDNN(reason) GPU_SKIP("cuDNN attention not available: " << reason)

// Float64 causal attention over qkv [B, T, 3d] with dout [B, T, d]: out [B, T, d],
// lse [B, H, T], dqkv [B, T, 3d] (the gradient of sum(out * dout)).
struct Reference {
  std::vector<double> out, lse, dqkv;
};
Reference reference_attention(const cuda::AttentionShape& s, const std::vector<float>& qkv,
                              const std::vector<float>& dout) {
  const int B = s.B, T = s.T, H = s.H, D = s.dh, d = H * D;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  Reference r;
  r.out.assign(static_cast<size_t>(B) * T * d, 0.0);
  r.lse.assign(static_cast<size_t>(B) * H * T, 0.0);
  r.dqkv.assign(static_cast<size_t>(B) * T * 3 * d, 0.0);
  auto at = [&](int b, int t, int block, int h) { return (static_cast<size_t>(b) * T + t) * 3 * d + block * d + h * D; };
  std::vector<double> a(T), dp(T);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < T; ++t) {
        const float* q = &qkv[at(b, t, 0, h)];
        double m = -INFINITY;
        for (int u = 0; u <= t; ++u) {
          const float* k = &qkv[at(b, u, 1, h)];
          double z = 0;
          for (int i = 0; i < D; ++i) z += static_cast<double>(q[i]) * k[i];
          a[u] = z * scale;
          m = std::max(m, a[u]);
        }
        double l = 0;
        for (int u = 0; u <= t; ++u) l += std::exp(a[u] - m);
        const double lse = m + std::log(l);
        r.lse[(static_cast<size_t>(b) * H + h) * T + t] = lse;
        for (int u = 0; u <= t; ++u) a[u] = std::exp(a[u] - lse);
        double* o = &r.out[(static_cast<size_t>(b) * T + t) * d + h * D];
        const float* g = &dout[(static_cast<size_t>(b) * T + t) * d + h * D];
        double Dt = 0;
        for (int u = 0; u <= t; ++u) {
          const float* v = &qkv[at(b, u, 2, h)];
          double gv = 0;
          for (int i = 0; i < D; ++i) {
            o[i] += a[u] * v[i];
            gv += static_cast<double>(g[i]) * v[i];
          }
          dp[u] = gv;
          Dt += a[u] * gv;
        }
        for (int u = 0; u <= t; ++u) {
          const double ds = a[u] * (dp[u] - Dt) * scale;
          const float* k = &qkv[at(b, u, 1, h)];
          double* dq = &r.dqkv[at(b, t, 0, h)];
          double* dk = &r.dqkv[at(b, u, 1, h)];
          double* dv = &r.dqkv[at(b, u, 2, h)];
          for (int i = 0; i < D; ++i) {
            dq[i] += ds * k[i];
            dk[i] += ds * q[i];
            dv[i] += a[u] * g[i];
          }
        }
      }
  return r;
}

// Each of the q, k, v gradient blocks against the reference, relative to the larger of its norm
// and the whole gradient's (see the top of the file).  Returns the worst.
double check_gradient_blocks(const std::vector<float>& got, const std::vector<double>& ref,
                             size_t N, size_t d, double tol) {
  double all2 = 0;
  for (double x : ref) all2 += x * x;
  double worst = 0;
  for (int j = 0; j < 3; ++j) {
    std::vector<float> a;
    std::vector<double> r;
    for (size_t n = 0; n < N; ++n)
      for (size_t i = 0; i < d; ++i) {
        a.push_back(got[n * 3 * d + j * d + i]);
        r.push_back(ref[n * 3 * d + j * d + i]);
      }
    Comparison e = compare(a, r);
    const double abs_err = e.ref_norm > 0 ? e.rel * e.ref_norm : e.rel;
    e.rel = e.nonfinite ? INFINITY : abs_err / std::max(e.ref_norm, std::sqrt(all2));
    INFO(describe(std::string("d") + "qkv"[j], e, tol));
    CHECK(e.rel <= tol);  // false for NaN: an unwritten (poisoned) element fails here
    worst = std::max(worst, e.rel);
  }
  return worst;
}

struct Case {
  int B, T, H, dh;
};

}  // namespace

// Shapes: T = 1; T not a multiple of 64 (37, 129, 200); dh 32, 64, 128; B*H > 1 and H > 1 (each
// head's columns of the fused rows).  The fp32 interface (what the backend calls) and the bf16
// level with the non-deterministic backward (the benchmark's) are both checked; out, lse and
// dqkv are NaN-poisoned first.
TEST_CASE("cuDNN attention matches a float64 causal attention", "[gpu][attention-cudnn]") {
  if (!cuda::cudnn_attention_available()) BLM_SKIP_CUDNN(cuda::cudnn_attention_unavailable_reason());
  std::printf("%s\n", cuda::cudnn_attention_version().c_str());
  uint64_t seed = 9100;
  for (const Case c : {Case{1, 1, 2, 64}, Case{2, 37, 3, 64}, Case{1, 129, 2, 128},
                       Case{2, 64, 2, 32}, Case{3, 200, 2, 64}, Case{2, 1, 1, 128},
                       Case{1, 130, 3, 32}}) {
    INFO("B " << c.B << " T " << c.T << " H " << c.H << " dh " << c.dh);
    const cuda::AttentionShape s{c.B, c.T, c.H, c.dh};
    const size_t N = static_cast<size_t>(c.B) * c.T, d = static_cast<size_t>(c.H) * c.dh;
    const size_t rows = static_cast<size_t>(c.B) * c.H * c.T;
    // q, k of std 1.2: logits of a few units, softmax rows far from uniform.
    const std::vector<float> qkv = randn(N * 3 * d, ++seed, 1.2);
    const std::vector<float> dout = randn(N * d, ++seed);
    const Reference ref = reference_attention(s, rounded_bf16(qkv), rounded_bf16(dout));

    DeviceArray<float> dqkv_in(qkv), ddout(dout), lse(rows), dqkv(N * 3 * d);
    DeviceArray<uint16_t> out(N * d);
    DeviceArray<char> ws(std::max<size_t>(1, cuda::cudnn_attention_workspace_bytes(s, true)));
    CHECK(cuda::cudnn_attention_workspace_bytes(s, false) <= cuda::cudnn_attention_workspace_bytes(s, true));
    poison(out);
    poison(lse);
    poison(dqkv);
    auto run = [&] {
      cuda::cudnn_attention_forward(s, dqkv_in.get(), as_bf16(out), lse.get(), ws.get(), nullptr);
      cuda::cudnn_attention_backward(s, dqkv_in.get(), as_bf16(out), ddout.get(), lse.get(),
                                     dqkv.get(), ws.get(), nullptr);
    };
    run();
    const std::vector<uint16_t> o16 = out.download();
    const std::vector<float> g = dqkv.download();
    const Comparison e_out = compare(from_bits(o16), ref.out);
    const Comparison e_lse = compare(lse.download(), ref.lse);
    INFO(describe("out", e_out, 1e-2));
    INFO(describe("lse", e_lse, 1e-5));
    CHECK(e_out.rel <= 1e-2);
    CHECK(e_lse.rel <= 1e-5);
    const double worst = check_gradient_blocks(g, ref.dqkv, N, d, 2e-2);
    // Deterministic, and everything written over: a second run gives the same bits.
    run();
    CHECK(out.download() == o16);
    CHECK(bit_identical(dqkv.download(), g));
    std::printf("cuDNN attention vs fp64 [B %d T %d H %d dh %d]: out %.2e, lse %.2e, worst dqkv "
                "block %.2e\n", c.B, c.T, c.H, c.dh, e_out.rel, e_lse.rel, worst);

    // The bf16 level with the fp32-accumulated (atomic) dQ: same reference, same bounds.
    DeviceArray<uint16_t> qkv16(to_bits(qkv)), dout16(to_bits(dout)), dqkv16(N * 3 * d);
    DeviceArray<char> ws16(std::max<size_t>(1, cuda::cudnn_sdpa_workspace_bytes(s, true, false)));
    poison(dqkv16);
    cuda::cudnn_sdpa_backward(s, as_bf16(qkv16), as_bf16(out), as_bf16(dout16), lse.get(),
                              as_bf16(dqkv16), ws16.get(), nullptr, false);
    INFO("bf16 level, non-deterministic dQ");
    check_gradient_blocks(from_bits(dqkv16.download()), ref.dqkv, N, d, 2e-2);
  }
}

TEST_CASE("cuDNN attention refuses head sizes and misaligned tensors", "[gpu][attention-cudnn]") {
  if (!cuda::cudnn_attention_available()) BLM_SKIP_CUDNN(cuda::cudnn_attention_unavailable_reason());
  CHECK_FALSE(cuda::cudnn_attention_head_size_supported(48));
  CHECK_THROWS_AS(cuda::cudnn_attention_workspace_bytes(cuda::AttentionShape{1, 8, 2, 48}, true),
                  ConfigError);
  const cuda::AttentionShape s{1, 8, 2, 64};
  const size_t N = 8, d = 128;
  DeviceArray<uint16_t> qkv16(N * 3 * d + 8), out(N * d + 8);
  DeviceArray<float> lse(2 * 8 + 4);
  DeviceArray<char> ws(std::max<size_t>(1, cuda::cudnn_sdpa_workspace_bytes(s, false)));
  CHECK_THROWS_AS(cuda::cudnn_sdpa_forward(s, as_bf16(qkv16) + 1, as_bf16(out), lse.get(), ws.get(), nullptr),
                  DeviceError);
  CHECK_THROWS_AS(cuda::cudnn_sdpa_forward(s, as_bf16(qkv16), as_bf16(out) + 2, lse.get(), ws.get(), nullptr),
                  DeviceError);
}

// BLM_ATTENTION=cudnn in the bf16 backend: one training step's loss and gradients against the
// flash kernels' (both bf16 approximations of the same model: loss within 5e-3, the whole
// gradient vector within 3e-2, relative), with the barrier on (under cuDNN it reads the bf16 qkv
// the attention reads, BLM_BARRIER_QKV's default; under the flash kernels an fp32 qkv); and two
// cuDNN runs give the same bits.
TEST_CASE("bf16 backend: BLM_ATTENTION=cudnn tracks the flash kernels", "[gpu][attention-cudnn][backend]") {
  if (!cuda::cudnn_attention_available()) BLM_SKIP_CUDNN(cuda::cudnn_attention_unavailable_reason());
  const ModelCase c{"dh 64, T 33", model_config(56, 128, 2, 2, 40), 2, 33, {}, false};
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 9300);
  const HostBatch data = make_batch(c, 9301);
  auto step = [&](const char* attention, std::vector<float>& grads) {
    ScopedEnv env("BLM_ATTENTION", attention);
    std::unique_ptr<Backend> gpu = make_cuda_backend(cuda_config(c, 0.5, "bf16"), 0);
    gpu->set_parameters(params);
    const LossTerms t = gpu->forward_backward(data.view(), options_for(data));
    gpu->get_gradients(grads);
    return t;
  };
  std::vector<float> g_flash, g_cudnn, g_again;
  const LossTerms flash = step("flash", g_flash);
  const LossTerms cudnn = step("cudnn", g_cudnn);
  const LossTerms again = step("cudnn", g_again);
  INFO("loss flash " << flash.loss << ", cudnn " << cudnn.loss);
  CHECK(std::fabs(cudnn.loss - flash.loss) <= 5e-3 * std::fabs(flash.loss));
  const Comparison e = compare(g_cudnn, to_double(g_flash));
  INFO(describe("gradient (cudnn vs flash)", e, 3e-2));
  CHECK(e.rel <= 3e-2);
  CHECK(again.loss == cudnn.loss);
  CHECK(bit_identical(g_again, g_cudnn));
  std::printf("bf16 backend, cuDNN vs flash attention: loss %.6f vs %.6f, gradient rel %.2e\n",
              cudnn.loss, flash.loss, e.rel);
}

// Timing (not a correctness test), run with
//   test_gpu "[.bench][attention-cudnn]" -s
// Shapes (a) B=16 H=12 T=1024 dh=64 and (b) B=64 H=6 T=256 dh=64, side by side in one run: the
// flash kernels (attention_*_bf16, BLM_ATTENTION=flash), cuDNN through the fp32 interface the
// backend calls (bf16 rounding of qkv / dout and widening of dqkv included), and the cuDNN graphs
// alone on bf16 tensors, with the deterministic backward (the backend's) and with the atomic-dQ
// backward.  Median of 20 repeats after 3 warm-ups (CUDA events, gputest::median_ms), random
// N(0, 1) inputs.  FLOP rate: causal forward 4 B H T^2 dh / 2, forward + backward 3.5x that.
TEST_CASE("cuDNN attention: time against the flash kernels", "[.bench][attention-cudnn]") {
  if (!cuda::cudnn_attention_available()) BLM_SKIP_CUDNN(cuda::cudnn_attention_unavailable_reason());
  std::printf("%s\n", cuda::cudnn_attention_version().c_str());
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  struct Bench {
    const char* name;
    cuda::AttentionShape s;
  };
  for (const Bench& b : {Bench{"(a)", {16, 1024, 12, 64}}, Bench{"(b)", {64, 256, 6, 64}}}) {
    const cuda::AttentionShape s = b.s;
    const size_t N = static_cast<size_t>(s.B) * s.T, d = static_cast<size_t>(s.H) * s.dh;
    DeviceArray<float> qkv(randn(N * 3 * d, 93)), dout(randn(N * d, 94));
    DeviceArray<float> lse(static_cast<size_t>(s.B) * s.H * s.T), dqkv(N * 3 * d);
    DeviceArray<uint16_t> out(N * d), qkv16(to_bits(randn(N * 3 * d, 93))),
        dout16(to_bits(randn(N * d, 94))), dqkv16(N * 3 * d);
    const double flops = 3.5 * 4.0 * s.B * s.H * static_cast<double>(s.T) * s.T * s.dh / 2;
    auto report = [&](const char* path, double fwd, double both, size_t ws) {
      std::printf("attention %s B=%d H=%d T=%d dh=%d, %-34s fwd %.3f ms, fwd+bwd %.3f ms "
                  "(%.0f TFLOP/s causal), workspace %.1f MiB\n",
                  b.name, s.B, s.H, s.T, s.dh, path, fwd, both, flops / both * 1e-9, ws / 1048576.0);
    };

    double f1 = 0, f2 = 0;
    {
      ScopedEnv attention("BLM_ATTENTION", "flash");
      DeviceArray<char> ws_flash(
          std::max<size_t>(1, cuda::attention_bf16_workspace_bytes(s, true)));
      auto flash_fwd = [&] {
        cuda::attention_forward_bf16(s, qkv.get(), as_bf16(out), lse.get(), ws_flash.get(), blas,
                                     nullptr);
      };
      auto flash_bwd = [&] {
        cuda::attention_backward_bf16(s, qkv.get(), as_bf16(out), dout.get(), lse.get(),
                                      dqkv.get(), ws_flash.get(), blas, nullptr);
      };
      f1 = median_ms(flash_fwd);
      f2 = median_ms([&] { flash_fwd(); flash_bwd(); });
      report("flash kernels (fp32 qkv)", f1, f2, ws_flash.size());
    }

    DeviceArray<char> ws(std::max<size_t>(1, cuda::cudnn_attention_workspace_bytes(s, true)));
    auto c_fwd = [&] {
      cuda::cudnn_attention_forward(s, qkv.get(), as_bf16(out), lse.get(), ws.get(), nullptr);
    };
    auto c_bwd = [&] {
      cuda::cudnn_attention_backward(s, qkv.get(), as_bf16(out), dout.get(), lse.get(), dqkv.get(),
                                     ws.get(), nullptr);
    };
    const double c1 = median_ms(c_fwd), c2 = median_ms([&] { c_fwd(); c_bwd(); });
    report("cuDNN, fp32 interface (backend)", c1, c2, ws.size());

    for (const bool det : {true, false}) {
      DeviceArray<char> ws16(std::max<size_t>(1, cuda::cudnn_sdpa_workspace_bytes(s, true, det)));
      auto g_fwd = [&] {
        cuda::cudnn_sdpa_forward(s, as_bf16(qkv16), as_bf16(out), lse.get(), ws16.get(), nullptr);
      };
      auto g_bwd = [&] {
        cuda::cudnn_sdpa_backward(s, as_bf16(qkv16), as_bf16(out), as_bf16(dout16), lse.get(),
                                  as_bf16(dqkv16), ws16.get(), nullptr, det);
      };
      const double g1 = median_ms(g_fwd), g2 = median_ms([&] { g_fwd(); g_bwd(); });
      report(det ? "cuDNN graphs alone, bf16, determ." : "cuDNN graphs alone, bf16, atomic dQ",
             g1, g2, ws16.size());
    }
    CHECK(f2 > 0);
    CHECK(c2 > 0);
  }
  cuda::destroy_cublas(blas);
}
