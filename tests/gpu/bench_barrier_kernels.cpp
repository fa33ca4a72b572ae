// Timing of the barrier alone (not a correctness test): a hidden Catch2 case, run with
//   build-gpu/tests/test_gpu "[.bench]"        (BLM_BENCH_SHAPE=B,H,T,dh, default 8,12,1024,64)
// Prints the median over 20 repeats (after 3 warm-ups) of the forward and of forward + backward,
// timed with CUDA events, on random q, k (N(0, 0.5^2), never zeros), and the counted FLOP/s with
// the same work count as scripts/py/bench_barrier.py:
//   W = B*H*T*(T-1)/2*dh^2 multiply-adds; forward 2W FLOPs, forward + backward 6W FLOPs;
// for the fp32 per-position kernels (cuda/barrier.cu, the fp32 default) and for the flash-style
// pipeline (cuda/barrier_flash.h, the bf16 default; dh 32, 64), exact barrier.  The flash
// "forward" is the evaluation call (log det by LU) and "forward+backward" the training call.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "cuda/barrier_flash.h"
#include "cuda/kernels.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

using blm::cuda::AttentionShape;
using blm::gputest::DeviceArray;
using blm::gputest::median_ms;

AttentionShape bench_shape() {
  AttentionShape s{8, 12, 1024, 64};
  if (const char* env = std::getenv("BLM_BENCH_SHAPE"))
    std::sscanf(env, "%d,%d,%d,%d", &s.B, &s.H, &s.T, &s.dh);
  return s;
}

}  // namespace

TEST_CASE("barrier kernels: time forward and forward+backward", "[.bench]") {
  const AttentionShape s = bench_shape();
  const size_t d = static_cast<size_t>(s.H) * s.dh;
  DeviceArray<float> qkv(blm::gputest::randn(static_cast<size_t>(s.B) * s.T * 3 * d, 2026, 0.5));
  DeviceArray<float> dqkv(blm::gputest::randn(static_cast<size_t>(s.B) * s.T * 3 * d, 7, 0.1));
  DeviceArray<float> logdet(static_cast<size_t>(s.B) * s.H * s.T);
  DeviceArray<float> phi(static_cast<size_t>(s.B) * s.H * s.T);
  DeviceArray<char> ws(std::max<size_t>(blm::cuda::barrier_workspace_bytes(s), 1));
  const double eps = 1e-4;
  const double fwd = median_ms([&] {
    blm::cuda::barrier_forward(s, qkv.get(), nullptr, eps, logdet.get(), phi.get(), ws.get(), nullptr);
  });
  const double both = median_ms([&] {
    blm::cuda::barrier_forward(s, qkv.get(), nullptr, eps, logdet.get(), phi.get(), ws.get(), nullptr);
    blm::cuda::barrier_backward(s, qkv.get(), nullptr, eps, 1.0f, dqkv.get(), ws.get(), nullptr);
  });
  const double W = static_cast<double>(s.B) * s.H * s.T * (s.T - 1) / 2.0 * s.dh * s.dh;
  std::printf("barrier kernels B=%d H=%d T=%d dh=%d: forward %.3f ms (%.2f TFLOP/s counted), "
              "forward+backward %.3f ms (%.2f TFLOP/s counted)\n",
              s.B, s.H, s.T, s.dh, fwd, 2 * W / fwd * 1e-9, both, 6 * W / both * 1e-9);
  CHECK(fwd > 0);
  if (!blm::cuda::barrier_flash_supported(s.dh)) return;
  const int kmax = std::max(s.T - 2, 0);
  DeviceArray<char> fws(std::max<size_t>(blm::cuda::barrier_flash_workspace_bytes(s, kmax), 1));
  DeviceArray<float> dqk(static_cast<size_t>(s.B) * s.T * 2 * d);
  cublasHandle_t blas = blm::cuda::create_cublas(nullptr);
  // The evaluation forward (LU, log det only) and the training call (forward and backward).
  const double ffwd = median_ms([&] {
    blm::cuda::barrier_forward_flash(s, qkv.get(), nullptr, kmax, eps, logdet.get(), phi.get(),
                                     fws.get(), nullptr);
  });
  const double fboth = median_ms([&] {
    blm::cuda::barrier_forward_backward_flash(s, qkv.get(), nullptr, kmax, eps, 1.0f,
                                              logdet.get(), phi.get(), dqk.get(), fws.get(), blas,
                                              nullptr);
  });
  blm::cuda::destroy_cublas(blas);
  std::printf("barrier flash B=%d H=%d T=%d dh=%d: forward %.3f ms (%.2f TFLOP/s counted), "
              "forward+backward %.3f ms (%.2f TFLOP/s counted)\n",
              s.B, s.H, s.T, s.dh, ffwd, 2 * W / ffwd * 1e-9, fboth, 6 * W / fboth * 1e-9);
  CHECK(ffwd > 0);
}
