// Timing of the attention kernels alone (not a correctness test; test_bf16.cpp checks them): a
// hidden Catch2 case, run with
//   build-gpu/tests/test_gpu "[.bench]" -s       (scripts/bench.sh check runs it)
// For the bench shapes (a) B=16 H=12 T=1024 dh=64 and (b) B=64 H=6 T=256 dh=64, the median over
// 20 repeats (after 3 warm-ups, CUDA events) of forward and forward + backward of the fp32 flash
// kernels (attention.h) and of the bf16 batched-GEMM path (attention_bf16.h), on random qkv
// (N(0, 1), never zeros), with the causal FLOP count 4 B H T^2 dh / 2 forward (q k^T and P v),
// 3.5x that forward + backward.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/attention.h"
#include "cuda/attention_bf16.h"
#include "cuda/kernels.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

using blm::cuda::AttentionShape;
using blm::gputest::DeviceArray;
using blm::gputest::median_ms;
using blm::gputest::ScopedEnv;

}  // namespace

TEST_CASE("attention kernels: time fp32 flash vs bf16 batched GEMMs", "[.bench]") {
  cublasHandle_t blas = blm::cuda::create_cublas(nullptr);
  for (const AttentionShape s : {AttentionShape{16, 1024, 12, 64}, AttentionShape{64, 256, 6, 64}}) {
    const size_t N = static_cast<size_t>(s.B) * s.T, d = static_cast<size_t>(s.H) * s.dh;
    DeviceArray<float> qkv(blm::gputest::randn(N * 3 * d, 91));
    DeviceArray<float> dout(blm::gputest::randn(N * d, 92));
    DeviceArray<float> out32(N * d), lse(static_cast<size_t>(s.B) * s.H * s.T), dqkv(N * 3 * d);
    DeviceArray<uint16_t> out16(N * d);
    auto* o16 = reinterpret_cast<__nv_bfloat16*>(out16.get());
    DeviceArray<char> ws32(std::max<size_t>(1, blm::cuda::attention_workspace_bytes(s)));
    double f32 = 0, fb32 = 0, f16 = 0, fb16 = 0, ff = 0, fbf = 0;
    size_t gemm_ws = 0;  // the batched-GEMM path's workspace, printed with its times
    {
      ScopedEnv attention("BLM_ATTENTION", "gemm");  // the batched-GEMM path (flash: the default)
      gemm_ws = blm::cuda::attention_bf16_workspace_bytes(s, true);
      DeviceArray<char> ws16(gemm_ws);
      f32 = median_ms([&] {
        blm::cuda::attention_forward(s, qkv.get(), out32.get(), lse.get(), nullptr);
      });
      fb32 = median_ms([&] {
        blm::cuda::attention_forward(s, qkv.get(), out32.get(), lse.get(), nullptr);
        blm::cuda::attention_backward(s, qkv.get(), out32.get(), dout.get(), lse.get(),
                                      dqkv.get(), ws32.get(), nullptr);
      });
      f16 = median_ms([&] {
        blm::cuda::attention_forward_bf16(s, qkv.get(), o16, lse.get(), ws16.get(), blas,
                                          nullptr);
      });
      fb16 = median_ms([&] {
        blm::cuda::attention_forward_bf16(s, qkv.get(), o16, lse.get(), ws16.get(), blas,
                                          nullptr);
        blm::cuda::attention_backward_bf16(s, qkv.get(), o16, dout.get(), lse.get(), dqkv.get(),
                                           ws16.get(), blas, nullptr);
      });
    }
    {
      ScopedEnv attention("BLM_ATTENTION", "flash");  // the flash-style tensor-core kernels
      DeviceArray<char> wsf(blm::cuda::attention_bf16_workspace_bytes(s, true));
      ff = median_ms([&] {
        blm::cuda::attention_forward_bf16(s, qkv.get(), o16, lse.get(), wsf.get(), blas, nullptr);
      });
      fbf = median_ms([&] {
        blm::cuda::attention_forward_bf16(s, qkv.get(), o16, lse.get(), wsf.get(), blas, nullptr);
        blm::cuda::attention_backward_bf16(s, qkv.get(), o16, dout.get(), lse.get(), dqkv.get(),
                                           wsf.get(), blas, nullptr);
      });
    }
    const double fwd_flops = 4.0 * s.B * s.H * static_cast<double>(s.T) * s.T * s.dh / 2;
    std::printf("attention B=%d H=%d T=%d dh=%d (per layer): bf16 flash kernels (BLM_ATTENTION=flash) "
                "fwd %.3f ms, fwd+bwd %.3f ms (%.1f TFLOP/s)\n",
                s.B, s.H, s.T, s.dh, ff, fbf, 3.5 * fwd_flops / fbf * 1e-9);
    std::printf("attention B=%d H=%d T=%d dh=%d (per layer): fp32 flash fwd %.3f ms, fwd+bwd %.3f "
                "ms (%.1f TFLOP/s); bf16 GEMMs fwd %.3f ms, fwd+bwd %.3f ms (%.1f TFLOP/s causal "
                "count); workspace bf16 %.2f GiB\n",
                s.B, s.H, s.T, s.dh, f32, fb32, 3.5 * fwd_flops / fb32 * 1e-9, f16, fb16,
                3.5 * fwd_flops / fb16 * 1e-9, gemm_ws / 1073741824.0);
    CHECK(fb16 > 0);
  }
  blm::cuda::destroy_cublas(blas);
}
