// The fused S = pi @ P kernel (cuda/barrier_fused_s.cuh) alone, against S computed in double on
// the host from the same float inputs: S[bh, k, i D + j] = sum_s pi[bh, k, s] q[bh, s, i] k[bh, s, j].
//
// Element-wise bound (why it holds): both tensor-core operands are rounded to TF32 with round to
// nearest (relative error <= 2^-11 each, the fp32 product q_i k_j adds 2^-24 before that), so
// each term pi_ks q_si k_sj is off by <= ~2^-10 of its magnitude; the fp32 accumulation over at
// most T terms adds <= T 2^-24 of the sum of magnitudes.  Hence
//   |S - S_ref| <= (1.0e-3 + 1.2e-7 T) sum_s |pi_ks q_si k_sj| + 1e-30.
// A wrong fragment index (row, column or s) gives errors of the order of that sum itself, and a
// causal tile skipped wrongly drops terms of it, so the check cannot pass by accident.
// Also: padding slots (rows = -1) and slots past K are exact zeros; the output was NaN-poisoned
// (an element never written fails); a second run is bit-identical; K = 0 writes nothing.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda/barrier_fused_s.cuh"
#include "tests/catch.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

struct FusedCase {
  int B, H, T, D;
  std::vector<int> counts;  // counted positions per sequence b (b % size); empty: exact (T - 2)
};

// rows [B, K]: per sequence its counted t >= 2 in increasing order, -1 up to K (K = the largest
// count).  Positions drawn with hash2 (fixed per seed).
std::vector<int32_t> make_rows(const FusedCase& c, uint64_t seed, int* K_out) {
  std::vector<std::vector<int32_t>> per(c.B);
  for (int b = 0; b < c.B; ++b) {
    std::vector<int32_t> pos;
    for (int t = 2; t < c.T; ++t) pos.push_back(t);
    if (!c.counts.empty()) {
      for (int i = static_cast<int>(pos.size()) - 1; i > 0; --i)
        std::swap(pos[i], pos[hash2(seed, static_cast<uint64_t>(b) * 4096 + i) % (i + 1)]);
      pos.resize(std::min<size_t>(pos.size(), c.counts[b % c.counts.size()]));
      std::sort(pos.begin(), pos.end());
    }
    per[b] = pos;
  }
  int K = 0;
  for (const auto& p : per) K = std::max(K, static_cast<int>(p.size()));
  std::vector<int32_t> rows(static_cast<size_t>(c.B) * K, -1);
  for (int b = 0; b < c.B; ++b)
    for (size_t k = 0; k < per[b].size(); ++k) rows[static_cast<size_t>(b) * K + k] = per[b][k];
  *K_out = K;
  return rows;
}

// pi [BH, K, T]: for slot k with position t, a softmax of random logits over s < t (zeros for
// s >= t); all zero for padding.
std::vector<float> make_pi(const FusedCase& c, const std::vector<int32_t>& rows, int K,
                           uint64_t seed) {
  const size_t BH = static_cast<size_t>(c.B) * c.H;
  std::vector<float> pi(BH * K * c.T, 0.0f);
  const std::vector<float> z = randn(pi.size(), seed, 1.5);
  for (size_t bh = 0; bh < BH; ++bh)
    for (int k = 0; k < K; ++k) {
      const int t = rows[(bh / c.H) * K + k];
      const size_t base = (bh * K + k) * c.T;
      double l = 0;
      for (int s = 0; s < t; ++s) l += std::exp(static_cast<double>(z[base + s]));
      for (int s = 0; s < t; ++s) pi[base + s] = static_cast<float>(std::exp(static_cast<double>(z[base + s])) / l);
    }
  return pi;
}

}  // namespace

TEST_CASE("fused S = pi P kernel matches an fp64 product within the TF32 bound",
          "[gpu][barrier_tc][barrier_fused_s]") {
  // T 3: one slot; 37, 257: T and K not multiples of the 32-step or the 64-slot tile; 64: K 62
  // (a partial slot tile) and t_max = 63 (the last s tile is full); counts: per-sequence
  // different K (padding slots in the same tile as counted ones), a tile of only padding slots
  // (counts 70 vs 1), H = 2 and 3 (b = bh / H).
  const std::vector<FusedCase> cases = {
      {1, 1, 3, 32, {}},          {2, 2, 37, 32, {}},          {2, 3, 64, 64, {}},
      {1, 2, 257, 64, {}},        {1, 1, 257, 32, {}},         {3, 2, 100, 64, {1, 70, 17}},
      {3, 2, 257, 32, {5, 200, 1}}, {2, 1, 45, 64, {1, 3}}};
  uint64_t seed = 4100;
  for (const FusedCase& c : cases) {
    int K = 0;
    const std::vector<int32_t> rows = make_rows(c, ++seed, &K);
    const int64_t BH = static_cast<int64_t>(c.B) * c.H;
    const int D = c.D, T = c.T;
    const std::vector<float> pi = make_pi(c, rows, K, ++seed);
    const std::vector<float> q = randn(static_cast<size_t>(BH) * T * D, ++seed, 0.8, 0.3);
    const std::vector<float> kk = randn(static_cast<size_t>(BH) * T * D, ++seed, 0.8, -0.2);
    DeviceArray<float> pi_d(pi), q_d(q), k_d(kk), S_d(static_cast<size_t>(BH) * K * D * D);
    DeviceArray<int32_t> rows_d(rows.empty() ? std::vector<int32_t>(1, -1) : rows);
    poison(S_d);
    cuda::barrier_fused_s(pi_d.get(), q_d.get(), k_d.get(), rows_d.get(), BH, c.H, T, K, D,
                          S_d.get(), nullptr);
    const std::vector<float> S = S_d.download();
    const std::string label = "B " + std::to_string(c.B) + " H " + std::to_string(c.H) + " T " +
                              std::to_string(T) + " dh " + std::to_string(D) + " K " +
                              std::to_string(K) + (c.counts.empty() ? " exact" : " counts");
    INFO(label);
    size_t bad = 0, bad_padding = 0, first_bad = 0;
    double worst_ratio = 0;  // |error| / bound, the largest
    const double rel_bound = 1.0e-3 + 1.2e-7 * T;
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int k = 0; k < K; ++k) {
        const int t = rows[(bh / c.H) * K + k];
        const size_t srow = (static_cast<size_t>(bh) * K + k) * D * D;
        for (int i = 0; i < D; ++i)
          for (int j = 0; j < D; ++j) {
            const float got = S[srow + static_cast<size_t>(i) * D + j];
            if (t < 0) {  // padding slot: exact zero
              if (!(got == 0.0f)) ++bad_padding;
              continue;
            }
            double ref = 0, mag = 0;
            for (int s = 0; s < t; ++s) {
              const double p = pi[(static_cast<size_t>(bh) * K + k) * T + s];
              const double term = p * q[(static_cast<size_t>(bh) * T + s) * D + i] *
                                  kk[(static_cast<size_t>(bh) * T + s) * D + j];
              ref += term;
              mag += std::fabs(term);
            }
            const double bound = rel_bound * mag + 1e-30;
            const double err = std::fabs(static_cast<double>(got) - ref);
            if (!(err <= bound)) {  // NaN fails too
              if (bad == 0) first_bad = srow + static_cast<size_t>(i) * D + j;
              ++bad;
            }
            worst_ratio = std::max(worst_ratio, std::isfinite(err) ? err / bound : INFINITY);
          }
      }
    INFO("elements over the bound: " << bad << " (first at " << first_bad << "), padding "
                                     "elements not zero: " << bad_padding
                                     << ", worst |err| / bound " << worst_ratio);
    CHECK(bad == 0);
    CHECK(bad_padding == 0);
    std::printf("barrier_fused_s [%s]: worst |err| / bound %.3f (bound %.2e x sum |terms|)\n",
                label.c_str(), worst_ratio, rel_bound);
    // Deterministic: a second run into a freshly poisoned buffer gives the same bits.
    poison(S_d);
    cuda::barrier_fused_s(pi_d.get(), q_d.get(), k_d.get(), rows_d.get(), BH, c.H, T, K, D,
                          S_d.get(), nullptr);
    CHECK(bit_identical(S_d.download(), S));
  }
}

TEST_CASE("fused S kernel: K = 0 writes nothing, unsupported shapes are refused",
          "[gpu][barrier_tc][barrier_fused_s]") {
  DeviceArray<float> S(16), any(16);
  DeviceArray<int32_t> rows(std::vector<int32_t>(4, -1));
  poison(S);
  const std::vector<float> before = S.download();
  cuda::barrier_fused_s(any.get(), any.get(), any.get(), rows.get(), 2, 1, 2, 0, 64, S.get(), nullptr);
  cuda::barrier_fused_s(any.get(), any.get(), any.get(), rows.get(), 0, 1, 5, 3, 32, S.get(), nullptr);
  CHECK(bit_identical(S.download(), before));
  CHECK_FALSE(cuda::barrier_fused_s_supported(128, 1));
  CHECK_FALSE(cuda::barrier_fused_s_supported(64, 70000));
  CHECK(cuda::barrier_fused_s_supported(32, 65535));
  CHECK_THROWS(cuda::barrier_fused_s(any.get(), any.get(), any.get(), rows.get(), 1, 1, 5, 3, 128,
                                     S.get(), nullptr));
}
