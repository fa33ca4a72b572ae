// The barrier as matrix products (cuda/barrier_tc.h) against the per-position kernels
// (cuda/barrier.cu, themselves tested against the fp64 reference in test_barrier.cu): log det,
// phi and the dq, dk the backward adds, for fp32 products ("gemm") and TF32 products ("tc").
//
// Inputs as test_barrier.cu's "well inside" cases: q, k = 0.5 N(0, 1) + a per-coordinate offset
// shared by all positions (so the centring matters).  Masks: random bits; per-sequence counts of
// 1, 3 and 17 counted positions (different per sequence, so the compact row lists are padded);
// all zero; T = 1, 2 (nothing counted).  T is not a multiple of 32 in most cases.  Masked cases
// also run the kmax overloads: kmax = the true largest count, and kmax = T - 2 (padding rows in
// every sequence), both held to the same tolerance.
// Tolerances (relative error of the whole tensor): fp32 products 2e-4 against the kernels (both
// fp32, summed in different orders; each is within 1e-4 of fp64); TF32 products (10-bit
// mantissa) 5e-2, a sanity bound - the measured errors are printed, to decide whether TF32 is
// accurate enough to become the default.  The backward's v block must be left untouched.
//
// The fused S kernel (BLM_BARRIER_FUSED_S=1, cuda/barrier_fused_s.cu) against the cuBLAS TF32
// product (variable unset), both with tf32 = true: relative error of the whole tensor <= 1e-3
// for logdet, phi and the added dq, dk.  Why 1e-3: both paths multiply the same fp32 pi and the
// same fp32 products q~_i k~_j rounded to TF32 (10-bit mantissa) and accumulate in fp32; they
// differ in summation order and possibly in the rounding of the TF32 conversion (cuBLAS may
// truncate), i.e. by <= 2^-10 of the sum of |terms| of each S element, typically ~1e-4 of S,
// which J = I - c (S - qbar kbar^T) (well-conditioned inputs) carries to logdet, phi and the
// gradient without large amplification.  test_barrier_fused_s.cpp bounds the kernel alone
// against fp64 element by element.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "cuda/barrier_tc.h"
#include "cuda/kernels.h"
#include "tests/catch.h"
#include "tests/gpu/barrier_test_util.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

constexpr double kEps = 1e-4;

}  // namespace

TEST_CASE("barrier as matrix products matches the per-position kernels", "[gpu][barrier_tc]") {
  using Mask = BarrierMask;
  struct Case {
    cuda::AttentionShape s;
    Mask mask;
    std::vector<int> counts;
  };
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  uint64_t seed = 900;
  const std::vector<Case> cases = {
      {{2, 37, 2, 32}, Mask::bits, {}},       {{1, 70, 2, 64}, Mask::none, {}},
      {{1, 20, 1, 128}, Mask::none, {}},      {{2, 2, 1, 32}, Mask::none, {}},
      {{3, 45, 2, 64}, Mask::counts, {1, 3, 17}}, {{3, 33, 1, 32}, Mask::counts, {17, 1, 3}},
      {{2, 50, 1, 128}, Mask::counts, {3, 17}}, {{2, 1, 2, 64}, Mask::none, {}},
      {{2, 2, 2, 64}, Mask::counts, {1}},      {{2, 40, 2, 64}, Mask::zero, {}}};
  for (const Case& c : cases) {
    const cuda::AttentionShape& s = c.s;
    const size_t d = static_cast<size_t>(s.H) * s.dh, N = static_cast<size_t>(s.B) * s.T;
    const size_t BHT = static_cast<size_t>(s.B) * s.H * s.T;
    DeviceArray<float> qkv(barrier_inputs(s, ++seed));
    const DeviceMask mask_d(barrier_mask(c.mask, s, c.counts, seed));
    const uint8_t* mask = mask_d.get();
    const int kmax_true = mask_d.kmax(s);
    std::string label = "B " + std::to_string(s.B) + " T " + std::to_string(s.T) + " H " +
                        std::to_string(s.H) + " dh " + std::to_string(s.dh);
    if (c.mask == Mask::bits) label += " random mask";
    if (c.mask == Mask::counts) label += " mask of counts";
    if (c.mask == Mask::zero) label += " zero mask";
    label += " (kmax " + std::to_string(kmax_true) + ")";
    const std::vector<float> dqkv0 = randn(N * 3 * d, ++seed, 0.1);
    const float scale = 0.37f;
    // The per-position kernels.
    const BarrierResult ref = per_position_barrier(s, qkv.get(), mask, kEps, scale, dqkv0);

    // Runs: both product precisions through the overloads that find kmax; for masks, fp32 also
    // through the kmax overloads with the true kmax and with T - 2.
    struct Run {
      bool tf32;
      int kmax;  // -1: the overload without kmax
    };
    std::vector<Run> runs = {{false, -1}, {true, -1}};
    if (mask) runs.push_back({false, kmax_true});
    if (mask && s.T - 2 > kmax_true) runs.push_back({false, s.T - 2});
    for (const Run run : runs) {
      const double tol = run.tf32 ? 5e-2 : 2e-4;
      const std::string how = std::string(run.tf32 ? "TF32" : "fp32") +
                              (run.kmax < 0 ? "" : ", kmax " + std::to_string(run.kmax));
      INFO(label << ", " << how);
      DeviceArray<float> ld(BHT), phi(BHT), dqkv(dqkv0);
      poison(ld);
      poison(phi);
      const size_t ws_bytes = run.kmax < 0 ? cuda::barrier_tc_workspace_bytes(s)
                                           : cuda::barrier_tc_workspace_bytes(s, run.kmax);
      DeviceArray<char> ws(std::max<size_t>(1, ws_bytes));
      poison(ws);  // nothing may read a workspace slot it did not write
      if (run.kmax < 0) {
        cuda::barrier_forward_tc(s, qkv.get(), mask, kEps, ld.get(), phi.get(), ws.get(), run.tf32, blas, nullptr);
        cuda::barrier_backward_tc(s, qkv.get(), mask, kEps, scale, dqkv.get(), ws.get(), run.tf32, blas, nullptr);
      } else {
        cuda::barrier_forward_tc(s, qkv.get(), mask, run.kmax, kEps, ld.get(), phi.get(), ws.get(), run.tf32, blas, nullptr);
        cuda::barrier_backward_tc(s, qkv.get(), mask, run.kmax, kEps, scale, dqkv.get(), ws.get(), run.tf32, blas, nullptr);
      }
      const BarrierErrors e =
          check_barrier_result(ld.download(), phi.download(), dqkv.download(), dqkv0, ref, N, d, tol);
      std::printf("barrier_tc vs kernels [%s, %s]: logdet %.2e, phi %.2e, dq/dk %.2e\n",
                  label.c_str(), how.c_str(), e.logdet, e.phi, e.grad);
    }
  }
  cuda::destroy_cublas(blas);
}

TEST_CASE("barrier_tc: the fused S kernel (BLM_BARRIER_FUSED_S=1) matches the cuBLAS product",
          "[gpu][barrier_tc][barrier_fused_s]") {
  // T 1, 2: nothing counted; 37, 257: partial s and slot tiles; 64: K 62.  Masks of counts: K
  // differs per sequence (padding slots), and for T 257 one sequence fills more than one slot tile
  // while another has a single slot.
  struct Case {
    cuda::AttentionShape s;
    std::vector<int> counts;  // empty: exact mode (no mask)
  };
  std::vector<Case> cases;
  for (int dh : {32, 64})
    for (int T : {1, 2, 37, 64, 257}) {
      cases.push_back({{3, T, 2, dh}, {}});
      cases.push_back({{3, T, 2, dh}, T > 64 ? std::vector<int>{5, 200, 1} : std::vector<int>{1, 3, 17}});
    }
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  const double tol = 1e-3;
  uint64_t seed = 2600;
  for (const Case& c : cases) {
    const cuda::AttentionShape& s = c.s;
    const size_t d = static_cast<size_t>(s.H) * s.dh, N = static_cast<size_t>(s.B) * s.T;
    const size_t BHT = static_cast<size_t>(s.B) * s.H * s.T;
    DeviceArray<float> qkv(barrier_inputs(s, ++seed));
    const DeviceMask mask_d(
        barrier_mask(c.counts.empty() ? BarrierMask::none : BarrierMask::counts, s, c.counts, seed));
    const uint8_t* mask = mask_d.get();
    const int kmax = mask_d.kmax(s);
    const std::vector<float> dqkv0 = randn(N * 3 * d, ++seed, 0.1);
    const float scale = 0.37f;
    const std::string label = "B " + std::to_string(s.B) + " T " + std::to_string(s.T) + " H " +
                              std::to_string(s.H) + " dh " + std::to_string(s.dh) +
                              (mask ? " mask of counts" : " exact") + " (kmax " +
                              std::to_string(kmax) + ")";
    INFO(label);
    struct Out {
      std::vector<float> ld, phi, dqkv;
    };
    // One forward + backward with the variable at `value`, NaN-poisoned outputs and workspace.
    auto run = [&](const char* value) {
      ScopedEnv env("BLM_BARRIER_FUSED_S", value);
      DeviceArray<float> ld(BHT), phi(BHT), dqkv(dqkv0);
      poison(ld);
      poison(phi);
      DeviceArray<char> ws(std::max<size_t>(1, cuda::barrier_tc_workspace_bytes(s, kmax)));
      poison(ws);
      cuda::barrier_forward_tc(s, qkv.get(), mask, kmax, kEps, ld.get(), phi.get(), ws.get(), true, blas, nullptr);
      cuda::barrier_backward_tc(s, qkv.get(), mask, kmax, kEps, scale, dqkv.get(), ws.get(), true, blas, nullptr);
      return Out{ld.download(), phi.download(), dqkv.download()};
    };
    const Out base = run(nullptr), fused = run("1"), again = run("1");
    const BarrierResult cublas_s{base.ld, base.phi, added(base.dqkv, dqkv0)};
    const BarrierErrors e =
        check_barrier_result(fused.ld, fused.phi, fused.dqkv, dqkv0, cublas_s, N, d, tol);
    // Fixed-order kernels and cuBLAS: the fused path is bit-identical from run to run.
    CHECK(bit_identical(fused.ld, again.ld));
    CHECK(bit_identical(fused.phi, again.phi));
    CHECK(bit_identical(fused.dqkv, again.dqkv));
    std::printf("barrier_tc fused S vs cuBLAS S [%s]: logdet %.2e, phi %.2e, dq/dk %.2e\n",
                label.c_str(), e.logdet, e.phi, e.grad);
  }
  // An unknown value is refused (one line naming it).
  {
    ScopedEnv env("BLM_BARRIER_FUSED_S", "yes");
    const cuda::AttentionShape s{1, 8, 1, 32};
    DeviceArray<float> qkv(barrier_inputs(s, 1)), ld(8), phi(8);
    DeviceArray<char> ws(cuda::barrier_tc_workspace_bytes(s));
    CHECK_THROWS(cuda::barrier_forward_tc(s, qkv.get(), nullptr, kEps, ld.get(), phi.get(), ws.get(), true, blas, nullptr));
  }
  cuda::destroy_cublas(blas);
}

TEST_CASE("barrier as matrix products: time against the per-position kernels", "[.bench]") {
  // Exact: shape (b) of docs/PERFORMANCE.md (B 64, T 256, H 6, dh 64) and a long-context shape;
  // sampled: shape (b) with K = 32 positions per sequence (the kmax overloads, kmax = 32).
  struct Shape {
    cuda::AttentionShape s;
    int K;  // 0: exact
  };
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  for (const Shape sh : {Shape{{64, 256, 6, 64}, 0}, Shape{{64, 256, 6, 64}, 32},
                         Shape{{4, 1024, 12, 64}, 0}}) {
    const cuda::AttentionShape& s = sh.s;
    const size_t d = static_cast<size_t>(s.H) * s.dh, N = static_cast<size_t>(s.B) * s.T;
    const size_t BHT = static_cast<size_t>(s.B) * s.H * s.T;
    DeviceArray<float> qkv(barrier_inputs(s, 77)), dqkv(randn(N * 3 * d, 78, 0.1));
    DeviceArray<float> ld(BHT), phi(BHT);
    const DeviceMask mask_d(sh.K > 0 ? count_mask(s.B, s.T, {sh.K}, 79) : std::vector<uint8_t>());
    const uint8_t* mask = mask_d.get();
    const int kmax = mask_d.kmax(s);
    DeviceArray<char> ws_k(std::max<size_t>(1, cuda::barrier_workspace_bytes(s)));
    DeviceArray<char> ws_t(std::max<size_t>(1, cuda::barrier_tc_workspace_bytes(s, kmax)));
    // Each time: the mean of 5 calls after one warm-up (mean_ms).
    const float k = mean_ms([&] {
      cuda::barrier_forward(s, qkv.get(), mask, kEps, ld.get(), phi.get(), ws_k.get(), nullptr);
      cuda::barrier_backward(s, qkv.get(), mask, kEps, 1.0f, dqkv.get(), ws_k.get(), nullptr);
    });
    // t[0]: fp32 GEMMs, t[1]: TF32 GEMMs, t[2]: TF32 with the fused S kernel
    // (BLM_BARRIER_FUSED_S=1); f[.]: the forward alone of TF32 and of the fused S.
    float t[3], f[2];
    for (int v = 0; v < 3; ++v) {
      ScopedEnv env("BLM_BARRIER_FUSED_S", v == 2 ? "1" : "0");
      const bool tf32 = v > 0;
      t[v] = mean_ms([&] {
        cuda::barrier_forward_tc(s, qkv.get(), mask, kmax, kEps, ld.get(), phi.get(), ws_t.get(), tf32, blas, nullptr);
        cuda::barrier_backward_tc(s, qkv.get(), mask, kmax, kEps, 1.0f, dqkv.get(), ws_t.get(), tf32, blas, nullptr);
      });
      if (v > 0)
        f[v - 1] = mean_ms([&] {
          cuda::barrier_forward_tc(s, qkv.get(), mask, kmax, kEps, ld.get(), phi.get(), ws_t.get(), true, blas, nullptr);
        });
    }
    std::printf("barrier fwd+bwd B=%d H=%d T=%d dh=%d %s (one layer): kernels %.2f ms, fp32 GEMMs "
                "%.2f ms, TF32 GEMMs %.2f ms (forward %.2f), TF32 + fused S %.2f ms (forward %.2f); "
                "GEMM workspace %.2f GiB\n",
                s.B, s.H, s.T, s.dh, sh.K ? ("K=" + std::to_string(sh.K)).c_str() : "exact", k, t[0],
                t[1], f[0], t[2], f[1], cuda::barrier_tc_workspace_bytes(s, kmax) / 1073741824.0);
    CHECK(k > 0);
  }
  cuda::destroy_cublas(blas);
}
