// Finite-difference gradient checking in float64, shared by the tests of the ops and the model.
//
// The derivative estimate is the central difference D(h) = (f(x+h) - f(x-h)) / 2h improved by one
// Richardson step, (4 D(h/2) - D(h)) / 3, whose truncation error is O(h^4): with h = 1e-3 both
// the truncation and the rounding error (~1e-16 |f| / h) stay near 1e-12 for smooth f of size 1.
//
// Relative error of an analytic gradient g against the estimate e:
//     |g - e| / max(|g|, |e|, floor)
// The floor keeps parameters whose gradient is (nearly) zero from dividing noise by noise; each
// test states the floor it uses.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <sstream>
#include <string>
#include <vector>

namespace blm {
namespace gradcheck {

// d f / d x[i] by Richardson-extrapolated central differences; x[i] is restored.
template <class F>
double derivative(F&& f, std::vector<double>& x, size_t i, double h = 1e-3) {
  const double x0 = x[i];
  auto central = [&](double step) {
    x[i] = x0 + step;
    const double fp = f();
    x[i] = x0 - step;
    const double fm = f();
    x[i] = x0;
    return (fp - fm) / (2 * step);
  };
  const double d1 = central(h), d2 = central(h / 2);
  return (4 * d2 - d1) / 3;
}

inline double relative_error(double analytic, double estimate, double floor) {
  return std::fabs(analytic - estimate) /
         std::max({std::fabs(analytic), std::fabs(estimate), floor});
}

struct Report {
  double max_rel = 0;    // largest relative error seen
  size_t worst = 0;      // index where it occurred
  double analytic = 0;   // the two values at that index
  double estimate = 0;
  size_t checked = 0;
  std::string describe(const std::string& what) const {
    std::ostringstream o;
    o.precision(3);
    o << std::scientific << what << ": max rel err " << max_rel << " at [" << worst << "] analytic "
      << analytic << " fd " << estimate << " (" << checked << " checked)";
    return o.str();
  }
};

// Compares grad (the analytic gradient of f at x) with finite differences for the indices in
// `which` (every index when empty).  f reads x by reference.
template <class F>
Report check(F&& f, std::vector<double>& x, const std::vector<double>& grad, double floor,
             const std::vector<size_t>& which = {}, double h = 1e-3) {
  Report r;
  auto one = [&](size_t i) {
    const double e = derivative(f, x, i, h);
    const double rel = relative_error(grad[i], e, floor);
    if (r.checked == 0 || rel > r.max_rel) {
      r.max_rel = rel;
      r.worst = i;
      r.analytic = grad[i];
      r.estimate = e;
    }
    ++r.checked;
  };
  if (which.empty())
    for (size_t i = 0; i < x.size(); ++i) one(i);
  else
    for (size_t i : which) one(i);
  return r;
}

}  // namespace gradcheck
}  // namespace blm
