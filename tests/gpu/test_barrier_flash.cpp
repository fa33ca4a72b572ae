// The flash-style barrier pipeline (cuda/barrier_flash.h) against the per-position fp32 kernels
// (cuda/barrier.cu, themselves within 1e-4 of the fp64 reference: test_barrier.cu): log det, phi
// and the dq, dk the backward adds, with the forward's saved state and with the backward
// recomputing it.  Inputs as test_barrier_tc.cpp (q, k = 0.5 N(0, 1) + a per-coordinate offset,
// so the centring matters); masks: none (exact), random bits, per-sequence counts 1, 3, 17
// (padded slot lists), all zero; T = 1, 2 (nothing counted); T not a multiple of the tiles.
//
// Tolerance 1e-2 relative error of the whole tensor.  Why: the tiles multiply TF32-rounded
// operands (10-bit mantissa, relative rounding 2^-11 per operand) with fp32 accumulation, so S,
// qbar, kbar carry ~1e-3 of the sum of |terms| (the kernels' own tests bound them element by
// element against fp64); J = I - c (S - qbar kbar^T) of these well-conditioned inputs passes that
// to logdet, phi and G with little amplification, and the gradient adds a second TF32 stage (the
// backward tiles).  The measured errors are printed; the saved and the recomputing backward must
// agree bit for bit (same kernels, same inputs).  The v block of dqkv must be left untouched.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "cuda/barrier_flash.h"
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

TEST_CASE("flash barrier matches the per-position kernels", "[gpu][barrier-flash]") {
  using Mask = BarrierMask;
  struct Case {
    cuda::AttentionShape s;
    Mask mask;
    std::vector<int> counts;
  };
  const std::vector<Case> cases = {
      {{2, 37, 2, 32}, Mask::bits, {}},           {{1, 70, 2, 64}, Mask::none, {}},
      {{2, 2, 1, 32}, Mask::none, {}},            {{3, 45, 2, 64}, Mask::counts, {1, 3, 17}},
      {{3, 33, 1, 32}, Mask::counts, {17, 1, 3}}, {{2, 1, 2, 64}, Mask::none, {}},
      {{2, 130, 2, 64}, Mask::none, {}},          {{2, 200, 1, 64}, Mask::counts, {64, 5}},
      {{2, 40, 2, 64}, Mask::zero, {}}};
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  uint64_t seed = 4100;
  for (const Case& c : cases) {
    const cuda::AttentionShape& s = c.s;
    const size_t d = static_cast<size_t>(s.H) * s.dh, N = static_cast<size_t>(s.B) * s.T;
    const size_t BHT = static_cast<size_t>(s.B) * s.H * s.T;
    DeviceArray<float> qkv(barrier_inputs(s, ++seed));
    const DeviceMask mask_d(barrier_mask(c.mask, s, c.counts, seed));
    const uint8_t* mask = mask_d.get();
    const int kmax = mask_d.kmax(s);
    const std::string label = "B " + std::to_string(s.B) + " T " + std::to_string(s.T) + " H " +
                              std::to_string(s.H) + " dh " + std::to_string(s.dh) + " kmax " +
                              std::to_string(kmax);
    INFO(label);
    const std::vector<float> dqkv0 = randn(N * 3 * d, ++seed, 0.1);
    const float scale = 0.37f;
    const BarrierResult ref = per_position_barrier(s, qkv.get(), mask, kEps, scale, dqkv0);

    // Saved: the training forward keeps G for the backward.  Recompute: no saved state.
    std::vector<float> grads[2];
    for (int saved_mode = 1; saved_mode >= 0; --saved_mode) {
      const bool keep = saved_mode == 1;
      INFO((keep ? "saved" : "recomputed"));
      DeviceArray<float> ld(BHT), phi(BHT), dqkv(dqkv0);
      poison(ld);
      poison(phi);
      DeviceArray<char> ws(std::max<size_t>(1, cuda::barrier_flash_workspace_bytes(s, kmax, keep)));
      DeviceArray<char> sv(std::max<size_t>(1, cuda::barrier_flash_saved_bytes(s, kmax)));
      poison(ws);  // nothing may read a slot it did not write
      poison(sv);
      cuda::barrier_forward_flash(s, qkv.get(), mask, kmax, kEps, ld.get(), phi.get(),
                                  keep ? sv.get() : nullptr, ws.get(), nullptr);
      cuda::barrier_backward_flash(s, qkv.get(), mask, kmax, kEps, scale, dqkv.get(),
                                   keep ? sv.get() : nullptr, ws.get(), blas, nullptr);
      const double tol = 1e-2;
      grads[saved_mode] = dqkv.download();
      const BarrierErrors e =
          check_barrier_result(ld.download(), phi.download(), grads[saved_mode], dqkv0, ref, N, d, tol);
      std::printf("barrier_flash vs kernels [%s, %s]: logdet %.2e, phi %.2e, dq/dk %.2e\n",
                  label.c_str(), keep ? "saved" : "recomputed", e.logdet, e.phi, e.grad);
    }
    CHECK(grads[0] == grads[1]);

    // The backend's one call, forward and backward together: logdet, phi and dq, dk (written
    // into dqk [N, 2d]) are the same bits as the separate calls' (backward into a zero dqkv);
    // dqkv0 + dqk (barrier_flash_add_gradient) matches the reference.
    {
      INFO("forward and backward in one call");
      DeviceArray<float> ld(BHT), phi(BHT), dqk(N * 2 * d);
      poison(ld);
      poison(phi);
      poison(dqk);
      DeviceArray<char> ws(std::max<size_t>(1, cuda::barrier_flash_workspace_bytes(s, kmax, false)));
      poison(ws);
      cuda::barrier_forward_backward_flash(s, qkv.get(), mask, kmax, kEps, scale, ld.get(),
                                           phi.get(), dqk.get(), ws.get(), blas, nullptr);
      DeviceArray<float> ld2(BHT), phi2(BHT), zero(std::vector<float>(N * 3 * d, 0.0f));
      DeviceArray<char> ws2(std::max<size_t>(1, cuda::barrier_flash_workspace_bytes(s, kmax, true)));
      DeviceArray<char> sv(std::max<size_t>(1, cuda::barrier_flash_saved_bytes(s, kmax)));
      cuda::barrier_forward_flash(s, qkv.get(), mask, kmax, kEps, ld2.get(), phi2.get(), sv.get(),
                                  ws2.get(), nullptr);
      cuda::barrier_backward_flash(s, qkv.get(), mask, kmax, kEps, scale, zero.get(), sv.get(),
                                   ws2.get(), blas, nullptr);
      CHECK(bit_identical(ld.download(), ld2.download()));
      CHECK(bit_identical(phi.download(), phi2.download()));
      const std::vector<float> g = dqk.download(), z = zero.download();
      size_t differ = 0;
      for (size_t n = 0; n < N; ++n)
        for (size_t c = 0; c < 2 * d; ++c)
          differ += std::memcmp(&g[n * 2 * d + c], &z[n * 3 * d + c], sizeof(float)) != 0;
      CHECK(differ == 0);
      DeviceArray<float> dqkv(dqkv0);
      cuda::barrier_flash_add_gradient(dqk.get(), static_cast<int64_t>(N), static_cast<int>(d),
                                       dqkv.get(), nullptr);
      const BarrierErrors e =
          check_barrier_result(ld.download(), phi.download(), dqkv.download(), dqkv0, ref, N, d, 1e-2);
      std::printf("barrier_flash vs kernels [%s, one call]: logdet %.2e, phi %.2e, dq/dk %.2e\n",
                  label.c_str(), e.logdet, e.phi, e.grad);
    }
  }
  cuda::destroy_cublas(blas);
}
