// sigma_min and log det of many small Jacobians on the host, OpenMP over matrices (see
// margins_host.h).  The math is core/barrier.h's, so the CUDA backend's margins agree with the
// CPU reference's up to the fp32 rounding of J itself.
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
    std::vector<double> a(n2);
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < count; ++i) {
      const float* src = jac + static_cast<size_t>(i) * n2;
      for (size_t j = 0; j < n2; ++j) a[j] = src[j];
      sigma_min[i] = static_cast<float>(smallest_singular_value(a.data(), dh));
      double la = 0;
      const int sign = log_abs_det(a.data(), dh, &la);
      logdet[i] = sign > 0 ? static_cast<float>(la) : -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace cuda
}  // namespace blm
