// The barrier as matrix products (cuda/barrier_tc.h) against the per-position kernels
// (cuda/barrier.cu, themselves tested against the fp64 reference in test_barrier.cu): log det,
// phi and the dq, dk the backward adds, for fp32 products ("gemm") and TF32 products ("tc").
//
// Inputs as test_barrier.cu's "well inside" cases: q, k = 0.5 N(0, 1) + a per-coordinate offset
// shared by all positions (so the centring matters), a random position mask in one case.
// Tolerances (relative error of the whole tensor): fp32 products 2e-4 against the kernels (both
// fp32, summed in different orders; each is within 1e-4 of fp64); TF32 products (10-bit
// mantissa) 5e-2, a sanity bound - the measured errors are printed, to decide whether TF32 is
// accurate enough to become the default.  The backward's v block must be left untouched.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "cuda/barrier_tc.h"
#include "cuda/kernels.h"
#include "tests/catch.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

constexpr double kEps = 1e-4;

std::vector<float> barrier_inputs(const cuda::AttentionShape& s, uint64_t seed) {
  const size_t d = static_cast<size_t>(s.H) * s.dh, N = static_cast<size_t>(s.B) * s.T;
  std::vector<float> qkv = randn(N * 3 * d, seed, 0.5);
  const std::vector<float> offset = randn(2 * d, seed + 1, 0.7);
  for (size_t n = 0; n < N; ++n)
    for (size_t c = 0; c < 2 * d; ++c) qkv[n * 3 * d + c] += offset[c];
  return qkv;
}

}  // namespace

TEST_CASE("barrier as matrix products matches the per-position kernels", "[gpu][barrier_tc]") {
  struct Case {
    cuda::AttentionShape s;
    bool mask;
  };
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  uint64_t seed = 900;
  for (const Case c : {Case{{2, 37, 2, 32}, true}, Case{{1, 70, 2, 64}, false},
                       Case{{1, 20, 1, 128}, false}, Case{{2, 2, 1, 32}, false}}) {
    const cuda::AttentionShape& s = c.s;
    const size_t d = static_cast<size_t>(s.H) * s.dh, N = static_cast<size_t>(s.B) * s.T;
    const size_t BHT = static_cast<size_t>(s.B) * s.H * s.T;
    DeviceArray<float> qkv(barrier_inputs(s, ++seed));
    std::vector<uint8_t> mask_h;
    if (c.mask) {
      const std::vector<int32_t> bits = randint(N, ++seed, 2);
      mask_h.assign(bits.begin(), bits.end());
    }
    DeviceArray<uint8_t> mask_d(mask_h.empty() ? std::vector<uint8_t>(1, 1) : mask_h);
    const uint8_t* mask = mask_h.empty() ? nullptr : mask_d.get();
    const std::vector<float> dqkv0 = randn(N * 3 * d, ++seed, 0.1);
    const float scale = 0.37f;
    // The per-position kernels.
    DeviceArray<float> ld_ref(BHT), phi_ref(BHT), dqkv_ref(dqkv0);
    DeviceArray<char> ws_ref(std::max<size_t>(1, cuda::barrier_workspace_bytes(s)));
    cuda::barrier_forward(s, qkv.get(), mask, kEps, ld_ref.get(), phi_ref.get(), ws_ref.get(), nullptr);
    cuda::barrier_backward(s, qkv.get(), mask, kEps, scale, dqkv_ref.get(), ws_ref.get(), nullptr);
    const std::vector<float> ref_ld = ld_ref.download(), ref_phi = phi_ref.download();
    const std::vector<float> ref_dqkv = dqkv_ref.download();
    std::vector<double> ref_added(N * 3 * d);
    for (size_t i = 0; i < ref_added.size(); ++i) ref_added[i] = static_cast<double>(ref_dqkv[i]) - dqkv0[i];

    for (const bool tf32 : {false, true}) {
      const double tol = tf32 ? 5e-2 : 2e-4;
      INFO("B " << s.B << " T " << s.T << " H " << s.H << " dh " << s.dh << (c.mask ? " masked" : "")
                << (tf32 ? ", TF32 products" : ", fp32 products"));
      DeviceArray<float> ld(BHT), phi(BHT), dqkv(dqkv0);
      DeviceArray<char> ws(cuda::barrier_tc_workspace_bytes(s));
      cuda::barrier_forward_tc(s, qkv.get(), mask, kEps, ld.get(), phi.get(), ws.get(), tf32, blas, nullptr);
      cuda::barrier_backward_tc(s, qkv.get(), mask, kEps, scale, dqkv.get(), ws.get(), tf32, blas, nullptr);
      const Comparison e_ld = compare(ld.download(), to_double(ref_ld));
      const Comparison e_phi = compare(phi.download(), to_double(ref_phi));
      const std::vector<float> got = dqkv.download();
      std::vector<double> added(got.size());
      for (size_t i = 0; i < got.size(); ++i) added[i] = static_cast<double>(got[i]) - dqkv0[i];
      const Comparison e_grad = compare(added.data(), ref_added.data(), added.size());
      INFO(describe("logdet", e_ld, tol));
      INFO(describe("phi", e_phi, tol));
      INFO(describe("dq, dk added", e_grad, tol));
      CHECK(e_ld.rel <= tol);
      CHECK(e_phi.rel <= tol);
      CHECK(e_grad.rel <= tol);
      size_t v_changed = 0;
      for (size_t n = 0; n < N; ++n)
        for (size_t i = 0; i < d; ++i) v_changed += got[n * 3 * d + 2 * d + i] != dqkv0[n * 3 * d + 2 * d + i];
      CHECK(v_changed == 0);
      std::printf("barrier_tc vs kernels [B %d T %d H %d dh %d%s, %s]: logdet %.2e, phi %.2e, "
                  "dq/dk %.2e\n",
                  s.B, s.T, s.H, s.dh, c.mask ? " masked" : "", tf32 ? "TF32" : "fp32", e_ld.rel,
                  e_phi.rel, e_grad.rel);
    }
  }
  cuda::destroy_cublas(blas);
}

TEST_CASE("barrier as matrix products: time against the per-position kernels", "[.bench]") {
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  for (const cuda::AttentionShape s : {cuda::AttentionShape{64, 256, 6, 64}, cuda::AttentionShape{4, 1024, 12, 64}}) {
    const size_t d = static_cast<size_t>(s.H) * s.dh, N = static_cast<size_t>(s.B) * s.T;
    const size_t BHT = static_cast<size_t>(s.B) * s.H * s.T;
    DeviceArray<float> qkv(barrier_inputs(s, 77)), dqkv(randn(N * 3 * d, 78, 0.1));
    DeviceArray<float> ld(BHT), phi(BHT);
    DeviceArray<char> ws_k(std::max<size_t>(1, cuda::barrier_workspace_bytes(s)));
    DeviceArray<char> ws_t(cuda::barrier_tc_workspace_bytes(s));
    cudaEvent_t a, b;
    CUDA_CHECK(cudaEventCreate(&a));
    CUDA_CHECK(cudaEventCreate(&b));
    auto time_ms = [&](auto&& run) {
      run();
      CUDA_CHECK(cudaEventRecord(a));
      for (int i = 0; i < 5; ++i) run();
      CUDA_CHECK(cudaEventRecord(b));
      CUDA_CHECK(cudaEventSynchronize(b));
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
      return ms / 5;
    };
    const float k = time_ms([&] {
      cuda::barrier_forward(s, qkv.get(), nullptr, kEps, ld.get(), phi.get(), ws_k.get(), nullptr);
      cuda::barrier_backward(s, qkv.get(), nullptr, kEps, 1.0f, dqkv.get(), ws_k.get(), nullptr);
    });
    float t[2];
    for (int tf32 = 0; tf32 < 2; ++tf32)
      t[tf32] = time_ms([&] {
        cuda::barrier_forward_tc(s, qkv.get(), nullptr, kEps, ld.get(), phi.get(), ws_t.get(), tf32, blas, nullptr);
        cuda::barrier_backward_tc(s, qkv.get(), nullptr, kEps, 1.0f, dqkv.get(), ws_t.get(), tf32, blas, nullptr);
      });
    std::printf("barrier fwd+bwd B=%d H=%d T=%d dh=%d (one layer): kernels %.2f ms, fp32 GEMMs %.2f "
                "ms, TF32 GEMMs %.2f ms; GEMM workspace %.2f GiB\n",
                s.B, s.H, s.T, s.dh, k, t[0], t[1], cuda::barrier_tc_workspace_bytes(s) / 1073741824.0);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    CHECK(k > 0);
  }
  cuda::destroy_cublas(blas);
}
