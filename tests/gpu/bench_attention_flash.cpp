// Timing of the bf16 attention paths alone (not a correctness test; test_bf16.cpp checks them):
// a hidden Catch2 case, run with
//   build-gpu/tests/test_gpu "[.bench][attention-flash]" -s
// For the bench shapes (a) B=16 H=12 T=1024 dh=64 (12 layers) and (b) B=64 H=6 T=256 dh=64
// (6 layers): the median over 20 repeats (after 3 warm-ups, CUDA events, gputest::median_ms) of
// forward, and forward + backward, of the default flash kernels (cuda/attention_flash.h, reading
// qkv / dout and writing out / dqkv directly) and of the batched-GEMM path (BLM_ATTENTION=gemm),
// on random qkv and dout (N(0, 1), never zeros).  Printed per layer and times the layer count
// (the attention share of one training step), with the causal FLOP rate
// (forward 4 B H T^2 dh / 2, forward + backward 3.5x that).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>
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

struct BenchShape {
  const char* name;
  AttentionShape s;
  int layers;
};

// Median forward and forward + backward of attention_{forward,backward}_bf16 with the path the
// environment selects now.
struct PathTimes {
  double fwd, fwd_bwd;
  size_t workspace;
};
PathTimes time_path(const AttentionShape& s, cublasHandle_t blas, const float* qkv,
                    const float* dout, __nv_bfloat16* out, float* lse, float* dqkv) {
  PathTimes t{};
  t.workspace = blm::cuda::attention_bf16_workspace_bytes(s, true);
  DeviceArray<char> ws(std::max<size_t>(1, t.workspace));
  t.fwd = median_ms([&] {
    blm::cuda::attention_forward_bf16(s, qkv, out, lse, ws.get(), blas, nullptr);
  });
  t.fwd_bwd = median_ms([&] {
    blm::cuda::attention_forward_bf16(s, qkv, out, lse, ws.get(), blas, nullptr);
    blm::cuda::attention_backward_bf16(s, qkv, out, dout, lse, dqkv, ws.get(), blas, nullptr);
  });
  return t;
}

}  // namespace

TEST_CASE("attention kernels: time the bf16 flash kernels (default) vs batched GEMMs", "[.bench][attention-flash]") {
  cublasHandle_t blas = blm::cuda::create_cublas(nullptr);
  for (const BenchShape& b : {BenchShape{"(a)", AttentionShape{16, 1024, 12, 64}, 12},
                              BenchShape{"(b)", AttentionShape{64, 256, 6, 64}, 6}}) {
    const AttentionShape s = b.s;
    const size_t N = static_cast<size_t>(s.B) * s.T, d = static_cast<size_t>(s.H) * s.dh;
    DeviceArray<float> qkv(blm::gputest::randn(N * 3 * d, 93));
    DeviceArray<float> dout(blm::gputest::randn(N * d, 94));
    DeviceArray<float> lse(static_cast<size_t>(s.B) * s.H * s.T), dqkv(N * 3 * d);
    DeviceArray<uint16_t> out16(N * d);
    auto* out = reinterpret_cast<__nv_bfloat16*>(out16.get());
    // The path BLM_ATTENTION selects (null: unset, the default).
    auto time_with = [&](const char* attention) {
      ScopedEnv env("BLM_ATTENTION", attention);
      return time_path(s, blas, qkv.get(), dout.get(), out, lse.get(), dqkv.get());
    };
    const PathTimes flash = time_with(nullptr);
    const PathTimes gemm = time_with("gemm");
    const double fwd_flops = 4.0 * s.B * s.H * static_cast<double>(s.T) * s.T * s.dh / 2;
    for (const auto& [name, t] : {std::pair<const char*, PathTimes>{"flash (default)", flash},
                                  std::pair<const char*, PathTimes>{"gemm", gemm}}) {
      std::printf("bf16 attention %s B=%d H=%d T=%d dh=%d, %s: per layer fwd %.3f ms, fwd+bwd "
                  "%.3f ms (%.1f TFLOP/s causal); x %d layers fwd+bwd %.2f ms; workspace %.3f "
                  "GiB\n",
                  b.name, s.B, s.H, s.T, s.dh, name, t.fwd, t.fwd_bwd,
                  3.5 * fwd_flops / t.fwd_bwd * 1e-9, b.layers, t.fwd_bwd * b.layers,
                  t.workspace / 1073741824.0);
    }
    CHECK(flash.fwd_bwd > 0);
    CHECK(gemm.fwd_bwd > 0);
  }
  blm::cuda::destroy_cublas(blas);
}
