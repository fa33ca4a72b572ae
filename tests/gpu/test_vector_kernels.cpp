// The vectorised paths of the bandwidth-bound kernels (cuda/vector_io.cuh users) and the fused
// launchers, against float64 host references on fresh random inputs.  Every kernel that picks a
// 16-byte vector path runs twice: on 16-byte aligned buffers (vector path, with sizes that leave
// a scalar tail) and on buffers offset by one element (the scalar fallback), and both must match
// the reference.  Error measure: ||got - ref|| / ||ref|| (tests/gpu/gpu_test_util.h).
//
// Tolerances: 1e-5 for fp32 results (fp32 rounding of these sums and of __expf is ~1e-6); 5e-3
// for values stored in bf16 (unit roundoff 2^-8, ~1-2e-3 RMS over a tensor); exact bits where
// the result is a copy or a rounding (bf16 copies) or where two launchers must do the same
// arithmetic (fused vs unfused dx, two runs of one kernel).
#include <cmath>
#include <cstdint>
#include <cstring>
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
constexpr double kTolBf16 = 5e-3;

// A device copy of host data placed `offset` elements into the buffer: offset 0 is 16-byte
// aligned (cudaMalloc), offset 1 is not (4 or 2 bytes in), which selects the scalar paths.
template <class T>
struct Placed {
  DeviceArray<T> buf;
  size_t offset, n;
  Placed(const std::vector<T>& host, size_t off) : buf(host.size() + off), offset(off), n(host.size()) {
    std::vector<T> padded(off, T{});
    padded.insert(padded.end(), host.begin(), host.end());
    buf.upload(padded);
  }
  T* get() const { return buf.get() + offset; }
  std::vector<T> download() const {
    const std::vector<T> all = buf.download();
    return std::vector<T>(all.begin() + static_cast<std::ptrdiff_t>(offset), all.end());
  }
};
__nv_bfloat16* bf(const Placed<uint16_t>& p) { return reinterpret_cast<__nv_bfloat16*>(p.get()); }

}  // namespace

TEST_CASE("vector kernels: fp32 elementwise on aligned and unaligned buffers", "[gpu][vector]") {
  // C = 512: vectors; C = 13: scalar (C % 4); n = 3 * 4099 leaves a tail for the flat kernels.
  const int shapes[][2] = {{300, 512}, {7, 13}, {3, 4099}, {1, 4}};
  uint64_t seed = 3100;
  for (const auto& sh : shapes)
    for (size_t off : {0, 1}) {
      const int N = sh[0], C = sh[1];
      const size_t n = static_cast<size_t>(N) * C;
      const std::vector<float> pre = randn(n, ++seed, 2.0), b = randn(C, ++seed, 0.5);
      const std::vector<float> resid = randn(n, ++seed), dact = randn(n, ++seed);
      std::vector<double> xb(n), act(n), grad(n), res(n);
      for (size_t i = 0; i < n; ++i) {
        xb[i] = static_cast<double>(pre[i]) + b[i % C];
        act[i] = gelu_ref(xb[i]);
        grad[i] = dact[i] * gelu_grad_ref(pre[i]);
        res[i] = static_cast<double>(resid[i]) + pre[i] + b[i % C];
      }
      INFO("N " << N << " C " << C << " offset " << off);
      Placed<float> dy(pre, off), db(b, off), dpre(pre, off), dout(std::vector<float>(n), off);
      cuda::add_bias(dy.get(), db.get(), N, C, nullptr);
      GPU_CHECK_REL("add_bias", dy.download(), xb, kTol);
      cuda::bias_gelu_forward(dpre.get(), db.get(), dout.get(), N, C, nullptr);
      GPU_CHECK_REL("pre + bias", dpre.download(), xb, kTol);
      GPU_CHECK_REL("gelu", dout.download(), act, kTol);
      Placed<float> p2(pre, off), dd(dact, off);
      cuda::gelu_backward_inplace(p2.get(), dd.get(), static_cast<int64_t>(n), nullptr);
      GPU_CHECK_REL("gelu backward", dd.download(), grad, kTol);
      Placed<float> dres(resid, off), dy2(pre, off);
      cuda::residual_bias_add(dres.get(), dy2.get(), db.get(), dres.get(), N, C, nullptr);
      GPU_CHECK_REL("residual add (aliased)", dres.download(), res, kTol);
    }
}

TEST_CASE("vector kernels: bf16 GELU and conversion, vector and scalar paths agree", "[gpu][vector]") {
  uint64_t seed = 3200;
  for (size_t n : {size_t(1), size_t(7), size_t(8), size_t(100005)})
    for (size_t off : {0, 1}) {
      std::vector<float> pre = randn(n, ++seed, 2.5), dact = randn(n, ++seed);
      for (float& x : pre) x = round_bf16(x);
      for (float& x : dact) x = round_bf16(x);
      pre[0] = -30.0f;  // far negative tail: gelu -> -0, gelu' -> 0, never NaN
      std::vector<double> out(n), grad(n);
      for (size_t i = 0; i < n; ++i) {
        out[i] = gelu_ref(pre[i]);
        grad[i] = dact[i] * gelu_grad_ref(pre[i]);
      }
      INFO("n " << n << " offset " << off);
      Placed<uint16_t> dpre(to_bits(pre), off), dout(std::vector<uint16_t>(n), off),
          dd(to_bits(dact), off);
      cuda::gelu_forward(bf(dpre), bf(dout), static_cast<int64_t>(n), nullptr);
      cuda::gelu_backward_inplace(bf(dpre), bf(dd), static_cast<int64_t>(n), nullptr);
      GPU_CHECK_REL("gelu (bf16)", from_bits(dout.download()), out, kTolBf16);
      GPU_CHECK_REL("gelu backward (bf16)", from_bits(dd.download()), grad, kTolBf16);
      // Conversion: exact round-to-nearest-even bits, including the tail.
      const std::vector<float> x = randn(n, ++seed, 3.0);
      Placed<float> dx(x, off);
      Placed<uint16_t> dy(std::vector<uint16_t>(n, 0xFFFF), off);
      cuda::convert_to_bf16(dx.get(), bf(dy), static_cast<int64_t>(n), nullptr);
      CHECK(dy.download() == to_bits(x));
    }
}

TEST_CASE("vector kernels: cross-entropy at V = 50304 (bf16 shared-memory row, fp32 re-read) and odd V", "[gpu][vector]") {
  struct Case {
    int N, V;
    bool bf16;
    size_t off;
  };
  // bf16 50304: 100 KB rows cached in shared memory; fp32 50304: 200 KB rows re-read; 1001: the
  // scalar path (V % 8 != 0); offset 1: unaligned buffer.
  const Case cases[] = {{6, 50304, true, 0}, {3, 50304, false, 0}, {5, 1001, true, 0},
                        {4, 2048, true, 1}, {2, 999, false, 1}, {1, 8, true, 0}};
  uint64_t seed = 3300;
  for (const Case& c : cases) {
    const size_t n = static_cast<size_t>(c.N) * c.V;
    std::vector<float> z = randn(n, ++seed, 3.0);
    if (c.bf16)
      for (float& x : z) x = round_bf16(x);
    std::vector<int32_t> y = randint(c.N, ++seed, c.V);
    // Row 0: its maximum twice, the target at the second copy (first index wins: no hit).
    z[5] = 40.0f;
    z[c.V - 1] = 40.0f;
    y[0] = c.V - 1;
    const float scale = 0.3f;
    std::vector<double> loss(c.N), grad(n);
    std::vector<int32_t> hit(c.N);
    for (int r = 0; r < c.N; ++r) {
      const float* row = &z[static_cast<size_t>(r) * c.V];
      int arg = 0;
      for (int v = 1; v < c.V; ++v)
        if (row[v] > row[arg]) arg = v;
      double s = 0;
      for (int v = 0; v < c.V; ++v) s += std::exp(static_cast<double>(row[v]) - row[arg]);
      loss[r] = row[arg] + std::log(s) - row[y[r]];
      hit[r] = arg == y[r];
      for (int v = 0; v < c.V; ++v)
        grad[static_cast<size_t>(r) * c.V + v] =
            (std::exp(row[v] - row[arg]) / s - (v == y[r] ? 1.0 : 0.0)) * scale;
    }
    INFO("N " << c.N << " V " << c.V << (c.bf16 ? " bf16" : " fp32") << " offset " << c.off);
    DeviceArray<int32_t> dy(y), dhit(c.N);
    DeviceArray<float> dloss(c.N);
    std::vector<double> got_grad;
    if (c.bf16) {
      Placed<uint16_t> dz(to_bits(z), c.off);
      cuda::cross_entropy(bf(dz), dy.get(), c.N, c.V, false, scale, dloss.get(), dhit.get(), nullptr);
      CHECK(dz.download() == to_bits(z));  // no gradient requested: logits untouched
      GPU_CHECK_REL("row loss (no grad)", dloss.download(), loss, kTol);
      cuda::cross_entropy(bf(dz), dy.get(), c.N, c.V, true, scale, dloss.get(), dhit.get(), nullptr);
      const std::vector<float> g = from_bits(dz.download());
      got_grad.assign(g.begin(), g.end());
      GPU_CHECK_REL("dlogits (bf16)", got_grad, grad, kTolBf16);
      // BLM_CE=vector (the cached row by vector loads) against the default bulk copy (where it
      // applies: V 50304 and 8 here; the other cases take the vector loads either way): the
      // same bits.
      {
        ScopedEnv ce("BLM_CE", "vector");
        Placed<uint16_t> dz2(to_bits(z), c.off);
        DeviceArray<int32_t> dhit2(c.N);
        DeviceArray<float> dloss2(c.N);
        cuda::cross_entropy(bf(dz2), dy.get(), c.N, c.V, true, scale, dloss2.get(), dhit2.get(),
                            nullptr);
        CHECK(dz2.download() == dz.download());
        CHECK(bit_identical(dloss2.download(), dloss.download()));
        CHECK(dhit2.download() == dhit.download());
      }
    } else {
      Placed<float> dz(z, c.off);
      cuda::cross_entropy(dz.get(), dy.get(), c.N, c.V, false, scale, dloss.get(), dhit.get(), nullptr);
      CHECK(dz.download() == z);
      GPU_CHECK_REL("row loss (no grad)", dloss.download(), loss, kTol);
      cuda::cross_entropy(dz.get(), dy.get(), c.N, c.V, true, scale, dloss.get(), dhit.get(), nullptr);
      GPU_CHECK_REL("dlogits", dz.download(), grad, kTol);
    }
    GPU_CHECK_REL("row loss", dloss.download(), loss, kTol);
    CHECK(dhit.download() == hit);
  }
}

TEST_CASE("vector kernels: fused column sum + bf16 copy, fused GELU backward + column sum", "[gpu][vector]") {
  // 70001 rows: the chunking's second regime; C = 1536 vectors, C = 36 (fp32 vectors, bf16 not),
  // C = 5 scalar.
  const int shapes[][2] = {{1, 8}, {130, 1536}, {70001, 36}, {65, 5}};
  uint64_t seed = 3400;
  for (const auto& sh : shapes)
    for (size_t off : {0, 1}) {
      const int N = sh[0], C = sh[1];
      const size_t n = static_cast<size_t>(N) * C;
      INFO("N " << N << " C " << C << " offset " << off);
      // Column sum + copy.
      const std::vector<float> x = randn(n, ++seed, 1.0, 0.2), out0 = randn(C, ++seed);
      std::vector<double> ref(out0.begin(), out0.end());
      for (size_t i = 0; i < n; ++i) ref[i % C] += x[i];
      Placed<float> dx(x, off), dout(out0, 0);
      Placed<uint16_t> d16(std::vector<uint16_t>(n, 0xFFFF), off);
      DeviceArray<float> partial(cuda::column_partial_floats(N, C, 1));
      cuda::column_sum_convert_accumulate(dx.get(), nullptr, 0, N, C, partial.get(), dout.get(),
                                          bf(d16), nullptr);
      GPU_CHECK_REL("column sum (with copy)", dout.download(), ref, kTol);
      CHECK(d16.download() == to_bits(x));
      // With an addend in the first columns (a multiple of 8, as the backend's 2 d): y = x + a.
      const int ac = C / 3 * 2 / 8 * 8;
      if (ac > 0) {
        const std::vector<float> a = randn(static_cast<size_t>(N) * ac, ++seed, 0.5);
        std::vector<float> y = x;
        std::vector<double> ref_y(out0.begin(), out0.end());
        for (int r = 0; r < N; ++r)
          for (int c = 0; c < ac; ++c)
            y[static_cast<size_t>(r) * C + c] += a[static_cast<size_t>(r) * ac + c];
        for (size_t i = 0; i < n; ++i) ref_y[i % C] += y[i];
        Placed<float> da(a, off), dout_y(out0, 0);
        Placed<uint16_t> y16(std::vector<uint16_t>(n, 0xFFFF), off);
        cuda::column_sum_convert_accumulate(dx.get(), da.get(), ac, N, C, partial.get(),
                                            dout_y.get(), bf(y16), nullptr);
        GPU_CHECK_REL("column sum (with addend and copy)", dout_y.download(), ref_y, kTol);
        CHECK(y16.download() == to_bits(y));
        // The bf16 in-place form on bf16(x): the same sums and bits as the fp32 form on x
        // widened from bf16.
        std::vector<float> xb = x;
        for (float& v : xb) v = round_bf16(v);
        Placed<float> dxb(xb, off), dout_w(out0, 0), dout_b(out0, 0);
        Placed<uint16_t> w16(std::vector<uint16_t>(n, 0xFFFF), off), b16(to_bits(xb), off);
        cuda::column_sum_convert_accumulate(dxb.get(), da.get(), ac, N, C, partial.get(),
                                            dout_w.get(), bf(w16), nullptr);
        cuda::column_sum_add_accumulate(bf(b16), da.get(), ac, N, C, partial.get(), dout_b.get(),
                                        nullptr);
        CHECK(bit_identical(dout_b.download(), dout_w.download()));
        CHECK(b16.download() == w16.download());
        // A bf16 addend (the bf16 precision's barrier dq, dk) is widened exactly: both forms give
        // the sums and bits of the fp32 addend holding the same values.
        const std::vector<float> ab = rounded_bf16(a);
        Placed<float> dab(ab, off), sum_f(out0, 0), sum_h(out0, 0), add_f(out0, 0), add_h(out0, 0);
        Placed<uint16_t> dab16(to_bits(ab), off);
        const std::vector<uint16_t> nan16(n, 0xFFFF);
        Placed<uint16_t> copy_f(nan16, off), copy_h(nan16, off);
        cuda::column_sum_convert_accumulate(dx.get(), dab.get(), ac, N, C, partial.get(),
                                            sum_f.get(), bf(copy_f), nullptr);
        cuda::column_sum_convert_accumulate(dx.get(), bf(dab16), ac, N, C, partial.get(),
                                            sum_h.get(), bf(copy_h), nullptr);
        CHECK(bit_identical(sum_h.download(), sum_f.download()));
        CHECK(copy_h.download() == copy_f.download());
        Placed<uint16_t> x_f(to_bits(xb), off), x_h(to_bits(xb), off);
        cuda::column_sum_add_accumulate(bf(x_f), dab.get(), ac, N, C, partial.get(), add_f.get(),
                                        nullptr);
        cuda::column_sum_add_accumulate(bf(x_h), bf(dab16), ac, N, C, partial.get(), add_h.get(),
                                        nullptr);
        CHECK(bit_identical(add_h.download(), add_f.download()));
        CHECK(x_h.download() == x_f.download());
      }
      // GELU backward + column sum, bf16: the sum is over the stored (rounded) gradient.
      std::vector<float> pre = randn(n, ++seed, 2.0), dact = randn(n, ++seed);
      for (float& v : pre) v = round_bf16(v);
      for (float& v : dact) v = round_bf16(v);
      std::vector<double> g(n);
      for (size_t i = 0; i < n; ++i) g[i] = dact[i] * gelu_grad_ref(pre[i]);
      Placed<uint16_t> dpre(to_bits(pre), off), dd(to_bits(dact), off);
      Placed<float> dsum(out0, 0);
      cuda::gelu_backward_column_sum_accumulate(bf(dpre), bf(dd), N, C, partial.get(), dsum.get(),
                                                nullptr);
      const std::vector<float> stored = from_bits(dd.download());
      GPU_CHECK_REL("gelu backward (bf16, fused)", stored, g, kTolBf16);
      std::vector<double> sum_stored(out0.begin(), out0.end());
      for (size_t i = 0; i < n; ++i) sum_stored[i % C] += stored[i];
      GPU_CHECK_REL("column sum of the stored gradient", dsum.download(), sum_stored, kTol);
      // fp32.
      std::vector<double> sum32(out0.begin(), out0.end());
      for (size_t i = 0; i < n; ++i) sum32[i % C] += g[i];
      Placed<float> fpre(pre, off), fd(dact, off), fsum(out0, 0);
      cuda::gelu_backward_column_sum_accumulate(fpre.get(), fd.get(), N, C, partial.get(), fsum.get(),
                                                nullptr);
      GPU_CHECK_REL("gelu backward (fp32, fused)", fd.download(), g, kTol);
      GPU_CHECK_REL("column sum (fp32, fused)", fsum.download(), sum32, kTol);
    }
}

TEST_CASE("vector kernels: fused LayerNorm backward = dx + dw + db, deterministic", "[gpu][vector]") {
  // C = 6200: too long for the fused kernel's shared memory (falls back to the two passes);
  // C = 33 and offset 1: scalar path; C = 8, 384: the row in registers (4 vectors per lane),
  // 768: 8 vectors per lane (6 used), 2000: vectorised loop form; N = 1 and N = 700 (several
  // chunks of 64 rows).
  const int shapes[][2] = {{1, 8}, {63, 384}, {700, 768}, {130, 33}, {40, 2000}, {5, 6200}};
  uint64_t seed = 3500;
  for (const auto& sh : shapes)
    for (size_t off : {0, 1}) {
      const int N = sh[0], C = sh[1];
      const size_t n = static_cast<size_t>(N) * C;
      const std::vector<float> x = randn(n, ++seed, 2.0, 5.0), w = randn(C, ++seed, 0.2, 1.0);
      // dy exactly representable in bf16: the bf16-dy launcher below must give the same bits.
      const std::vector<float> b = randn(C, ++seed, 0.2), dy = randn_bf16_exact(n, ++seed);
      const std::vector<float> dx0 = randn(n, ++seed, 0.5), dw0 = randn(C, ++seed, 0.5),
                               db0 = randn(C, ++seed, 0.5);
      std::vector<double> dx(dx0.begin(), dx0.end()), dw(dw0.begin(), dw0.end()),
          db(db0.begin(), db0.end());
      for (int r = 0; r < N; ++r) {
        const size_t o = static_cast<size_t>(r) * C;
        double mu = 0, var = 0;
        for (int c = 0; c < C; ++c) mu += x[o + c];
        mu /= C;
        for (int c = 0; c < C; ++c) var += (x[o + c] - mu) * (x[o + c] - mu);
        const double rs = 1.0 / std::sqrt(var / C + 1e-5);
        double sg = 0, sgx = 0;
        for (int c = 0; c < C; ++c) {
          const double xh = (x[o + c] - mu) * rs, g = static_cast<double>(dy[o + c]) * w[c];
          sg += g;
          sgx += g * xh;
          dw[c] += dy[o + c] * xh;
          db[c] += dy[o + c];
        }
        for (int c = 0; c < C; ++c) {
          const double xh = (x[o + c] - mu) * rs, g = static_cast<double>(dy[o + c]) * w[c];
          dx[o + c] += rs * (g - sg / C - xh * sgx / C);
        }
      }
      INFO("N " << N << " C " << C << " offset " << off);
      Placed<float> dX(x, off), dW(w, off), dB(b, off), dY(std::vector<float>(n), off);
      DeviceArray<float> mean(N), rstd(N);
      cuda::layernorm_forward(dX.get(), dW.get(), dB.get(), N, C, dY.get(), mean.get(), rstd.get(),
                              nullptr);
      Placed<float> ddy(dy, off), ddx(dx0, off), ddx2(dx0, off), ddw(dw0, 0), ddb(db0, 0);
      DeviceArray<float> partial(cuda::column_partial_floats(N, C, 2));
      cuda::layernorm_backward_accumulate(ddy.get(), dX.get(), mean.get(), rstd.get(), dW.get(), N, C,
                                          ddx.get(), partial.get(), ddw.get(), ddb.get(), nullptr);
      GPU_CHECK_REL("dx (fused)", ddx.download(), dx, kTol);
      GPU_CHECK_REL("dw (fused)", ddw.download(), dw, kTol);
      GPU_CHECK_REL("db (fused)", ddb.download(), db, kTol);
      // The dx of the fused launcher is the unfused launcher's, bit for bit.
      cuda::layernorm_backward_dx_accumulate(ddy.get(), dX.get(), mean.get(), rstd.get(), dW.get(),
                                             N, C, ddx2.get(), nullptr);
      CHECK(bit_identical(ddx.download(), ddx2.download()));
      // A second run gives the same bits for dw (fixed reduction order).
      Placed<float> ddx3(dx0, off), ddw3(dw0, 0), ddb3(db0, 0);
      cuda::layernorm_backward_accumulate(ddy.get(), dX.get(), mean.get(), rstd.get(), dW.get(), N, C,
                                          ddx3.get(), partial.get(), ddw3.get(), ddb3.get(), nullptr);
      CHECK(bit_identical(ddw.download(), ddw3.download()));
      CHECK(bit_identical(ddb.download(), ddb3.download()));
      // dy in bf16 (the bf16 step's form), with the bf16 copy of dx: the same fp32 arithmetic on
      // the same values, so the same bits, and dx16 = bf16(dx).
      Placed<uint16_t> ddy16(to_bits(dy), off), ddx16(std::vector<uint16_t>(n, 0xFFFF), off);
      Placed<float> ddx4(dx0, off), ddw4(dw0, 0), ddb4(db0, 0);
      cuda::layernorm_backward_accumulate(bf(ddy16), dX.get(), mean.get(), rstd.get(), dW.get(), N,
                                          C, ddx4.get(), bf(ddx16), partial.get(), ddw4.get(),
                                          ddb4.get(), nullptr, nullptr);
      const std::vector<float> dx4 = ddx4.download();
      CHECK(bit_identical(ddx.download(), dx4));
      CHECK(bit_identical(ddw.download(), ddw4.download()));
      CHECK(bit_identical(ddb.download(), ddb4.download()));
      CHECK(ddx16.download() == to_bits(dx4));
      // With the column sums of the new dx (the bf16 step's projection bias gradients): dx, dw
      // and db keep their bits, and ds[c] = ds0[c] + sum_n dx[n, c] against float64 of the
      // reference's dx (the third output's partials take the third slice of the scratch).
      const std::vector<float> ds0 = randn(C, ++seed, 0.5);
      std::vector<double> ds(ds0.begin(), ds0.end());
      for (int r = 0; r < N; ++r)
        for (int c = 0; c < C; ++c) ds[c] += dx[static_cast<size_t>(r) * C + c];
      DeviceArray<float> partial3(cuda::column_partial_floats(N, C, 3));
      Placed<float> ddx5(dx0, off), ddw5(dw0, 0), ddb5(db0, 0), dds5(ds0, 0);
      Placed<uint16_t> ddx16b(std::vector<uint16_t>(n, 0xFFFF), off);
      cuda::layernorm_backward_accumulate(bf(ddy16), dX.get(), mean.get(), rstd.get(), dW.get(), N,
                                          C, ddx5.get(), bf(ddx16b), partial3.get(), ddw5.get(),
                                          ddb5.get(), dds5.get(), nullptr);
      CHECK(bit_identical(dx4, ddx5.download()));
      CHECK(bit_identical(ddw.download(), ddw5.download()));
      CHECK(bit_identical(ddb.download(), ddb5.download()));
      CHECK(ddx16b.download() == ddx16.download());
      GPU_CHECK_REL("dx column sums (fused)", dds5.download(), ds, kTol);
    }
}

TEST_CASE("vector kernels: residual add fused with the LayerNorm forward", "[gpu][vector]") {
  // sum = x + delta (delta bf16) must be the fp32 sum bit for bit, and y, mean, rstd those of
  // layernorm_forward on that sum, for a bf16 and an fp32 y; vector (C = 384, 768: the row in
  // registers; 2000: the loop form) and scalar (C = 33, offset 1) paths.
  const int shapes[][2] = {{1, 8}, {63, 384}, {300, 768}, {130, 33}, {40, 2000}};
  uint64_t seed = 3550;
  for (const auto& sh : shapes)
    for (size_t off : {0, 1}) {
      const int N = sh[0], C = sh[1];
      const size_t n = static_cast<size_t>(N) * C;
      const std::vector<float> x = randn(n, ++seed, 2.0, 5.0), w = randn(C, ++seed, 0.2, 1.0);
      const std::vector<float> b = randn(C, ++seed, 0.2), delta = randn_bf16_exact(n, ++seed);
      std::vector<float> sum(n);
      for (size_t i = 0; i < n; ++i) sum[i] = x[i] + delta[i];
      INFO("N " << N << " C " << C << " offset " << off);
      Placed<float> dX(x, off), dW(w, off), dB(b, off), dSumRef(sum, off);
      Placed<uint16_t> dDelta(to_bits(delta), off);
      DeviceArray<float> mean0(N), rstd0(N), mean1(N), rstd1(N);
      // bf16 y
      Placed<uint16_t> y0(std::vector<uint16_t>(n, 0xFFFF), off), y1(std::vector<uint16_t>(n, 0), off);
      Placed<float> dSum(std::vector<float>(n, -1.0f), off);
      cuda::layernorm_forward(dSumRef.get(), dW.get(), dB.get(), N, C, bf(y0), mean0.get(),
                              rstd0.get(), nullptr);
      cuda::residual_layernorm_forward(dX.get(), bf(dDelta), dSum.get(), dW.get(), dB.get(), N, C,
                                       bf(y1), mean1.get(), rstd1.get(), nullptr);
      CHECK(bit_identical(dSum.download(), sum));
      CHECK(y1.download() == y0.download());
      CHECK(bit_identical(mean1.download(), mean0.download()));
      CHECK(bit_identical(rstd1.download(), rstd0.download()));
      // fp32 y
      Placed<float> z0(std::vector<float>(n, 0.0f), off), z1(std::vector<float>(n, 1.0f), off);
      Placed<float> dSum2(std::vector<float>(n, -1.0f), off);
      cuda::layernorm_forward(dSumRef.get(), dW.get(), dB.get(), N, C, z0.get(), mean0.get(),
                              rstd0.get(), nullptr);
      cuda::residual_layernorm_forward(dX.get(), bf(dDelta), dSum2.get(), dW.get(), dB.get(), N,
                                       C, z1.get(), mean1.get(), rstd1.get(), nullptr);
      CHECK(bit_identical(dSum2.download(), sum));
      CHECK(bit_identical(z1.download(), z0.download()));
    }
}

TEST_CASE("vector kernels: AdamW vectors across tensor boundaries, unaligned fallback", "[gpu][vector]") {
  // Tensors starting at offsets that are not multiples of 4 (vectors straddle them), an empty
  // tensor, and n % 4 = 3 (a scalar tail).
  const std::vector<int64_t> starts = {0, 6, 6, 1001, 1003, 4099};
  const std::vector<uint8_t> flags = {1, 0, 1, 0, 1};
  const size_t n = 4099;
  uint64_t seed = 3600;
  for (size_t off : {0, 1}) {
    const std::vector<float> p = randn(n, ++seed, 0.5), g = randn(n, ++seed, 0.01);
    const std::vector<float> m = randn(n, ++seed, 0.001);
    std::vector<float> v = randn(n, ++seed, 1e-3);
    for (float& x : v) x = x * x;
    AdamWHyper hyper;
    hyper.weight_decay = 0.1;
    const AdamWScalars s = adamw_scalars(hyper, 3e-3, 3, 0.7);
    std::vector<double> rp(p.begin(), p.end()), rm(m.begin(), m.end()), rv(v.begin(), v.end());
    const std::vector<double> rg(g.begin(), g.end());
    for (size_t seg = 0; seg < flags.size(); ++seg) {
      const size_t o = starts[seg], len = starts[seg + 1] - starts[seg];
      adamw_update<double>(rp.data() + o, rg.data() + o, rm.data() + o, rv.data() + o, len,
                           flags[seg] != 0, s);
    }
    Placed<float> dp(p, off), dg(g, off), dm(m, off), dv(v, off);
    Placed<uint16_t> d16(std::vector<uint16_t>(n, 0xFFFF), off);
    DeviceArray<int64_t> dstarts(starts);
    DeviceArray<uint8_t> dflags(flags);
    const cuda::DecayTable table{dstarts.get(), dflags.get(), static_cast<int>(flags.size())};
    cuda::adamw_update(dp.get(), dg.get(), dm.get(), dv.get(), static_cast<int64_t>(n), table, s,
                       bf(d16), nullptr);
    INFO("offset " << off);
    const std::vector<float> got = dp.download();
    GPU_CHECK_REL("params", got, rp, 1e-6);
    GPU_CHECK_REL("m", dm.download(), rm, 1e-6);
    GPU_CHECK_REL("v", dv.download(), rv, 1e-6);
    std::vector<double> du(n), ru(n);
    for (size_t i = 0; i < n; ++i) {
      du[i] = static_cast<double>(got[i]) - p[i];
      ru[i] = rp[i] - p[i];
    }
    GPU_CHECK_REL("update", du, ru, 1e-4);
    // Decay per element: at each tensor boundary the decayed and undecayed neighbours differ by
    // the decay factor only when their flags differ, so a shifted table would show up here.
    for (size_t seg = 0; seg + 1 < flags.size(); ++seg) {
      const size_t i = starts[seg + 1];
      if (i >= n || starts[seg + 1] == starts[seg + 2]) continue;
      INFO("boundary " << i);
      CHECK(std::fabs(got[i] - rp[i]) <= 1e-6 * std::fabs(rp[i]) + 1e-9);
      CHECK(std::fabs(got[i - 1] - rp[i - 1]) <= 1e-6 * std::fabs(rp[i - 1]) + 1e-9);
    }
    CHECK(d16.download() == to_bits(got));
  }
}

TEST_CASE("vector kernels: embedding forward and wpe backward, scalar and vector paths", "[gpu][vector]") {
  const int shapes[][4] = {{2, 5, 6, 9}, {3, 7, 12, 11}};  // B, T, d, V (d = 6: scalar rows)
  uint64_t seed = 3700;
  for (const auto& sh : shapes) {
    const int B = sh[0], T = sh[1], d = sh[2], V = sh[3];
    const std::vector<int32_t> tok = randint(static_cast<size_t>(B) * T, ++seed, V);
    const std::vector<float> wte = randn(static_cast<size_t>(V) * d, ++seed);
    const std::vector<float> wpe = randn(static_cast<size_t>(T) * d, ++seed);
    const double noise = 0.2;
    std::vector<double> ref(static_cast<size_t>(B) * T * d);
    for (int r = 0; r < B * T; ++r)
      for (int i = 0; i < d; ++i) {
        const size_t idx = static_cast<size_t>(r) * d + i;
        ref[idx] = static_cast<double>(wte[static_cast<size_t>(tok[r]) * d + i]) +
                   wpe[static_cast<size_t>(r % T) * d + i] + noise * normal01(seed, idx);
      }
    DeviceArray<int32_t> dtok(tok);
    DeviceArray<float> dwte(wte), dwpe(wpe), dout(ref.size());
    cuda::embedding_forward(dtok.get(), dwte.get(), dwpe.get(), B, T, d, noise, seed, dout.get(),
                            nullptr);
    INFO("B " << B << " T " << T << " d " << d);
    GPU_CHECK_REL("embedding", dout.download(), ref, 1e-6);
    const std::vector<float> g = randn(ref.size(), ++seed), w0 = randn(wpe.size(), ++seed);
    std::vector<double> rw(w0.begin(), w0.end());
    for (size_t i = 0; i < g.size(); ++i) rw[i % (static_cast<size_t>(T) * d)] += g[i];
    DeviceArray<float> dg(g), dw(w0);
    cuda::embedding_backward_wpe_accumulate(dg.get(), B, T, d, dw.get(), nullptr);
    GPU_CHECK_REL("dwpe", dw.download(), rw, kTol);
  }
}
