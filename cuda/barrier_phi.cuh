// The barrier's per-position scalars on the device, shared by the per-position kernels
// (barrier.cu) and the matrix-product path (barrier_tc.cu):
//   position_counted  : whether position t of sequence b enters the barrier (t >= 2, and the
//                       sampled estimator's mask, [B, T], when there is one)
//   phi_from_det      : phi(delta) of spec section 3 from (sign, log|det|)
//   grad_coefficient  : -phi'(delta) delta, the factor of J^{-T} in the gradient
// computed as core/barrier.cpp does: -log(delta) is -logabs directly on the log branch, so large
// determinants neither overflow nor lose digits.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace blm {
namespace cuda {

__device__ __forceinline__ bool position_counted(int t, int b, int T, const uint8_t* mask) {
  return t >= 2 && (mask == nullptr || mask[static_cast<size_t>(b) * T + t] != 0);
}

__device__ inline double phi_from_det(int sign, double logabs, double eps) {
  if (sign > 0 && logabs >= log(eps)) return -logabs;
  const double x = sign == 0 ? 0.0 : sign * exp(logabs);
  const double dx = x - eps;
  return -log(eps) - dx / eps + dx * dx / (2 * eps * eps);
}

__device__ inline double grad_coefficient(int sign, double logabs, double eps) {
  if (sign > 0 && logabs >= log(eps)) return 1.0;
  const double x = sign == 0 ? 0.0 : sign * exp(logabs);
  const double phi_prime = -1.0 / eps + (x - eps) / (eps * eps);
  return -phi_prime * x;
}

}  // namespace cuda
}  // namespace blm
