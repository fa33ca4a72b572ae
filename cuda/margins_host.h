// Host half of the CUDA backend's margins(): sigma_min and log det of the barrier Jacobians
// copied back from the GPU (a GPU SVD can replace this later).  Plain C++ with OpenMP, which is
// why it lives in a .cpp file and not in cuda_backend.cu.
#pragma once
#include <cstdint>

namespace blm {
namespace cuda {

// jac: count matrices [dh, dh] row-major (J_t = I - C_t, as barrier_jacobians writes them).
// Writes sigma_min[i] = smallest singular value of matrix i and logdet[i] = log det (-inf when
// det <= 0), both computed in double by core/barrier.h.  threads <= 0: OpenMP's default.
void jacobian_margins(const float* jac, int64_t count, int dh, float* sigma_min, float* logdet,
                      int threads);

}  // namespace cuda
}  // namespace blm
