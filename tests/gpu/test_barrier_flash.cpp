// The flash-style barrier pipeline (cuda/barrier_flash.h) against the per-position fp32 kernels
// (cuda/barrier.cu, themselves within 1e-4 of the fp64 reference: test_barrier.cu): log det, phi
// and dq, dk of the training call, and log det, phi of the evaluation call.  Inputs as
// test_barrier_tc.cpp (q, k = 0.5 N(0, 1) + a per-coordinate offset, so the centring matters);
// masks: none (exact), random bits, per-sequence counts 1, 3, 17 (padded slot lists), all zero;
// T = 1, 2 (nothing counted); T not a multiple of the tiles; kmax 1, 3, 8, 16 (few counted
// slots, as with the sampled estimator) as well as 17, 64 and exact.
//
// Tolerance 1e-2 relative error of the whole tensor.  Why: the forward tiles multiply
// TF32-rounded operands (relative rounding 2^-11 per operand) with fp32 accumulation, so S,
// qbar, kbar carry ~1e-3 of the sum of |terms| (the kernels' own tests bound them element by
// element against fp64); J = I - c (S - qbar kbar^T) of these well-conditioned inputs passes that
// to logdet, phi and G with little amplification, and the gradient adds the backward tiles'
// products (bf16 operands by default: ~2^-8 of each term, measured ~2e-3 relative in their own
// test).  The measured errors are printed; two training calls must agree bit for bit (one of them
// also writing qkv's bf16 copy, which must equal bf16(qkv) exactly, as in evaluation).  The v
// block of dqkv must be left untouched.  The training call with a bf16 dqk (the bf16 precision)
// must give the fp32 call's dqk rounded to nearest even, except at the counted rows' dq (see
// there).  On a bf16 qkv (the bf16 precision's attention input) both calls must give what they
// give on its values widened to fp32, bit for bit.
#include <algorithm>
#include <cstdint>
#include <cstdio>
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
      {{2, 40, 2, 64}, Mask::zero, {}},
      // kmax 1, 3, 8, 16 (few counted slots, as with the sampled estimator), with padding
      {{2, 45, 2, 64}, Mask::counts, {1}},        {{3, 37, 1, 32}, Mask::counts, {3, 1, 2}},
      {{2, 100, 2, 64}, Mask::counts, {8, 3}},    {{2, 77, 2, 32}, Mask::counts, {16, 5}}};
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

    DeviceArray<char> ws(std::max<size_t>(1, cuda::barrier_flash_workspace_bytes(s, kmax)));
    const double tol = 1e-2;

    // Training: forward and backward in one call, dq, dk written into dqk [N, 2d]; dqkv0 + dqk
    // (barrier_flash_add_gradient) against the reference.  Twice, from poisoned scratch each
    // time (nothing may read a slot it did not write): the same bits.  The second run also asks
    // for qkv's bf16 copy, which must be exactly bf16(qkv) and change nothing else.
    const std::vector<uint16_t> qkv_bf16 = to_bits(qkv.download());
    std::vector<float> runs[2][3];  // logdet, phi, dqk
    for (int r = 0; r < 2; ++r) {
      std::vector<float>(&run)[3] = runs[r];
      DeviceArray<float> ld(BHT), phi(BHT), dqk(N * 2 * d);
      DeviceArray<uint16_t> copy(N * 3 * d);
      poison(ld);
      poison(phi);
      poison(dqk);
      poison(ws);
      poison(copy);
      cuda::barrier_forward_backward_flash(
          s, qkv.get(), mask, kmax, kEps, scale, ld.get(), phi.get(), dqk.get(), ws.get(), blas,
          nullptr, r == 1 ? reinterpret_cast<__nv_bfloat16*>(copy.get()) : nullptr);
      if (r == 1) CHECK(copy.download() == qkv_bf16);
      DeviceArray<float> dqkv(dqkv0);
      cuda::barrier_flash_add_gradient(dqk.get(), static_cast<int64_t>(N), static_cast<int>(d),
                                       dqkv.get(), nullptr);
      run[0] = ld.download();
      run[1] = phi.download();
      run[2] = dqk.download();
      const BarrierErrors e =
          check_barrier_result(run[0], run[1], dqkv.download(), dqkv0, ref, N, d, tol);
      std::printf("barrier_flash vs kernels [%s, training]: logdet %.2e, phi %.2e, dq/dk %.2e\n",
                  label.c_str(), e.logdet, e.phi, e.grad);
    }
    for (int i = 0; i < 3; ++i) CHECK(bit_identical(runs[0][i], runs[1][i]));

    // dqk in bf16 (the bf16 precision's): every element the fp32 run's rounded to nearest even,
    // but the dq of the counted positions' rows, rounded twice (the tiles' part, then its sum
    // with the slot row's dz k~ in fp32; each rounding within half a bf16 ulp of its value, the
    // per-element bound is checked in test_barrier_flash_bwd.cpp): there within 2e-2 of the fp32
    // values (relative over those elements; a slot row left out would be off by the size of its
    // dz k~).  log det and phi as the fp32 run's, and dqkv0 + widened dqk against the reference
    // within tol.
    {
      INFO("bf16 dqk");
      DeviceArray<float> ld(BHT), phi(BHT);
      DeviceArray<uint16_t> dqk16(N * 2 * d);
      poison(dqk16);
      poison(ws);
      cuda::barrier_forward_backward_flash(s, qkv.get(), mask, kmax, kEps, scale, ld.get(),
                                           phi.get(), as_bf16(dqk16), ws.get(), blas, nullptr);
      CHECK(bit_identical(ld.download(), runs[0][0]));
      CHECK(bit_identical(phi.download(), runs[0][1]));
      const std::vector<uint16_t> got16 = dqk16.download(), want16 = to_bits(runs[0][2]);
      std::vector<float> slot_got, slot_want, dqkv16 = dqkv0;
      size_t differ = 0;
      for (size_t n = 0; n < N; ++n) {
        const int t = static_cast<int>(n % s.T);
        const bool counted = t >= 2 && (mask_d.host.empty() || mask_d.host[n]);
        for (size_t col = 0; col < 2 * d; ++col) {
          const size_t e = n * 2 * d + col;
          dqkv16[n * 3 * d + col] += bf16_value(got16[e]);
          if (counted && col < d) {
            slot_got.push_back(bf16_value(got16[e]));
            slot_want.push_back(runs[0][2][e]);
          } else {
            differ += got16[e] != want16[e];
          }
        }
      }
      CHECK(differ == 0);
      const Comparison slots = compare(slot_got, to_double(slot_want));
      INFO(describe("counted rows' dq, bf16 against fp32", slots, 2e-2));
      CHECK(slots.rel <= 2e-2);
      const BarrierErrors e16 =
          check_barrier_result(runs[0][0], runs[0][1], dqkv16, dqkv0, ref, N, d, tol);
      std::printf("barrier_flash [%s, training, bf16 dqk]: counted rows' dq against fp32 %.2e, "
                  "dq/dk against kernels %.2e\n",
                  label.c_str(), slots.rel, e16.grad);
    }

    // A bf16 qkv (the bf16 precision's attention input, BLM_BARRIER_QKV=bf16): both calls give,
    // bit for bit, what the fp32 calls give on its values widened to fp32.
    {
      INFO("bf16 qkv");
      DeviceArray<uint16_t> qkv16(qkv_bf16);
      DeviceArray<float> widened(from_bits(qkv_bf16)), ld(BHT), phi(BHT);
      DeviceArray<uint16_t> dqk16(N * 2 * d);
      // log det, phi (and dq, dk widened) of the training or the evaluation call on `in`.
      auto results = [&](const auto* in, bool train) {
        for (DeviceArray<float>* a : {&ld, &phi}) poison(*a);
        poison(dqk16);
        poison(ws);
        if (train)
          cuda::barrier_forward_backward_flash(s, in, mask, kmax, kEps, scale, ld.get(), phi.get(),
                                               as_bf16(dqk16), ws.get(), blas, nullptr);
        else
          cuda::barrier_forward_flash(s, in, mask, kmax, kEps, ld.get(), phi.get(), ws.get(),
                                      nullptr);
        std::vector<std::vector<float>> r = {ld.download(), phi.download()};
        if (train) r.push_back(from_bits(dqk16.download()));
        return r;
      };
      const auto* q16 = reinterpret_cast<const __nv_bfloat16*>(qkv16.get());
      for (bool train : {true, false}) {
        INFO((train ? "training" : "evaluation"));
        const auto a = results(q16, train), b = results(widened.get(), train);
        for (size_t i = 0; i < a.size(); ++i) CHECK(bit_identical(a[i], b[i]));
      }
    }

    // Evaluation: log det and phi through the LU, no gradient.
    {
      INFO("evaluation");
      DeviceArray<float> ld(BHT), phi(BHT);
      DeviceArray<uint16_t> copy(N * 3 * d);
      poison(ld);
      poison(phi);
      poison(ws);
      poison(copy);
      cuda::barrier_forward_flash(s, qkv.get(), mask, kmax, kEps, ld.get(), phi.get(), ws.get(),
                                  nullptr, reinterpret_cast<__nv_bfloat16*>(copy.get()));
      CHECK(copy.download() == qkv_bf16);
      GPU_CHECK_REL("logdet", ld.download(), to_double(ref.logdet), tol);
      GPU_CHECK_REL("phi", phi.download(), to_double(ref.phi), tol);
    }
  }
  cuda::destroy_cublas(blas);
}
