// Helpers of the GPU tests: device arrays (NaN-poisoning, bit-for-bit comparison), fresh random
// inputs, bf16 on the host (rounding as the device rounds, bit patterns, bf16-exact random
// values), the error measure every GPU test uses, with a report of the worst element on failure,
// a float64 matrix product, and the benchmarks' timing.
//
// Relative error of a tensor: ||got - ref||_2 / ||ref||_2 (over the whole tensor; when
// ||ref|| = 0 the absolute ||got - ref|| is used).  Failures print the tensor's name, the error,
// ||ref||, and the worst element's index with both values.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/rng.h"
#include "cuda/common.cuh"
#include "tests/catch.h"

// A visible skip for a case whose hardware or library is missing (a second GPU, cuDNN):
// Catch2 3 reports it as skipped; Catch2 2, which has no skip, prints a warning and the case
// returns.
#if defined(SKIP)
#define GPU_SKIP(why) SKIP(why)
#else
#define GPU_SKIP(why)          \
  do {                         \
    WARN(why << " (not run)"); \
    return;                    \
  } while (0)
#endif

namespace blm {
namespace gputest {

// Sets (value non-null) or unsets an environment variable (a BLM_* kernel choice) for one scope;
// at its end the variable gets back the value it had (or is unset again), so a choice made for
// the whole run (scripts/gpu-check.sh sets some) survives the tests that vary it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    set(name_, value);
  }
  ~ScopedEnv() { set(name_, had_ ? old_.c_str() : nullptr); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  static void set(const char* name, const char* value) {
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  const char* name_;
  bool had_ = false;
  std::string old_;
};

// A typed device array filled from / read back to host vectors.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : buf_(n * sizeof(T), "a test array"), n_(n) {}
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  void upload(const std::vector<T>& host) {
    REQUIRE(host.size() == n_);
    if (n_) CUDA_CHECK(cudaMemcpy(buf_.get(), host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    CUDA_CHECK(cudaDeviceSynchronize());
    if (n_) CUDA_CHECK(cudaMemcpy(host.data(), buf_.get(), n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  T* get() const { return buf_.as<T>(); }
  size_t size() const { return n_; }

 private:
  cuda::DeviceBuffer buf_;
  size_t n_ = 0;
};

// A float device array of values held in double (rounded to float).
inline DeviceArray<float> upload(const std::vector<double>& host) {
  return DeviceArray<float>(std::vector<float>(host.begin(), host.end()));
}

// All bits set: a NaN in every float, so an element a kernel forgets to write fails the test.
template <class T>
void poison(DeviceArray<T>& a) {
  CUDA_CHECK(cudaMemset(a.get(), 0xFF, a.size() * sizeof(T)));
}

inline bool bit_identical(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Fresh random values: scale * N(0, 1) (+ offset), from a counter-based stream per seed.
inline std::vector<float> randn(size_t n, uint64_t seed, double scale = 1.0, double offset = 0.0) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<float>(offset + scale * normal01(seed, i));
  return v;
}
inline std::vector<int32_t> randint(size_t n, uint64_t seed, int hi) {
  std::vector<int32_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<int32_t>(hash2(seed, i) % static_cast<uint64_t>(hi));
  return v;
}
// ------------------------------------------------------------------ bf16 on the host
// bf16 values are held as their 16 bits (uint16_t) on the host and in DeviceArray<uint16_t>; the
// kernels see them as __nv_bfloat16 (as_bf16).

// The bf16 bits of a finite float, rounded to nearest even (as __float2bfloat16_rn): add half an
// ulp of bf16 (0x7FFF) plus the kept lowest bit, so ties go to the even neighbour, then truncate.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
// The float a bf16 bit pattern stands for (exact: bf16 is the top half of a float).
inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
// x rounded to the nearest bf16, as float.
inline float round_bf16(float x) { return bf16_value(bf16_bits(x)); }

// Element-wise: bits of each value (rounded), values of each bit pattern, values rounded to bf16.
inline std::vector<uint16_t> to_bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_bits(v[i]);
  return out;
}
inline std::vector<float> from_bits(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_value(v[i]);
  return out;
}
inline std::vector<float> rounded_bf16(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = round_bf16(v[i]);
  return out;
}
// randn(n, seed, scale, offset) rounded to bf16: random floats exactly representable in bf16, so
// a kernel's bf16 copy of them is exact and a float64 reference sees the kernel's operands.
// (Not named randn_bf16: tests/gpu/test_recompute.cpp has its own randn_bf16 of __nv_bfloat16.)
inline std::vector<float> randn_bf16_exact(size_t n, uint64_t seed, double scale = 1.0,
                                           double offset = 0.0) {
  return rounded_bf16(randn(n, seed, scale, offset));
}
// A bf16 device array as the kernels' element type.
inline __nv_bfloat16* as_bf16(const DeviceArray<uint16_t>& a) {
  return reinterpret_cast<__nv_bfloat16*>(a.get());
}

// GELU (tanh form, the model's) and its derivative in double: the references of the GPU GELU
// kernels.
inline double gelu_ref(double x) {
  const double k0 = std::sqrt(2.0 / std::acos(-1.0)), k1 = 0.044715;
  return 0.5 * x * (1.0 + std::tanh(k0 * (x + k1 * x * x * x)));
}
inline double gelu_grad_ref(double x) {
  const double k0 = std::sqrt(2.0 / std::acos(-1.0)), k1 = 0.044715;
  const double th = std::tanh(k0 * (x + k1 * x * x * x));
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k0 * (1.0 + 3.0 * k1 * x * x);
}

inline std::vector<double> to_double(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

struct Comparison {
  double rel = 0, ref_norm = 0, worst_abs = 0;
  size_t worst = 0;
  double got_worst = 0, ref_worst = 0;
  bool nonfinite = false;
  size_t n = 0;
};

template <class A, class B>
Comparison compare(const A* got, const B* ref, size_t n) {
  Comparison c;
  c.n = n;
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(got[i]), r = static_cast<double>(ref[i]);
    if (!std::isfinite(g) && !(std::isinf(g) && g == r)) c.nonfinite = true;
    // Equal infinities (log det = -inf on both sides) count as agreement.
    const double e = (std::isinf(r) && g == r) ? 0.0 : g - r;
    num += e * e;
    den += std::isinf(r) ? 0.0 : r * r;
    if (!(std::fabs(e) <= c.worst_abs)) {  // also catches NaN
      c.worst_abs = std::fabs(e);
      c.worst = i;
      c.got_worst = g;
      c.ref_worst = r;
    }
  }
  c.ref_norm = std::sqrt(den);
  c.rel = c.ref_norm > 0 ? std::sqrt(num) / c.ref_norm : std::sqrt(num);
  if (c.nonfinite) c.rel = INFINITY;
  return c;
}
template <class A, class B>
Comparison compare(const std::vector<A>& got, const std::vector<B>& ref) {
  REQUIRE(got.size() == ref.size());
  return compare(got.data(), ref.data(), got.size());
}

inline std::string describe(const std::string& name, const Comparison& c, double tol) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "%s: rel err %.3e (tol %.1e) over %zu values, ||ref|| %.4e; worst [%zu] got %.9g "
                "ref %.9g (|diff| %.3e)%s",
                name.c_str(), c.rel, tol, c.n, c.ref_norm, c.worst, c.got_worst, c.ref_worst,
                c.worst_abs, c.nonfinite ? "; NON-FINITE values" : "");
  return buf;
}

// Row-major reference of D[M,N] = op(A) op(B) + bias + beta C, in double: A is [M, K] (or [K, M]
// when ta), B is [K, N] (or [N, K] when tb), with leading dimensions lda, ldb, ldc, ldd; bias [N]
// and C only read when given / beta != 0.
inline std::vector<double> matmul_ref(bool ta, bool tb, int M, int N, int K,
                                      const std::vector<float>& A, int lda,
                                      const std::vector<float>& B, int ldb,
                                      const std::vector<float>* bias, float beta,
                                      const std::vector<float>* C, int ldc, int ldd) {
  std::vector<double> D(static_cast<size_t>(M) * ldd, 0.0);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = 0;
      for (int k = 0; k < K; ++k) {
        const double a = ta ? A[static_cast<size_t>(k) * lda + i] : A[static_cast<size_t>(i) * lda + k];
        const double b = tb ? B[static_cast<size_t>(j) * ldb + k] : B[static_cast<size_t>(k) * ldb + j];
        s += a * b;
      }
      if (bias) s += (*bias)[j];
      if (beta != 0.0f) s += beta * (*C)[static_cast<size_t>(i) * ldc + j];
      D[static_cast<size_t>(i) * ldd + j] = s;
    }
  return D;
}

// CHECK that got matches ref within a relative error tol (see the top of this file).
#define GPU_CHECK_REL(name, got, ref, tol)                                       \
  do {                                                                           \
    const ::blm::gputest::Comparison cmp_ = ::blm::gputest::compare(got, ref);   \
    INFO(::blm::gputest::describe(name, cmp_, tol));                             \
    CHECK(cmp_.rel <= (tol));                                                    \
  } while (0)

// Scalars: |got - ref| <= tol * max(|ref|, floor).
inline std::string describe_scalar(const std::string& name, double got, double ref, double bound) {
  char buf[320];
  std::snprintf(buf, sizeof buf, "%s: got %.12g ref %.12g |diff| %.3e bound %.3e", name.c_str(),
                got, ref, std::fabs(got - ref), bound);
  return buf;
}
#define GPU_CHECK_SCALAR(name, got, ref, tol, floor)                                      \
  do {                                                                                    \
    const double g_ = static_cast<double>(got), r_ = static_cast<double>(ref);           \
    const double bound_ = (tol) * std::max(std::fabs(r_), static_cast<double>(floor));    \
    INFO(::blm::gputest::describe_scalar(name, g_, r_, bound_));                          \
    CHECK(std::fabs(g_ - r_) <= bound_);                                                  \
  } while (0)

// Timing of the [.bench] cases: the median in ms of run() over `repeats` calls, after `warmup`
// untimed ones, each call timed alone with CUDA events on the default stream.
template <class F>
double median_ms(F&& run, int warmup = 3, int repeats = 20) {
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < warmup; ++i) run();
  std::vector<float> ms(repeats);
  for (int i = 0; i < repeats; ++i) {
    CUDA_CHECK(cudaEventRecord(a));
    run();
    CUDA_CHECK(cudaEventRecord(b));
    CUDA_CHECK(cudaEventSynchronize(b));
    CUDA_CHECK(cudaEventElapsedTime(&ms[i], a, b));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[repeats / 2];
}

// The mean in ms of `repeats` back-to-back calls of run() after one untimed call, timed together
// with CUDA events on the default stream (the barrier benchmarks' measure: for kernels short
// enough that one event pair per call would weigh in).
template <class F>
float mean_ms(F&& run, int repeats = 5) {
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  run();
  CUDA_CHECK(cudaEventRecord(a));
  for (int i = 0; i < repeats; ++i) run();
  CUDA_CHECK(cudaEventRecord(b));
  CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / repeats;
}

}  // namespace gputest
}  // namespace blm
