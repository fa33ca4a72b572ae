// Inputs, masks and host references shared by the barrier pipeline tests (test_barrier_tc.cpp,
// test_barrier_flash.cpp, test_barrier_fused_s.cpp, test_barrier_flash_bwd.cpp):
//   - barrier_inputs: qkv [B*T, 3d] with q, k = 0.5 N(0, 1) + a per-coordinate offset shared by
//     all positions (so the centring matters);
//   - counted positions: per-sequence masks [B, T] (count_mask, barrier_mask, DeviceMask) and the
//     flash kernels' compact row lists [B, K] (counted_rows), both drawn by a seeded shuffle;
//   - the per-position fp32 kernels (cuda/barrier.cu, tested against fp64 in test_barrier.cu) as
//     the reference of the matrix-product pipelines: log det, phi and the dq, dk they add, and
//     the check of a pipeline's results against a reference (relative error of each tensor, v
//     block untouched);
//   - the float64 causal softmax row of one slot (scaled logits, max, sum), as the flash kernels'
//     references need it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/rng.h"
#include "cuda/attention.h"
#include "cuda/barrier_tc.h"
#include "cuda/kernels.h"
#include "tests/gpu/gpu_test_util.h"

namespace blm {
namespace gputest {

// qkv [B*T, 3d] (d = H dh): every entry 0.5 N(0, 1) (seed), plus on the q and k columns an offset
// per column, 0.7 N(0, 1) (seed + 1), the same for every position; v columns without offset.
inline std::vector<float> barrier_inputs(const cuda::AttentionShape& s, uint64_t seed) {
  const size_t d = static_cast<size_t>(s.H) * s.dh, N = static_cast<size_t>(s.B) * s.T;
  std::vector<float> qkv = randn(N * 3 * d, seed, 0.5);
  const std::vector<float> offset = randn(2 * d, seed + 1, 0.7);
  for (size_t n = 0; n < N; ++n)
    for (size_t c = 0; c < 2 * d; ++c) qkv[n * 3 * d + c] += offset[c];
  return qkv;
}

// The positions that may count, 2 .. T - 1, in a seeded random order: Fisher-Yates from the back,
// position i swapping with i' = hash2(seed, first_key + i) % (i + 1).  Each sequence draws with
// its own first_key (a per-sequence spacing of keys), so sequences get different orders.
inline std::vector<int32_t> shuffled_positions(int T, uint64_t seed, uint64_t first_key) {
  std::vector<int32_t> pos;
  for (int t = 2; t < T; ++t) pos.push_back(t);
  for (int i = static_cast<int>(pos.size()) - 1; i > 0; --i)
    std::swap(pos[i], pos[hash2(seed, first_key + i) % (i + 1)]);
  return pos;
}

// A [B, T] mask with counts[b % counts.size()] counted positions t >= 2 in sequence b (distinct,
// uniformly drawn), plus t = 0, 1 set (they never count).
inline std::vector<uint8_t> count_mask(int B, int T, const std::vector<int>& counts, uint64_t seed) {
  std::vector<uint8_t> m(static_cast<size_t>(B) * T, 0);
  for (int b = 0; b < B; ++b) {
    const std::vector<int32_t> pos = shuffled_positions(T, seed, static_cast<uint64_t>(b) * 1000);
    const int n = std::min<int>(counts[b % counts.size()], static_cast<int>(pos.size()));
    for (int i = 0; i < n; ++i) m[static_cast<size_t>(b) * T + pos[i]] = 1;
    for (int t = 0; t < std::min(T, 2); ++t) m[static_cast<size_t>(b) * T + t] = 1;
  }
  return m;
}

// rows [B, K] of the flash kernels: per sequence its counted positions t >= 2 in increasing
// order, then -1 up to K = the largest count (*K_out).  counts empty: exact, t = 2 .. T - 1;
// otherwise counts[b % size] positions drawn by shuffled_positions with first key
// b * keys_per_sequence + key_offset.  (The two flash tests draw with different key spacings,
// 4096 and 100003 + 1; each keeps its own, so its sampled positions stay those its measured
// errors were recorded with.)
inline std::vector<int32_t> counted_rows(int B, int T, const std::vector<int>& counts,
                                         uint64_t seed, uint64_t keys_per_sequence,
                                         uint64_t key_offset, int* K_out) {
  std::vector<std::vector<int32_t>> per(B);
  for (int b = 0; b < B; ++b) {
    std::vector<int32_t> pos;
    if (counts.empty()) {
      for (int t = 2; t < T; ++t) pos.push_back(t);
    } else {
      pos = shuffled_positions(T, seed, static_cast<uint64_t>(b) * keys_per_sequence + key_offset);
      pos.resize(std::min<size_t>(pos.size(), counts[b % counts.size()]));
      std::sort(pos.begin(), pos.end());
    }
    per[b] = pos;
  }
  int K = 0;
  for (const auto& p : per) K = std::max(K, static_cast<int>(p.size()));
  std::vector<int32_t> rows(static_cast<size_t>(B) * K, -1);
  for (int b = 0; b < B; ++b)
    std::copy(per[b].begin(), per[b].end(), rows.begin() + static_cast<size_t>(b) * K);
  *K_out = K;
  return rows;
}

// The masks of the barrier pipeline tests: none (exact mode), random bits, per-sequence counts
// (count_mask), all zero.
enum class BarrierMask { none, bits, counts, zero };

// The host mask [B*T] of one kind (empty for none).  Random bits and counts draw from ++seed.
inline std::vector<uint8_t> barrier_mask(BarrierMask kind, const cuda::AttentionShape& s,
                                         const std::vector<int>& counts, uint64_t& seed) {
  const size_t N = static_cast<size_t>(s.B) * s.T;
  switch (kind) {
    case BarrierMask::bits: {
      const std::vector<int32_t> bits = randint(N, ++seed, 2);
      return std::vector<uint8_t>(bits.begin(), bits.end());
    }
    case BarrierMask::counts:
      return count_mask(s.B, s.T, counts, ++seed);
    case BarrierMask::zero:
      return std::vector<uint8_t>(N, 0);
    case BarrierMask::none:
      break;
  }
  return {};
}

// A host mask and its device copy; get() is null for the exact mode (empty host mask).
struct DeviceMask {
  std::vector<uint8_t> host;
  DeviceArray<uint8_t> dev;
  explicit DeviceMask(const std::vector<uint8_t>& h)
      : host(h), dev(h.empty() ? std::vector<uint8_t>(1, 1) : h) {}
  const uint8_t* get() const { return host.empty() ? nullptr : dev.get(); }
  // The largest number of counted positions of a sequence (T - 2 in exact mode).
  int kmax(const cuda::AttentionShape& s) const {
    return cuda::barrier_tc_max_counted(host.empty() ? nullptr : host.data(), s.B, s.T);
  }
};

// after - before in double: what a backward added to a gradient it accumulates into.
inline std::vector<double> added(const std::vector<float>& after, const std::vector<float>& before) {
  std::vector<double> a(after.size());
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<double>(after[i]) - before[i];
  return a;
}

// The number of entries of the v block (columns 2d .. 3d - 1 of dqkv [N, 3d]) that differ from
// before: the barrier has no v gradient, so its backward must leave them untouched.
inline size_t v_block_changes(const std::vector<float>& dqkv, const std::vector<float>& before,
                              size_t N, size_t d) {
  size_t changed = 0;
  for (size_t n = 0; n < N; ++n)
    for (size_t i = 0; i < d; ++i) changed += dqkv[n * 3 * d + 2 * d + i] != before[n * 3 * d + 2 * d + i];
  return changed;
}

// A barrier pipeline's results: log det and phi [B, H, T], and what its backward added to a
// gradient dqkv [N, 3d] (after - before).
struct BarrierResult {
  std::vector<float> logdet, phi;
  std::vector<double> added;
};

// The per-position fp32 kernels' results on qkv, backward with gradient scale `scale` into a copy
// of dqkv0.
inline BarrierResult per_position_barrier(const cuda::AttentionShape& s, const float* qkv,
                                              const uint8_t* mask, double eps, float scale,
                                              const std::vector<float>& dqkv0) {
  const size_t BHT = static_cast<size_t>(s.B) * s.H * s.T;
  DeviceArray<float> ld(BHT), phi(BHT), dqkv(dqkv0);
  DeviceArray<char> ws(std::max<size_t>(1, cuda::barrier_workspace_bytes(s)));
  cuda::barrier_forward(s, qkv, mask, eps, ld.get(), phi.get(), ws.get(), nullptr);
  cuda::barrier_backward(s, qkv, mask, eps, scale, dqkv.get(), ws.get(), nullptr);
  return {ld.download(), phi.download(), added(dqkv.download(), dqkv0)};
}

// The causal softmax row of one slot in double, from float inputs: the scaled logits
// cz_s = c sum_d qg_d kc_sd over the keys s < t (kc [t or more, D], row-major), their max m, the
// sum l = sum_s exp(cz_s - m), and zmag = max_s sum_d |qg_d kc_sd| (the scale of the rounding
// error of a computed z).
struct SoftmaxRow {
  std::vector<double> cz;
  double m = -INFINITY, l = 0, zmag = 0;
};
inline SoftmaxRow causal_softmax_row(const float* qg, const float* kc, int t, int D, double c) {
  SoftmaxRow r;
  r.cz.resize(std::max(t, 0));
  for (int s = 0; s < t; ++s) {
    double z = 0, mag = 0;
    for (int d = 0; d < D; ++d) {
      z += static_cast<double>(qg[d]) * kc[static_cast<size_t>(s) * D + d];
      mag += std::fabs(static_cast<double>(qg[d]) * kc[static_cast<size_t>(s) * D + d]);
    }
    r.cz[s] = c * z;
    r.m = std::max(r.m, r.cz[s]);
    r.zmag = std::max(r.zmag, mag);
  }
  for (int s = 0; s < t; ++s) r.l += std::exp(r.cz[s] - r.m);
  return r;
}

// The relative errors of a pipeline's log det, phi and added dq, dk against a reference, as the
// pipeline tests print them.
struct BarrierErrors {
  double logdet, phi, grad;
};
// CHECKs each of log det, phi and the dq, dk added (dqkv - dqkv0) within the relative error tol
// of ref (reporting the worst element on failure), and that the v block of dqkv [N, 3d] is
// untouched.
inline BarrierErrors check_barrier_result(const std::vector<float>& logdet,
                                          const std::vector<float>& phi,
                                          const std::vector<float>& dqkv,
                                          const std::vector<float>& dqkv0, const BarrierResult& ref,
                                          size_t N, size_t d, double tol) {
  const Comparison e_ld = compare(logdet, to_double(ref.logdet));
  const Comparison e_phi = compare(phi, to_double(ref.phi));
  const std::vector<double> got_added = added(dqkv, dqkv0);
  const Comparison e_grad = compare(got_added, ref.added);
  INFO(describe("logdet", e_ld, tol));
  INFO(describe("phi", e_phi, tol));
  INFO(describe("dq, dk added", e_grad, tol));
  CHECK(e_ld.rel <= tol);
  CHECK(e_phi.rel <= tol);
  CHECK(e_grad.rel <= tol);
  CHECK(v_block_changes(dqkv, dqkv0, N, d) == 0);
  return {e_ld.rel, e_phi.rel, e_grad.rel};
}

}  // namespace gputest
}  // namespace blm
