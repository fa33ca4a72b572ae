// Counter-based random numbers: the value for (seed, index) is a pure function, so the CPU and
// CUDA backends draw identical noise, and a resumed run draws what the uninterrupted run drew.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BLM_HD __host__ __device__ __forceinline__
#else
#define BLM_HD inline
#endif

namespace blm {

// SplitMix64 finaliser: a good 64-bit mix.
BLM_HD uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

BLM_HD uint64_t hash2(uint64_t seed, uint64_t index) { return mix64(seed ^ mix64(index)); }

// Uniform in (0, 1), never 0 (safe for log).
BLM_HD double uniform01(uint64_t seed, uint64_t index) {
  return (static_cast<double>(hash2(seed, index) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// Standard normal for (seed, index), Box-Muller on two independent uniforms.
BLM_HD double normal01(uint64_t seed, uint64_t index) {
  double u1 = uniform01(seed, 2 * index);
  double u2 = uniform01(seed, 2 * index + 1);
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

// A small sequential generator (xoshiro256**) for host-side sampling where a stream is natural.
struct Rng {
  uint64_t s[4];
  explicit Rng(uint64_t seed = 1) { reseed(seed); }
  void reseed(uint64_t seed) {
    for (int i = 0; i < 4; ++i) s[i] = mix64(seed + 0x1234567ull * (i + 1));
  }
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t next() {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return r;
  }
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
  uint64_t below(uint64_t n) { return n ? next() % n : 0; }
  double normal() {
    double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

}  // namespace blm
