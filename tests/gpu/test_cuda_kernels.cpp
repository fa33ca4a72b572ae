// Each kernel of the CUDA backend (cuda/kernels.h) against a float64 host computation of the same
// formula, on fresh random inputs at several shapes (odd sizes, sizes around the block and chunk
// boundaries, a single row/column).  Error measure: ||got - ref|| / ||ref|| per tensor
// (tests/gpu/gpu_test_util.h).
//
// Tolerances: 1e-5 for single kernels (fp32 rounding of these reductions is 1e-7 .. 1e-6; 1e-5
// still catches TF32 matmuls, whose error is ~1e-4 .. 1e-3); 1e-10 for the double-accumulating
// reductions; exact equality for integer results, argmax hits and the embedding gather.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/optim.h"
#include "core/rng.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "tests/catch.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

constexpr double kTol = 1e-5;

// A cuBLAS handle on the default stream for the matmul tests.
struct Blas {
  cublasHandle_t h = cuda::create_cublas(nullptr);
  ~Blas() { cuda::destroy_cublas(h); }
};

}  // namespace

TEST_CASE("cuda gemm: row-major C = alpha op(A) op(B) + beta C, fp32 without TF32", "[gpu][kernels]") {
  Blas blas;
  const int shapes[][3] = {{1, 1, 1}, {7, 13, 5}, {64, 96, 128}, {257, 33, 300}, {3, 200, 1}};
  uint64_t seed = 100;
  for (const auto& sh : shapes) {
    const int M = sh[0], N = sh[1], K = sh[2];
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        // Stored shapes: A [M, K] or [K, M] (ta), B [K, N] or [N, K] (tb); C [M, N].
        const std::vector<float> A = randn(static_cast<size_t>(M) * K, ++seed);
        const std::vector<float> B = randn(static_cast<size_t>(K) * N, ++seed);
        const std::vector<float> C0 = randn(static_cast<size_t>(M) * N, ++seed);
        const float alpha = 0.75f, beta = -0.5f;
        const int lda = ta ? M : K, ldb = tb ? K : N;
        std::vector<double> ref = matmul_ref(ta, tb, M, N, K, A, lda, B, ldb, nullptr, 0.0f, nullptr, N, N);
        for (size_t i = 0; i < ref.size(); ++i) ref[i] = alpha * ref[i] + beta * C0[i];
        DeviceArray<float> dA(A), dB(B), dC(C0);
        cuda::gemm(blas.h, ta, tb, M, N, K, alpha, dA.get(), lda, dB.get(), ldb, beta, dC.get(), N);
        INFO("M " << M << " N " << N << " K " << K << " trans_a " << ta << " trans_b " << tb);
        GPU_CHECK_REL("C", dC.download(), ref, kTol);
      }
  }
}

TEST_CASE("cuda gemm: strided rows (lda > K), as last_logits uses", "[gpu][kernels]") {
  Blas blas;
  const int B = 3, T = 5, d = 16, V = 11;
  const std::vector<float> X = randn(static_cast<size_t>(B) * T * d, 1);  // [B, T, d]
  const std::vector<float> W = randn(static_cast<size_t>(V) * d, 2);      // [V, d]
  std::vector<double> ref(static_cast<size_t>(B) * V);
  for (int b = 0; b < B; ++b)
    for (int v = 0; v < V; ++v) {
      double s = 0;
      for (int i = 0; i < d; ++i)
        s += static_cast<double>(X[(static_cast<size_t>(b) * T + T - 1) * d + i]) * W[static_cast<size_t>(v) * d + i];
      ref[static_cast<size_t>(b) * V + v] = s;
    }
  DeviceArray<float> dX(X), dW(W), dY(ref.size());
  cuda::gemm(blas.h, false, true, B, V, d, 1.0f, dX.get() + (T - 1) * d, T * d, dW.get(), d, 0.0f,
             dY.get(), V);
  GPU_CHECK_REL("last rows", dY.download(), ref, kTol);
}

TEST_CASE("cuda embedding forward: gather + positions + counter-based noise", "[gpu][kernels]") {
  const int shapes[][4] = {{1, 1, 8, 5}, {3, 7, 32, 11}, {2, 33, 96, 300}};  // B, T, d, V
  uint64_t seed = 200;
  for (const auto& sh : shapes) {
    const int B = sh[0], T = sh[1], d = sh[2], V = sh[3], P = T + 2;  // wpe has spare rows
    const std::vector<int32_t> tok = randint(static_cast<size_t>(B) * T, ++seed, V);
    const std::vector<float> wte = randn(static_cast<size_t>(V) * d, ++seed);
    const std::vector<float> wpe = randn(static_cast<size_t>(P) * d, ++seed);
    for (double noise : {0.0, 0.3}) {
      const uint64_t noise_seed = 77 + seed;
      std::vector<double> ref(static_cast<size_t>(B) * T * d);
      for (int n = 0; n < B * T; ++n)
        for (int i = 0; i < d; ++i) {
          const size_t idx = static_cast<size_t>(n) * d + i;
          const double e = static_cast<double>(wte[static_cast<size_t>(tok[n]) * d + i]) +
                           wpe[static_cast<size_t>(n % T) * d + i];
          ref[idx] = e + noise * normal01(noise_seed, idx);
        }
      DeviceArray<int32_t> dtok(tok);
      DeviceArray<float> dwte(wte), dwpe(wpe), dout(ref.size());
      cuda::embedding_forward(dtok.get(), dwte.get(), dwpe.get(), B, T, d, noise, noise_seed,
                              dout.get(), nullptr);
      INFO("B " << B << " T " << T << " d " << d << " noise " << noise);
      GPU_CHECK_REL("embedding", dout.download(), ref, 1e-6);
    }
  }
}

TEST_CASE("cuda embedding backward: token groups, no atomics, accumulates", "[gpu][kernels]") {
  const int shapes[][4] = {{1, 1, 8, 5}, {4, 9, 40, 6}, {3, 64, 300, 1000}};  // B, T, d, V
  uint64_t seed = 300;
  for (const auto& sh : shapes) {
    const int B = sh[0], T = sh[1], d = sh[2], V = sh[3], N = B * T;
    const std::vector<int32_t> tok = randint(N, ++seed, V);  // small V: many repeats
    const std::vector<float> dout = randn(static_cast<size_t>(N) * d, ++seed);
    const std::vector<float> g_wte0 = randn(static_cast<size_t>(V) * d, ++seed, 0.1);
    const std::vector<float> g_wpe0 = randn(static_cast<size_t>(T + 1) * d, ++seed, 0.1);
    std::vector<double> ref_wte = to_double(g_wte0), ref_wpe = to_double(g_wpe0);
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < d; ++i) {
        ref_wte[static_cast<size_t>(tok[n]) * d + i] += dout[static_cast<size_t>(n) * d + i];
        ref_wpe[static_cast<size_t>(n % T) * d + i] += dout[static_cast<size_t>(n) * d + i];
      }
    std::vector<int32_t> count, used, offsets, positions;
    cuda::group_positions_by_token(tok.data(), N, V, count, used, offsets, positions);
    // The grouping itself: every position once, under its own token, ascending within a group.
    REQUIRE(offsets.size() == used.size() + 1);
    REQUIRE(offsets.back() == N);
    for (size_t u = 0; u < used.size(); ++u)
      for (int p = offsets[u]; p < offsets[u + 1]; ++p) {
        REQUIRE(tok[positions[p]] == used[u]);
        if (p > offsets[u]) REQUIRE(positions[p] > positions[p - 1]);
      }
    DeviceArray<float> ddout(dout), dwte(g_wte0), dwpe(g_wpe0);
    DeviceArray<int32_t> dused(used), doff(offsets), dpos(positions);
    cuda::embedding_backward_wte_accumulate(ddout.get(), dused.get(), doff.get(), dpos.get(),
                                            static_cast<int>(used.size()), d, dwte.get(), nullptr);
    cuda::embedding_backward_wpe_accumulate(ddout.get(), B, T, d, dwpe.get(), nullptr);
    INFO("B " << B << " T " << T << " d " << d << " V " << V);
    GPU_CHECK_REL("dwte", dwte.download(), ref_wte, kTol);
    GPU_CHECK_REL("dwpe", dwpe.download(), ref_wpe, kTol);
  }
}

TEST_CASE("cuda layernorm forward and backward", "[gpu][kernels]") {
  const int shapes[][2] = {{1, 8}, {5, 32}, {37, 100}, {300, 768}, {70, 33}};  // N, C
  uint64_t seed = 400;
  for (const auto& sh : shapes) {
    const int N = sh[0], C = sh[1];
    // A large common offset checks the two-pass variance (no E[x^2] - mean^2 cancellation).
    const std::vector<float> x = randn(static_cast<size_t>(N) * C, ++seed, 2.0, 30.0);
    const std::vector<float> w = randn(C, ++seed, 0.2, 1.0), b = randn(C, ++seed, 0.2);
    const std::vector<float> dy = randn(static_cast<size_t>(N) * C, ++seed);
    const std::vector<float> dx0 = randn(static_cast<size_t>(N) * C, ++seed, 0.5);
    const std::vector<float> dw0 = randn(C, ++seed, 0.5), db0 = randn(C, ++seed, 0.5);
    std::vector<double> y(x.size()), mean(N), rstd(N), dx = to_double(dx0), dw = to_double(dw0),
                                                           db = to_double(db0);
    for (int n = 0; n < N; ++n) {
      const float* xr = &x[static_cast<size_t>(n) * C];
      double mu = 0, var = 0;
      for (int c = 0; c < C; ++c) mu += xr[c];
      mu /= C;
      for (int c = 0; c < C; ++c) var += (xr[c] - mu) * (xr[c] - mu);
      var /= C;
      const double rs = 1.0 / std::sqrt(var + 1e-5);
      mean[n] = mu;
      rstd[n] = rs;
      double sg = 0, sgx = 0;
      for (int c = 0; c < C; ++c) {
        const double xh = (xr[c] - mu) * rs, g = static_cast<double>(dy[static_cast<size_t>(n) * C + c]) * w[c];
        y[static_cast<size_t>(n) * C + c] = xh * w[c] + b[c];
        sg += g;
        sgx += g * xh;
        dw[c] += dy[static_cast<size_t>(n) * C + c] * xh;
        db[c] += dy[static_cast<size_t>(n) * C + c];
      }
      for (int c = 0; c < C; ++c) {
        const double xh = (xr[c] - mu) * rs, g = static_cast<double>(dy[static_cast<size_t>(n) * C + c]) * w[c];
        dx[static_cast<size_t>(n) * C + c] += rs * (g - sg / C - xh * sgx / C);
      }
    }
    DeviceArray<float> dX(x), dW(w), dB(b), dY(x.size()), dMean(N), dRstd(N);
    cuda::layernorm_forward(dX.get(), dW.get(), dB.get(), N, C, dY.get(), dMean.get(), dRstd.get(),
                            nullptr);
    INFO("N " << N << " C " << C);
    GPU_CHECK_REL("y", dY.download(), y, kTol);
    GPU_CHECK_REL("mean", dMean.download(), mean, kTol);
    GPU_CHECK_REL("rstd", dRstd.download(), rstd, kTol);
    DeviceArray<float> ddy(dy), ddx(dx0), ddw(dw0), ddb(db0);
    DeviceArray<float> partial(cuda::column_partial_floats(N, C, 2));
    cuda::layernorm_backward_dx_accumulate(ddy.get(), dX.get(), dMean.get(), dRstd.get(), dW.get(), N,
                                           C, ddx.get(), nullptr);
    cuda::layernorm_backward_params_accumulate(ddy.get(), dX.get(), dMean.get(), dRstd.get(), N, C,
                                               partial.get(), ddw.get(), ddb.get(), nullptr);
    // dx of a LayerNorm of inputs with std 2 is ~rstd * dy: its norm is a fair scale, and the
    // cancellation in g - mean(g) - xhat mean(g xhat) is mild for random dy.
    GPU_CHECK_REL("dx", ddx.download(), dx, kTol);
    GPU_CHECK_REL("dw", ddw.download(), dw, kTol);
    GPU_CHECK_REL("db", ddb.download(), db, kTol);
  }
}

TEST_CASE("cuda column sums (bias gradients) accumulate, at chunk boundaries", "[gpu][kernels]") {
  // 64 rows per chunk up to 65536 rows, then ceil(N/1024): 63/64/65 and 70001 cross both regimes.
  const int shapes[][2] = {{1, 1}, {63, 3}, {64, 130}, {65, 129}, {1000, 7}, {70001, 5}};
  uint64_t seed = 500;
  for (const auto& sh : shapes) {
    const int N = sh[0], C = sh[1];
    const std::vector<float> x = randn(static_cast<size_t>(N) * C, ++seed, 1.0, 0.3);
    const std::vector<float> out0 = randn(C, ++seed);
    std::vector<double> ref = to_double(out0);
    for (int n = 0; n < N; ++n)
      for (int c = 0; c < C; ++c) ref[c] += x[static_cast<size_t>(n) * C + c];
    DeviceArray<float> dx(x), dout(out0), partial(cuda::column_partial_floats(N, C, 1));
    cuda::column_sum_accumulate(dx.get(), N, C, partial.get(), dout.get(), nullptr);
    INFO("N " << N << " C " << C);
    GPU_CHECK_REL("column sums", dout.download(), ref, kTol);
  }
}

TEST_CASE("cuda elementwise: bias add, bias+GELU, GELU backward, residual add", "[gpu][kernels]") {
  const double k0 = 0.7978845608028654, k1 = 0.044715;
  const int shapes[][2] = {{1, 1}, {7, 13}, {300, 512}};
  uint64_t seed = 600;
  for (const auto& sh : shapes) {
    const int N = sh[0], C = sh[1];
    const size_t n = static_cast<size_t>(N) * C;
    const std::vector<float> pre = randn(n, ++seed, 2.0), bias = randn(C, ++seed, 0.5);
    const std::vector<float> resid = randn(n, ++seed), dact = randn(n, ++seed);
    std::vector<double> pre_b(n), act(n), grad(n), res(n), badd(n);
    for (size_t i = 0; i < n; ++i) {
      const double x = static_cast<double>(pre[i]) + bias[i % C];
      const double th = std::tanh(k0 * (x + k1 * x * x * x));
      pre_b[i] = x;
      act[i] = 0.5 * x * (1 + th);
      grad[i] = dact[i] * (0.5 * (1 + th) + 0.5 * x * (1 - th * th) * k0 * (1 + 3 * k1 * x * x));
      res[i] = static_cast<double>(resid[i]) + pre[i] + bias[i % C];
      badd[i] = x;
    }
    INFO("N " << N << " C " << C);
    DeviceArray<float> dpre(pre), dbias(bias), dact_out(n), dres(resid), dy(pre), dd(dact);
    cuda::add_bias(dy.get(), dbias.get(), N, C, nullptr);
    GPU_CHECK_REL("add_bias", dy.download(), badd, kTol);
    cuda::bias_gelu_forward(dpre.get(), dbias.get(), dact_out.get(), N, C, nullptr);
    GPU_CHECK_REL("pre + bias", dpre.download(), pre_b, kTol);
    GPU_CHECK_REL("gelu", dact_out.download(), act, kTol);
    cuda::gelu_backward_inplace(dpre.get(), dd.get(), static_cast<int64_t>(n), nullptr);
    GPU_CHECK_REL("gelu backward", dd.download(), grad, kTol);
    DeviceArray<float> dy2(pre);
    cuda::residual_bias_add(dres.get(), dy2.get(), dbias.get(), dres.get(), N, C, nullptr);  // aliased
    GPU_CHECK_REL("residual add", dres.download(), res, kTol);
  }
}

TEST_CASE("cuda fused softmax cross-entropy: loss, hits, dlogits in place", "[gpu][kernels]") {
  const int shapes[][2] = {{1, 2}, {7, 5}, {64, 256}, {9, 1000}, {3, 50257}};  // N, V
  uint64_t seed = 700;
  for (const auto& sh : shapes) {
    const int N = sh[0], V = sh[1];
    std::vector<float> logits = randn(static_cast<size_t>(N) * V, ++seed, 3.0);
    std::vector<int32_t> targets = randint(N, ++seed, V);
    // Ties: row 0 has its maximum twice; the first index wins (as the CPU reference's argmax).
    if (V >= 3) {
      logits[0] = 50.0f;
      logits[2] = 50.0f;
      targets[0] = N > 1 ? 0 : 2;  // one row: a tie lost (hit 0)
    }
    if (N > 1 && V >= 3) {
      logits[static_cast<size_t>(V) + 1] = 40.0f;  // row 1: a clear hit
      targets[1] = 1;
    }
    const float grad_scale = 0.7f / N;
    std::vector<double> loss(N), dlog(logits.size());
    std::vector<int32_t> hit(N);
    for (int n = 0; n < N; ++n) {
      const float* z = &logits[static_cast<size_t>(n) * V];
      int arg = 0;
      for (int v = 1; v < V; ++v)
        if (z[v] > z[arg]) arg = v;
      double s = 0;
      for (int v = 0; v < V; ++v) s += std::exp(static_cast<double>(z[v]) - z[arg]);
      const double lse = z[arg] + std::log(s);
      loss[n] = lse - z[targets[n]];
      hit[n] = arg == targets[n];
      for (int v = 0; v < V; ++v)
        dlog[static_cast<size_t>(n) * V + v] =
            (std::exp(z[v] - lse) - (v == targets[n] ? 1.0 : 0.0)) * grad_scale;
    }
    INFO("N " << N << " V " << V);
    DeviceArray<float> dz(logits), dloss(N);
    DeviceArray<int32_t> dt(targets), dhit(N);
    cuda::cross_entropy(dz.get(), dt.get(), N, V, false, grad_scale, dloss.get(), dhit.get(), nullptr);
    GPU_CHECK_REL("row loss", dloss.download(), loss, kTol);
    CHECK(dhit.download() == hit);
    CHECK(dz.download() == logits);  // write_grad = false leaves the logits alone
    cuda::cross_entropy(dz.get(), dt.get(), N, V, true, grad_scale, dloss.get(), dhit.get(), nullptr);
    GPU_CHECK_REL("row loss (with grad)", dloss.download(), loss, kTol);
    CHECK(dhit.download() == hit);
    GPU_CHECK_REL("dlogits", dz.download(), dlog, kTol);
  }
}

TEST_CASE("cuda deterministic reductions: sum, sum of squares, int sum", "[gpu][kernels]") {
  const int64_t sizes[] = {1, 255, 2048, 2049, 100003, 3000001};
  uint64_t seed = 800;
  for (int64_t n : sizes) {
    const std::vector<float> x = randn(n, ++seed, 1.0, 0.25);
    const std::vector<int32_t> k = randint(n, ++seed, 7);
    double s = 0, sq = 0, ks = 0;
    for (int64_t i = 0; i < n; ++i) {
      s += x[i];
      sq += static_cast<double>(x[i]) * x[i];
      ks += k[i];
    }
    DeviceArray<float> dx(x);
    DeviceArray<int32_t> dk(k);
    DeviceArray<double> partials(cuda::kReducePartials), out(3);
    cuda::reduce_sum(dx.get(), n, partials.get(), out.get() + 0, nullptr);
    cuda::reduce_sum_squares(dx.get(), n, partials.get(), out.get() + 1, nullptr);
    cuda::reduce_sum(dk.get(), n, partials.get(), out.get() + 2, nullptr);
    const std::vector<double> r = out.download();
    INFO("n " << n);
    GPU_CHECK_SCALAR("sum", r[0], s, 1e-10, 1.0);
    GPU_CHECK_SCALAR("sum of squares", r[1], sq, 1e-10, 1.0);
    CHECK(r[2] == ks);
    // Deterministic: the same bits again.
    cuda::reduce_sum_squares(dx.get(), n, partials.get(), out.get() + 0, nullptr);
    const std::vector<double> r2 = out.download();
    CHECK(std::memcmp(&r2[0], &r[1], sizeof(double)) == 0);
  }
}

TEST_CASE("cuda barrier_reduce: sum of counted phi, min of counted log det", "[gpu][kernels]") {
  const int shapes[][4] = {{1, 1, 1, 3}, {2, 3, 2, 17}, {3, 4, 4, 129}};  // Lb, B, H, T
  uint64_t seed = 900;
  for (const auto& sh : shapes) {
    const int Lb = sh[0], B = sh[1], H = sh[2], T = sh[3];
    const size_t n = static_cast<size_t>(Lb) * B * H * T;
    std::vector<float> phi = randn(n, ++seed, 1.0, 0.5), logdet = randn(n, ++seed);
    const std::vector<int32_t> mask_bits = randint(static_cast<size_t>(B) * T, ++seed, 3);
    std::vector<uint8_t> mask(mask_bits.size());
    for (size_t i = 0; i < mask.size(); ++i) mask[i] = mask_bits[i] != 0;
    // Uncounted entries carry junk that must be ignored; one counted entry is -inf (det <= 0).
    logdet[0] = -1000.0f;  // t = 0: never counted
    for (int pass = 0; pass < 2; ++pass) {
      const bool use_mask = pass == 1;
      double s = 0, m = std::numeric_limits<double>::infinity();
      size_t first_counted = n;
      for (size_t i = 0; i < n; ++i) {
        const int t = static_cast<int>(i % T), b = static_cast<int>((i / (static_cast<size_t>(T) * H)) % B);
        if (t < 2 || (use_mask && !mask[static_cast<size_t>(b) * T + t])) continue;
        if (first_counted == n) first_counted = i;
        s += phi[i];
        m = std::min(m, static_cast<double>(logdet[i]));
      }
      DeviceArray<float> dphi(phi), dld(logdet), minp(cuda::kReducePartials), dmin(1);
      DeviceArray<double> partials(cuda::kReducePartials), dsum(1);
      DeviceArray<uint8_t> dmask(mask);
      cuda::barrier_reduce(dphi.get(), dld.get(), use_mask ? dmask.get() : nullptr, Lb, B, H, T,
                           partials.get(), minp.get(), dsum.get(), dmin.get(), nullptr);
      INFO("Lb " << Lb << " B " << B << " H " << H << " T " << T << " mask " << use_mask);
      GPU_CHECK_SCALAR("phi sum", dsum.download()[0], s, 1e-10, 1.0);
      CHECK(dmin.download()[0] == static_cast<float>(m));
      if (pass == 0 && first_counted < n) {  // a counted -inf log det must win the minimum
        logdet[first_counted] = -std::numeric_limits<float>::infinity();
        DeviceArray<float> dld2(logdet);
        cuda::barrier_reduce(dphi.get(), dld2.get(), nullptr, Lb, B, H, T, partials.get(),
                             minp.get(), dsum.get(), dmin.get(), nullptr);
        CHECK(dmin.download()[0] == -std::numeric_limits<float>::infinity());
        logdet[first_counted] = 0.0f;
      }
    }
  }
}

TEST_CASE("cuda AdamW matches torch.optim.AdamW (core/optim.h) per element", "[gpu][kernels]") {
  // Three tensors: decay, no decay, decay (the table's binary search sees every segment).
  const std::vector<int64_t> starts = {0, 1000, 1037, 5000};
  const std::vector<uint8_t> flags = {1, 0, 1};
  const size_t n = 5000;
  uint64_t seed = 1000;
  for (int64_t t : {1, 2, 10}) {
    const std::vector<float> p = randn(n, ++seed, 0.5), g = randn(n, ++seed, 0.01);
    const std::vector<float> m = randn(n, ++seed, 0.001);
    std::vector<float> v = randn(n, ++seed, 1e-5);
    for (float& x : v) x = x * x;  // second moments are non-negative
    AdamWHyper hyper;
    hyper.weight_decay = 0.1;
    const AdamWScalars s = adamw_scalars(hyper, 3e-3, t, 0.6);
    std::vector<double> rp = to_double(p), rm = to_double(m), rv = to_double(v);
    const std::vector<double> rg = to_double(g);
    for (size_t seg = 0; seg < flags.size(); ++seg) {
      const size_t off = starts[seg], len = starts[seg + 1] - starts[seg];
      adamw_update<double>(rp.data() + off, rg.data() + off, rm.data() + off, rv.data() + off, len,
                           flags[seg] != 0, s);
    }
    DeviceArray<float> dp(p), dg(g), dm(m), dv(v);
    DeviceArray<int64_t> dstarts(starts);
    DeviceArray<uint8_t> dflags(flags);
    cuda::DecayTable table;
    table.seg_start = dstarts.get();
    table.decay = dflags.get();
    table.n_seg = static_cast<int>(flags.size());
    cuda::adamw_update(dp.get(), dg.get(), dm.get(), dv.get(), static_cast<int64_t>(n), table, s,
                       nullptr);
    INFO("step " << t);
    // Per-element math in double on both sides; only the fp32 storage differs.
    GPU_CHECK_REL("params", dp.download(), rp, 1e-6);
    GPU_CHECK_REL("m", dm.download(), rm, 1e-6);
    GPU_CHECK_REL("v", dv.download(), rv, 1e-6);
    // The update itself (p_new - p), so a no-op kernel could not pass on the params' size alone.
    const std::vector<float> got = dp.download();
    std::vector<double> dgot(n), dref(n);
    for (size_t i = 0; i < n; ++i) {
      dgot[i] = static_cast<double>(got[i]) - p[i];
      dref[i] = rp[i] - p[i];
    }
    GPU_CHECK_REL("update", dgot, dref, 1e-4);
  }
}

TEST_CASE("cuda errors name the failing call", "[gpu][errors]") {
  // An absurd allocation: the message names cudaMalloc, the size and the purpose.
  try {
    cuda::DeviceBuffer huge(size_t(1) << 50, "an absurd test buffer");
    FAIL("a 1 PiB cudaMalloc succeeded");
  } catch (const DeviceError& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find("cudaMalloc of 1024.0 TiB for an absurd test buffer failed") != std::string::npos);
    CHECK(msg.find("reduce train.batch_size") != std::string::npos);
  }
  // A failing runtime call: the message quotes the call.
  try {
    CUDA_CHECK(cudaSetDevice(1 << 20));
    FAIL("cudaSetDevice(1 << 20) succeeded");
  } catch (const DeviceError& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find("cudaSetDevice(1 << 20) failed") != std::string::npos);
  }
  // The device still works after the handled errors.
  CUDA_CHECK(cudaSetDevice(0));
  DeviceArray<float> y(std::vector<float>{1.0f, 2.0f});
  CHECK(y.download() == std::vector<float>{1.0f, 2.0f});
}
