// The wgmma tile primitives of cuda/wgmma.cuh.
//
// 1. [gpu][wgmma]: one warpgroup computes D[64 x 64] = A[64 x 64] B[64 x 64] as 8 TF32 k-steps,
//    A from registers, B from shared memory in the documented K-major layout, against a float64
//    product of the same TF32-rounded inputs (rounding as cvt.rna: to nearest, ties away).  The
//    only difference left is the fp32 accumulation, so the bound is 1e-5 x sum_k |a b| per element
//    (64 terms: ~64 x 2^-24 at worst); a wrong fragment or descriptor layout is off by O(1).  The
//    output is NaN-poisoned first; A and B are random and unrelated, so a wrong layout cannot
//    pass by symmetry.  (Swapping the descriptor's two byte offsets is no diagnostic: it reads
//    past the tile, which faults.)
// 2. [gpu][wgmma]: operands formed by cuda::tf32_operand (the bits plus half a TF32 ulp, low bits
//    left as they fall) give products bit-identical to cvt.rna operands (cuda::to_tf32), on wgmma
//    (A in registers, B in shared memory) and on mma.sync m16n8k8: the tensor cores read only an
//    operand's top 19 bits.  A third of the inputs sit exactly on a rounding tie (low 13 bits
//    0x1000), a third one below or above it; were the low bits used, or the operand rounded
//    again, the products would differ.
// 3. [.bench][wgmma]: the wgmma TF32 m64n64k8 rate with operands resident (B in shared memory,
//    A in registers), 2 warpgroups per block and 2 blocks per SM, beside mma.sync's 320 TFLOP/s
//    of "[mma-rates]".
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/wgmma.cuh"
#include "tests/catch.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

constexpr int kN = 64;  // M = N = K = 64

// The TF32 operand bits of x: cvt.rna (to_tf32), or the half-ulp add (tf32_operand).
template <bool kHalfUlpAdd>
__device__ __forceinline__ uint32_t operand(float x) {
  return kHalfUlpAdd ? cuda::tf32_operand(x) : cuda::to_tf32(x);
}

// D = A B for row-major A [64][64] (m, k), B [64][64] (k, n), D [64][64] (m, n); one block of
// one warpgroup.
template <bool kHalfUlpAdd = false>
__global__ void wgmma_product_kernel(const float* __restrict__ A, const float* __restrict__ B,
                                     float* __restrict__ D) {
  __shared__ alignas(128) uint32_t tile[kN * kN];
  const int t = threadIdx.x, w = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
  for (int idx = t; idx < kN * kN; idx += blockDim.x)
    tile[cuda::wgmma_b_offset(idx / kN, idx % kN)] = operand<kHalfUlpAdd>(B[idx]);
  cuda::fence_proxy_async_shared();
  __syncthreads();

  uint32_t a[kN / 8][4];
  uint64_t desc[kN / 8];
  const float* ra = A + (16 * w + g) * kN;
  const float* rb = ra + 8 * kN;
#pragma unroll
  for (int ks = 0; ks < kN / 8; ++ks) {
    a[ks][0] = operand<kHalfUlpAdd>(ra[8 * ks + c]);
    a[ks][1] = operand<kHalfUlpAdd>(rb[8 * ks + c]);
    a[ks][2] = operand<kHalfUlpAdd>(ra[8 * ks + c + 4]);
    a[ks][3] = operand<kHalfUlpAdd>(rb[8 * ks + c + 4]);
    desc[ks] = cuda::wgmma_b_descriptor(tile, ks);
  }
  float d[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) d[i] = 0.0f;
  cuda::wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kN / 8; ++ks) cuda::wgmma_tf32_m64n64k8(d, a[ks], desc[ks], ks > 0);
  cuda::wgmma_commit();
  cuda::wgmma_wait<0>();
  cuda::tie(d);
#pragma unroll
  for (int ks = 0; ks < kN / 8; ++ks) cuda::tie(a[ks]);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * w + g + (e >= 2 ? 8 : 0), col = 8 * j + 2 * c + (e & 1);
      D[row * kN + col] = d[4 * j + e];
    }
}

// D [16][8] = A [16][8] (row-major) B [8][8] (row-major, k x n) on one mma.sync m16n8k8; one
// warp.  Fragments as in cuda/mma.cuh.
template <bool kHalfUlpAdd>
__global__ void mma_product_kernel(const float* __restrict__ A, const float* __restrict__ B,
                                   float* __restrict__ D) {
  const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
  const uint32_t a[4] = {operand<kHalfUlpAdd>(A[g * 8 + q]),
                         operand<kHalfUlpAdd>(A[(g + 8) * 8 + q]),
                         operand<kHalfUlpAdd>(A[g * 8 + q + 4]),
                         operand<kHalfUlpAdd>(A[(g + 8) * 8 + q + 4])};
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  cuda::mma_tf32(d, a, operand<kHalfUlpAdd>(B[q * 8 + g]),
                 operand<kHalfUlpAdd>(B[(q + 4) * 8 + g]));
  D[g * 8 + 2 * q] = d[0];
  D[g * 8 + 2 * q + 1] = d[1];
  D[(g + 8) * 8 + 2 * q] = d[2];
  D[(g + 8) * 8 + 2 * q + 1] = d[3];
}

// Random floats whose low 13 bits are, by thirds: exactly 0x1000 (a rounding tie), 0x1000 -+ 1,
// or random; the signs and exponents of randn's values.
std::vector<float> tie_heavy(size_t n, uint64_t seed) {
  std::vector<float> v = randn(n, seed, 1.0, 0.0);
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &v[i], 4);
    const uint32_t near_tie = i % 2 ? 0x0FFFu : 0x1001u;
    const uint32_t low = i % 3 == 0 ? 0x1000u : i % 3 == 1 ? near_tie : u & 0x1FFFu;
    u = (u & ~0x1FFFu) | low;
    std::memcpy(&v[i], &u, 4);
  }
  return v;
}

// The TF32 value of x as cvt.rna.tf32.f32 gives it (finite x): 10 mantissa bits, to nearest,
// ties away from zero.
float tf32_host(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x1000u) & 0xFFFFE000u;
  float y;
  std::memcpy(&y, &u, 4);
  return y;
}

struct ProductError {
  double worst_ratio;  // max over elements of |d - ref| / (sum_k |a b|)
  bool finite;
};

ProductError run_product(const std::vector<float>& A, const std::vector<float>& B) {
  DeviceArray<float> dA(A), dB(B), dD(static_cast<size_t>(kN) * kN);
  poison(dD);
  wgmma_product_kernel<><<<1, 128>>>(dA.get(), dB.get(), dD.get());
  CUDA_CHECK(cudaGetLastError());
  const std::vector<float> D = dD.download();
  ProductError e{0.0, true};
  for (int m = 0; m < kN; ++m)
    for (int n = 0; n < kN; ++n) {
      double ref = 0.0, mag = 0.0;
      for (int k = 0; k < kN; ++k) {
        const double p = static_cast<double>(tf32_host(A[m * kN + k])) * tf32_host(B[k * kN + n]);
        ref += p;
        mag += std::fabs(p);
      }
      const double got = D[m * kN + n];
      if (!std::isfinite(got)) e.finite = false;
      e.worst_ratio = std::max(e.worst_ratio, std::fabs(got - ref) / mag);
    }
  return e;
}

// Rate kernel: each warpgroup repeats 8 k-steps of D += A B on resident operands.
__global__ void __launch_bounds__(256) wgmma_rate_kernel(int iters, float* __restrict__ out) {
  __shared__ alignas(128) uint32_t tile[kN * kN];
  for (int idx = threadIdx.x; idx < kN * kN; idx += blockDim.x)
    tile[idx] = cuda::to_tf32(1e-3f * static_cast<float>(idx % 61 + 1));
  cuda::fence_proxy_async_shared();
  __syncthreads();
  const float x = 1e-3f * static_cast<float>(threadIdx.x % 29 + 1);
  uint32_t a[4] = {cuda::to_tf32(x), cuda::to_tf32(-x), cuda::to_tf32(0.5f * x),
                   cuda::to_tf32(2.0f * x)};
  float d[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) d[i] = 0.0f;
  for (int it = 0; it < iters; ++it) {
    cuda::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kN / 8; ++ks)
      cuda::wgmma_tf32_m64n64k8(d, a, cuda::wgmma_b_descriptor(tile, ks), true);
    cuda::wgmma_commit();
    cuda::wgmma_wait<0>();
    cuda::tie(d);
    cuda::tie(a);
  }
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 32; ++i) s += d[i];
  out[static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x] = s;
}

}  // namespace

TEST_CASE("wgmma: TF32 m64n64k8 steps, A from registers and B from shared memory, match float64",
          "[gpu][wgmma]") {
  for (uint64_t seed : {5301u, 5302u}) {
    const std::vector<float> A = randn(static_cast<size_t>(kN) * kN, seed, 1.0, 0.3);
    const std::vector<float> B = randn(static_cast<size_t>(kN) * kN, seed + 100, 0.5, -0.2);
    const ProductError e = run_product(A, B);
    std::printf("wgmma TF32 m64n64k8 x 8 (seed %llu): worst |d - ref| / sum|a b| = %.2e "
                "(bound 1e-5)\n", static_cast<unsigned long long>(seed), e.worst_ratio);
    CHECK(e.finite);
    CHECK(e.worst_ratio <= 1e-5);
  }
}

namespace {

// Runs a product kernel with cvt.rna operands and with tf32_operand operands on the same A, B (one
// block of `threads`, `n` outputs) and requires finite outputs that are equal bit for bit.
using ProductKernel = void (*)(const float*, const float*, float*);
void check_same_products(ProductKernel rounded, ProductKernel added, int threads, size_t n,
                         const DeviceArray<float>& A, const DeviceArray<float>& B) {
  DeviceArray<float> dr(n), da(n);
  poison(dr);
  poison(da);
  rounded<<<1, threads>>>(A.get(), B.get(), dr.get());
  added<<<1, threads>>>(A.get(), B.get(), da.get());
  CUDA_CHECK(cudaGetLastError());
  const std::vector<float> r = dr.download(), a = da.download();
  CHECK(std::all_of(r.begin(), r.end(), [](float v) { return std::isfinite(v); }));
  CHECK(std::memcmp(r.data(), a.data(), r.size() * sizeof(float)) == 0);
}

}  // namespace

TEST_CASE("tensor cores: tf32_operand operands give the products of cvt.rna operands, bit for bit",
          "[gpu][wgmma]") {
  for (uint64_t seed : {5311u, 5312u}) {
    const DeviceArray<float> A(tie_heavy(static_cast<size_t>(kN) * kN, seed));
    const DeviceArray<float> B(tie_heavy(static_cast<size_t>(kN) * kN, seed + 100));
    check_same_products(wgmma_product_kernel<false>, wgmma_product_kernel<true>, 128,
                        static_cast<size_t>(kN) * kN, A, B);
    check_same_products(mma_product_kernel<false>, mma_product_kernel<true>, 32, 16 * 8, A, B);
  }
}

TEST_CASE("wgmma: TF32 m64n64k8 rate with resident operands", "[.bench][wgmma]") {
  int dev = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  constexpr int kIters = 4096, kThreads = 256;
  const int blocks = 4 * 2 * sms;
  DeviceArray<float> out(static_cast<size_t>(blocks) * kThreads);
  const double ms =
      median_ms([&] { wgmma_rate_kernel<<<blocks, kThreads>>>(kIters, out.get()); }, 1, 5);
  CUDA_CHECK(cudaGetLastError());
  const double flops = 2.0 * 64 * 64 * 8 * 8.0 * kIters * blocks * (kThreads / 128);
  std::printf("wgmma TF32 m64n64k8, 2 warpgroups per block, 2 blocks per SM: %.1f TFLOP/s\n",
              flops / (ms * 1e-3) / 1e12);
  const std::vector<float> host = out.download();
  CHECK(std::all_of(host.begin(), host.end(), [](float v) { return std::isfinite(v); }));
}
