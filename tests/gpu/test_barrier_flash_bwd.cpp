// The flash-style barrier backward kernel (cuda/barrier_flash_bwd.cuh) against a float64 host
// evaluation of its formula on the same float inputs:
//   pi_ks = exp(c Qg_k . Kc_s - m_k) / l_k                 (s < t_k; m, l from Qg, Kc on the host)
//   g_ks  = c (Qc_s^T G_k Kc_s - U_k . Kc_s - W_k . Qc_s + E_k),  dz_ks = pi_ks (g_ks - rowterm_k)
//   dQs_s = sum_{k: t_k > s} pi_ks (G_k Kc_s - W_k)
//   dKs_s = sum_{k: t_k > s} [pi_ks (G_k^T Qc_s - U_k) + dz_ks Qg_k]
// G, U, W, E, rowterm are independent random numbers (the kernel evaluates a formula; whether
// they come from a J^{-T} does not matter to it).
//
// Element-wise bound, relative to the sum of the magnitudes of the terms that make the element
// (|got - ref| <= tol * mag):  every tensor-core operand is rounded to TF32 (round to nearest,
// relative error <= 2^-11), so each product G_ij Kc_j or Qc_i G_ij is off by <= 2^-10 + 2^-22 of
// its size; the mma's fp32 accumulation over D terms adds <= D 2^-23 (allowing truncation); g
// multiplies X - W by Qc rounded to TF32 (another 2^-11); the fp32 sums over up to K slots add
// <= K 2^-24; pi's own fp32 error (logit and exp) is ~1e-6 relative.  Together
//   tol = 1.5e-3 (2^-10 + 2^-11 = 1.46e-3) + 2.4e-7 (K + D), rounded up to 2e-3 + 2.4e-7 (K + D).
// The bf16 products (FlashBwdProducts::bf16_mma) round G, Kc and Qc to bf16 (8 significant bits,
// round to nearest: relative error <= 2^-8 each), so each product is off by <= 2^-7 + 2^-16 of
// its size; their products are exact in fp32 and the dot Qc . (X - W) reads Qc unrounded:
//   tol_bf16 = 7.9e-3 + 2.4e-7 (K + D), rounded up to 8e-3 + 2.4e-7 (K + D).
// A wrong fragment index, a slot skipped or visited twice, or a row misassigned produces errors
// of the size of mag itself, so the check cannot pass by accident.  Also: dz is exactly 0 for
// s >= t_k and for padding slots; outputs are NaN-poisoned before the launch (an element never
// written fails); padding slots carry NaN in m, l, G, U, W, E, rowterm (reading one fails); a
// second run is bit-identical; all four variants (64 or 128 rows per block, either dispatch
// order) are checked, and the entry point is the default variant bit for bit.  bf16 rows
// (FlashBwdRows' bf16 pair, the bf16 precision's) must be the fp32 rows rounded to nearest even,
// bit for bit (at scale 1 and 0.37).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/barrier_flash_bwd.cuh"
#include "cuda/kernels.h"
#include "tests/catch.h"
#include "tests/gpu/barrier_test_util.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

// BLM_BARRIER_BWD's name for each product choice (also the label in the printed lines).
const char* products_name(cuda::FlashBwdProducts p) {
  switch (p) {
    case cuda::FlashBwdProducts::tf32_mma: return "mma";
    case cuda::FlashBwdProducts::tf32_wgmma: return "wgmma";
    default: return "bf16";
  }
}

struct BwdCase {
  int B, H, T, D;
  std::vector<int> counts;  // counted positions of sequence b (b % size); empty: exact, T - 2
};

// rows [B, K] (counted_rows, barrier_test_util.h): sampled positions drawn with hash keys
// b * 100003 + 1 + i.
std::vector<int32_t> make_rows(int B, int T, const std::vector<int>& counts, uint64_t seed,
                               int* K_out) {
  return counted_rows(B, T, counts, seed, 100003, 1, K_out);
}

// The kernel's inputs, host side.
struct BwdInputs {
  int B = 0, H = 0, T = 0, K = 0, D = 0;
  float c = 0;
  std::vector<int32_t> rows;
  std::vector<float> Qg, Qc, Kc, m, l, G, U, W, E, rowterm;
  int64_t BH() const { return static_cast<int64_t>(B) * H; }
};

// Row statistics of the strict causal softmax of c z, z_ks = Qg_k . Kc_s (double, from the float
// inputs), stored as float like the forward kernel's; NaN for padding slots.
void row_statistics(BwdInputs& in) {
  const int64_t BH = in.BH();
  const int D = in.D, T = in.T, K = in.K;
  in.m.assign(static_cast<size_t>(BH) * K, NAN);
  in.l.assign(static_cast<size_t>(BH) * K, NAN);
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int k = 0; k < K; ++k) {
      const int t = in.rows[(bh / in.H) * K + k];
      if (t < 0) continue;
      const SoftmaxRow sm =
          causal_softmax_row(&in.Qg[(bh * K + k) * D], &in.Kc[bh * T * D], t, D, in.c);
      in.m[bh * K + k] = static_cast<float>(sm.m);
      in.l[bh * K + k] = static_cast<float>(sm.l);
    }
}

// Fresh random inputs of a case: q = N(0.3, 0.7^2) per element, Qc = q minus its mean over the
// sequence, Qg = q at the counted rows (0 for padding); Kc likewise; G = I + N(0, 1/D),
// U, W ~ N(0, 0.5^2), E ~ N(0, 1), rowterm ~ N(0, 0.5^2); padding slots NaN (never read).
BwdInputs make_inputs(const BwdCase& cs, uint64_t seed) {
  BwdInputs in;
  in.B = cs.B, in.H = cs.H, in.T = cs.T, in.D = cs.D;
  in.c = static_cast<float>(1.0 / std::sqrt(static_cast<double>(cs.D)));
  in.rows = make_rows(cs.B, cs.T, cs.counts, seed, &in.K);
  const int64_t BH = in.BH();
  const int D = in.D, T = in.T, K = in.K;
  const std::vector<float> q = randn(static_cast<size_t>(BH) * T * D, seed + 1, 0.7, 0.3);
  const std::vector<float> kr = randn(static_cast<size_t>(BH) * T * D, seed + 2, 0.7, -0.2);
  in.Qc.resize(q.size());
  in.Kc.resize(kr.size());
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int j = 0; j < D; ++j) {
      double mq = 0, mk = 0;
      for (int s = 0; s < T; ++s) mq += q[(bh * T + s) * D + j], mk += kr[(bh * T + s) * D + j];
      mq /= T, mk /= T;
      for (int s = 0; s < T; ++s) {
        in.Qc[(bh * T + s) * D + j] = static_cast<float>(q[(bh * T + s) * D + j] - mq);
        in.Kc[(bh * T + s) * D + j] = static_cast<float>(kr[(bh * T + s) * D + j] - mk);
      }
    }
  const size_t slots = static_cast<size_t>(BH) * K;
  in.Qg.assign(slots * D, 0.0f);
  in.G = randn(slots * D * D, seed + 3, 1.0 / std::sqrt(static_cast<double>(D)));
  in.U = randn(slots * D, seed + 4, 0.5);
  in.W = randn(slots * D, seed + 5, 0.5);
  in.E = randn(slots, seed + 6, 1.0);
  in.rowterm = randn(slots, seed + 7, 0.5);
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int k = 0; k < K; ++k) {
      const size_t slot = static_cast<size_t>(bh) * K + k;
      const int t = in.rows[(bh / in.H) * K + k];
      if (t < 0) {  // padding: the kernel must never read these
        std::fill_n(&in.G[slot * D * D], D * D, NAN);
        std::fill_n(&in.U[slot * D], D, NAN);
        std::fill_n(&in.W[slot * D], D, NAN);
        in.E[slot] = in.rowterm[slot] = NAN;
        continue;
      }
      std::copy_n(&q[(bh * T + t) * D], D, &in.Qg[slot * D]);
      for (int i = 0; i < D; ++i) in.G[slot * D * D + static_cast<size_t>(i) * D + i] += 1.0f;
    }
  row_statistics(in);
  return in;
}

// The float64 values and term magnitudes (the bound's scale) of dz, dQs, dKs.
struct BwdReference {
  std::vector<double> dz, dz_mag, dQ, dQ_mag, dK, dK_mag;
};

BwdReference reference(const BwdInputs& in) {
  const int64_t BH = in.BH();
  const int D = in.D, T = in.T, K = in.K;
  const double c = in.c;
  BwdReference r;
  r.dz.assign(static_cast<size_t>(BH) * K * T, 0.0);
  r.dz_mag = r.dz;
  r.dQ.assign(static_cast<size_t>(BH) * T * D, 0.0);
  r.dQ_mag = r.dK = r.dK_mag = r.dQ;
  std::vector<double> X(D), Xm(D), Y(D), Ym(D);
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int k = 0; k < K; ++k) {
      const int t = in.rows[(bh / in.H) * K + k];
      if (t < 0) continue;
      const size_t slot = static_cast<size_t>(bh) * K + k;
      const float* qg = &in.Qg[slot * D];
      const float* G = &in.G[slot * D * D];
      const float* U = &in.U[slot * D];
      const float* W = &in.W[slot * D];
      for (int s = 0; s < t; ++s) {
        const float* qc = &in.Qc[(bh * T + s) * D];
        const float* kc = &in.Kc[(bh * T + s) * D];
        double z = 0, uk = 0, uk_mag = 0;
        for (int j = 0; j < D; ++j) {
          z += static_cast<double>(qg[j]) * kc[j];
          uk += static_cast<double>(U[j]) * kc[j];
          uk_mag += std::fabs(static_cast<double>(U[j]) * kc[j]);
        }
        const double pi = std::exp(c * z - in.m[slot]) / in.l[slot];
        std::fill(Y.begin(), Y.end(), 0.0);
        std::fill(Ym.begin(), Ym.end(), 0.0);
        double gq = 0, gq_mag = 0;
        for (int i = 0; i < D; ++i) {
          double x = 0, xm = 0;
          for (int j = 0; j < D; ++j) {
            const double gij = G[static_cast<size_t>(i) * D + j];
            x += gij * kc[j];
            xm += std::fabs(gij * kc[j]);
            Y[j] += qc[i] * gij;
            Ym[j] += std::fabs(qc[i] * gij);
          }
          X[i] = x - W[i];
          Xm[i] = xm + std::fabs(static_cast<double>(W[i]));
          gq += qc[i] * X[i];
          gq_mag += std::fabs(static_cast<double>(qc[i])) * Xm[i];
        }
        const double g = c * (gq - uk + in.E[slot]);
        const double g_mag = c * (gq_mag + uk_mag + std::fabs(static_cast<double>(in.E[slot])));
        const double dz = pi * (g - in.rowterm[slot]);
        const double dz_mag = pi * (g_mag + std::fabs(static_cast<double>(in.rowterm[slot])));
        r.dz[slot * T + s] = dz;
        r.dz_mag[slot * T + s] = dz_mag;
        const size_t row = (static_cast<size_t>(bh) * T + s) * D;
        for (int i = 0; i < D; ++i) {
          r.dQ[row + i] += pi * X[i];
          r.dQ_mag[row + i] += pi * Xm[i];
          r.dK[row + i] += pi * (Y[i] - U[i]) + dz * qg[i];
          r.dK_mag[row + i] += pi * (Ym[i] + std::fabs(static_cast<double>(U[i]))) +
                               dz_mag * std::fabs(static_cast<double>(qg[i]));
        }
      }
    }
  return r;
}

// Element-wise check |got - ref| <= tol mag (NaN fails); returns the worst |err| / (tol mag).
double check_bounded(const std::string& name, const std::vector<float>& got,
                     const std::vector<double>& ref, const std::vector<double>& mag, double tol) {
  REQUIRE(got.size() == ref.size());
  size_t bad = 0, first_bad = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = tol * mag[i] + 1e-30;
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    if (!(err <= bound)) {
      if (bad == 0) first_bad = i;
      ++bad;
    }
    worst = std::max(worst, std::isfinite(err) ? err / bound : INFINITY);
  }
  INFO(name << ": " << bad << " elements over the bound (first [" << first_bad << "] got "
            << (got.empty() ? 0.0f : got[first_bad]) << " ref "
            << (ref.empty() ? 0.0 : ref[first_bad]) << "), worst |err| / bound " << worst);
  CHECK(bad == 0);
  return worst;
}

// The spacing of bf16 values at |v| (v != 0 normal): 2^(e - 7) for 2^e <= |v| < 2^(e + 1); 0 at 0.
double bf16_ulp(double v) {
  if (v == 0) return 0;
  int e = 0;
  std::frexp(v, &e);  // |v| = m 2^e, m in [0.5, 1)
  return std::ldexp(1.0, e - 8);
}

// dz must be exactly 0 where s >= t_k and on padding slots.
size_t nonzero_outside_causal(const BwdInputs& in, const std::vector<float>& dz) {
  size_t n = 0;
  for (int64_t bh = 0; bh < in.BH(); ++bh)
    for (int k = 0; k < in.K; ++k) {
      const int t = in.rows[(bh / in.H) * in.K + k];
      for (int s = std::max(t, 0); s < in.T; ++s)
        if (!(dz[(static_cast<size_t>(bh) * in.K + k) * in.T + s] == 0.0f)) ++n;
    }
  return n;
}

// G as the bf16 products read it (barrier_linalg_forward's GFormat::bf16): each slot's D * D
// floats hold bf16(G_k) (round to nearest even) in their first half; the second half is NaN, so
// reading it fails the checks.  The reference keeps the fp32 G: the bound covers the rounding.
std::vector<float> g_in_bf16_layout(const BwdInputs& in) {
  const size_t DD = static_cast<size_t>(in.D) * in.D, slots = in.G.size() / DD;
  std::vector<float> out(in.G.size(), NAN);
  for (size_t k = 0; k < slots; ++k) {
    uint16_t* half = reinterpret_cast<uint16_t*>(out.data() + k * DD);
    for (size_t e = 0; e < DD; ++e) half[e] = bf16_bits(in.G[k * DD + e]);
  }
  return out;
}

// The inputs on the device and poisoned outputs (dQ16, dK16: the bf16 rows).
struct DeviceBwd {
  DeviceArray<float> Qg, Qc, Kc, m, l, G, G16, U, W, E, rowterm, dz, dQ, dK;
  DeviceArray<uint16_t> dQ16, dK16;
  DeviceArray<int32_t> rows;
  explicit DeviceBwd(const BwdInputs& in)
      : Qg(in.Qg), Qc(in.Qc), Kc(in.Kc), m(in.m), l(in.l), G(in.G), G16(g_in_bf16_layout(in)),
        U(in.U), W(in.W), E(in.E), rowterm(in.rowterm),
        dz(static_cast<size_t>(in.BH()) * in.K * in.T),
        dQ(static_cast<size_t>(in.BH()) * in.T * in.D),
        dK(static_cast<size_t>(in.BH()) * in.T * in.D), dQ16(dQ.size()), dK16(dK.size()),
        rows(in.rows.empty() ? std::vector<int32_t>(1, -1) : in.rows) {}
  const float* g_for(cuda::FlashBwdProducts p) const {
    return p == cuda::FlashBwdProducts::bf16_mma ? G16.get() : G.get();
  }
  // The rows in fp32 (dQ, dK) or, bf16, in dQ16, dK16; times `scale`.
  void run(const BwdInputs& in, cuda::FlashBwdVariant variant, bool bf16 = false,
           float scale = 1.0f) {
    poison(dz);
    poison(dQ);
    poison(dK);
    poison(dQ16);
    poison(dK16);
    cuda::FlashBwdRows out =
        bf16 ? cuda::FlashBwdRows::bhtd(as_bf16(dQ16), as_bf16(dK16), in.H, in.T, in.D)
             : cuda::FlashBwdRows::bhtd(dQ.get(), dK.get(), in.H, in.T, in.D);
    out.scale = scale;
    cuda::barrier_flash_backward_into(
        Qg.get(), Qc.get(), Kc.get(), rows.get(), m.get(), l.get(), g_for(variant.products),
        U.get(), W.get(), E.get(), rowterm.get(), in.B, in.H, in.T, in.K, in.D, in.c, dz.get(),
        out, variant, nullptr);
  }
  void run_default(const BwdInputs& in) {
    poison(dz);
    poison(dQ);
    poison(dK);
    const float* g = g_for(cuda::barrier_flash_backward_variant_from_env().products);
    cuda::barrier_flash_backward(Qg.get(), Qc.get(), Kc.get(), rows.get(), m.get(), l.get(), g,
                                 U.get(), W.get(), E.get(), rowterm.get(), in.B, in.H, in.T, in.K,
                                 in.D, in.c, dz.get(), dQ.get(), dK.get(), nullptr);
  }
};

}  // namespace

TEST_CASE("flash barrier backward matches a float64 evaluation within the TF32 / bf16 bound",
          "[gpu][barrier-flash-bwd]") {
  // T 3: one slot, one row; 77, 200: T not a multiple of the 64-row tile; 256 exact: K = 254,
  // four full tiles; 300 with K 17 sampled (and fewer in other sequences: padding slots); D 32
  // and 64; B H > 1 with H 2 and 3 (b = bh / H).
  const std::vector<BwdCase> cases = {
      {1, 1, 3, 32, {}},       {2, 2, 77, 64, {}},         {1, 3, 200, 32, {}},
      {1, 2, 256, 64, {}},     {3, 2, 300, 64, {17, 9, 12}}, {2, 2, 300, 32, {17, 4}},
      {2, 1, 130, 64, {1, 40}}};
  uint64_t seed = 7700;
  for (const BwdCase& cs : cases) {
    seed += 10;
    const BwdInputs in = make_inputs(cs, seed);
    const BwdReference ref = reference(in);
    DeviceBwd dev(in);
    // (the wgmma variants: head size 64 on wgmma, 32 falls back to mma.sync)
    using Pr = cuda::FlashBwdProducts;
    for (const cuda::FlashBwdVariant variant :
         {cuda::FlashBwdVariant{64, false, Pr::bf16_mma},
          cuda::FlashBwdVariant{64, true, Pr::bf16_mma},
          cuda::FlashBwdVariant{128, false, Pr::bf16_mma},
          cuda::FlashBwdVariant{128, true, Pr::bf16_mma},
          cuda::FlashBwdVariant{64, false, Pr::tf32_mma},
          cuda::FlashBwdVariant{128, true, Pr::tf32_mma},
          cuda::FlashBwdVariant{64, true, Pr::tf32_wgmma},
          cuda::FlashBwdVariant{128, true, Pr::tf32_wgmma}}) {
      const bool bf16 = variant.products == Pr::bf16_mma;
      const double tol = (bf16 ? 8e-3 : 2e-3) + 2.4e-7 * (in.K + in.D);
      const std::string label = "B " + std::to_string(in.B) + " H " + std::to_string(in.H) +
                                " T " + std::to_string(in.T) + " D " + std::to_string(in.D) +
                                " K " + std::to_string(in.K) +
                                (cs.counts.empty() ? " exact" : " sampled") +
                                ", " + std::to_string(variant.rows_per_block) +
                                " rows per block" +
                                (variant.longest_first ? ", longest first" : "") +
                                ", " + products_name(variant.products);
      INFO(label);
      dev.run(in, variant);
      const std::vector<float> dz = dev.dz.download(), dQ = dev.dQ.download(),
                               dK = dev.dK.download();
      const double wz = check_bounded("dz", dz, ref.dz, ref.dz_mag, tol);
      const double wq = check_bounded("dQs", dQ, ref.dQ, ref.dQ_mag, tol);
      const double wk = check_bounded("dKs", dK, ref.dK, ref.dK_mag, tol);
      CHECK(nonzero_outside_causal(in, dz) == 0);
      std::printf("barrier_flash_bwd [%s]: worst |err| / (tol mag), tol %.2e: dz %.3f dQs %.3f "
                  "dKs %.3f; ||err|| / ||ref||: dz %.2e dQs %.2e dKs %.2e\n",
                  label.c_str(), tol, wz, wq, wk, compare(dz, ref.dz).rel,
                  compare(dQ, ref.dQ).rel, compare(dK, ref.dK).rel);
      dev.run(in, variant);  // deterministic: the same bits again
      CHECK(bit_identical(dev.dz.download(), dz));
      CHECK(bit_identical(dev.dQ.download(), dQ));
      CHECK(bit_identical(dev.dK.download(), dK));
      // bf16 rows (the bf16 precision's): bit for bit the fp32 rows rounded to nearest even
      // (the kernel rounds the same fp32 products), every element written, the same dz; and
      // with a scale (0.37: products that are not exact) against the fp32 rows at that scale.
      dev.run(in, variant, true);
      CHECK(dev.dQ16.download() == to_bits(dQ));
      CHECK(dev.dK16.download() == to_bits(dK));
      CHECK(bit_identical(dev.dz.download(), dz));
      dev.run(in, variant, false, 0.37f);
      const std::vector<float> dQs = dev.dQ.download(), dKs = dev.dK.download();
      dev.run(in, variant, true, 0.37f);
      CHECK(dev.dQ16.download() == to_bits(dQs));
      CHECK(dev.dK16.download() == to_bits(dKs));
      // The entry point runs the default products with BLM_BARRIER_BWD unset, and the named
      // ones with it set, at the block height and order barrier_flash_backward_variant_from_env
      // picks for them.
      const cuda::FlashBwdVariant def;
      ScopedEnv bwd("BLM_BARRIER_BWD", variant.products == def.products
                                           ? nullptr
                                           : products_name(variant.products));
      const cuda::FlashBwdVariant chosen = cuda::barrier_flash_backward_variant_from_env();
      if (variant.rows_per_block == chosen.rows_per_block &&
          variant.longest_first == chosen.longest_first) {
        dev.run_default(in);
        CHECK(bit_identical(dev.dQ.download(), dQ));
        CHECK(bit_identical(dev.dK.download(), dK));
      }
    }
  }
}

TEST_CASE("flash barrier backward: BLM_BARRIER_BWD other than mma, wgmma or bf16 is refused",
          "[gpu][barrier-flash-bwd]") {
  ScopedEnv bwd("BLM_BARRIER_BWD", "fast");
  DeviceArray<float> any(64), out(64);
  DeviceArray<int32_t> rows(std::vector<int32_t>(2, 1));
  CHECK_THROWS_AS(cuda::barrier_flash_backward(any.get(), any.get(), any.get(), rows.get(),
                                               any.get(), any.get(), any.get(), any.get(),
                                               any.get(), any.get(), any.get(), 1, 1, 2, 2, 32,
                                               1.0f, out.get(), out.get(), out.get(), nullptr),
                  ConfigError);
}

TEST_CASE("flash barrier backward: the block height follows the products unless "
          "BLM_BARRIER_BWD_ROWS forces it; other values are refused",
          "[gpu][barrier-flash-bwd]") {
  using cuda::FlashBwdProducts;
  const auto variant = [](const char* products, const char* rows) {
    ScopedEnv p("BLM_BARRIER_BWD", products), r("BLM_BARRIER_BWD_ROWS", rows);
    return cuda::barrier_flash_backward_variant_from_env();
  };
  const cuda::FlashBwdVariant plain = variant(nullptr, nullptr);
  CHECK(plain.products == FlashBwdProducts::bf16_mma);
  CHECK(plain.rows_per_block == 64);
  CHECK(plain.longest_first);
  CHECK(variant(nullptr, "auto").rows_per_block == 64);
  CHECK(variant(nullptr, "").rows_per_block == 64);
  CHECK(variant("mma", nullptr).rows_per_block == 128);
  CHECK(variant("wgmma", "auto").rows_per_block == 128);
  CHECK(variant(nullptr, "128").rows_per_block == 128);
  CHECK(variant("mma", "64").rows_per_block == 64);
  for (const char* bad : {"32", "96", " 64", "AUTO", "128x"})
    CHECK_THROWS_AS(variant(nullptr, bad), ConfigError);
}

TEST_CASE("flash barrier backward: K = 0 gives zero dQs, dKs; unsupported shapes are refused",
          "[gpu][barrier-flash-bwd]") {
  const int B = 1, H = 2, T = 5, D = 32;
  DeviceArray<float> any(64), dQ(static_cast<size_t>(B) * H * T * D), dK(dQ.size()), dz(4);
  DeviceArray<int32_t> rows(std::vector<int32_t>(4, -1));
  poison(dQ);
  poison(dK);
  poison(dz);
  const std::vector<float> dz_before = dz.download();
  cuda::barrier_flash_backward(any.get(), any.get(), any.get(), rows.get(), any.get(), any.get(),
                               any.get(), any.get(), any.get(), any.get(), any.get(), B, H, T, 0,
                               D, 0.17f, dz.get(), dQ.get(), dK.get(), nullptr);
  CHECK(bit_identical(dQ.download(), std::vector<float>(dQ.size(), 0.0f)));
  CHECK(bit_identical(dK.download(), std::vector<float>(dK.size(), 0.0f)));
  CHECK(bit_identical(dz.download(), dz_before));  // K = 0: dz has no elements to write
  CHECK_FALSE(cuda::barrier_flash_backward_supported(128, 1));
  CHECK_FALSE(cuda::barrier_flash_backward_supported(64, 70000));
  CHECK(cuda::barrier_flash_backward_supported(32, 65535));
  CHECK_THROWS(cuda::barrier_flash_backward(any.get(), any.get(), any.get(), rows.get(), any.get(),
                                            any.get(), any.get(), any.get(), any.get(), any.get(),
                                            any.get(), 1, 1, 5, 3, 128, 0.1f, dz.get(), dQ.get(),
                                            dK.get(), nullptr));
}

// The backward's second step (barrier_flash_slot_rows): dQa_k = sum_s dz_ks Kc_s added as
// scale * dQa_k into the dq row of slot k's position t_k, against float64:
//   dq_ref = dq0 + scale sum_s dz_ks Kc_s at the slot rows,
//   mag    = |dq0| + |scale| sum_s |dz_ks Kc_s|   (the bound's scale, per element).
// dQa on cuBLAS TF32: each operand rounded to TF32 (cuBLAS may truncate: up to 2^-10 relative
// each), so each product is off by <= 2^-9 of its size, plus the fp32 accumulation:
// 4e-3 + 2^-24 (T + 32).  A wrong row, slot, column or a missed range of rows gives errors of
// the size of mag.  Also: every other dq row and all of dk keep their bits; padding slots add
// nothing; two runs give the same bits.  dz is random where s < t_k and 0 elsewhere (as the tile
// kernel leaves it).  K 1, 3, 8, 16, 40, T not a multiple of 32 or of 4 and multiples of 4,
// padding slots, D 32 and 64.  Then the same on bf16 rows (the bf16 precision): see the bound
// there.
TEST_CASE("flash barrier slot rows: dz Kc added at the slot rows against float64",
          "[gpu][barrier-flash-bwd]") {
  struct SlotCase {
    int B, H, T, D;
    std::vector<int> counts;
  };
  const std::vector<SlotCase> cases = {
      {2, 2, 77, 64, {1}},        {3, 2, 45, 32, {3, 1, 2}},  {2, 3, 130, 64, {8, 5}},
      {2, 2, 300, 64, {16, 9}},   {1, 2, 1024, 64, {8}},      {2, 2, 200, 32, {40, 17}},
      {1, 2, 70, 64, {}},         {2, 1, 97, 32, {16, 0}}};
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  uint64_t seed = 9100;
  for (const SlotCase& cs : cases) {
    seed += 10;
    int K = 0;
    const std::vector<int32_t> rows = make_rows(cs.B, cs.T, cs.counts, seed, &K);
    const int64_t BH = static_cast<int64_t>(cs.B) * cs.H;
    const int T = cs.T, D = cs.D;
    const float scale = 0.37f;
    std::vector<float> dz = randn(static_cast<size_t>(BH) * K * T, seed + 1);
    const std::vector<float> Kc = randn(static_cast<size_t>(BH) * T * D, seed + 2, 0.7);
    const std::vector<float> dq0 = randn(Kc.size(), seed + 3), dk0 = randn(Kc.size(), seed + 4);
    std::vector<double> ref(dq0.begin(), dq0.end()), mag(dq0.size());
    std::vector<uint8_t> slot_row(static_cast<size_t>(BH) * T, 0);  // (bh, t): a slot's row
    for (size_t i = 0; i < mag.size(); ++i) mag[i] = std::fabs(static_cast<double>(dq0[i]));
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int k = 0; k < K; ++k) {
        const int t = rows[(bh / cs.H) * K + k];
        float* z = &dz[(static_cast<size_t>(bh) * K + k) * T];
        for (int s = std::max(t, 0); s < T; ++s) z[s] = 0.0f;  // s >= t_k, padding: 0
        if (t < 0) continue;
        slot_row[bh * T + t] = 1;
        const size_t row = (static_cast<size_t>(bh) * T + t) * D;
        const float* kc = &Kc[static_cast<size_t>(bh) * T * D];
        for (int i = 0; i < D; ++i) {
          double sum = 0, sum_mag = 0;
          for (int s = 0; s < t; ++s) {
            const double p = static_cast<double>(z[s]) * kc[static_cast<size_t>(s) * D + i];
            sum += p;
            sum_mag += std::fabs(p);
          }
          ref[row + i] += static_cast<double>(scale) * sum;
          mag[row + i] += std::fabs(static_cast<double>(scale)) * sum_mag;
        }
      }
    DeviceArray<float> dz_d(dz), Kc_d(Kc), dq(dq0.size()), dk(dk0.size()),
        dQa(std::max<size_t>(1, static_cast<size_t>(BH) * K * D));
    DeviceArray<int32_t> rows_d(rows.empty() ? std::vector<int32_t>(1, -1) : rows);
    cuda::FlashBwdRows out = cuda::FlashBwdRows::bhtd(dq.get(), dk.get(), cs.H, T, D);
    out.scale = scale;
    std::vector<double> ref_added(ref.size());  // what the slot rows should add
    for (size_t i = 0; i < ref.size(); ++i) ref_added[i] = ref[i] - dq0[i];
    const double tol = 4e-3 + std::ldexp(1.0, -24) * (T + 32);
    const std::string label = "B " + std::to_string(cs.B) + " H " + std::to_string(cs.H) +
                              " T " + std::to_string(T) + " D " + std::to_string(D) + " K " +
                              std::to_string(K);
    INFO(label);
    std::vector<float> runs[2];
    for (int r = 0; r < 2; ++r) {
      dq.upload(dq0);
      dk.upload(dk0);
      poison(dQa);
      cuda::barrier_flash_slot_rows(dz_d.get(), Kc_d.get(), rows_d.get(), cs.B, cs.H, T, K, D,
                                    out, dQa.get(), blas, nullptr);
      runs[r] = dq.download();
      CHECK(bit_identical(dk.download(), dk0));
    }
    CHECK(bit_identical(runs[0], runs[1]));
    const std::vector<float>& q = runs[0];
    size_t changed_elsewhere = 0;
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int t = 0; t < T; ++t)
        if (!slot_row[bh * T + t])
          for (int i = 0; i < D; ++i) {
            const size_t e = (static_cast<size_t>(bh) * T + t) * D + i;
            changed_elsewhere += std::memcmp(&q[e], &dq0[e], sizeof(float)) != 0;
          }
    CHECK(changed_elsewhere == 0);
    const double worst = check_bounded("dq", q, ref, mag, tol);
    std::printf("barrier_flash_slot_rows [%s]: worst |err| / (tol mag) %.3f, tol %.2e; "
                "||err|| / ||ref - dq0|| %.2e\n",
                label.c_str(), worst, tol,
                compare(added(q, dq0), ref_added).rel);

    // bf16 rows (the bf16 precision's): dq0 rounded to bf16 as the tiles leave it; the slot
    // rows are read, added to in fp32 and rounded once.  Every other row, and dk, keep their
    // bits.  A slot row's element differs from the fp32 run's q by the first rounding (half a
    // bf16 ulp of dq0) plus the second (half a bf16 ulp of the result) plus the fp32 sums'
    // last-bit differences: checked as one bf16 ulp of the larger of |dq0| and the results,
    // plus 2^-22 of the result.
    const std::vector<uint16_t> dq0_16 = to_bits(dq0), dk0_16 = to_bits(dk0);
    DeviceArray<uint16_t> dq16(dq0_16), dk16(dk0_16);
    cuda::FlashBwdRows out16 = cuda::FlashBwdRows::bhtd(as_bf16(dq16), as_bf16(dk16), cs.H, T, D);
    out16.scale = scale;
    cuda::barrier_flash_slot_rows(dz_d.get(), Kc_d.get(), rows_d.get(), cs.B, cs.H, T, K, D,
                                  out16, dQa.get(), blas, nullptr);
    const std::vector<uint16_t> q16 = dq16.download();
    CHECK(dk16.download() == dk0_16);
    size_t off_elsewhere = 0, off_slot = 0;
    double worst_ulps = 0;
    for (size_t e = 0; e < q16.size(); ++e) {
      if (!slot_row[e / D]) {
        off_elsewhere += q16[e] != dq0_16[e];
        continue;
      }
      const double y16 = bf16_value(q16[e]), y = q[e];
      const double big = std::max({std::fabs(static_cast<double>(dq0[e])), std::fabs(y),
                                   std::fabs(y16)});
      const double err = std::fabs(y16 - y);
      const double bound = bf16_ulp(big) + std::ldexp(std::fabs(y), -22);
      off_slot += !(err <= bound);
      worst_ulps = std::max(worst_ulps, big > 0 ? err / bf16_ulp(big) : err);
    }
    CHECK(off_elsewhere == 0);
    CHECK(off_slot == 0);
    std::printf("barrier_flash_slot_rows [%s, bf16 rows]: worst |bf16 - fp32| %.3f bf16 ulps\n",
                label.c_str(), worst_ulps);
  }
  cuda::destroy_cublas(blas);
}

// Timing at the bench shapes (b) B64 H6 T256 D64 exact (K 254) and (a) B16 H12 T1024 D64 with
// 64 sampled positions, for the four variants (block height, dispatch order).  Work =
// 4 K_eff T_eff D^2 flops (two D x D matrix-vector products per causal pair (k, s < t_k), 2
// flops per multiply-add), K_eff T_eff = sum over slots of t_k.  "G L2->SM" = D^2 * 4 * (slots
// each tile visits), the bytes of G the blocks load (how many of them come from HBM depends on
// the dispatch order; see the kernel's header).  Inputs are random (a pool of normals copied
// over the large G), m and l the true row statistics.  BLM_BENCH_REPEATS=n sets the timed
// repetitions (0: one untimed launch each, for a profiler).
TEST_CASE("flash barrier backward: time at the bench shapes", "[.bench][barrier-flash-bwd]") {
  struct Shape { const char* name; int B, H, T, D, K; };
  const Shape shapes[] = {{"(b)", 64, 6, 256, 64, 254}, {"(a)", 16, 12, 1024, 64, 64}};
  int repeats = 20;
  if (const char* env = std::getenv("BLM_BENCH_REPEATS")) repeats = std::atoi(env);
  for (const Shape& sh : shapes) {
    const BwdCase cs{sh.B, sh.H, sh.T, sh.D,
                     sh.K == sh.T - 2 ? std::vector<int>{} : std::vector<int>{sh.K}};
    BwdInputs in;
    in.B = sh.B, in.H = sh.H, in.T = sh.T, in.D = sh.D;
    in.c = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sh.D)));
    in.rows = make_rows(sh.B, sh.T, cs.counts, 991, &in.K);
    REQUIRE(in.K == sh.K);
    const int64_t BH = in.BH();
    const size_t slots = static_cast<size_t>(BH) * in.K;
    in.Qc = randn(static_cast<size_t>(BH) * sh.T * sh.D, 11, 0.7);
    in.Kc = randn(in.Qc.size(), 12, 0.7);
    in.Qg = randn(slots * sh.D, 13, 0.7);
    row_statistics(in);
    in.U = randn(slots * sh.D, 14, 0.5);
    in.W = randn(slots * sh.D, 15, 0.5);
    in.E = randn(slots, 16);
    in.rowterm = randn(slots, 17, 0.5);
    // G (1.6 GB at (b)): a pool of 2^22 normals copied over it at shifting offsets; for the bf16
    // products (G in bf16, GFormat::bf16) a pool whose every float holds two bf16 normals.
    const std::vector<float> pool = randn(size_t{1} << 22, 18, 0.125);
    std::vector<float> pool16(pool.size());
    for (size_t i = 0; i < pool.size(); ++i) {
      const uint32_t pair =
          bf16_bits(pool[i]) | (uint32_t{bf16_bits(pool[(i + 7919) % pool.size()])} << 16);
      std::memcpy(&pool16[i], &pair, 4);
    }
    auto fill = [&](DeviceArray<float>& dst, const std::vector<float>& src) {
      for (size_t at = 0, round = 0; at < dst.size(); ++round) {
        const size_t shift = (round * 4099) % (src.size() / 2);
        const size_t n = std::min(dst.size() - at, src.size() - shift);
        CUDA_CHECK(cudaMemcpy(dst.get() + at, src.data() + shift, n * sizeof(float),
                              cudaMemcpyHostToDevice));
        at += n;
      }
    };
    DeviceArray<float> G(slots * sh.D * sh.D), G16(slots * sh.D * sh.D);
    fill(G, pool);
    fill(G16, pool16);
    DeviceArray<float> Qg(in.Qg), Qc(in.Qc), Kc(in.Kc), m(in.m), l(in.l), U(in.U), W(in.W), E(in.E),
        rowterm(in.rowterm), dz(slots * sh.T), dQ(in.Qc.size()), dK(in.Qc.size());
    DeviceArray<int32_t> rows(in.rows);
    double pairs = 0;  // K_eff T_eff
    for (int32_t t : in.rows) pairs += t > 0 ? t : 0;
    pairs *= sh.H;
    const double flops = 4.0 * pairs * sh.D * sh.D;
    for (const cuda::FlashBwdVariant variant :
         {cuda::FlashBwdVariant{64, false}, cuda::FlashBwdVariant{64, true},
          cuda::FlashBwdVariant{128, false}, cuda::FlashBwdVariant{128, true},
          cuda::FlashBwdVariant{128, true, cuda::FlashBwdProducts::tf32_mma},
          cuda::FlashBwdVariant{128, true, cuda::FlashBwdProducts::tf32_wgmma}}) {
      const int rpb = variant.rows_per_block;
      double visits = 0;  // slots visited, summed over blocks
      for (int64_t bh = 0; bh < BH; ++bh)
        for (int s0 = 0; s0 < sh.T; s0 += rpb)
          for (int k = 0; k < in.K; ++k) visits += in.rows[(bh / sh.H) * in.K + k] > s0;
      const bool bf16 = variant.products == cuda::FlashBwdProducts::bf16_mma;
      auto run = [&] {
        cuda::barrier_flash_backward_into(
            Qg.get(), Qc.get(), Kc.get(), rows.get(), m.get(), l.get(),
            bf16 ? G16.get() : G.get(), U.get(), W.get(), E.get(), rowterm.get(), sh.B, sh.H,
            sh.T, in.K, sh.D, in.c, dz.get(),
            cuda::FlashBwdRows::bhtd(dQ.get(), dK.get(), sh.H, sh.T, sh.D), variant, nullptr);
      };
      if (repeats <= 0) {
        run();
        CUDA_CHECK(cudaDeviceSynchronize());
        continue;
      }
      const double ms = median_ms(run, 3, repeats);
      const double g_bytes = visits * sh.D * sh.D * (bf16 ? 2.0 : 4.0);
      std::printf("barrier_flash_bwd %s B%d H%d T%d D%d K%d, %d rows per block%s, %s: %.3f ms, %.1f "
                  "TFLOP/s (4 K_eff T_eff D^2 = %.3g flop), G L2->SM %.2f GB (%.0f GB/s), G in "
                  "memory %.2f GB\n",
                  sh.name, sh.B, sh.H, sh.T, sh.D, in.K, rpb,
                  variant.longest_first ? ", longest first" : "",
                  products_name(variant.products),
                  ms, flops / ms * 1e-9, flops,
                  g_bytes * 1e-9, g_bytes / ms * 1e-6, G.size() * (bf16 ? 2.0 : 4.0) * 1e-9);
    }
    const std::vector<float> dQh = dQ.download();
    size_t finite = 0;
    for (float v : dQh) finite += std::isfinite(v);
    CHECK(finite == dQh.size());  // a timed kernel that produced NaN would be a wrong timing
  }
}

// Timing of dQa and its slot rows (barrier_flash_slot_rows) at shape (a), B16 H12 T1024 D64, with
// K = 4, 8, 16, 32, 64 sampled positions (the cuBLAS TF32 product and the slot-row pass; the
// fused kernel measured against it and dropped: see barrier_flash_bwd.cu).  dz random where
// s < t_k, Kc random; rows into fp32 and bf16 [B, T, 2 H D] blocks as the pipeline writes them.
// In a step the tiles have just read Kc (50 MB here), partly still in L2; this measures it
// repeatedly, so the times are a lower bound.
TEST_CASE("flash barrier slot rows: time at shape (a)", "[.bench][barrier-flash-bwd]") {
  const int B = 16, H = 12, T = 1024, D = 64;
  const int64_t BH = static_cast<int64_t>(B) * H, hd = static_cast<int64_t>(H) * D;
  int repeats = 20;
  if (const char* env = std::getenv("BLM_BENCH_REPEATS")) repeats = std::atoi(env);
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  const DeviceArray<float> Kc(randn(static_cast<size_t>(BH) * T * D, 21, 0.7));
  DeviceArray<float> dqk(static_cast<size_t>(B) * T * 2 * hd);
  DeviceArray<uint16_t> dqk16(dqk.size());
  CUDA_CHECK(cudaMemset(dqk.get(), 0, dqk.size() * sizeof(float)));
  CUDA_CHECK(cudaMemset(dqk16.get(), 0, dqk16.size() * sizeof(uint16_t)));
  for (int k : {4, 8, 16, 32, 64}) {
    int K = 0;
    const std::vector<int32_t> rows = make_rows(B, T, {k}, 991, &K);
    std::vector<float> dz = randn(static_cast<size_t>(BH) * K * T, 22);
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int j = 0; j < K; ++j) {
        const int t = rows[(bh / H) * K + j];
        for (int s = std::max(t, 0); s < T; ++s) dz[(static_cast<size_t>(bh) * K + j) * T + s] = 0;
      }
    const DeviceArray<float> dz_d(dz);
    const DeviceArray<int32_t> rows_d(rows);
    DeviceArray<float> dQa(static_cast<size_t>(BH) * K * D);
    for (bool bf16 : {false, true}) {
      const cuda::FlashBwdRows out =
          bf16 ? cuda::FlashBwdRows::at(as_bf16(dqk16), as_bf16(dqk16) + hd, T * 2 * hd, D,
                                        2 * hd, 0.125f)
               : cuda::FlashBwdRows::at(dqk.get(), dqk.get() + hd, T * 2 * hd, D, 2 * hd,
                                        0.125f);
      auto run = [&] {
        cuda::barrier_flash_slot_rows(dz_d.get(), Kc.get(), rows_d.get(), B, H, T, K, D, out,
                                      dQa.get(), blas, nullptr);
      };
      if (repeats <= 0) {
        run();
        CUDA_CHECK(cudaDeviceSynchronize());
        continue;
      }
      const double ms = median_ms(run, 3, repeats);
      std::printf("barrier_flash_slot_rows (a) B%d H%d T%d D%d K%d, %s rows: %.1f us\n", B, H, T,
                  D, K, bf16 ? "bf16" : "fp32", ms * 1e3);
    }
  }
  cuda::destroy_cublas(blas);
}
