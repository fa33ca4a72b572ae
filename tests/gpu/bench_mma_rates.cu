// [.bench][mma-rates]: the rate of the legacy tensor-core instruction (mma.sync) on this GPU, the
// instruction every hand-written tile kernel here uses (cuda/mma.cuh), with operands already in
// registers: no loads, no conversions, no barriers.  It bounds what those kernels can reach
// without wgmma (Hopper's warpgroup instruction, which cuBLAS and cuDNN use), and shows how the
// rate depends on resident warps and on independent accumulators per warp.
//
//   TF32 m16n8k8 (1024 multiply-adds per instruction) and bf16 m16n8k16 (2048), each warp issuing
//   CHAINS independent accumulator tiles in turn (32 = the 128 accumulator registers of the
//   barrier tile kernels), W warps per multiprocessor (8 = one block of the barrier kernels).
//
// Operands are derived from the thread index (not zeros; small enough that the sums stay
// finite) and every accumulator reaches the output, so nothing is folded away; the test checks
// only that the output is finite.  Timing: median_ms (gpu_test_util.h), 5 launches after 1.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "tests/catch.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

using blm::cuda::mma16816;
using blm::cuda::mma_tf32;
using blm::cuda::to_tf32;

template <bool kBf16>
__device__ __forceinline__ uint32_t operand(float x) {
  if constexpr (kBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(x, -x);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    return to_tf32(x);
  }
}

template <bool kBf16, int kChains>
__global__ void mma_rate_kernel(int iters, float* __restrict__ out) {
  const float x = 1e-3f * static_cast<float>((threadIdx.x % 29) + 1);
  const uint32_t a[4] = {operand<kBf16>(x), operand<kBf16>(-x), operand<kBf16>(0.5f * x),
                         operand<kBf16>(2.0f * x)};
  const uint32_t b0 = operand<kBf16>(1.0f - x), b1 = operand<kBf16>(x - 0.25f);
  float acc[kChains][4];
#pragma unroll
  for (int c = 0; c < kChains; ++c) acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.0f;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) {
      if constexpr (kBf16)
        mma16816(acc[c], a, b0, b1);
      else
        mma_tf32(acc[c], a, b0, b1);
    }
  }
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s += (acc[c][0] + acc[c][1]) + (acc[c][2] + acc[c][3]);
  out[static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x] = s;
}

struct Rate {
  double tflops;
  bool finite;
};

// blocks of 8 warps, `blocks_per_sm` of them per multiprocessor, 4 waves.
template <bool kBf16, int kChains>
Rate measure(int blocks_per_sm, int sms) {
  constexpr int kWarps = 8, kThreads = 32 * kWarps, kIters = 2048;
  const int blocks = 4 * sms * blocks_per_sm;
  float* out = nullptr;
  CUDA_CHECK(cudaMalloc(&out, static_cast<size_t>(blocks) * kThreads * sizeof(float)));
  const double ms = blm::gputest::median_ms(
      [&] { mma_rate_kernel<kBf16, kChains><<<blocks, kThreads>>>(kIters, out); }, 1, 5);
  CUDA_CHECK(cudaGetLastError());
  std::vector<float> host(static_cast<size_t>(blocks) * kThreads);
  CUDA_CHECK(cudaMemcpy(host.data(), out, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaFree(out));
  const bool finite = std::all_of(host.begin(), host.end(), [](float v) { return std::isfinite(v); });
  const double fma_per_mma = kBf16 ? 2048.0 : 1024.0;
  const double flops = 2.0 * fma_per_mma * kChains * kIters * (static_cast<double>(blocks) * kWarps);
  return Rate{flops / (ms * 1e-3) / 1e12, finite};
}

template <bool kBf16, int kChains>
void report(const char* name, int blocks_per_sm, int sms) {
  const Rate r = measure<kBf16, kChains>(blocks_per_sm, sms);
  std::printf("mma.sync %-14s %2d independent accumulators per warp, %2d warps per SM: %6.1f TFLOP/s\n",
              name, kChains, 8 * blocks_per_sm, r.tflops);
  CHECK(r.finite);
}

}  // namespace

TEST_CASE("tensor cores: mma.sync rates with operands in registers", "[.bench][mma-rates]") {
  int dev = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  report<false, 32>("TF32 m16n8k8", 1, sms);
  report<false, 8>("TF32 m16n8k8", 1, sms);
  report<false, 8>("TF32 m16n8k8", 2, sms);
  report<false, 8>("TF32 m16n8k8", 4, sms);
  report<true, 32>("bf16 m16n8k16", 1, sms);
  report<true, 8>("bf16 m16n8k16", 1, sms);
  report<true, 8>("bf16 m16n8k16", 2, sms);
  report<true, 8>("bf16 m16n8k16", 4, sms);
}
