// The barrier's forward and backward for one head in one call (an addition to core/barrier.h).
//
// A training step needs both sum_phi and its gradient.  Separate barrier_head_forward and
// barrier_head_backward calls each build pi, S_t = sum_s pi_ts q_s k_s^T (a T x T x dh^2 GEMM)
// and one LU per position; this call builds them once.  The barrier gradient does not depend on
// anything downstream, so an engine may call this during its forward pass, keep dq, dk, and add
// them to the attention's q/k gradients in its backward pass.
#pragma once
#include <cstdint>

#include "core/barrier.h"

namespace blm {

// Returns exactly what barrier_head_forward returns (and fills logdet, margin [T] when non-null)
// and adds scale * d(sum of counted phi(delta_t)) / dq and / dk into dq, dk [T, dh], exactly as
// barrier_head_backward does.
template <class Real>
BarrierHeadOutput<Real> barrier_head_forward_backward(const Real* q, const Real* k, int T, int dh,
                                                      double eps, const uint8_t* mask, Real scale,
                                                      Real* dq, Real* dk, Real* logdet,
                                                      Real* margin);

}  // namespace blm
