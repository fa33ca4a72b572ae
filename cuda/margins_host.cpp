// sigma_min and log det of many small Jacobians on the host, OpenMP over matrices (see
// margins_host.h).  The functions are the CPU reference's (core/barrier.h: margin_sigma_min,
// log_abs_det), so the CUDA backend's margins agree with its margins up to the fp32 rounding of J
// itself.  (Until 2026-11-29 this used one-sided Jacobi for every matrix: 1.10 against 0.10 ms
// for a 64 x 64 J on one core of the development machine, the same sigma_min to 1.3e-14.)
#include "cuda/margins_host.h"

#include <omp.h>

#include <cstddef>
#include <limits>
#include <vector>

#include "core/barrier.h"

namespace blm {
namespace cuda {

void jacobian_margins(const float* jac, int64_t count, int dh, float* sigma_min, float* logdet,
                      int threads) {
  const int nthreads = threads > 0 ? threads : omp_get_max_threads();
  const size_t n2 = static_cast<size_t>(dh) * dh;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<double> a(n2), g(n2), v(dh), p(dh);  // J in double; margin_sigma_min's scratch
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < count; ++i) {
      const float* src = jac + static_cast<size_t>(i) * n2;
      for (size_t j = 0; j < n2; ++j) a[j] = src[j];
      const double smin = margin_sigma_min(a.data(), dh, g.data(), v.data(), p.data());
      sigma_min[i] = static_cast<float>(smin);
      double la = 0;
      const int sign = log_abs_det(a.data(), dh, &la);
      logdet[i] = sign > 0 ? static_cast<float>(la) : -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace cuda
}  // namespace blm
