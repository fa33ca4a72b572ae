// The flash-style barrier forward (cuda/barrier_fused_s.cuh: barrier_flash_forward, and S from a
// materialised pi, barrier_fused_s) against float64 references on the host, computed from the
// same float inputs.  Tag [barrier-flash-fwd]; the timing case is [.bench][barrier-flash-fwd].
//
// Inputs: fresh random Qg, Qc, Kc with N(0, 1) entries (as real per-head q, k), and peaked cases
// with Qg 5 N(0, 1) (c z has standard deviation 5: the softmax puts most weight on a few s).
// Qg rows of padding slots are random too (the kernel must ignore them).
//
// Bounds (per element; "ez" bounds the error of the kernel's c z for slot k):
//   ez_k = c (2 D + 8) 2^-23 max_{s<t} sum_d |Qg_kd Kc_sd|: z from 3xTF32 (operands split into
//   TF32 hi + lo: representation error <= 3 2^-22 per product) accumulated in fp32 over 3 D / 8
//   mma steps of up to 4 roundings each (the 8 products and the accumulator, if the tensor core
//   adds pairwise), plus 3 final additions and the product by c, each <= 2^-23 of the sum of
//   |terms| (tensor cores may truncate): fewer than 2 D + 8 such steps.
//   m: |m - m_ref| <= ez + 1e-30.
//   l: relative 3 ez + 1.2e-7 (t + 8): the exponents are off by <= 2 ez (z and m), l is
//   relative to the kernel's own m (another ez), expf and the fp32 sums over t terms and the
//   online rescaling add ulps.
//   S, Qb, Kb: (1.0e-3 + 6 ez + 1.2e-7 t) x sum_s |terms| (terms pi_ks Qc_si Kc_sj, pi_ks Qc_si,
//   pi_ks Kc_sj): each term's two tensor-core operands are rounded to TF32 (round to nearest,
//   <= 2^-11 each, so <= 2^-10 + 2^-22 for the product, below 1.0e-3), pi itself is off by
//   <= ~5 ez relative (exponent and l), and the fp32 accumulation over t terms adds <= t 2^-23.
// A wrong fragment index, a wrong s (causal off by one) or a skipped tile changes an element by
// the order of its sum of |terms| (or m by O(1)), so these checks cannot pass by accident.
// Padding slots (t = -1) must give exact zeros and m = 0, l = 1; outputs are NaN-poisoned first
// (an element never written fails); a second run must be bit-identical.  The cases run with the
// statistics' s sweep in one range and forced into 2 and 3 (BLM_BARRIER_STATS_SPLITS; the
// automatic choice splits the small grids of most cases too), and with the statistics on 16- and
// 32-slot tiles (BLM_BARRIER_STATS_ROWS; automatic: 16 for K <= 16).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cublas_v2.h>

#include "cuda/attention.h"
#include "cuda/barrier_fused_s.cuh"
#include "cuda/barrier_tc.h"
#include "cuda/kernels.h"
#include "tests/catch.h"
#include "tests/gpu/barrier_test_util.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

struct FlashCase {
  int B, H, T, D;
  std::vector<int> counts;     // counted positions per sequence b (b % size); empty: exact
  double q_scale;              // Qg entries q_scale N(0, 1)
  std::vector<int32_t> fixed;  // explicit rows [B, K] (edge cases); empty: from counts
};

// rows [B, K] (counted_rows, barrier_test_util.h): sampled positions drawn with hash keys
// b * 4096 + i.
std::vector<int32_t> make_rows(int B, int T, const std::vector<int>& counts, uint64_t seed,
                               int* K_out) {
  return counted_rows(B, T, counts, seed, 4096, 0, K_out);
}

// Elements over their bound and the largest |error| / bound of one output.
struct Tally {
  size_t bad = 0, first_bad = 0;
  double worst = 0;
  void add(size_t index, double got, double ref, double bound) {
    const double err = std::fabs(got - ref);
    if (!(err <= bound)) {  // NaN fails too
      if (bad == 0) first_bad = index;
      ++bad;
    }
    worst = std::max(worst, std::isfinite(err) ? err / bound : INFINITY);
  }
};

struct FlashResult {
  std::vector<float> S, Qb, Kb, m, l;
};

struct FlashDevice {
  DeviceArray<float> Qg, Qc, Kc, S, Qb, Kb, m, l;
  DeviceArray<int32_t> rows;
  FlashResult run(int B, int H, int T, int K, int D, float c) {
    poison(S), poison(Qb), poison(Kb), poison(m), poison(l);
    cuda::barrier_flash_forward(Qg.get(), Qc.get(), Kc.get(), rows.get(), B, H, T, K, D, c,
                                S.get(), Qb.get(), Kb.get(), m.get(), l.get(), nullptr);
    return {S.download(), Qb.download(), Kb.download(), m.download(), l.download()};
  }
};

// Checks every output of slot (bh, k) against the float64 reference; padding slots against
// exact zeros, m = 0, l = 1.
struct FlashChecker {
  FlashChecker(const std::vector<float>& Qg_, const std::vector<float>& Qc_,
               const std::vector<float>& Kc_, int T_, int K_, int D_, double c_)
      : Qg(Qg_), Qc(Qc_), Kc(Kc_), T(T_), K(K_), D(D_), c(c_) {}
  const std::vector<float>&Qg, &Qc, &Kc;
  int T, K, D;
  double c;
  Tally S, Qb, Kb, m, l;
  size_t padding_bad = 0;

  void slot(const FlashResult& r, int64_t bh, int k, int t) {
    const size_t DD = static_cast<size_t>(D) * D;
    const size_t row = static_cast<size_t>(bh) * K + k;
    if (t <= 0) {
      for (size_t e = 0; e < DD; ++e) padding_bad += !(r.S[row * DD + e] == 0.0f);
      for (int d = 0; d < D; ++d)
        padding_bad += !(r.Qb[row * D + d] == 0.0f) + !(r.Kb[row * D + d] == 0.0f);
      padding_bad += !(r.m[row] == 0.0f) + !(r.l[row] == 1.0f);
      return;
    }
    const float* q = &Qg[row * D];
    const float* qc = &Qc[static_cast<size_t>(bh) * T * D];
    const float* kc = &Kc[static_cast<size_t>(bh) * T * D];
    const SoftmaxRow sm = causal_softmax_row(q, kc, t, D, c);
    const std::vector<double>& cz = sm.cz;
    const double m_ref = sm.m, l_ref = sm.l;
    const double ez = c * (2 * D + 8) * std::ldexp(1.0, -23) * sm.zmag;
    m.add(row, r.m[row], m_ref, ez + 1e-30);
    l.add(row, r.l[row], l_ref, (3 * ez + 1.2e-7 * (t + 8)) * l_ref);
    const double rel = 1.0e-3 + 6 * ez + 1.2e-7 * t;
    std::vector<double> s_ref(DD, 0.0), s_mag(DD, 0.0), qb(D, 0.0), qb_mag(D, 0.0), kb(D, 0.0),
        kb_mag(D, 0.0);
    for (int s = 0; s < t; ++s) {
      const double p = std::exp(cz[s] - m_ref) / l_ref;
      for (int i = 0; i < D; ++i) {
        const double pq = p * qc[s * D + i];
        qb[i] += pq, qb_mag[i] += std::fabs(pq);
        kb[i] += p * kc[s * D + i], kb_mag[i] += std::fabs(p * kc[s * D + i]);
        double* sr = &s_ref[static_cast<size_t>(i) * D];
        double* sm = &s_mag[static_cast<size_t>(i) * D];
        for (int j = 0; j < D; ++j) {
          const double term = pq * kc[s * D + j];
          sr[j] += term;
          sm[j] += std::fabs(term);
        }
      }
    }
    for (int d = 0; d < D; ++d) {
      Qb.add(row * D + d, r.Qb[row * D + d], qb[d], rel * qb_mag[d] + 1e-30);
      Kb.add(row * D + d, r.Kb[row * D + d], kb[d], rel * kb_mag[d] + 1e-30);
    }
    for (size_t e = 0; e < DD; ++e) S.add(row * DD + e, r.S[row * DD + e], s_ref[e], rel * s_mag[e] + 1e-30);
  }
};

std::string tally_text(const char* name, const Tally& t) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s: %zu over the bound (first at %zu), worst |err|/bound %.3f",
                name, t.bad, t.first_bad, t.worst);
  return buf;
}

// The cases through barrier_flash_forward, under the BLM_BARRIER_S, BLM_BARRIER_STATS_SPLITS and
// BLM_BARRIER_STATS_ROWS choices in force.
void check_flash_forward(const std::vector<FlashCase>& cases);

// Every case below, then `extra`.
void check_flash_forward_cases(const std::vector<FlashCase>& extra = {}) {
  // T 1, 2: padding-only and a slot at t = 1 (one s); T 3: one slot; 77, 200: T and K not
  // multiples of the 32-slot or 32-step tiles; 256 exact (K 254, the (b) shape's); 300 with
  // K 17 (sampled, per-sequence counts with padding slots in the same tile); H > 1 (b = bh / H);
  // D 32 and 64; peaked softmaxes (q_scale 5).
  std::vector<FlashCase> cases = {
      {1, 1, 1, 32, {}, 1.0, {-1}},
      {2, 1, 2, 64, {}, 1.0, {1, -1, -1, -1}},
      {2, 1, 3, 32, {}, 1.0, {}},
      {1, 2, 77, 64, {}, 1.0, {}},
      {2, 1, 200, 32, {}, 1.0, {}},
      {1, 2, 256, 64, {}, 1.0, {}},
      {3, 2, 300, 64, {17, 5, 12}, 1.0, {}},
      {2, 3, 300, 32, {17, 1}, 1.0, {}},
      {2, 2, 130, 64, {}, 5.0, {}},
      {3, 1, 190, 32, {40, 7, 33}, 5.0, {}}};
  cases.insert(cases.end(), extra.begin(), extra.end());
  check_flash_forward(cases);
}

void check_flash_forward(const std::vector<FlashCase>& cases) {
  uint64_t seed = 7100;
  for (const FlashCase& fc : cases) {
    int K = 0;
    std::vector<int32_t> rows;
    if (!fc.fixed.empty()) {
      rows = fc.fixed;
      K = static_cast<int>(rows.size()) / fc.B;
    } else {
      rows = make_rows(fc.B, fc.T, fc.counts, ++seed, &K);
    }
    const int64_t BH = static_cast<int64_t>(fc.B) * fc.H;
    const int D = fc.D, T = fc.T;
    const float c = 1.0f / std::sqrt(static_cast<float>(D));
    const std::vector<float> Qg = randn(static_cast<size_t>(BH) * K * D, ++seed, fc.q_scale);
    const std::vector<float> Qc = randn(static_cast<size_t>(BH) * T * D, ++seed);
    const std::vector<float> Kc = randn(static_cast<size_t>(BH) * T * D, ++seed);
    const size_t slots = static_cast<size_t>(BH) * K;
    FlashDevice dev{DeviceArray<float>(Qg), DeviceArray<float>(Qc), DeviceArray<float>(Kc),
                    DeviceArray<float>(slots * D * D), DeviceArray<float>(slots * D),
                    DeviceArray<float>(slots * D), DeviceArray<float>(slots),
                    DeviceArray<float>(slots), DeviceArray<int32_t>(rows)};
    const FlashResult r = dev.run(fc.B, fc.H, T, K, D, c);
    FlashChecker chk{Qg, Qc, Kc, T, K, D, static_cast<double>(c)};
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int k = 0; k < K; ++k) chk.slot(r, bh, k, rows[(bh / fc.H) * K + k]);
    const std::string label = "B " + std::to_string(fc.B) + " H " + std::to_string(fc.H) + " T " +
                              std::to_string(T) + " D " + std::to_string(D) + " K " +
                              std::to_string(K) + (fc.counts.empty() ? " exact" : " sampled") +
                              (fc.q_scale > 1 ? " peaked" : "");
    INFO(label);
    INFO(tally_text("S", chk.S) << "; " << tally_text("Qb", chk.Qb) << "; "
                                << tally_text("Kb", chk.Kb) << "; " << tally_text("m", chk.m)
                                << "; " << tally_text("l", chk.l) << "; padding values wrong "
                                << chk.padding_bad);
    CHECK(chk.S.bad == 0);
    CHECK(chk.Qb.bad == 0);
    CHECK(chk.Kb.bad == 0);
    CHECK(chk.m.bad == 0);
    CHECK(chk.l.bad == 0);
    CHECK(chk.padding_bad == 0);
    std::printf("barrier_flash_forward [%s]: worst |err|/bound S %.3f Qb %.3f Kb %.3f m %.3f l %.3f\n",
                label.c_str(), chk.S.worst, chk.Qb.worst, chk.Kb.worst, chk.m.worst, chk.l.worst);
    // Deterministic: a second run into freshly poisoned outputs gives the same bits.
    const FlashResult again = dev.run(fc.B, fc.H, T, K, D, c);
    CHECK(bit_identical(again.S, r.S));
    CHECK(bit_identical(again.Qb, r.Qb));
    CHECK(bit_identical(again.Kb, r.Kb));
    CHECK(bit_identical(again.m, r.m));
    CHECK(bit_identical(again.l, r.l));
  }
}

// barrier_flash_forward with `name` set to the bad `value` refuses (ConfigError) before it
// launches anything.
void check_forward_refuses(const char* name, const char* value) {
  ScopedEnv env(name, value);
  INFO(name << " '" << value << "'");
  DeviceArray<float> any(4096);
  DeviceArray<int32_t> rows(std::vector<int32_t>{1, 2, 3});
  float* a = any.get();
  CHECK_THROWS_AS(cuda::barrier_flash_forward(a, a, a, rows.get(), 1, 1, 5, 3, 32, 0.1f, a, a, a,
                                              a, a, nullptr),
                  ConfigError);
}

}  // namespace

TEST_CASE("flash barrier forward: S, Qb, Kb, m, l match float64 within the TF32 bound",
          "[gpu][barrier-flash-fwd]") {
  ScopedEnv s_kernel("BLM_BARRIER_S", "mma");
  check_flash_forward_cases();
}

// The S product on wgmma (head size 64; the D 32 cases run the mma.sync kernel either way):
// the same cases, the same bound (same TF32 operands; fp32 logits).
// With rows of T 1024 too (the (a) shape's 64 sampled positions, and every position: 32 s tiles).
TEST_CASE("flash barrier forward, S on wgmma: the same cases within the same bound",
          "[gpu][barrier-flash-fwd][wgmma]") {
  ScopedEnv s_kernel("BLM_BARRIER_S", "wgmma");
  check_flash_forward_cases({{1, 2, 1024, 64, {64}, 1.0, {}}, {1, 1, 1024, 64, {}, 1.0, {}}});
}

// The wgmma S kernel with 3 positions a block (BLM_BARRIER_S_SLOTS=3, the automatic choice for
// the exact barrier: 168 registers, three blocks an SM; A built per k-step into two register
// sets): the same cases within the same bound, and the same bits as 4 positions a block (each
// position's S takes the same operands in the same order), on an exact and a sampled shape
// whose slot counts are not multiples of 3.
TEST_CASE("flash barrier forward, S on wgmma with 3 slots a block: the same cases, the same bits",
          "[gpu][barrier-flash-fwd][wgmma]") {
  ScopedEnv s_kernel("BLM_BARRIER_S", "wgmma");
  {
    ScopedEnv slots("BLM_BARRIER_S_SLOTS", "3");
    check_flash_forward_cases();
  }
  uint64_t seed = 9100;
  for (const FlashCase& fc : {FlashCase{2, 3, 300, 64, {}, 1.0, {}},
                              FlashCase{3, 2, 500, 64, {17, 40, 4}, 1.0, {}}}) {
    int K = 0;
    const std::vector<int32_t> rows = make_rows(fc.B, fc.T, fc.counts, ++seed, &K);
    const int64_t BH = static_cast<int64_t>(fc.B) * fc.H;
    const size_t slots = static_cast<size_t>(BH) * K;
    const size_t rows_d = static_cast<size_t>(BH) * fc.T * fc.D;
    FlashDevice dev{DeviceArray<float>(randn(slots * fc.D, ++seed)),
                    DeviceArray<float>(randn(rows_d, ++seed)),
                    DeviceArray<float>(randn(rows_d, ++seed)),
                    DeviceArray<float>(slots * fc.D * fc.D), DeviceArray<float>(slots * fc.D),
                    DeviceArray<float>(slots * fc.D), DeviceArray<float>(slots),
                    DeviceArray<float>(slots), DeviceArray<int32_t>(rows)};
    const float c = 1.0f / std::sqrt(static_cast<float>(fc.D));
    FlashResult four, three;
    {
      ScopedEnv slots_env("BLM_BARRIER_S_SLOTS", "4");
      four = dev.run(fc.B, fc.H, fc.T, K, fc.D, c);
    }
    {
      ScopedEnv slots_env("BLM_BARRIER_S_SLOTS", "3");
      three = dev.run(fc.B, fc.H, fc.T, K, fc.D, c);
    }
    INFO("B " << fc.B << " H " << fc.H << " T " << fc.T << " K " << K);
    CHECK(bit_identical(three.S, four.S));
    CHECK(bit_identical(three.Qb, four.Qb));
    CHECK(bit_identical(three.m, four.m));
  }
  {  // automatic: 3 for the exact barrier's dense slots, 4 for sampled positions
    ScopedEnv slots_env("BLM_BARRIER_S_SLOTS", nullptr);
    CHECK(cuda::barrier_s_wgmma_slots(254, 256) == 3);
    CHECK(cuda::barrier_s_wgmma_slots(64, 1024) == 4);
  }
  {
    ScopedEnv slots_env("BLM_BARRIER_S_SLOTS", "4");
    CHECK(cuda::barrier_s_wgmma_slots(254, 256) == 4);
  }
  ScopedEnv bad("BLM_BARRIER_S_SLOTS", "5");
  CHECK_THROWS_AS(cuda::barrier_s_wgmma_slots(254, 256), ConfigError);
}

TEST_CASE("flash barrier forward: BLM_BARRIER_S picks the S kernel; other values are refused",
          "[gpu][barrier-flash-fwd]") {
  {
    ScopedEnv s_kernel("BLM_BARRIER_S", nullptr);  // auto: wgmma for long rows at D = 64 only
    CHECK(cuda::barrier_s_on_wgmma(64, cuda::kBarrierSWgmmaMinT));
    CHECK_FALSE(cuda::barrier_s_on_wgmma(64, cuda::kBarrierSWgmmaMinT - 1));
    CHECK_FALSE(cuda::barrier_s_on_wgmma(32, 4096));
  }
  {
    ScopedEnv s_kernel("BLM_BARRIER_S", "mma");
    CHECK_FALSE(cuda::barrier_s_on_wgmma(64, 4096));
  }
  {
    ScopedEnv s_kernel("BLM_BARRIER_S", "wgmma");
    CHECK(cuda::barrier_s_on_wgmma(64, 2));
    CHECK_FALSE(cuda::barrier_s_on_wgmma(32, 4096));
  }
  for (const char* removed_or_unknown : {"gemm", "tensor"}) {  // gemm: removed 2026-11-30
    ScopedEnv s_kernel("BLM_BARRIER_S", removed_or_unknown);
    CHECK_THROWS_AS(cuda::barrier_s_on_wgmma(64, 256), ConfigError);
  }
}

// The statistics kernel's sweep split over s (flash decoding: partials of m, l, Qb, Kb per range
// of s, in S's memory, then combined) forced to 2 and 3 ranges: every case above within the same
// bound (the combine's few extra roundings are far inside it), and the second run of each case
// bit-identical (deterministic: the partials are combined in a fixed order).  Empty splits: T 1,
// 2, 3 (one s tile: the blocks of splits 1, 2 sweep nothing), sequences whose counts are small,
// and the two fixed-row shapes below (T 150 = 4 x 32 + 22: 5 s tiles in ranges of 96 / 64 s;
// sequence 1's t <= 40, so its blocks of every split but the first see no s < t; slots with
// t 1, 2 next to t 149 in one block).
TEST_CASE("flash barrier forward, statistics split over s: the same cases within the same bound",
          "[gpu][barrier-flash-fwd]") {
  ScopedEnv s_kernel("BLM_BARRIER_S", "mma");
  const std::vector<FlashCase> empty_splits = {
      {2, 2, 150, 64, {}, 1.0, {1, 2, 63, 64, 65, 149, 2, 5, 33, 40, -1, -1}},
      {2, 1, 150, 32, {}, 5.0, {1, 70, 128, 129, -1, 149, 3, 31, 32, -1, -1, -1}}};
  for (const char* splits : {"2", "3"}) {
    ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", splits);
    INFO("BLM_BARRIER_STATS_SPLITS " << splits);
    check_flash_forward_cases(empty_splits);
  }
}

TEST_CASE("flash barrier forward: BLM_BARRIER_STATS_SPLITS forces the statistics split; other "
          "values are refused",
          "[gpu][barrier-flash-fwd]") {
  {
    ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", nullptr);  // automatic
    CHECK(cuda::barrier_stats_splits(384, 254, 256, 64) == 1);  // (b): 8 x 384 blocks
    CHECK(cuda::barrier_stats_splits(192, 8, 100, 64) == 1);    // T <= 128: one range
    const int a = cuda::barrier_stats_splits(192, 8, 1024, 64);  // 192 blocks: depends on SMs
    CHECK(a >= 1);
    CHECK(a <= 8);  // ranges of at least 128 s
  }
  {
    ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", "");  // empty: automatic
    CHECK(cuda::barrier_stats_splits(384, 254, 256, 64) == 1);
  }
  {
    ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", "3");
    CHECK(cuda::barrier_stats_splits(384, 254, 256, 64) == 3);
    CHECK(cuda::barrier_stats_splits(1, 1, 2, 32) == 3);  // forced even past the s tiles
  }
  {
    ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", "1000");  // capped by the records' room in S
    CHECK(cuda::barrier_stats_splits(1, 1, 1024, 32) == 32 * 32 / (2 * 32 + 2));
    CHECK(cuda::barrier_stats_splits(1, 1, 1024, 64) == 64 * 64 / (2 * 64 + 2));
  }
  for (const char* bad : {"1.5", "2x", "0", "-1", " 3", "auto"}) {
    ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", bad);
    INFO("BLM_BARRIER_STATS_SPLITS '" << bad << "'");
    CHECK_THROWS_AS(cuda::barrier_stats_splits(1, 1, 256, 64), ConfigError);
  }
  // barrier_flash_forward reads it too.
  check_forward_refuses("BLM_BARRIER_STATS_SPLITS", "1.5");
}

namespace {

// Small K, the shapes of the 16-slot statistics tiles (K 1, 5, the sampled estimator's 8 and
// 16): T not a multiple of 32, D 32 and 64, H > 1, sequences with fewer counted positions than K
// (padding slots in the tile), peaked softmaxes; and fixed rows: slots at t 1, 2 next to t 149 in
// one tile, padding (-1 and 0) between counted slots, t unsorted; T 97 with K 16: t 96 ends on
// the third s tile, t 31, 32, 33 and 63, 64, 65 straddle tile edges, the fourth tile is past
// every t (with 3 splits of 64 s, the last split of each block is empty).
std::vector<FlashCase> small_k_cases() {
  return {{2, 2, 77, 64, {1}, 1.0, {}},
          {3, 1, 150, 32, {5, 2, 4}, 5.0, {}},
          {2, 3, 200, 64, {8, 3}, 1.0, {}},
          {2, 2, 333, 32, {8}, 1.0, {}},
          {2, 1, 100, 32, {16, 9}, 1.0, {}},
          {1, 2, 333, 64, {16}, 5.0, {}},
          {2, 1, 150, 64, {}, 1.0, {1, 149, -1, 2, 33, 0, 64, 65, 3, -1, 31, 32, -1, -1, 40, 1}},
          {1, 3, 97, 32, {}, 5.0, {96, 1, 2, 3, 31, 32, 33, 63, 64, 65, 95, -1, 50, 10, 20, 30}}};
}

}  // namespace

// The statistics on 16-slot tiles (one m-tile; the logits' d range split over warp pairs and
// added by the softmax) forced at every K: the small-K cases, and the cases above, whose K of 17
// to 254 make grids of several 16-slot tiles per sequence-head (K 17: a second tile of one slot
// and 15 of padding), each with the sweep in one range and split into 2 and 3 (partial records
// of 16-slot blocks, combined).  The same float64 bounds: only the logits' summation order
// differs from the 32-slot tiles.
TEST_CASE("flash barrier forward, statistics on 16-slot tiles: the same cases within the same "
          "bound",
          "[gpu][barrier-flash-fwd]") {
  ScopedEnv s_kernel("BLM_BARRIER_S", "mma");
  ScopedEnv tiles("BLM_BARRIER_STATS_ROWS", "16");
  for (const char* splits : {"1", "2", "3"}) {
    ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", splits);
    INFO("BLM_BARRIER_STATS_ROWS 16, BLM_BARRIER_STATS_SPLITS " << splits);
    check_flash_forward_cases(small_k_cases());
  }
}

// The small-K cases under the automatic tile height (16 at these K) and automatic split, and on
// 32-slot tiles forced (16 to 31 rows of padding a tile), one range and 3.
TEST_CASE("flash barrier forward, small K: automatic and 32-slot statistics tiles within the "
          "same bound",
          "[gpu][barrier-flash-fwd]") {
  ScopedEnv s_kernel("BLM_BARRIER_S", "mma");
  for (const char* tile_rows : {"auto", "32"})
    for (const char* splits : {static_cast<const char*>(nullptr), "1", "3"}) {
      ScopedEnv tiles("BLM_BARRIER_STATS_ROWS", tile_rows);
      ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", splits);
      INFO("BLM_BARRIER_STATS_ROWS " << tile_rows << ", BLM_BARRIER_STATS_SPLITS "
                                     << (splits ? splits : "automatic"));
      check_flash_forward(small_k_cases());
    }
}

TEST_CASE("flash barrier forward: BLM_BARRIER_STATS_ROWS picks the statistics tile height; other "
          "values are refused",
          "[gpu][barrier-flash-fwd]") {
  for (const char* automatic : {static_cast<const char*>(nullptr), "", "auto"}) {
    ScopedEnv tiles("BLM_BARRIER_STATS_ROWS", automatic);
    INFO("BLM_BARRIER_STATS_ROWS " << (automatic ? automatic : "unset"));
    CHECK(cuda::barrier_stats_rows(1) == 16);
    CHECK(cuda::barrier_stats_rows(8) == 16);
    CHECK(cuda::barrier_stats_rows(16) == 16);
    CHECK(cuda::barrier_stats_rows(17) == 32);
    CHECK(cuda::barrier_stats_rows(254) == 32);
  }
  {
    ScopedEnv tiles("BLM_BARRIER_STATS_ROWS", "16");
    CHECK(cuda::barrier_stats_rows(1) == 16);
    CHECK(cuda::barrier_stats_rows(254) == 16);
  }
  {
    ScopedEnv tiles("BLM_BARRIER_STATS_ROWS", "32");
    CHECK(cuda::barrier_stats_rows(1) == 32);
    CHECK(cuda::barrier_stats_rows(254) == 32);
  }
  // The automatic split counts blocks of the tile height in use: BH sequence-heads of K = 32
  // slots are BH blocks of 32 slots or 2 BH of 16.  With BH half the split's target of 4 blocks
  // per SM, 32-slot tiles take 2 ranges of s and 16-slot tiles 1.
  {
    ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", nullptr);
    int device = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t BH = 2 * static_cast<int64_t>(sms);
    {
      ScopedEnv tiles("BLM_BARRIER_STATS_ROWS", "32");
      CHECK(cuda::barrier_stats_splits(BH, 32, 1024, 64) == 2);
    }
    {
      ScopedEnv tiles("BLM_BARRIER_STATS_ROWS", "16");
      CHECK(cuda::barrier_stats_splits(BH, 32, 1024, 64) == 1);
    }
  }
  for (const char* bad : {"8", "0", "64", "16 ", " 32", "AUTO", "1.5"}) {
    ScopedEnv tiles("BLM_BARRIER_STATS_ROWS", bad);
    INFO("BLM_BARRIER_STATS_ROWS '" << bad << "'");
    CHECK_THROWS_AS(cuda::barrier_stats_rows(8), ConfigError);
    CHECK_THROWS_AS(cuda::barrier_stats_splits(1, 8, 256, 64), ConfigError);
  }
  // barrier_flash_forward reads it too.
  check_forward_refuses("BLM_BARRIER_STATS_ROWS", "24");
}

TEST_CASE("flash barrier forward: K = 0 writes nothing, unsupported shapes are refused",
          "[gpu][barrier-flash-fwd]") {
  DeviceArray<float> out(64), any(64);
  DeviceArray<int32_t> rows(std::vector<int32_t>(4, -1));
  poison(out);
  const std::vector<float> before = out.download();
  float* o = out.get();
  cuda::barrier_flash_forward(any.get(), any.get(), any.get(), rows.get(), 2, 1, 5, 0, 64, 0.125f,
                              o, o, o, o, o, nullptr);
  cuda::barrier_flash_forward(any.get(), any.get(), any.get(), rows.get(), 0, 1, 5, 3, 32, 0.125f,
                              o, o, o, o, o, nullptr);
  cuda::barrier_fused_s(any.get(), any.get(), any.get(), rows.get(), 2, 1, 2, 0, 64, o, nullptr);
  CHECK(bit_identical(out.download(), before));
  CHECK_FALSE(cuda::barrier_fused_s_supported(128, 1));
  CHECK_FALSE(cuda::barrier_fused_s_supported(64, 70000));
  CHECK(cuda::barrier_fused_s_supported(32, 65535));
  CHECK_THROWS(cuda::barrier_flash_forward(any.get(), any.get(), any.get(), rows.get(), 1, 1, 5,
                                           3, 128, 0.1f, o, o, o, o, o, nullptr));
  CHECK_THROWS(cuda::barrier_fused_s(any.get(), any.get(), any.get(), rows.get(), 1, 1, 5, 3, 128,
                                     o, nullptr));
  // A misaligned tensor (cp.async moves 16-byte pieces) is refused, not read wrongly.
  CHECK_THROWS(cuda::barrier_flash_forward(any.get(), any.get() + 1, any.get(), rows.get(), 1, 1,
                                           5, 3, 32, 0.1f, o, o, o, o, o, nullptr));
}

// S from a materialised pi (barrier_fused_s, the opt-in of barrier_tc): pi rows are softmaxes of
// random logits over s < t.  Bound (1.0e-3 + 1.2e-7 T) x sum_s |pi_ks Qc_si Kc_sj|: the operands
// tf32(pi q_i) and tf32(k_j) are each within 2^-11 (the fp32 product pi q adds 2^-24), the fp32
// accumulation <= T 2^-23.
TEST_CASE("fused S = pi P from a materialised pi matches float64 within the TF32 bound",
          "[gpu][barrier_tc][barrier_fused_s][barrier-flash-fwd]") {
  const std::vector<FlashCase> cases = {{1, 1, 3, 32, {}, 1, {}},
                                        {2, 3, 100, 64, {1, 70, 17}, 1, {}},
                                        {3, 2, 257, 32, {5, 200, 1}, 1, {}},
                                        {1, 2, 257, 64, {}, 1, {}}};
  uint64_t seed = 4100;
  for (const FlashCase& fc : cases) {
    int K = 0;
    const std::vector<int32_t> rows = make_rows(fc.B, fc.T, fc.counts, ++seed, &K);
    const int64_t BH = static_cast<int64_t>(fc.B) * fc.H;
    const int D = fc.D, T = fc.T;
    std::vector<float> pi(static_cast<size_t>(BH) * K * T, 0.0f);
    const std::vector<float> z = randn(pi.size(), ++seed, 1.5);
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int k = 0; k < K; ++k) {
        const int t = rows[(bh / fc.H) * K + k];
        const size_t base = (static_cast<size_t>(bh) * K + k) * T;
        double l = 0;
        for (int s = 0; s < t; ++s) l += std::exp(static_cast<double>(z[base + s]));
        for (int s = 0; s < t; ++s)
          pi[base + s] = static_cast<float>(std::exp(static_cast<double>(z[base + s])) / l);
      }
    const std::vector<float> q = randn(static_cast<size_t>(BH) * T * D, ++seed);
    const std::vector<float> kk = randn(static_cast<size_t>(BH) * T * D, ++seed);
    DeviceArray<float> pi_d(pi), q_d(q), k_d(kk), S_d(static_cast<size_t>(BH) * K * D * D);
    DeviceArray<int32_t> rows_d(rows);
    poison(S_d);
    cuda::barrier_fused_s(pi_d.get(), q_d.get(), k_d.get(), rows_d.get(), BH, fc.H, T, K, D,
                          S_d.get(), nullptr);
    const std::vector<float> S = S_d.download();
    Tally tally;
    size_t padding_bad = 0;
    const double rel = 1.0e-3 + 1.2e-7 * T;
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int k = 0; k < K; ++k) {
        const int t = rows[(bh / fc.H) * K + k];
        const size_t srow = (static_cast<size_t>(bh) * K + k) * D * D;
        for (int i = 0; i < D; ++i)
          for (int j = 0; j < D; ++j) {
            const size_t e = srow + static_cast<size_t>(i) * D + j;
            if (t < 0) {
              padding_bad += !(S[e] == 0.0f);
              continue;
            }
            double ref = 0, mag = 0;
            for (int s = 0; s < t; ++s) {
              const double term = static_cast<double>(pi[(static_cast<size_t>(bh) * K + k) * T + s]) *
                                  q[(static_cast<size_t>(bh) * T + s) * D + i] *
                                  kk[(static_cast<size_t>(bh) * T + s) * D + j];
              ref += term;
              mag += std::fabs(term);
            }
            tally.add(e, S[e], ref, rel * mag + 1e-30);
          }
      }
    INFO("B " << fc.B << " H " << fc.H << " T " << T << " D " << D << " K " << K << ": "
              << tally_text("S", tally) << ", padding not zero " << padding_bad);
    CHECK(tally.bad == 0);
    CHECK(padding_bad == 0);
    std::printf("barrier_fused_s [T %d D %d K %d]: worst |err|/bound %.3f\n", T, D, K, tally.worst);
    poison(S_d);
    cuda::barrier_fused_s(pi_d.get(), q_d.get(), k_d.get(), rows_d.get(), BH, fc.H, T, K, D,
                          S_d.get(), nullptr);
    CHECK(bit_identical(S_d.download(), S));
  }
}

namespace {

// A device array of n random values: 16 Mi fresh N(0, 1) values uploaded once and repeated
// (cheap for the GiB-sized operands of the cuBLAS product; never zeros).
DeviceArray<float> random_device(size_t n, uint64_t seed) {
  const size_t piece = std::min<size_t>(n, size_t{1} << 24);
  const std::vector<float> h = randn(piece, seed);
  DeviceArray<float> a(n);
  for (size_t off = 0; off < n; off += piece)
    CUDA_CHECK(cudaMemcpy(a.get() + off, h.data(), std::min(piece, n - off) * sizeof(float),
                          cudaMemcpyHostToDevice));
  return a;
}

}  // namespace

TEST_CASE("flash barrier forward: timing at (b) and (a) against the present path",
          "[.bench][barrier-flash-fwd]") {
  struct Shape {
    const char* name;
    int B, H, T, D, K;  // K = T - 2: exact; else sampled K positions per sequence
  };
  cublasHandle_t blas = cuda::create_cublas(nullptr);
  for (const Shape& sh : {Shape{"(b)", 64, 6, 256, 64, 254}, Shape{"(a)", 16, 12, 1024, 64, 64}}) {
    const bool exact = sh.K == sh.T - 2;
    int K = 0;
    const std::vector<int32_t> rows =
        make_rows(sh.B, sh.T, exact ? std::vector<int>{} : std::vector<int>{sh.K}, 31, &K);
    REQUIRE(K == sh.K);
    const int64_t BH = static_cast<int64_t>(sh.B) * sh.H;
    const int D = sh.D, T = sh.T;
    const size_t slots = static_cast<size_t>(BH) * K, DD = static_cast<size_t>(D) * D;
    double sum_t = 0;  // sum over slots of t: the causal length of each S row
    for (int32_t t : rows) sum_t += std::max(t, 0);
    sum_t *= sh.H;
    const double flops_causal = 2.0 * sum_t * DD;
    const double flops_full = 2.0 * slots * T * DD;

    FlashDevice dev{random_device(slots * D, 41), random_device(BH * T * D, 42),
                    random_device(BH * T * D, 43), DeviceArray<float>(slots * DD),
                    DeviceArray<float>(slots * D), DeviceArray<float>(slots * D),
                    DeviceArray<float>(slots), DeviceArray<float>(slots),
                    DeviceArray<int32_t>(rows)};
    const float c = 1.0f / std::sqrt(static_cast<float>(D));
    auto flash_forward = [&] {
      cuda::barrier_flash_forward(dev.Qg.get(), dev.Qc.get(), dev.Kc.get(), dev.rows.get(), sh.B,
                                  sh.H, T, K, D, c, dev.S.get(), dev.Qb.get(), dev.Kb.get(),
                                  dev.m.get(), dev.l.get(), nullptr);
    };
    float flash = 0, flash_wgmma = 0;
    {
      ScopedEnv s_kernel("BLM_BARRIER_S", "mma");
      flash = mean_ms(flash_forward);
    }
    {
      ScopedEnv s_kernel("BLM_BARRIER_S", "wgmma");
      flash_wgmma = mean_ms(flash_forward);
    }
    float flash_wgmma3 = 0;
    {
      ScopedEnv s_kernel("BLM_BARRIER_S", "wgmma");
      ScopedEnv slots("BLM_BARRIER_S_SLOTS", "3");
      flash_wgmma3 = mean_ms(flash_forward);
    }
    std::printf("flash forward %s: S on mma.sync %.3f ms, S on wgmma %.3f ms (%.1f TFLOP/s on the "
                "causal S count), with 3 slots a block %.3f ms (%.1f)\n",
                sh.name, flash, flash_wgmma, flops_causal / flash_wgmma * 1e-9, flash_wgmma3,
                flops_causal / flash_wgmma3 * 1e-9);
    // The statistics' s sweep in one range against the automatic split (same S kernel).
    float one_range = 0;
    {
      ScopedEnv s_kernel("BLM_BARRIER_S", "wgmma");
      ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", "1");
      one_range = mean_ms(flash_forward);
    }
    std::printf("flash forward %s, S on wgmma: statistics in %d range(s) (automatic) %.3f ms, in "
                "one range %.3f ms\n",
                sh.name, cuda::barrier_stats_splits(BH, K, T, D), flash_wgmma, one_range);
    // S kernel alone from a materialised (random) pi: the flash cost minus m, l, Qb, Kb and the
    // logit recomputation.
    DeviceArray<float> pi = random_device(slots * T, 44);
    const float fused_s = mean_ms([&] {
      cuda::barrier_fused_s(pi.get(), dev.Qc.get(), dev.Kc.get(), dev.rows.get(), BH, sh.H, T, K,
                            D, dev.S.get(), nullptr);
    });
    // The present path's S product alone: cuBLAS TF32, S [K, D^2] = pi [K, T] Pm [T, D^2] per bh
    // (column-major: S^T = Pm^T pi^T).
    float gemm = 0;
    {
      DeviceArray<float> Pm = random_device(static_cast<size_t>(BH) * T * DD, 45);
      const float one = 1.0f, zero = 0.0f;
      gemm = mean_ms([&] {
        const cublasStatus_t st = cublasGemmStridedBatchedEx(
            blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(DD), K, T, &one, Pm.get(), CUDA_R_32F,
            static_cast<int>(DD), static_cast<long long>(T) * DD, pi.get(), CUDA_R_32F, T,
            static_cast<long long>(K) * T, &zero, dev.S.get(), CUDA_R_32F, static_cast<int>(DD),
            static_cast<long long>(K) * DD, static_cast<int>(BH), CUBLAS_COMPUTE_32F_FAST_TF32,
            CUBLAS_GEMM_DEFAULT);
        REQUIRE(st == CUBLAS_STATUS_SUCCESS);
      });
    }
    // The present forward through barrier_tc (BLM_BARRIER_FUSED_S unset): extract, centre,
    // outer, Z, pi, Qb, Kb, S on cuBLAS TF32, then the warp LU (log det, phi) - more than the
    // flash kernel's work by the extract/centre/LU steps.
    float present = 0;
    {
      ScopedEnv fused_s("BLM_BARRIER_FUSED_S", nullptr);
      const cuda::AttentionShape s{sh.B, T, sh.H, D};
      const size_t d = static_cast<size_t>(sh.H) * D, N = static_cast<size_t>(sh.B) * T;
      DeviceArray<float> qkv = random_device(N * 3 * d, 46);
      std::vector<uint8_t> mask_h(N, 0);
      for (int b = 0; b < sh.B; ++b)
        for (int k = 0; k < K; ++k)
          if (rows[static_cast<size_t>(b) * K + k] >= 0)
            mask_h[static_cast<size_t>(b) * T + rows[static_cast<size_t>(b) * K + k]] = 1;
      DeviceArray<uint8_t> mask(mask_h);
      DeviceArray<float> ld(BH * T), phi(BH * T);
      DeviceArray<char> ws(cuda::barrier_tc_workspace_bytes(s, K));
      present = mean_ms([&] {
        cuda::barrier_forward_tc(s, qkv.get(), exact ? nullptr : mask.get(), K, 1e-4, ld.get(),
                                 phi.get(), ws.get(), true, blas, nullptr);
      });
    }
    std::printf(
        "flash forward %s B %d H %d T %d D %d K %d: flash %.3f ms (%.1f TFLOP/s on the causal S "
        "count %.3g); S from stored pi %.3f ms (%.1f TFLOP/s); present: cuBLAS TF32 S product "
        "alone %.3f ms (%.1f TFLOP/s of its full-T %.3g flops, %.1f causal), whole barrier_forward_tc "
        "%.3f ms\n",
        sh.name, sh.B, sh.H, T, D, K, flash, flops_causal / flash * 1e-9, flops_causal, fused_s,
        flops_causal / fused_s * 1e-9, gemm, flops_full / gemm * 1e-9, flops_full,
        flops_causal / gemm * 1e-9, present);
    CHECK(flash > 0);
  }
  cuda::destroy_cublas(blas);
}

// The statistics' tile height at the sampled estimator's K (B 16 H 12 T 1024 D 64, K 8 and 16):
// the whole forward (S on wgmma, automatic split) with 16- and 32-slot statistics tiles; the S
// kernel is the same in both, so the difference is the statistics kernel's (and its combine's).
TEST_CASE("flash barrier forward: timing of the statistics on 16- against 32-slot tiles",
          "[.bench][barrier-flash-fwd]") {
  const int B = 16, H = 12, T = 1024, D = 64;
  const int64_t BH = static_cast<int64_t>(B) * H;
  const float c = 1.0f / std::sqrt(static_cast<float>(D));
  ScopedEnv s_kernel("BLM_BARRIER_S", "wgmma");
  ScopedEnv stats("BLM_BARRIER_STATS_SPLITS", nullptr);
  for (const int count : {8, 16}) {
    int K = 0;
    const std::vector<int32_t> rows = make_rows(B, T, {count}, 31, &K);
    REQUIRE(K == count);
    const size_t slots = static_cast<size_t>(BH) * K;
    FlashDevice dev{random_device(slots * D, 41), random_device(BH * T * D, 42),
                    random_device(BH * T * D, 43), DeviceArray<float>(slots * D * D),
                    DeviceArray<float>(slots * D), DeviceArray<float>(slots * D),
                    DeviceArray<float>(slots), DeviceArray<float>(slots),
                    DeviceArray<int32_t>(rows)};
    auto flash_forward = [&] {
      cuda::barrier_flash_forward(dev.Qg.get(), dev.Qc.get(), dev.Kc.get(), dev.rows.get(), B, H,
                                  T, K, D, c, dev.S.get(), dev.Qb.get(), dev.Kb.get(),
                                  dev.m.get(), dev.l.get(), nullptr);
    };
    float ms[2] = {0, 0};
    int splits[2] = {0, 0};
    const char* heights[2] = {"16", "32"};
    for (int i = 0; i < 2; ++i) {
      ScopedEnv tiles("BLM_BARRIER_STATS_ROWS", heights[i]);
      splits[i] = cuda::barrier_stats_splits(BH, K, T, D);
      ms[i] = mean_ms(flash_forward, 20);
    }
    std::printf("flash forward B %d H %d T %d D %d K %d: statistics on 16-slot tiles %.3f ms (%d "
                "range(s) of s), on 32-slot tiles %.3f ms (%d)\n",
                B, H, T, D, K, ms[0], splits[0], ms[1], splits[1]);
    CHECK(ms[0] > 0);
  }
}
