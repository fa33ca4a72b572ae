// Grid sizing shared by the kernels: grid-stride loops over n elements with a grid that depends
// only on n (never on the device), so work splits, and hence results, are identical everywhere.
#pragma once
#include <cstdint>

namespace blm {
namespace cuda {

constexpr int kThreads = 256;          // threads per block of the elementwise kernels
constexpr int64_t kMaxBlocks = 65535;  // enough to fill any GPU; grid-stride loops do the rest

inline unsigned grid_for(int64_t n, int threads = kThreads) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  if (g > kMaxBlocks) g = kMaxBlocks;
  return static_cast<unsigned>(g);
}

}  // namespace cuda
}  // namespace blm
