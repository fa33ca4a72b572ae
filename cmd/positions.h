// Sampled barrier positions (barrier.positions = K > 0, spec section 7): each sequence of a step
// counts the barrier at K distinct query positions drawn uniformly from [2, T).  The draw is a
// pure function of (seed, step, row), so a resumed run, or a data-parallel rank that holds rows
// [r0, r0 + B) of the global batch, draws exactly what one uninterrupted worker would.
//
// Header-only so tests/test_cli.cpp can check it directly.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"

namespace blm {

// Separates this hash stream from the data sampler's and the initialiser's for the same seed.
constexpr uint64_t kBarrierPositionStream = 0x62617272;  // "barr"

// What barrier.positions = K means at sequence length T, for the run headers: the exact barrier
// for K = 0 and for K >= T - 2 (sample_barrier_positions then selects every position t >= 2).
inline std::string barrier_positions_label(int K, int T) {
  if (K <= 0) return "exact (every position)";
  if (K >= T - 2)
    return "exact (every position: positions " + std::to_string(K) + " >= seq_len - 2)";
  return std::to_string(K) + " sampled positions/sequence";
}

// mask: [T], set to 1 at the K sampled positions of row `row` of step `step`, 0 elsewhere.
// K >= T - 2 selects every position t >= 2 (the exact barrier).
inline void sample_barrier_positions(uint64_t seed, int64_t step, int row, int T, int K,
                                     uint8_t* mask) {
  for (int t = 0; t < T; ++t) mask[t] = 0;
  const int n = T - 2;  // candidates 2, 3, ..., T-1
  if (n <= 0) return;
  if (K >= n) {
    for (int t = 2; t < T; ++t) mask[t] = 1;
    return;
  }
  const uint64_t key = hash2(hash2(hash2(seed, kBarrierPositionStream),
                                   static_cast<uint64_t>(step)),
                             static_cast<uint64_t>(row));
  // Partial Fisher-Yates over the candidates: the first K slots end up a uniform K-subset.
  std::vector<int> cand(n);
  for (int i = 0; i < n; ++i) cand[i] = 2 + i;
  for (int j = 0; j < K; ++j) {
    int r = j + static_cast<int>(uniform01(key, static_cast<uint64_t>(j)) * (n - j));
    if (r >= n) r = n - 1;  // uniform01 < 1, but guard the float product
    std::swap(cand[j], cand[r]);
    mask[cand[j]] = 1;
  }
}

// mask: [B, T] for rows [row0, row0 + B) of step `step`.
inline void sample_barrier_mask(uint64_t seed, int64_t step, int row0, int B, int T, int K,
                                std::vector<uint8_t>& mask) {
  mask.assign(static_cast<size_t>(B) * T, 0);
  for (int b = 0; b < B; ++b)
    sample_barrier_positions(seed, step, row0 + b, T, K, mask.data() + static_cast<size_t>(b) * T);
}

}  // namespace blm
