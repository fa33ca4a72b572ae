// The bf16 step's fused passes against float64 host references: cuBLASLt's epilogues as
// cuda/matmul_lt.h exposes them (bias gradient of a weight-gradient product, GELU with its
// pre-activation as aux, GELU gradient with the bias gradient), the LayerNorm backward's bf16 copy
// of dx, the column sums with row lanes, the bias-gradient adds, and the whole bf16 backend with
// the epilogues (BLM_LT_EPILOGUES=bias, the default, all and gelu-forward) against the same backend with our
// kernels (none).
//
// Tolerances (relative error ||got - ref|| / ||ref||, tests/gpu/gpu_test_util.h), and why:
//   - 1e-4: fp32 results of tensor-core products of bf16-exact operands (fp32 accumulation may
//     round more coarsely than IEEE sums), and fp32 sums of bf16-exact values (bias gradients:
//     only fp32 rounding, K terms);
//   - 5e-3: anything stored in bf16 (unit roundoff 2^-8 ~ 3.9e-3 per element at most, ~1-2e-3
//     RMS), and bias gradients cuBLASLt may sum from the bf16-rounded GELU-gradient values (their
//     rounding errors do not cancel with the sum's, so the sum keeps ~1e-3 relative);
//   - 2e-5: the GELU epilogue with fp32 output against the tanh form (gelu_ref) applied to the
//     float64 product: fp32 rounding of the product and of the GELU itself.  The erf form differs
//     from the tanh form by up to 4e-4 (about 1e-4 relative over these inputs), so this bound
//     and the printed error against the erf form tell which GELU cuBLASLt computes;
//   - exact: the LayerNorm backward's bf16 copy (bf16 of the fp32 dx it wrote, nearest even), the
//     fp32 dx with and without the copy, the vector adds (one fp32 add per element), reruns.
//   - whole backend, epilogues vs our kernels: the same model in bf16 with different rounding
//     points (GELU from the fp32 pre-activation instead of its bf16 copy; bias gradients summed
//     from bf16 instead of fp32 dres): loss 1e-3 relative, every gradient tensor 2e-2.
#include <algorithm>
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
#include "core/params.h"
#include "cuda/cuda_backend.h"
#include "cuda/kernels.h"
#include "cuda/matmul_lt.h"
#include "tests/catch.h"
#include "tests/gpu/backend_test_util.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

cuda::LtOperand bf16_operand(const DeviceArray<uint16_t>& a, int ld) {
  return cuda::LtOperand{a.get(), cuda::Dtype::bf16, ld};
}
constexpr cuda::LtOperand kNoC{nullptr, cuda::Dtype::f32, 0};

// The erf form of GELU, only to show which form cuBLASLt computes.
double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

struct Shape {
  int M, N, K;
};

}  // namespace

// ------------------------------------------------------------------ bias gradient (BGRADB)

TEST_CASE("lt epilogue: bias gradient of dW += dY^T X is the column sums of dY, written not added", "[gpu][lt-epilogue]") {
  cuda::LtMatmul lt;
  uint64_t seed = 900;
  // dW [M, N] += dY [K, M]^T X [K, N]; the model's shapes are M = out features, N = in, K = B*T.
  for (const Shape sh : {Shape{40, 24, 136}, Shape{96, 160, 520}, Shape{384, 1536, 512}}) {
    const int M = sh.M, N = sh.N, K = sh.K;
    INFO("M " << M << " N " << N << " K " << K);
    const std::vector<float> dy = randn_bf16_exact(static_cast<size_t>(K) * M, ++seed);
    const std::vector<float> x = randn_bf16_exact(static_cast<size_t>(K) * N, ++seed);
    const std::vector<float> w0 = randn(static_cast<size_t>(M) * N, ++seed);
    DeviceArray<uint16_t> ddy(to_bits(dy)), dx(to_bits(x));
    std::vector<float> dw_runs[2], bg_runs[2];
    for (int run = 0; run < 2; ++run) {
      DeviceArray<float> dw(w0), bg(static_cast<size_t>(M));
      poison(bg);  // NaN: a gradient added to instead of written stays NaN
      cuda::LtEpilogue ep;
      ep.kind = cuda::LtEpilogue::Kind::bias_grad;
      ep.bias_grad = bg.get();
      // The backend falls back to column sums where this is refused; the model's shapes must not be.
      REQUIRE(lt.try_matmul(true, false, M, N, K, bf16_operand(ddy, M), bf16_operand(dx, N), nullptr,
                            1.0f, {dw.get(), cuda::Dtype::f32, N}, dw.get(), cuda::Dtype::f32, N,
                            nullptr, ep));
      dw_runs[run] = dw.download();
      bg_runs[run] = bg.download();
    }
    std::vector<double> ref = matmul_ref(true, false, M, N, K, dy, M, x, N, nullptr, 0.0f, nullptr, N, N);
    for (size_t i = 0; i < ref.size(); ++i) ref[i] += w0[i];
    std::vector<double> bg_ref(M, 0.0);
    for (int k = 0; k < K; ++k)
      for (int i = 0; i < M; ++i) bg_ref[i] += dy[static_cast<size_t>(k) * M + i];
    GPU_CHECK_REL("dW (C = D accumulation)", dw_runs[0], ref, 1e-4);
    GPU_CHECK_REL("bias gradient", bg_runs[0], bg_ref, 1e-4);
    CHECK(bit_identical(dw_runs[0], dw_runs[1]));
    CHECK(bit_identical(bg_runs[0], bg_runs[1]));
  }
}

// ------------------------------------------------------------------ GELU forward (GELU_AUX_BIAS)

namespace {

// fc_act = gelu(ln [M, K] W^T + b), W [N, K]: the FC1 product as the backend calls it, with D
// and aux of type `out` (bias of D's type).  Returns D and aux as floats; pre_ref the float64
// pre-activation (bias included).
bool gelu_aux_product(cuda::LtMatmul& lt, const Shape& sh, cuda::Dtype out, uint64_t seed,
                      std::vector<float>& D, std::vector<float>& aux, std::vector<double>& pre_ref) {
  const int M = sh.M, N = sh.N, K = sh.K;
  // Inputs scaled so the pre-activations spread over [-4, 4], where the GELU forms differ.
  const std::vector<float> a = randn_bf16_exact(static_cast<size_t>(M) * K, seed, 1.0);
  const std::vector<float> w = randn_bf16_exact(static_cast<size_t>(N) * K, seed + 1, 1.5 / std::sqrt(K));
  const std::vector<float> b = randn_bf16_exact(N, seed + 2, 0.5);
  DeviceArray<uint16_t> da(to_bits(a)), dw(to_bits(w));
  cuda::LtEpilogue ep;
  ep.kind = cuda::LtEpilogue::Kind::gelu_aux_bias;
  ep.aux_ld = N;
  pre_ref = matmul_ref(false, true, M, N, K, a, K, w, K, &b, 0.0f, nullptr, N, N);
  const size_t n = static_cast<size_t>(M) * N;
  if (out == cuda::Dtype::f32) {
    DeviceArray<float> dbias(b), dD(n), dAux(n);
    poison(dD);
    poison(dAux);
    ep.aux = dAux.get();
    if (!lt.try_matmul(false, true, M, N, K, bf16_operand(da, K), bf16_operand(dw, K), dbias.get(),
                       0.0f, kNoC, dD.get(), cuda::Dtype::f32, N, nullptr, ep))
      return false;
    D = dD.download();
    aux = dAux.download();
  } else {
    DeviceArray<uint16_t> dbias(to_bits(b)), dD(n), dAux(n);
    poison(dD);
    poison(dAux);
    ep.aux = dAux.get();
    if (!lt.try_matmul(false, true, M, N, K, bf16_operand(da, K), bf16_operand(dw, K),
                       as_bf16(dbias), 0.0f, kNoC, dD.get(), cuda::Dtype::bf16, N, nullptr, ep))
      return false;
    D = from_bits(dD.download());
    aux = from_bits(dAux.download());
  }
  return true;
}

}  // namespace

TEST_CASE("lt epilogue: GELU (aux, bias) is the tanh GELU of the product plus bias; aux is the pre-activation", "[gpu][lt-epilogue]") {
  cuda::LtMatmul lt;
  uint64_t seed = 1000;
  for (const Shape sh : {Shape{72, 40, 48}, Shape{512, 1536, 384}}) {
    INFO("M " << sh.M << " N " << sh.N << " K " << sh.K);
    std::vector<float> D, aux;
    std::vector<double> pre;
    // bf16 D and aux: what the backend uses (it falls back to its GELU kernel where refused).
    REQUIRE(gelu_aux_product(lt, sh, cuda::Dtype::bf16, seed += 10, D, aux, pre));
    std::vector<double> act(pre.size());
    for (size_t i = 0; i < pre.size(); ++i) act[i] = gelu_ref(pre[i]);
    GPU_CHECK_REL("aux (pre-activation, bf16)", aux, pre, 5e-3);
    GPU_CHECK_REL("D = gelu(pre) (bf16)", D, act, 5e-3);
    // fp32 D and aux: precise enough to tell the tanh form from the erf form.
    if (!gelu_aux_product(lt, sh, cuda::Dtype::f32, seed, D, aux, pre)) {
      std::printf("cuBLASLt GELU epilogue with fp32 output: no algorithm (%d x %d x %d)\n", sh.M,
                  sh.N, sh.K);
      WARN("the GELU epilogue with fp32 output is not available: the tanh-vs-erf check is skipped");
      continue;
    }
    std::vector<double> act_tanh(pre.size()), act_erf(pre.size());
    for (size_t i = 0; i < pre.size(); ++i) {
      act_tanh[i] = gelu_ref(pre[i]);
      act_erf[i] = gelu_erf(pre[i]);
    }
    const Comparison vs_tanh = compare(D, act_tanh), vs_erf = compare(D, act_erf);
    std::printf("cuBLASLt GELU epilogue (fp32 out, %d x %d x %d): rel err vs tanh form %.2e, vs erf "
                "form %.2e\n", sh.M, sh.N, sh.K, vs_tanh.rel, vs_erf.rel);
    GPU_CHECK_REL("aux (pre-activation, fp32)", aux, pre, 1e-4);
    GPU_CHECK_REL("D = gelu_tanh(pre) (fp32)", D, act_tanh, 2e-5);
    CHECK(vs_tanh.rel < vs_erf.rel);
  }
}

// ------------------------------------------------------------------ GELU backward (DGELU_BGRAD)

TEST_CASE("lt epilogue: GELU gradient and bias gradient of dhidden = dres Wp", "[gpu][lt-epilogue]") {
  cuda::LtMatmul lt;
  uint64_t seed = 1100;
  // dh [M, N] = gelu'(pre) * (dres [M, K] Wp [K, N]); dbfc [N] = column sums of dh.  The model's
  // shape: M = B*T, N = 4d, K = d.
  for (const Shape sh : {Shape{72, 40, 48}, Shape{512, 1536, 384}}) {
    const int M = sh.M, N = sh.N, K = sh.K;
    const std::vector<float> dres = randn_bf16_exact(static_cast<size_t>(M) * K, ++seed);
    const std::vector<float> wp = randn_bf16_exact(static_cast<size_t>(K) * N, ++seed, 1.0 / std::sqrt(K));
    const std::vector<float> pre = randn_bf16_exact(static_cast<size_t>(M) * N, ++seed, 2.0);
    DeviceArray<uint16_t> ddres(to_bits(dres)), dwp(to_bits(wp)), dpre(to_bits(pre));
    const std::vector<double> prod =
        matmul_ref(false, false, M, N, K, dres, K, wp, N, nullptr, 0.0f, nullptr, N, N);
    std::vector<double> dh_ref(prod.size()), bg_ref(N, 0.0);
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        const size_t e = static_cast<size_t>(i) * N + j;
        dh_ref[e] = gelu_grad_ref(pre[e]) * prod[e];
        bg_ref[j] += dh_ref[e];
      }
    // D (and aux) bf16 as the backend uses them, or fp32 (precise enough to see the GELU form);
    // the bias gradient in fp32 or in D's type.  The backend falls back to our kernels where
    // cuBLASLt refuses; with bf16 D at least one bias-gradient type must be available.
    int bf16_supported = 0;
    for (const cuda::Dtype out : {cuda::Dtype::bf16, cuda::Dtype::f32}) {
      for (const cuda::Dtype bg_type : {cuda::Dtype::f32, cuda::Dtype::bf16}) {
        const bool out16 = out == cuda::Dtype::bf16, bg16 = bg_type == cuda::Dtype::bf16;
        if (!out16 && bg16) continue;  // a bf16 bias gradient from an fp32 D: not used
        INFO("M " << M << " N " << N << " K " << K << " out " << (out16 ? "bf16" : "fp32")
                  << ", bias gradient " << (bg16 ? "bf16" : "fp32"));
        const size_t n = static_cast<size_t>(M) * N;
        DeviceArray<float> bg(static_cast<size_t>(N));  // bf16 gradients use its first half
        poison(bg);
        cuda::LtEpilogue ep;
        ep.kind = cuda::LtEpilogue::Kind::dgelu_bias_grad;
        ep.bias_grad = bg.get();
        ep.bias_grad_type = bg_type;
        ep.aux_ld = N;
        std::vector<float> dh;
        bool ran = false;
        if (out16) {
          ep.aux = dpre.get();
          DeviceArray<uint16_t> dD(n);
          poison(dD);
          ran = lt.try_matmul(false, false, M, N, K, bf16_operand(ddres, K), bf16_operand(dwp, N),
                              nullptr, 0.0f, kNoC, dD.get(), cuda::Dtype::bf16, N, nullptr, ep);
          if (ran) dh = from_bits(dD.download());
        } else {
          DeviceArray<float> dpre32(pre), dD(n);  // aux has D's type
          poison(dD);
          ep.aux = dpre32.get();
          ran = lt.try_matmul(false, false, M, N, K, bf16_operand(ddres, K), bf16_operand(dwp, N),
                              nullptr, 0.0f, kNoC, dD.get(), cuda::Dtype::f32, N, nullptr, ep);
          if (ran) dh = dD.download();
        }
        std::printf("cuBLASLt DGELU_BGRAD (%s out, %s bias gradient, %d x %d x %d): ",
                    out16 ? "bf16" : "fp32", bg16 ? "bf16" : "fp32", M, N, K);
        if (!ran) {
          std::printf("no algorithm\n");
          continue;
        }
        bf16_supported += out16;
        std::vector<float> bgv = bg.download();
        if (bg16) {  // the first N bf16 values of the buffer
          std::vector<uint16_t> bits(N);
          std::memcpy(bits.data(), bgv.data(), N * sizeof(uint16_t));
          bgv = from_bits(bits);
        }
        std::printf("dh rel err %.2e, bias gradient %.2e\n", compare(dh, dh_ref).rel,
                    compare(bgv, bg_ref).rel);
        GPU_CHECK_REL("dh = gelu'(pre) * (dres Wp)", dh, dh_ref, out16 ? 5e-3 : 2e-5);
        GPU_CHECK_REL("bias gradient", bgv, bg_ref, out16 || bg16 ? 5e-3 : 1e-4);
      }
    }
    CHECK(bf16_supported > 0);
  }
}

// ------------------------------------------------------------------ kernels of the fused step

TEST_CASE("lt epilogue kernels: LayerNorm backward's bf16 copy of dx is bf16(dx), dx unchanged", "[gpu][lt-epilogue]") {
  uint64_t seed = 1200;
  for (const Shape sh : {Shape{333, 384, 0}, Shape{70, 68, 0}, Shape{45, 30, 0}}) {
    const int N = sh.M, C = sh.N;  // C = 30: not a multiple of 4 (the scalar path)
    INFO("N " << N << " C " << C);
    const size_t n = static_cast<size_t>(N) * C;
    const std::vector<float> x = randn(n, ++seed, 2.0, 0.5), dy = randn(n, ++seed);
    const std::vector<float> w = randn(C, ++seed, 0.1, 1.0), b = randn(C, ++seed, 0.1);
    const std::vector<float> dx0 = randn(n, ++seed);
    DeviceArray<float> dxx(x), ddy(dy), dw(w), db(b), y(n), mean(N), rstd(N);
    cuda::layernorm_forward(dxx.get(), dw.get(), db.get(), N, C, y.get(), mean.get(), rstd.get(),
                            nullptr);
    DeviceArray<float> part(cuda::column_partial_floats(N, C, 2));
    std::vector<float> dx_plain, dx_copy, gw[2], gb[2];
    std::vector<uint16_t> dx16;
    for (int with_copy = 0; with_copy < 2; ++with_copy) {
      DeviceArray<float> dx(dx0), gdw(std::vector<float>(C, 0.0f)), gdb(std::vector<float>(C, 0.0f));
      DeviceArray<uint16_t> h(n);
      poison(h);
      cuda::layernorm_backward_accumulate(ddy.get(), dxx.get(), mean.get(), rstd.get(), dw.get(), N,
                                          C, dx.get(), with_copy ? as_bf16(h) : nullptr, part.get(),
                                          gdw.get(), gdb.get(), nullptr);
      (with_copy ? dx_copy : dx_plain) = dx.download();
      gw[with_copy] = gdw.download();
      gb[with_copy] = gdb.download();
      if (with_copy) dx16 = h.download();
    }
    CHECK(bit_identical(dx_plain, dx_copy));
    CHECK(bit_identical(gw[0], gw[1]));
    CHECK(bit_identical(gb[0], gb[1]));
    size_t mismatches = 0;
    for (size_t i = 0; i < n; ++i) mismatches += dx16[i] != bf16_bits(dx_copy[i]);
    CHECK(mismatches == 0);
    // And dx itself against float64 (the kernel's own tests cover it; here: the copy path's).
    std::vector<double> ref(n);
    for (int r = 0; r < N; ++r) {
      double mu = 0, var = 0;
      for (int c = 0; c < C; ++c) mu += x[static_cast<size_t>(r) * C + c];
      mu /= C;
      for (int c = 0; c < C; ++c) {
        const double t = x[static_cast<size_t>(r) * C + c] - mu;
        var += t * t;
      }
      const double rs = 1.0 / std::sqrt(var / C + cuda::kLayerNormEps);
      double mg = 0, mgx = 0;
      for (int c = 0; c < C; ++c) {
        const size_t i = static_cast<size_t>(r) * C + c;
        const double g = double(dy[i]) * w[c], xh = (x[i] - mu) * rs;
        mg += g / C;
        mgx += g * xh / C;
      }
      for (int c = 0; c < C; ++c) {
        const size_t i = static_cast<size_t>(r) * C + c;
        const double g = double(dy[i]) * w[c], xh = (x[i] - mu) * rs;
        ref[i] = dx0[i] + rs * (g - mg - xh * mgx);
      }
    }
    GPU_CHECK_REL("dx (with the bf16 copy)", dx_copy, ref, 1e-5);
  }
}

TEST_CASE("lt epilogue kernels: column sums with row lanes (fp32, fused bf16 copy) match float64; reruns bit-identical", "[gpu][lt-epilogue]") {
  uint64_t seed = 1300;
  // N: one partial chunk, several chunks with a short last one, 16384 (the benched B*T); C: the
  // model's d, 3d, a C that is not a multiple of the vector width, one above 256 vectors per row.
  for (const Shape sh : {Shape{37, 384, 0}, Shape{1000, 1152, 0}, Shape{16384, 384, 0},
                         Shape{300, 30, 0}, Shape{129, 2056, 0}}) {
    const int N = sh.M, C = sh.N;
    INFO("N " << N << " C " << C);
    const size_t n = static_cast<size_t>(N) * C;
    const std::vector<float> x = randn(n, ++seed, 1.0, 0.1);
    std::vector<double> ref(C, 0.0);
    const std::vector<float> out0 = randn(C, ++seed);
    for (int c = 0; c < C; ++c) ref[c] = out0[c];
    for (int r = 0; r < N; ++r)
      for (int c = 0; c < C; ++c) ref[c] += x[static_cast<size_t>(r) * C + c];
    DeviceArray<float> dx(x), part(cuda::column_partial_floats(N, C, 1));
    std::vector<float> sums[2];
    for (int run = 0; run < 2; ++run) {
      DeviceArray<float> out(out0);
      DeviceArray<uint16_t> x16(n);
      poison(x16);
      cuda::column_sum_convert_accumulate(dx.get(), nullptr, 0, N, C, part.get(), out.get(),
                                          as_bf16(x16), nullptr);
      sums[run] = out.download();
      if (run == 0) {
        const std::vector<uint16_t> h = x16.download();
        size_t mismatches = 0;
        for (size_t i = 0; i < n; ++i) mismatches += h[i] != bf16_bits(x[i]);
        CHECK(mismatches == 0);
      }
    }
    GPU_CHECK_REL("column sums (fused with the bf16 copy)", sums[0], ref, 1e-5);
    CHECK(bit_identical(sums[0], sums[1]));
    DeviceArray<float> out(out0);
    cuda::column_sum_accumulate(dx.get(), N, C, part.get(), out.get(), nullptr);
    GPU_CHECK_REL("column sums (fp32)", out.download(), ref, 1e-5);
  }
}

TEST_CASE("lt epilogue kernels: vector adds (fp32 and bf16 sources) in one launch", "[gpu][lt-epilogue]") {
  const int n0 = 384, n1 = 1536, n2 = 77;
  const std::vector<float> s0 = randn(n0, 1401), s1 = randn_bf16_exact(n1, 1402), s2 = randn(n2, 1403);
  const std::vector<float> d0 = randn(n0, 1404), d1 = randn(n1, 1405), d2 = randn(n2, 1406);
  DeviceArray<float> ds0(s0), ds2(s2), dd0(d0), dd1(d1), dd2(d2);
  DeviceArray<uint16_t> ds1(to_bits(s1));
  const cuda::VectorAdd adds[3] = {{ds0.get(), false, dd0.get(), n0},
                                   {ds1.get(), true, dd1.get(), n1},
                                   {ds2.get(), false, dd2.get(), n2}};
  cuda::add_vectors_accumulate(adds, 3, nullptr);
  const std::vector<float> g0 = dd0.download(), g1 = dd1.download(), g2 = dd2.download();
  size_t wrong = 0;
  for (int i = 0; i < n0; ++i) wrong += g0[i] != d0[i] + s0[i];
  for (int i = 0; i < n1; ++i) wrong += g1[i] != d1[i] + s1[i];
  for (int i = 0; i < n2; ++i) wrong += g2[i] != d2[i] + s2[i];
  CHECK(wrong == 0);
}

// ------------------------------------------------------------------ the whole bf16 step

TEST_CASE("lt epilogue backend: the epilogues give the kernels' loss and gradients; reruns bit-identical", "[gpu][lt-epilogue][backend]") {
  const std::vector<ModelCase> cases = {
      {"dh 32, 2 layers, V 64", model_config(64, 64, 2, 2, 16), 3, 13, {}, false},
      {"dh 64, 2 layers, T 40, barrier on layer 1", model_config(56, 128, 2, 2, 40), 4, 40, {1}, false},
  };
  uint64_t seed = 1500;
  for (const ModelCase& c : cases) {
    const ParamLayout layout(c.model);
    const std::vector<float> params = test_params(layout, ++seed);
    const HostBatch data = make_batch(c, ++seed);
    // Our kernels, the bias-gradient epilogue, all epilogues, the GELU forward's, then the default
    // (unset) twice.
    const char* modes[6] = {"none", "bias", "all", "gelu-forward", "", ""};
    LossTerms t[6];
    std::vector<float> g[6];
    for (int run = 0; run < 6; ++run) {
      ScopedEnv epilogues("BLM_LT_EPILOGUES", *modes[run] ? modes[run] : nullptr);  // "": unset
      std::unique_ptr<Backend> b = make_cuda_backend(cuda_config(c, 0.3, "bf16"), 0);
      b->set_parameters(params);
      t[run] = b->forward_backward(data.view(), options_for(data));
      b->get_gradients(g[run]);
    }
    for (int run = 1; run <= 3; ++run) {
      INFO("case '" << c.name << "', BLM_LT_EPILOGUES=" << modes[run] << " vs none");
      GPU_CHECK_SCALAR("loss, epilogues vs kernels", t[run].loss, t[0].loss, 1e-3, 1e-3);
      double worst = 0;
      for (const TensorSpec& ts : layout.tensors()) {
        const Comparison cmp = compare(g[run].data() + ts.offset, g[0].data() + ts.offset, ts.size);
        INFO(describe("gradient " + ts.name + ", epilogues vs kernels", cmp, 2e-2));
        CHECK(cmp.rel <= 2e-2);
        worst = std::max(worst, cmp.rel);
      }
      std::printf("bf16 BLM_LT_EPILOGUES=%s vs none [%s]: loss %.2e relative, worst gradient %.2e\n",
                  modes[run], c.name, std::fabs(t[run].loss - t[0].loss) / std::fabs(t[0].loss),
                  worst);
    }
    // The default is "gelu-forward"; it reruns bit for bit.
    CHECK(t[4].loss == t[3].loss);
    CHECK(bit_identical(g[4], g[3]));
    CHECK(t[4].loss == t[5].loss);
    CHECK(bit_identical(g[4], g[5]));
  }
  const ModelCase& c = cases[0];
  {
    ScopedEnv epilogues("BLM_LT_EPILOGUES", "sometimes");
    CHECK_THROWS_AS(make_cuda_backend(cuda_config(c, 0.0, "bf16"), 0), Error);
  }
  // The GELU recompute needs our GELU backward, which "all" replaces: asking for both is refused.
  ScopedEnv epilogues("BLM_LT_EPILOGUES", "all"), recompute("BLM_RECOMPUTE", "gelu");
  CHECK_THROWS_AS(make_cuda_backend(cuda_config(c, 0.0, "bf16"), 0), ConfigError);
}
