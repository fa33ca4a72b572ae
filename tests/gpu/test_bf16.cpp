// The bf16 precision of the CUDA backend: its pieces against fp64 host references, and the whole
// backend against the fp64 CPU reference model and the fp32 CUDA backend.
//
// Tolerances (relative error ||got - ref|| / ||ref||, see gpu_test_util.h), and why:
//   - exact: fp32 -> bf16 conversion (round to nearest even) and the AdamW kernel's bf16 copy
//     (bit patterns compared with the host's rounding);
//   - 1e-5: the fp32 parts of the bf16 kernels (LN mean / rstd, cross-entropy loss on bf16
//     logits, column sums of bf16 values) - only fp32 rounding separates them from fp64;
//   - 1e-4: tensor-core products of bf16-exact operands with fp32 accumulation and fp32 output
//     (cuBLASLt): the tensor cores' fp32 accumulation may round more coarsely than IEEE sums; a
//     wrong layout or transpose gives errors of order 1;
//   - 5e-3: anything stored in bf16 (unit roundoff 2^-8 ~ 3.9e-3 per element at most; a tensor's
//     relative RMS error ~ 1-2e-3);
//   - whole model against fp64 (bf16 weights and activations through several layers): loss and CE
//     1e-2 relative; each gradient tensor 5e-2; barrier term and min log det 5e-2 with floors as
//     tests/gpu/test_cuda_backend.cpp; ten AdamW steps: losses within 2e-2 of the fp32 backend.
// The measured errors of the whole-model comparisons are printed (one line per case), so a run's
// log shows how much of each tolerance is used.
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
#include "core/optim.h"
#include "core/params.h"
#include "core/reference.h"
#include "core/rng.h"
#include "cuda/attention.h"
#include "cuda/attention_bf16.h"
#include "cuda/attention_cudnn.h"
#include "cuda/attention_flash.h"
#include "cuda/cuda_backend.h"
#include "cuda/kernels.h"
#include "cuda/matmul_lt.h"
#include "tests/catch.h"
#include "tests/gpu/backend_test_util.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

// Host bf16 (bf16_bits, round_bf16, to_bits, from_bits, randn_bf16_exact, as_bf16):
// tests/gpu/gpu_test_util.h.

// ------------------------------------------------------------------ cuBLASLt products

TEST_CASE("bf16 matmul (cuBLASLt): transposes, bias, residual C, fp32 and bf16 output", "[gpu][bf16]") {
  cuda::LtMatmul lt;
  struct Shape {
    int M, N, K;
  };
  uint64_t seed = 100;
  for (const Shape sh : {Shape{37, 53, 29}, Shape{64, 96, 128}, Shape{8, 200, 1000}}) {
    for (int variant = 0; variant < 16; ++variant) {
      const bool ta = variant & 1, tb = variant & 2, with_bias = variant & 4, with_c = variant & 8;
      const int M = sh.M, N = sh.N, K = sh.K;
      const int lda = ta ? M : K, ldb = tb ? K : N;
      const std::vector<float> A = randn_bf16_exact(static_cast<size_t>(ta ? K : M) * lda, ++seed);
      const std::vector<float> B = randn_bf16_exact(static_cast<size_t>(tb ? N : K) * ldb, ++seed);
      DeviceArray<uint16_t> dA(to_bits(A)), dB(to_bits(B));
      for (const cuda::Dtype out : {cuda::Dtype::f32, cuda::Dtype::bf16}) {
        const bool out16 = out == cuda::Dtype::bf16;
        INFO("M " << M << " N " << N << " K " << K << " trans_a " << ta << " trans_b " << tb
                  << " bias " << with_bias << " C " << with_c << " out " << (out16 ? "bf16" : "fp32"));
        // Bias and C in D's type; bf16-exact values so both outputs see the same inputs.
        const std::vector<float> bias = randn_bf16_exact(N, ++seed, 0.5);
        const std::vector<float> C = randn_bf16_exact(static_cast<size_t>(M) * N, ++seed);
        const std::vector<double> ref =
            matmul_ref(ta, tb, M, N, K, A, lda, B, ldb, with_bias ? &bias : nullptr,
                       with_c ? 1.0f : 0.0f, &C, N, N);
        const cuda::LtOperand opA{dA.get(), cuda::Dtype::bf16, lda};
        const cuda::LtOperand opB{dB.get(), cuda::Dtype::bf16, ldb};
        if (!out16) {
          DeviceArray<float> dbias(bias), dC(C), dD(static_cast<size_t>(M) * N);
          lt.matmul(ta, tb, M, N, K, opA, opB, with_bias ? dbias.get() : nullptr,
                    with_c ? 1.0f : 0.0f, cuda::LtOperand{dC.get(), cuda::Dtype::f32, N}, dD.get(),
                    cuda::Dtype::f32, N, nullptr);
          GPU_CHECK_REL("D fp32", dD.download(), ref, 1e-4);
        } else {
          DeviceArray<uint16_t> dbias(to_bits(bias)), dC(to_bits(C)), dD(static_cast<size_t>(M) * N);
          lt.matmul(ta, tb, M, N, K, opA, opB, with_bias ? as_bf16(dbias) : nullptr,
                    with_c ? 1.0f : 0.0f, cuda::LtOperand{dC.get(), cuda::Dtype::bf16, N}, dD.get(),
                    cuda::Dtype::bf16, N, nullptr);
          GPU_CHECK_REL("D bf16", from_bits(dD.download()), ref, 5e-3);
        }
      }
    }
  }
  CHECK(lt.plans() > 0);
}

TEST_CASE("bf16 matmul: in-place accumulation D = C (dW += dy^T x), repeated calls reuse the plan", "[gpu][bf16]") {
  cuda::LtMatmul lt;
  const int M = 48, N = 40, K = 300;  // dW [M, N] += dy[K, M]^T x[K, N]
  const std::vector<float> dy = randn_bf16_exact(static_cast<size_t>(K) * M, 7), x = randn_bf16_exact(static_cast<size_t>(K) * N, 8);
  const std::vector<float> w0 = randn(static_cast<size_t>(M) * N, 9);
  DeviceArray<uint16_t> ddy(to_bits(dy)), dx(to_bits(x));
  DeviceArray<float> dw(w0);
  for (int rep = 0; rep < 3; ++rep)
    lt.matmul(true, false, M, N, K, {ddy.get(), cuda::Dtype::bf16, M}, {dx.get(), cuda::Dtype::bf16, N},
              nullptr, 1.0f, {dw.get(), cuda::Dtype::f32, N}, dw.get(), cuda::Dtype::f32, N, nullptr);
  std::vector<double> ref = matmul_ref(true, false, M, N, K, dy, M, x, N, nullptr, 0.0f, nullptr, N, N);
  for (size_t i = 0; i < ref.size(); ++i) ref[i] = w0[i] + 3.0 * ref[i];
  GPU_CHECK_REL("dW after three accumulations", dw.download(), ref, 1e-4);
  CHECK(lt.plans() == 1);
}

// ------------------------------------------------------------------ bf16 kernels

TEST_CASE("bf16 kernels: conversion rounds to nearest even, exactly", "[gpu][bf16]") {
  std::vector<float> x = randn(100003, 11, 3.0);
  // Exact ties and values near the rounding boundary.
  for (int i = 0; i < 64; ++i) {
    uint32_t u = 0x3F800000u + (static_cast<uint32_t>(i) << 15);  // 1 + i * 2^-8: halfway cases
    std::memcpy(&x[i], &u, 4);
  }
  DeviceArray<float> dx(x);
  DeviceArray<uint16_t> dy(x.size());
  cuda::convert_to_bf16(dx.get(), as_bf16(dy), static_cast<int64_t>(x.size()), nullptr);
  const std::vector<uint16_t> got = dy.download(), want = to_bits(x);
  size_t mismatches = 0;
  for (size_t i = 0; i < x.size(); ++i) mismatches += got[i] != want[i];
  CHECK(mismatches == 0);
}

TEST_CASE("bf16 kernels: layernorm with bf16 output", "[gpu][bf16]") {
  // C 384 and 768: the row in registers (2 and 3 vectors of 8 per lane); 1544: the loop form.
  for (const int C : {384, 768, 1544}) {
    INFO("C " << C);
    const int N = 77;
    const uint64_t seed = 21 + static_cast<uint64_t>(C);
    const std::vector<float> x = randn(static_cast<size_t>(N) * C, seed, 2.0, 0.7);
    const std::vector<float> w = randn(C, seed + 1, 0.2, 1.0), b = randn(C, seed + 2, 0.1);
    std::vector<double> ry(x.size()), rmean(N), rrstd(N);
    for (int n = 0; n < N; ++n) {
      double mu = 0, var = 0;
      for (int c = 0; c < C; ++c) mu += x[n * C + c];
      mu /= C;
      for (int c = 0; c < C; ++c) var += (x[n * C + c] - mu) * (x[n * C + c] - mu);
      const double rs = 1.0 / std::sqrt(var / C + cuda::kLayerNormEps);
      rmean[n] = mu;
      rrstd[n] = rs;
      for (int c = 0; c < C; ++c) ry[n * C + c] = (x[n * C + c] - mu) * rs * w[c] + b[c];
    }
    DeviceArray<float> dx(x), dw(w), db(b), dmean(N), drstd(N);
    DeviceArray<uint16_t> dy(x.size());
    poison(dy);
    cuda::layernorm_forward(dx.get(), dw.get(), db.get(), N, C, as_bf16(dy), dmean.get(),
                            drstd.get(), nullptr);
    GPU_CHECK_REL("y (bf16)", from_bits(dy.download()), ry, 5e-3);
    GPU_CHECK_REL("mean", dmean.download(), rmean, 1e-5);
    GPU_CHECK_REL("rstd", drstd.download(), rrstd, 1e-5);
  }
}

TEST_CASE("bf16 kernels: GELU forward and backward on bf16 storage", "[gpu][bf16]") {
  const size_t n = 50001;
  const std::vector<float> pre = randn_bf16_exact(n, 31, 2.0), dact = randn_bf16_exact(n, 32);
  std::vector<double> rout(n), rgrad(n);
  for (size_t i = 0; i < n; ++i) {
    rout[i] = gelu_ref(pre[i]);
    rgrad[i] = dact[i] * gelu_grad_ref(pre[i]);
  }
  DeviceArray<uint16_t> dpre(to_bits(pre)), dout(n), dd(to_bits(dact));
  cuda::gelu_forward(as_bf16(dpre), as_bf16(dout), static_cast<int64_t>(n), nullptr);
  cuda::gelu_backward_inplace(as_bf16(dpre), as_bf16(dd), static_cast<int64_t>(n), nullptr);
  GPU_CHECK_REL("gelu(pre)", from_bits(dout.download()), rout, 5e-3);
  GPU_CHECK_REL("dact * gelu'(pre)", from_bits(dd.download()), rgrad, 5e-3);
}

TEST_CASE("bf16 kernels: cross-entropy on bf16 logits, gradient in place", "[gpu][bf16]") {
  const int N = 45, V = 1037;
  const std::vector<float> logits = randn_bf16_exact(static_cast<size_t>(N) * V, 41, 3.0);
  const std::vector<int32_t> y = randint(N, 42, V);
  const float scale = 0.37f;
  std::vector<double> rloss(N), rgrad(logits.size());
  std::vector<int32_t> rhit(N);
  for (int n = 0; n < N; ++n) {
    const float* row = logits.data() + static_cast<size_t>(n) * V;
    double m = -INFINITY;
    int arg = 0;
    for (int c = 0; c < V; ++c)
      if (row[c] > m) {
        m = row[c];
        arg = c;
      }
    double s = 0;
    for (int c = 0; c < V; ++c) s += std::exp(row[c] - m);
    rloss[n] = m + std::log(s) - row[y[n]];
    rhit[n] = arg == y[n];
    for (int c = 0; c < V; ++c)
      rgrad[static_cast<size_t>(n) * V + c] = (std::exp(row[c] - m) / s - (c == y[n])) * scale;
  }
  DeviceArray<uint16_t> dl(to_bits(logits));
  DeviceArray<int32_t> dy(y), dhit(N);
  DeviceArray<float> dloss(N);
  cuda::cross_entropy(as_bf16(dl), dy.get(), N, V, true, scale, dloss.get(), dhit.get(), nullptr);
  GPU_CHECK_REL("row loss", dloss.download(), rloss, 1e-5);
  CHECK(dhit.download() == rhit);
  GPU_CHECK_REL("dlogits (bf16)", from_bits(dl.download()), rgrad, 5e-3);
}

TEST_CASE("bf16 kernels: column sums of bf16 values accumulate in fp32", "[gpu][bf16]") {
  const int N = 5000, C = 300;  // several row chunks
  const std::vector<float> x = randn_bf16_exact(static_cast<size_t>(N) * C, 51);
  const std::vector<float> out0 = randn(C, 52);
  std::vector<double> ref(out0.begin(), out0.end());
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) ref[c] += x[static_cast<size_t>(n) * C + c];
  DeviceArray<uint16_t> dx(to_bits(x));
  DeviceArray<float> dout(out0), partial(cuda::column_partial_floats(N, C, 1));
  cuda::column_sum_accumulate(as_bf16(dx), N, C, partial.get(), dout.get(), nullptr);
  GPU_CHECK_REL("column sums", dout.download(), ref, 1e-5);
}

TEST_CASE("bf16 kernels: AdamW refreshes the bf16 weights from the new fp32 weights", "[gpu][bf16]") {
  const size_t n = 20000;
  const std::vector<float> p = randn(n, 61), g = randn(n, 62), m = randn(n, 63, 0.1);
  std::vector<float> v = randn(n, 64, 0.1);
  for (float& x : v) x = std::fabs(x);
  const std::vector<int64_t> starts = {0, 7000, static_cast<int64_t>(n)};
  const std::vector<uint8_t> flags = {1, 0};
  DeviceArray<float> dp(p), dg(g), dm(m), dv(v), dp2(p), dm2(m), dv2(v);
  DeviceArray<int64_t> dstarts(starts);
  DeviceArray<uint8_t> dflags(flags);
  DeviceArray<uint16_t> d16(std::vector<uint16_t>(n, 0));
  cuda::DecayTable table{dstarts.get(), dflags.get(), 2};
  AdamWHyper hyper;
  const AdamWScalars s = adamw_scalars(hyper, 1e-2, 1, 0.8);
  cuda::adamw_update(dp.get(), dg.get(), dm.get(), dv.get(), static_cast<int64_t>(n), table, s,
                     as_bf16(d16), nullptr);
  cuda::adamw_update(dp2.get(), dg.get(), dm2.get(), dv2.get(), static_cast<int64_t>(n), table, s,
                     nullptr);
  const std::vector<float> newp = dp.download();
  CHECK(newp == dp2.download());  // the copy changes nothing else
  CHECK(d16.download() == to_bits(newp));
  CHECK(newp != p);
}

// ------------------------------------------------------------------ attention

// Both bf16 paths: the flash-style tensor-core kernels (the default, cuda/attention_flash.h;
// they read qkv / dout and write out / dqkv in place) and the batched GEMMs (BLM_ATTENTION=gemm),
// each against the fp32 flash kernels.  Shapes cover dh 32, 64, 128; T = 1; T not a multiple of
// the 64-key tiles nor of the 128-query (dh <= 64) or 64-query (dh 128) forward tiles; H > 1
// (each head's columns of the [B, T, 3d] rows).  out and dqkv are NaN-poisoned before the calls,
// so an element a path forgets to write fails the comparison.
TEST_CASE("bf16 attention (flash kernels, batched GEMMs) matches the fp32 flash kernels", "[gpu][bf16][attention]") {
  struct Case {
    int B, T, H, dh;
  };
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  uint64_t seed = 700;
  for (const Case c : {Case{2, 37, 3, 32}, Case{1, 130, 2, 64}, Case{2, 64, 1, 128}, Case{3, 1, 2, 32},
                       Case{2, 200, 2, 64}, Case{1, 129, 2, 128}, Case{2, 1, 1, 64}, Case{1, 1, 2, 128},
                       Case{1, 300, 3, 32}}) {
    INFO("B " << c.B << " T " << c.T << " H " << c.H << " dh " << c.dh);
    const cuda::AttentionShape s{c.B, c.T, c.H, c.dh};
    const size_t N = static_cast<size_t>(c.B) * c.T, d = static_cast<size_t>(c.H) * c.dh;
    // q, k of std 1.2: logits of a few units, softmax rows far from uniform.
    const std::vector<float> qkv = randn(N * 3 * d, ++seed, 1.2);
    const std::vector<float> dout = randn(N * d, ++seed);
    DeviceArray<float> dqkv_in(qkv), ddout(dout);
    // fp32 reference kernels
    DeviceArray<float> out32(N * d), lse32(static_cast<size_t>(c.B) * c.H * c.T), dqkv32(N * 3 * d);
    DeviceArray<char> ws32(std::max<size_t>(1, cuda::attention_workspace_bytes(s)));
    cuda::attention_forward(s, dqkv_in.get(), out32.get(), lse32.get(), nullptr);
    cuda::attention_backward(s, dqkv_in.get(), out32.get(), ddout.get(), lse32.get(), dqkv32.get(),
                             ws32.get(), nullptr);
    for (const bool flash : {true, false}) {
      INFO((flash ? "flash kernels (default)" : "batched GEMMs (BLM_ATTENTION=gemm)"));
      ScopedEnv attention("BLM_ATTENTION", flash ? nullptr : "gemm");
      CHECK(cuda::flash_attention_enabled() == flash);
      DeviceArray<uint16_t> out16(N * d);
      DeviceArray<float> lse16(static_cast<size_t>(c.B) * c.H * c.T), dqkv16(N * 3 * d);
      poison(out16);
      poison(lse16);
      poison(dqkv16);
      // Workspace from the arena's rules: at least one byte so the pointer is a real allocation.
      DeviceArray<char> ws16(std::max<size_t>(1, cuda::attention_bf16_workspace_bytes(s, true)));
      CHECK(cuda::attention_bf16_workspace_bytes(s, false) <= cuda::attention_bf16_workspace_bytes(s, true));
      auto run = [&] {
        cuda::attention_forward_bf16(s, dqkv_in.get(), as_bf16(out16), lse16.get(), ws16.get(),
                                     blas, nullptr);
        cuda::attention_backward_bf16(s, dqkv_in.get(), as_bf16(out16), ddout.get(), lse16.get(),
                                      dqkv16.get(), ws16.get(), blas, nullptr);
      };
      run();
      const std::vector<uint16_t> o16 = out16.download();
      const Comparison e_out = compare(from_bits(o16), to_double(out32.download()));
      const Comparison e_lse = compare(lse16.download(), to_double(lse32.download()));
      INFO(describe("out", e_out, 1e-2));
      // At T = 1 the lse is the single logit q.k / sqrt(dh) of bf16-rounded q and k: a dot
      // product whose terms partly cancel, so its relative error is not bounded by bf16's 2^-8
      // (measured 2.4e-3 for both bf16 paths at B 2 T 1 H 1 dh 64).  Longer rows add log-sum
      // terms that dilute it below 2e-3.
      const double lse_tol = c.T == 1 ? 5e-3 : 2e-3;
      INFO(describe("lse", e_lse, lse_tol));
      CHECK(e_out.rel <= 1e-2);
      CHECK(e_lse.rel <= lse_tol);
      const std::vector<float> g16 = dqkv16.download(), g32 = dqkv32.download();
      // Each of the q, k and v gradient blocks on its own (columns [j d, (j+1) d) of every row),
      // its error measured against the larger of its own norm and the norm of the whole
      // gradient: at T = 1 the q and k gradients are exactly zero (one key, softmax 1) and what
      // both precisions return there is rounding at the scale of the whole gradient (bf16: dP
      // from bf16 operands against D in fp32), not a relative error of that block.
      double all2 = 0;
      for (float x : g32) all2 += static_cast<double>(x) * x;
      double worst = 0;
      for (int j = 0; j < 3; ++j) {
        std::vector<float> a, r;
        for (size_t n = 0; n < N; ++n)
          for (size_t i = 0; i < d; ++i) {
            a.push_back(g16[n * 3 * d + j * d + i]);
            r.push_back(g32[n * 3 * d + j * d + i]);
          }
        Comparison e = compare(a, to_double(r));
        const double abs_err = e.ref_norm > 0 ? e.rel * e.ref_norm : e.rel;  // ||a - r||
        e.rel = abs_err / std::max(e.ref_norm, std::sqrt(all2));
        INFO(describe(std::string("d") + "qkv"[j], e, 2e-2));
        CHECK(e.rel <= 2e-2);  // false for NaN: an unwritten (poisoned) element fails here
        worst = std::max(worst, e.rel);
      }
      // Deterministic, and dqkv written over (=, not +=): a second run over the first's
      // outputs gives the same bits.
      run();
      CHECK(bit_identical(dqkv16.download(), g16));
      CHECK(out16.download() == o16);
      std::printf("bf16 vs fp32 attention [%s, B %d T %d H %d dh %d]: out %.2e, lse %.2e, worst "
                  "dqkv block %.2e\n",
                  flash ? "flash" : "GEMMs", c.B, c.T, c.H, c.dh, e_out.rel, e_lse.rel, worst);
    }
  }
  cuda::destroy_cublas(blas);
}

// The flash kernels' bf16-qkv overloads against their fp32-qkv overloads on the same values: with
// q, k, v exactly representable in bf16 the fp32 path's rounding on load is the identity, so both
// stage the same operands into the same products and must agree bit for bit (out, lse, dqkv).
TEST_CASE("flash attention: bf16 qkv gives the bits of the same values in fp32", "[gpu][bf16][attention]") {
  struct Case {
    int B, T, H, dh;
  };
  uint64_t seed = 760;
  for (const Case c : {Case{2, 37, 3, 32}, Case{1, 200, 2, 64}, Case{1, 129, 2, 128}, Case{2, 1, 1, 64}}) {
    INFO("B " << c.B << " T " << c.T << " H " << c.H << " dh " << c.dh);
    const cuda::AttentionShape s{c.B, c.T, c.H, c.dh};
    const size_t N = static_cast<size_t>(c.B) * c.T, d = static_cast<size_t>(c.H) * c.dh;
    const size_t BHT = static_cast<size_t>(c.B) * c.H * c.T;
    const std::vector<float> qkv = randn_bf16_exact(N * 3 * d, ++seed, 1.2);
    DeviceArray<float> qkv32(qkv), dout(randn(N * d, ++seed));
    DeviceArray<uint16_t> qkv16(to_bits(qkv));
    DeviceArray<char> ws(cuda::flash_attention_workspace_bytes(s));
    std::vector<uint16_t> out_bits[2];
    std::vector<float> lse[2], dqkv[2];
    for (int bf = 0; bf < 2; ++bf) {
      DeviceArray<uint16_t> out(N * d);
      DeviceArray<float> l(BHT), g(N * 3 * d);
      poison(out);
      poison(l);
      poison(g);
      if (bf) {
        cuda::flash_attention_forward(s, as_bf16(qkv16), as_bf16(out), l.get(), nullptr);
        cuda::flash_attention_backward(s, as_bf16(qkv16), as_bf16(out), dout.get(), l.get(),
                                       g.get(), ws.get(), nullptr);
      } else {
        cuda::flash_attention_forward(s, qkv32.get(), as_bf16(out), l.get(), nullptr);
        cuda::flash_attention_backward(s, qkv32.get(), as_bf16(out), dout.get(), l.get(), g.get(),
                                       ws.get(), nullptr);
      }
      out_bits[bf] = out.download();
      lse[bf] = l.download();
      dqkv[bf] = g.download();
    }
    CHECK(out_bits[0] == out_bits[1]);
    CHECK(bit_identical(lse[0], lse[1]));
    CHECK(bit_identical(dqkv[0], dqkv[1]));
  }
}

TEST_CASE("bf16 attention: BLM_ATTENTION values; the flash kernels refuse what they cannot read", "[gpu][bf16][attention]") {
  {
    ScopedEnv attention("BLM_ATTENTION", "flash");
    CHECK(cuda::flash_attention_enabled());
  }
  {
    ScopedEnv attention("BLM_ATTENTION", "");
    CHECK(cuda::flash_attention_enabled());
  }
  {
    ScopedEnv attention("BLM_ATTENTION", "gemm");
    CHECK_FALSE(cuda::flash_attention_enabled());
  }
  {
    ScopedEnv attention("BLM_ATTENTION", "flashy");
    CHECK_THROWS_AS(cuda::flash_attention_enabled(), ConfigError);
    CHECK_THROWS_AS(cuda::attention_bf16_workspace_bytes(cuda::AttentionShape{1, 8, 1, 32}, true),
                    ConfigError);
  }
  ScopedEnv attention("BLM_ATTENTION", nullptr);  // unset for the rest of the case: the default
  CHECK(cuda::flash_attention_enabled());

  const cuda::AttentionShape s{1, 8, 2, 64};
  const size_t N = 8, d = 128;
  DeviceArray<float> qkv(randn(N * 3 * d + 4, 801)), lse(2 * 8), dout(randn(N * d, 802));
  DeviceArray<float> dqkv(N * 3 * d + 4), D(cuda::flash_attention_workspace_bytes(s) / 4 + 4);
  DeviceArray<uint16_t> out(N * d + 8);
  // 16-byte loads: a qkv, out or dqkv one element off a 16-byte boundary is refused.
  CHECK_THROWS_AS(cuda::flash_attention_forward(s, qkv.get() + 1, as_bf16(out), lse.get(), nullptr),
                  DeviceError);
  CHECK_THROWS_AS(cuda::flash_attention_forward(s, qkv.get(), as_bf16(out) + 1, lse.get(), nullptr),
                  DeviceError);
  CHECK_THROWS_AS(cuda::flash_attention_backward(s, qkv.get(), as_bf16(out), dout.get(), lse.get(),
                                                 dqkv.get() + 2, D.get(), nullptr),
                  DeviceError);
  // Head sizes other than 32, 64, 128.
  CHECK_THROWS_AS(cuda::flash_attention_forward(cuda::AttentionShape{1, 8, 2, 48}, qkv.get(),
                                                as_bf16(out), lse.get(), nullptr),
                  DeviceError);
  // The aligned call runs.
  CHECK_NOTHROW(cuda::flash_attention_forward(s, qkv.get(), as_bf16(out), lse.get(), nullptr));
  CHECK_NOTHROW(cuda::flash_attention_backward(s, qkv.get(), as_bf16(out), dout.get(), lse.get(),
                                               dqkv.get(), D.get(), nullptr));
  CUDA_CHECK(cudaDeviceSynchronize());
}

// ------------------------------------------------------------------ the whole backend

namespace {

std::vector<ModelCase> bf16_cases() {
  return {
      {"dh 32, 2 layers, V 64", model_config(64, 64, 2, 2, 16), 3, 13, {}, false},
      {"dh 32, odd V 67, barrier on layer 1, masked", model_config(67, 64, 2, 2, 16), 2, 16, {1}, true},
      {"dh 64, T 33", model_config(56, 128, 2, 1, 40), 2, 33, {}, false},
      {"dh 128, T 17", model_config(48, 128, 1, 1, 20), 2, 17, {}, false},
  };
}

double rel_scalar(double got, double ref, double floor) {
  return std::fabs(got - ref) / std::max(std::fabs(ref), floor);
}

}  // namespace

TEST_CASE("bf16 backend: loss and every gradient track the fp64 reference", "[gpu][bf16][backend]") {
  uint64_t seed = 300;
  for (const ModelCase& c : bf16_cases()) {
    const ParamLayout layout(c.model);
    const std::vector<float> params = test_params(layout, ++seed);
    const HostBatch data = make_batch(c, ++seed);
    for (double lambda : {0.0, 0.5}) {
      INFO("case '" << c.name << "', lambda " << lambda);
      BarrierConfig bc;
      bc.lambda = lambda;
      bc.layers = c.barrier_layers;
      ReferenceModel<double> ref(c.model, bc);
      const std::vector<double> P(params.begin(), params.end());
      const LossTerms rt = ref.forward(P.data(), data.view(), options_for(data));
      std::vector<double> rg(P.size(), 0.0);
      ref.backward(P.data(), rg.data());

      std::unique_ptr<Backend> gpu = make_cuda_backend(cuda_config(c, lambda, "bf16"), 0);
      REQUIRE(gpu->name().rfind("cuda-bf16 (", 0) == 0);
      gpu->set_parameters(params);
      const LossTerms gt = gpu->forward_backward(data.view(), options_for(data));
      std::vector<float> grads;
      gpu->get_gradients(grads);

      const double e_loss = rel_scalar(gt.loss, rt.loss, 1e-3);
      const double e_ce = rel_scalar(gt.ce, rt.ce, 1e-3);
      const double e_bar = rel_scalar(gt.barrier, rt.barrier, 1e-2);
      CHECK(e_loss <= 1e-2);
      CHECK(e_ce <= 1e-2);
      CHECK(e_bar <= 5e-2);
      CHECK(gt.barrier_terms == rt.barrier_terms);
      CHECK(gt.tokens == rt.tokens);
      if (rt.barrier_terms > 0) CHECK(rel_scalar(gt.min_logdet, rt.min_logdet, 1e-2) <= 5e-2);
      double worst = 0;
      std::string worst_name;
      for (const TensorSpec& t : layout.tensors()) {
        const Comparison cmp = compare(grads.data() + t.offset, rg.data() + t.offset, t.size);
        INFO(describe("gradient " + t.name, cmp, 5e-2));
        CHECK(cmp.rel <= 5e-2);
        if (cmp.rel > worst) {
          worst = cmp.rel;
          worst_name = t.name;
        }
      }
      std::printf("bf16 vs fp64 [%s, lambda %g]: loss %.2e, ce %.2e, barrier %.2e, worst gradient "
                  "%.2e (%s)\n",
                  c.name, lambda, e_loss, e_ce, e_bar, worst, worst_name.c_str());
      // forward() alone gives forward_backward's terms (same bf16 path; the barrier's log det
      // from an LU instead of the Gauss-Jordan: check_forward_matches).
      check_forward_matches(gpu->forward(data.view(), options_for(data)), gt);
    }
  }
}

TEST_CASE("bf16 backend: the classifier in chunks of rows (BLM_CLASSIFIER_ROWS) gives the unchunked loss and gradients", "[gpu][bf16][backend]") {
  // Same bf16 operands, same per-row cross-entropy; what differs is the logits product's shape
  // (cuBLASLt may pick another algorithm for n rows than for N: fp32 sums in another order, so a
  // bf16 logit can round the other way) and dwte summed chunk after chunk.  Bounds: loss 1e-4
  // relative, every gradient tensor 1e-3 relative (bf16 rounding flips, not systematic error).
  uint64_t seed = 350;
  for (const ModelCase& c : bf16_cases()) {
    const ParamLayout layout(c.model);
    const std::vector<float> params = test_params(layout, ++seed);
    const HostBatch data = make_batch(c, ++seed);
    auto run = [&](const char* rows, std::vector<float>& grads) {
      ScopedEnv env("BLM_CLASSIFIER_ROWS", rows);
      std::unique_ptr<Backend> gpu = make_cuda_backend(cuda_config(c, 0.5, "bf16"), 0);
      gpu->set_parameters(params);
      const LossTerms t = gpu->forward_backward(data.view(), options_for(data));
      gpu->get_gradients(grads);
      // forward() chunks the same way
      check_forward_matches(gpu->forward(data.view(), options_for(data)), t);
      return t;
    };
    std::vector<float> g_all, g_chunk;
    const LossTerms whole = run("0", g_all);  // one chunk (unset: automatic, also one here)
    for (const char* rows : {"1", "5"}) {
      INFO("case '" << c.name << "', BLM_CLASSIFIER_ROWS=" << rows);
      const LossTerms chunked = run(rows, g_chunk);
      CHECK(rel_scalar(chunked.loss, whole.loss, 1e-3) <= 1e-4);
      CHECK(rel_scalar(chunked.ce, whole.ce, 1e-3) <= 1e-4);
      CHECK(chunked.tokens == whole.tokens);
      for (const TensorSpec& t : layout.tensors()) {
        const Comparison cmp = compare(g_chunk.data() + t.offset, g_all.data() + t.offset, t.size);
        INFO(describe("gradient " + t.name, cmp, 1e-3));
        CHECK(cmp.rel <= 1e-3);
      }
    }
  }
  ScopedEnv bad_rows("BLM_CLASSIFIER_ROWS", "x");
  CHECK_THROWS_AS(make_cuda_backend(cuda_config(bf16_cases()[0], 0.0, "bf16"), 0), ConfigError);
}

// BLM_QKV_BF16=1 (the default): at lambda 0 with no barrier report, the bf16 backend holds qkv in
// bf16 (the attention is its only reader); with report_barrier the barrier reads qkv, so it stays
// fp32 (under cuDNN only with BLM_BARRIER_QKV=f32, which this case sets) and the attention rounds
// it while staging.  The two steps differ by where the bias and the rounding meet: the bf16 product
// adds the bf16 copy of the bias in its epilogue (cuBLASLt reads the bias in the output's type;
// PyTorch's autocast rounds a linear's bias the same way), the fp32 one adds the fp32 bias and the
// attention rounds the sum.  That moves each qkv element by about one bf16 rounding, the same in
// every row, so the bounds are those of one bf16 rounding of an input: cross-entropy 3e-4 and every
// gradient tensor 1e-2 relative (measured on the H200: cross-entropy up to 1.1e-4 at dh 128, whose
// test biases move the most logits; gradients up to 3.9e-3).  With BLM_ATTENTION=cudnn the bf16 qkv
// also switches the attention to cuDNN's graphs on bf16 tensors (the output gradient and dqkv in
// bf16, no fp32 dqkv); skipped when cuDNN is unavailable.  A NaN fails every bound.
TEST_CASE("bf16 backend: a bf16 qkv (BLM_QKV_BF16=1) at lambda 0 gives the fp32-qkv step's results", "[gpu][bf16][backend]") {
  uint64_t seed = 380;
  for (const char* attention : {"flash", "cudnn"}) {
    if (std::strcmp(attention, "cudnn") == 0 && !cuda::cudnn_attention_available()) {
      WARN("cuDNN unavailable: " << cuda::cudnn_attention_unavailable_reason());
      continue;
    }
    ScopedEnv attention_env("BLM_ATTENTION", attention), qkv_bf16("BLM_QKV_BF16", "1");
    // report_barrier below asks for the barrier at lambda 0; with f32 the plan then keeps an
    // fp32 qkv (the comparison this case makes), not the bf16 one the barrier reads by default.
    ScopedEnv barrier_qkv("BLM_BARRIER_QKV", "f32");
    for (const ModelCase& c : bf16_cases()) {
      INFO("BLM_ATTENTION=" << attention << ", case '" << c.name << "'");
      const ParamLayout layout(c.model);
      const std::vector<float> params = test_params(layout, ++seed);
      const HostBatch data = make_batch(c, ++seed);
      std::unique_ptr<Backend> gpu = make_cuda_backend(cuda_config(c, 0.0, "bf16"), 0);
      gpu->set_parameters(params);
      std::vector<float> g_bf16, g_f32;
      ForwardOptions o = options_for(data);
      const LossTerms t_bf16 = gpu->forward_backward(data.view(), o);
      gpu->get_gradients(g_bf16);
      o.report_barrier = true;  // the barrier reads qkv: fp32 (BLM_BARRIER_QKV=f32)
      const LossTerms t_f32 = gpu->forward_backward(data.view(), o);
      gpu->get_gradients(g_f32);
      CHECK(rel_scalar(t_bf16.ce, t_f32.ce, 1e-3) <= 3e-4);
      int identical = 0;
      double worst = 0;
      for (const TensorSpec& t : layout.tensors()) {
        const std::vector<float> a(g_bf16.begin() + t.offset, g_bf16.begin() + t.offset + t.size);
        const std::vector<float> b(g_f32.begin() + t.offset, g_f32.begin() + t.offset + t.size);
        const Comparison cmp = compare(a, to_double(b));
        INFO(describe("gradient " + t.name, cmp, 1e-2));
        CHECK(cmp.rel <= 1e-2);
        identical += bit_identical(a, b);
        worst = std::max(worst, cmp.rel);
      }
      std::printf("bf16 qkv vs fp32 qkv [%s, %s]: ce %.2e relative, %d of %zu gradient tensors "
                  "bit-identical, worst %.2e\n", attention, c.name,
                  rel_scalar(t_bf16.ce, t_f32.ce, 1e-3), identical, layout.tensors().size(), worst);
    }
  }
  // "2" is not a value (the attention and the barrier's qkv unset: their defaults).
  ScopedEnv attention("BLM_ATTENTION", nullptr), barrier_qkv("BLM_BARRIER_QKV", nullptr);
  ScopedEnv qkv_bf16("BLM_QKV_BF16", "2");
  CHECK_THROWS_AS(make_cuda_backend(cuda_config(bf16_cases()[0], 0.0, "bf16"), 0), ConfigError);
}

TEST_CASE("bf16 backend: the flash barrier on the attention's bf16 qkv (BLM_BARRIER_QKV=bf16) "
          "against an fp32 qkv (f32)",
          "[gpu][bf16][backend]") {
  // The same step two ways, lambda 0.5, cuDNN attention: the default reads the bf16 qkv the
  // attention reads (the barrier of q, k rounded to bf16); f32 gives the barrier an fp32 qkv.
  // They must agree within bf16 rounding, and differ (else the setting chose nothing): the
  // barrier term is a mean over many positions of log det of q, k two roundings apart.  The
  // dh 128 case uses the tile barrier on an fp32 qkv either way: the same bits.
  if (!cuda::cudnn_attention_available())
    GPU_SKIP("cuDNN attention not available: " << cuda::cudnn_attention_unavailable_reason());
  ScopedEnv attention("BLM_ATTENTION", "cudnn");
  uint64_t seed = 390;
  for (const ModelCase& c : bf16_cases()) {
    INFO("case '" << c.name << "'");
    const ParamLayout layout(c.model);
    const std::vector<float> params = test_params(layout, ++seed);
    const HostBatch data = make_batch(c, ++seed);
    LossTerms terms[2];
    std::vector<float> grads[2];
    const char* settings[2] = {"bf16", "f32"};
    for (int i = 0; i < 2; ++i) {
      ScopedEnv barrier_qkv("BLM_BARRIER_QKV", settings[i]);
      std::unique_ptr<Backend> gpu = make_cuda_backend(cuda_config(c, 0.5, "bf16"), 0);
      gpu->set_parameters(params);
      terms[i] = gpu->forward_backward(data.view(), options_for(data));
      gpu->get_gradients(grads[i]);
    }
    const bool flash = c.model.head_dim() <= 64;
    CHECK(rel_scalar(terms[0].ce, terms[1].ce, 1e-3) <= 1e-3);
    const double e_bar = rel_scalar(terms[0].barrier, terms[1].barrier, 1e-2);
    CHECK(e_bar <= 2e-2);
    CHECK((terms[0].barrier != terms[1].barrier) == flash);
    double worst = 0;
    for (const TensorSpec& t : layout.tensors()) {
      const std::vector<float> a(grads[0].begin() + t.offset, grads[0].begin() + t.offset + t.size);
      const std::vector<float> b(grads[1].begin() + t.offset, grads[1].begin() + t.offset + t.size);
      const Comparison cmp = compare(a, to_double(b));
      INFO(describe("gradient " + t.name, cmp, 3e-2));
      CHECK(cmp.rel <= 3e-2);
      worst = std::max(worst, cmp.rel);
    }
    std::printf("barrier on bf16 qkv vs fp32 qkv [%s]: barrier %.2e relative, worst gradient "
                "%.2e\n", c.name, e_bar, worst);
  }
  ScopedEnv bad_qkv("BLM_BARRIER_QKV", "fp32");  // not a value
  CHECK_THROWS_AS(make_cuda_backend(cuda_config(bf16_cases()[0], 0.5, "bf16"), 0), ConfigError);
}

TEST_CASE("bf16 backend: ten AdamW steps track the fp32 backend; the bf16 weights follow", "[gpu][bf16][backend]") {
  const ModelCase c = bf16_cases()[0];
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 401);
  std::unique_ptr<Backend> b16 = make_cuda_backend(cuda_config(c, 0.05, "bf16"), 0);
  std::unique_ptr<Backend> b32 = make_cuda_backend(cuda_config(c, 0.05, "fp32"), 0);
  b16->set_parameters(params);
  b32->set_parameters(params);
  AdamWHyper h;
  double worst = 0;
  double first = 0, last = 0;
  for (int step = 0; step < 10; ++step) {
    const HostBatch data = make_batch(c, 500 + step);
    const LossTerms l16 = b16->forward_backward(data.view(), options_for(data));
    const LossTerms l32 = b32->forward_backward(data.view(), options_for(data));
    const double e = rel_scalar(l16.loss, l32.loss, 1e-3);
    INFO("step " << step << ": bf16 loss " << l16.loss << ", fp32 loss " << l32.loss);
    CHECK(e <= 2e-2);
    worst = std::max(worst, e);
    if (step == 0) first = l16.loss;
    last = l16.loss;
    b16->adamw_step(h, 1e-2, clip_scale(b16->grad_norm(), 1.0));
    b32->adamw_step(h, 1e-2, clip_scale(b32->grad_norm(), 1.0));
  }
  std::printf("bf16 vs fp32, ten AdamW steps: worst loss difference %.2e (loss %.4f -> %.4f)\n",
              worst, first, last);
  // The bf16 weights AdamW wrote are bf16(master weights): a fresh backend given the master
  // weights (set_parameters converts them) computes the same loss, bit for bit.
  const HostBatch data = make_batch(c, 999);
  std::vector<float> p16, p32;
  b16->get_parameters(p16);
  b32->get_parameters(p32);
  std::unique_ptr<Backend> fresh = make_cuda_backend(cuda_config(c, 0.05, "bf16"), 0);
  fresh->set_parameters(p16);
  const double e16 = b16->forward(data.view(), options_for(data)).loss;
  const double efresh = fresh->forward(data.view(), options_for(data)).loss;
  fresh->set_parameters(params);
  const double e0 = fresh->forward(data.view(), options_for(data)).loss;
  INFO("after 10 steps: bf16 " << e16 << ", fresh from its master weights " << efresh
                               << ", initial weights " << e0);
  CHECK(e16 == efresh);
  CHECK(e16 != e0);
  // The master weights stay fp32: get_parameters returns them, not a bf16 rounding.
  size_t not_bf16 = 0;
  for (float x : p16) not_bf16 += round_bf16(x) != x;
  CHECK(not_bf16 > p16.size() / 2);
  // The key biases have an exactly zero gradient (attention and the barrier are invariant to a
  // shift of every key), so Adam turns each precision's rounding noise into +-lr steps of
  // arbitrary sign: left out of the comparison, as in the fp32 backend test.  The rest is held
  // to 5e-2: Adam's steps are lr-sized whatever the gradient's size, so every weight whose
  // gradient is below bf16's rounding of it moves by +-lr in either precision (measured on an
  // H200, 2026-11-28: 1.8e-2 at lr 1e-2; the losses agree within 2e-2, checked above).
  const int d = c.model.d_model;
  for (int l = 0; l < c.model.n_layer; ++l) {
    const TensorSpec& qb = layout.find("h" + std::to_string(l) + ".attn.qkv.b");
    for (int i = 0; i < d; ++i) p16[qb.offset + d + i] = p32[qb.offset + d + i];
  }
  GPU_CHECK_REL("parameters after ten steps (key biases excepted)", p16, to_double(p32), 5e-2);
}

TEST_CASE("bf16 backend: two runs are bit-identical; margins and last logits near fp32", "[gpu][bf16][backend]") {
  const ModelCase c = bf16_cases()[1];
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 601);
  const HostBatch data = make_batch(c, 602);
  std::vector<float> g1, g2;
  LossTerms t1, t2;
  for (int run = 0; run < 2; ++run) {
    std::unique_ptr<Backend> b = make_cuda_backend(cuda_config(c, 0.5, "bf16"), 0);
    b->set_parameters(params);
    (run == 0 ? t1 : t2) = b->forward_backward(data.view(), options_for(data));
    b->get_gradients(run == 0 ? g1 : g2);
  }
  CHECK(t1.loss == t2.loss);
  CHECK(t1.barrier == t2.barrier);
  CHECK(g1 == g2);

  std::unique_ptr<Backend> b16 = make_cuda_backend(cuda_config(c, 0.0, "bf16"), 0);
  std::unique_ptr<Backend> b32 = make_cuda_backend(cuda_config(c, 0.0, "fp32"), 0);
  b16->set_parameters(params);
  b32->set_parameters(params);
  const Margins m16 = b16->margins(data.view()), m32 = b32->margins(data.view());
  GPU_CHECK_REL("margins sigma_min", m16.sigma_min, to_double(m32.sigma_min), 2e-2);
  std::vector<float> l16, l32;
  b16->last_logits(data.view(), l16);
  b32->last_logits(data.view(), l32);
  GPU_CHECK_REL("last-position logits", l16, to_double(l32), 2e-2);
}
