// The barrier of ../shared/docs/barrier-spec.md (sections 2-5), for one (sequence, layer, head),
// written literally: it is the reference every fast path is tested against.
//
// Inputs are the head's query and key vectors, q, k: [T, dh] row-major (bias included), exactly
// those the attention uses.  For each position t:
//   z_ts   = q_t . k_s / sqrt(dh)                      s < t
//   pi_ts  = softmax_{s<t}(z_ts)
//   C_t    = (1/sqrt(dh)) sum_{s<t} pi_ts (q_s - qbar_t)(k_s - kbar_t)^T
//   J_t    = I - C_t,   delta_t = det J_t,   b_t = phi(delta_t)
// Positions t = 0, 1 have C_t = 0, delta_t = 1 and are never counted.
#pragma once
#include <cstdint>

namespace blm {

// The smooth log-barrier phi (spec section 3) and its derivative.
double barrier_phi(double x, double eps);
double barrier_phi_prime(double x, double eps);

template <class Real>
struct BarrierHeadOutput {
  Real sum_phi = 0;    // sum of phi(delta_t) over the counted positions
  int count = 0;       // number of counted positions
  Real min_logdet = 0; // smallest log det J_t among counted positions (-inf if some det <= 0)
};

// Forward.  mask: [T] or null; position t counts when t >= 2 and (mask == null or mask[t]).
// Optional per-position outputs, [T] each (null to skip), filled for every t (also uncounted):
//   logdet[t] = log det J_t (-inf when det J_t <= 0), margin[t] = sigma_min(J_t).
template <class Real>
BarrierHeadOutput<Real> barrier_head_forward(const Real* q, const Real* k, int T, int dh,
                                             double eps, const uint8_t* mask, Real* logdet,
                                             Real* margin);

// Backward: adds scale * d(sum of counted phi(delta_t)) / dq and / dk into dq, dk [T, dh].
// Recomputes what it needs from q and k.
template <class Real>
void barrier_head_backward(const Real* q, const Real* k, int T, int dh, double eps,
                           const uint8_t* mask, Real scale, Real* dq, Real* dk);

// Smallest singular value of a general n x n row-major matrix (one-sided Jacobi, in double).
double smallest_singular_value(const double* a, int n);
// The same as the margins compute it (core/barrier.cpp): from the smallest eigenvalue of J^T J
// where that loses nothing (sigma_min >= 1e-4 |J|_F: <= ~1e-8 relative), about 9 times faster
// than Jacobi at n 64; Jacobi on J closer to singular.  j: n x n (kept); g: n * n doubles of
// scratch; v, p: n doubles each.
double margin_sigma_min(const double* j, int n, double* g, double* v, double* p);
// log|det| and sign of a general n x n matrix via LU with partial pivoting (in double);
// returns sign (+1, -1, or 0 for singular) and writes log|det| to *logabs.
int log_abs_det(const double* a, int n, double* logabs);

}  // namespace blm
