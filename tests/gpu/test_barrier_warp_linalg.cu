// The warp-per-matrix LU and Gauss-Jordan inverse of cuda/barrier_warp_linalg.cuh against a
// float64 host LU with partial pivoting, for D = 32 and 64, on float matrices (the reference sees
// the same float-rounded entries, so only the algorithm's rounding is measured):
//   near identity    I + 0.3 N(0, 1)/sqrt(D): sigma_min ~0.4; log|det| within 1e-4 absolute,
//                    J^{-1} within 1e-4 relative (fp32 with n u kappa ~ 64 * 6e-8 * 5 ~ 2e-5)
//   negative det     the same with row 3 negated: sign -1, same tolerances
//   row-permuted     a random row permutation of a near-identity matrix: every step pivots, the
//                    permutation has several cycles; sign = sign(perm) sign(det), same tolerances
//   near singular    U diag(sigma) V^T, U, V random orthogonal, sigma from 1 down to 1e-3
//                    (kappa = 1e3): log|det| within 1e-2, J^{-1} within 1e-2 relative (errors
//                    grow like kappa n u ~ 4e-3)
//   exactly singular a zero column (middle) and a zero row: sign 0, log|det| = -inf in both
// The inverse is read back as the grad kernel writes G = coef J^{-T} (coef = 1), through
// warp_store_inverse_transposed and the pivot order, so the permuted write-out is covered.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/barrier_warp_linalg.cuh"
#include "cuda/common.cuh"
#include "tests/catch.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

constexpr int kWarps = 2;  // matrices per block: two warps share the block's shared memory

// One warp per matrix: LU -> (sign, log|det|); Gauss-Jordan -> (sign, log|det|) and J^{-T}
// [n, D, D] (zeros when singular).
template <int D>
__global__ void warp_linalg_kernel(const float* __restrict__ A, int n, int* sign_lu,
                                   double* logabs_lu, int* sign_gj, double* logabs_gj,
                                   float* __restrict__ inv_t) {
  extern __shared__ float sm[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int idx = blockIdx.x * kWarps + warp;
  if (idx >= n) return;
  float* tile = sm + warp * (D * (D + 1) + D);
  int* perm = reinterpret_cast<int*>(tile + D * (D + 1));
  const float* Ai = A + static_cast<size_t>(idx) * D * D;
  float* out = inv_t + static_cast<size_t>(idx) * D * D;
  for (int e = lane; e < D * D; e += 32) tile[(e / D) * (D + 1) + e % D] = Ai[e];
  __syncwarp();
  float a[D / 32][D];
  cuda::warp_rows_from_tile<D>(tile, a);
  int s = 0;
  double la = 0;
  cuda::warp_lu_logdet<D>(a, &s, &la);
  if (lane == 0) sign_lu[idx] = s, logabs_lu[idx] = la;
  cuda::warp_rows_from_tile<D>(tile, a);  // the tile still holds A
  int cur[D / 32];
  cuda::warp_gj_inverse<D>(a, cur, perm, &s, &la);
  if (lane == 0) sign_gj[idx] = s, logabs_gj[idx] = la;
  if (s == 0) {
    for (int e = lane; e < D * D; e += 32) out[e] = 0.0f;
    return;
  }
  cuda::warp_store_inverse_transposed<D>(a, cur, 1.0f, tile);
  for (int k = 0; k < D; ++k)
    for (int c = lane; c < D; c += 32) out[perm[k] * D + c] = tile[k * (D + 1) + c];
}

struct LuRef {
  int sign;
  double logabs;
  std::vector<double> inv;  // row-major, empty when singular
};

// float64 LU with partial pivoting (row swaps), then the inverse by forward/back substitution.
LuRef host_lu(const std::vector<double>& A0, int D) {
  std::vector<double> A = A0;
  std::vector<int> piv(D);
  std::iota(piv.begin(), piv.end(), 0);
  LuRef r{1, 0.0, {}};
  for (int k = 0; k < D; ++k) {
    int p = k;
    for (int i = k + 1; i < D; ++i)
      if (std::fabs(A[i * D + k]) > std::fabs(A[p * D + k])) p = i;
    if (A[p * D + k] == 0.0) return LuRef{0, -INFINITY, {}};
    if (p != k) {
      for (int j = 0; j < D; ++j) std::swap(A[k * D + j], A[p * D + j]);
      std::swap(piv[k], piv[p]);
      r.sign = -r.sign;
    }
    const double d = A[k * D + k];
    if (d < 0) r.sign = -r.sign;
    r.logabs += std::log(std::fabs(d));
    for (int i = k + 1; i < D; ++i) {
      const double l = A[i * D + k] / d;
      A[i * D + k] = l;
      for (int j = k + 1; j < D; ++j) A[i * D + j] -= l * A[k * D + j];
    }
  }
  // P A = L U; column c of A^{-1} solves L U x = P e_c.
  r.inv.assign(static_cast<size_t>(D) * D, 0.0);
  for (int c = 0; c < D; ++c) {
    std::vector<double> x(D);
    for (int i = 0; i < D; ++i) x[i] = piv[i] == c ? 1.0 : 0.0;
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < i; ++j) x[i] -= A[i * D + j] * x[j];
    for (int i = D - 1; i >= 0; --i) {
      for (int j = i + 1; j < D; ++j) x[i] -= A[i * D + j] * x[j];
      x[i] /= A[i * D + i];
    }
    for (int i = 0; i < D; ++i) r.inv[static_cast<size_t>(i) * D + c] = x[i];
  }
  return r;
}

std::vector<double> near_identity(int D, uint64_t seed) {
  std::vector<double> A(static_cast<size_t>(D) * D);
  for (int i = 0; i < D * D; ++i)
    A[i] = (i / D == i % D ? 1.0 : 0.0) + 0.3 * normal01(seed, i) / std::sqrt(static_cast<double>(D));
  return A;
}

// Random orthogonal D x D (Gram-Schmidt of a Gaussian matrix, rows orthonormal).
std::vector<double> orthogonal(int D, uint64_t seed) {
  std::vector<double> Q(static_cast<size_t>(D) * D);
  for (int i = 0; i < D * D; ++i) Q[i] = normal01(seed, i);
  for (int i = 0; i < D; ++i) {
    for (int pass = 0; pass < 2; ++pass)  // twice: orthogonal to working precision
      for (int j = 0; j < i; ++j) {
        double dot = 0;
        for (int k = 0; k < D; ++k) dot += Q[i * D + k] * Q[j * D + k];
        for (int k = 0; k < D; ++k) Q[i * D + k] -= dot * Q[j * D + k];
      }
    double nrm = 0;
    for (int k = 0; k < D; ++k) nrm += Q[i * D + k] * Q[i * D + k];
    nrm = std::sqrt(nrm);
    for (int k = 0; k < D; ++k) Q[i * D + k] /= nrm;
  }
  return Q;
}

std::vector<double> near_singular(int D, uint64_t seed) {
  const std::vector<double> U = orthogonal(D, seed), V = orthogonal(D, seed + 1);
  std::vector<double> A(static_cast<size_t>(D) * D, 0.0);
  for (int k = 0; k < D; ++k) {
    const double sigma = std::pow(10.0, -3.0 * k / (D - 1));
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j) A[i * D + j] += U[i * D + k] * sigma * V[j * D + k];
  }
  return A;
}

struct Mat {
  std::string name;
  std::vector<double> A;
  double tol;  // log|det| absolute and J^{-1} relative
};

template <int D>
void run_cases(uint64_t seed) {
  std::vector<Mat> mats;
  mats.push_back({"near identity", near_identity(D, seed), 1e-4});
  mats.push_back({"near identity 2", near_identity(D, seed + 1), 1e-4});
  {
    Mat m{"negative det", near_identity(D, seed + 2), 1e-4};
    for (int j = 0; j < D; ++j) m.A[3 * D + j] = -m.A[3 * D + j];
    mats.push_back(m);
  }
  {
    const std::vector<double> B = near_identity(D, seed + 3);
    std::vector<int> perm(D);
    std::iota(perm.begin(), perm.end(), 0);
    for (int i = D - 1; i > 0; --i) std::swap(perm[i], perm[hash2(seed + 4, i) % (i + 1)]);
    Mat m{"row-permuted", std::vector<double>(B.size()), 1e-4};
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j) m.A[i * D + j] = B[perm[i] * D + j];
    mats.push_back(m);
  }
  mats.push_back({"near singular", near_singular(D, seed + 5), 1e-2});
  {
    Mat m{"near singular, negated row", near_singular(D, seed + 7), 1e-2};
    for (int j = 0; j < D; ++j) m.A[j] = -m.A[j];
    mats.push_back(m);
  }
  {
    Mat m{"zero column", near_identity(D, seed + 9), 0};
    for (int i = 0; i < D; ++i) m.A[i * D + D / 2 + 1] = 0.0;
    mats.push_back(m);
  }
  {
    Mat m{"zero row", near_identity(D, seed + 10), 0};
    for (int j = 0; j < D; ++j) m.A[5 * D + j] = 0.0;
    mats.push_back(m);
  }
  const int n = static_cast<int>(mats.size());
  std::vector<float> Af;
  for (Mat& m : mats)
    for (double& v : m.A) v = static_cast<float>(v), Af.push_back(static_cast<float>(v));
  DeviceArray<float> A(Af), inv_t(static_cast<size_t>(n) * D * D);
  DeviceArray<int> s_lu(n), s_gj(n);
  DeviceArray<double> l_lu(n), l_gj(n);
  poison(inv_t);
  const size_t smem = kWarps * (D * (D + 1) + D) * sizeof(float);
  CUDA_CHECK(cudaFuncSetAttribute(warp_linalg_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  warp_linalg_kernel<D><<<(n + kWarps - 1) / kWarps, 32 * kWarps, smem>>>(
      A.get(), n, s_lu.get(), l_lu.get(), s_gj.get(), l_gj.get(), inv_t.get());
  CUDA_CHECK(cudaGetLastError());
  const std::vector<int> sl = s_lu.download(), sg = s_gj.download();
  const std::vector<double> ll = l_lu.download(), lg = l_gj.download();
  const std::vector<float> it = inv_t.download();
  for (int c = 0; c < n; ++c) {
    const Mat& m = mats[c];
    const LuRef ref = host_lu(m.A, D);
    INFO("D " << D << ", " << m.name);
    if (m.tol == 0) {  // exactly singular
      CHECK(ref.sign == 0);
      CHECK(sl[c] == 0);
      CHECK(sg[c] == 0);
      CHECK(std::isinf(ll[c]));
      CHECK(ll[c] < 0);
      CHECK(std::isinf(lg[c]));
      continue;
    }
    REQUIRE(ref.sign != 0);
    CHECK(sl[c] == ref.sign);
    CHECK(sg[c] == ref.sign);
    CHECK(std::fabs(ll[c] - ref.logabs) <= m.tol);
    CHECK(std::fabs(lg[c] - ref.logabs) <= m.tol);
    // it = J^{-T}: compare with the transpose of the reference inverse.
    std::vector<double> ref_t(static_cast<size_t>(D) * D);
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j) ref_t[i * D + j] = ref.inv[j * D + i];
    const Comparison e = compare(it.data() + static_cast<size_t>(c) * D * D, ref_t.data(), ref_t.size());
    INFO(describe("J^{-T}", e, m.tol));
    CHECK(e.rel <= m.tol);
    std::printf("warp linalg D %d %-26s: sign %+d, log|det| %.6f, |dlogdet| LU %.2e GJ %.2e, "
                "J^-1 rel %.2e\n",
                D, m.name.c_str(), ref.sign, ref.logabs, std::fabs(ll[c] - ref.logabs),
                std::fabs(lg[c] - ref.logabs), e.rel);
  }
}

}  // namespace

TEST_CASE("warp LU and Gauss-Jordan inverse match a float64 LU", "[gpu][barrier_tc]") {
  run_cases<32>(4100);
  run_cases<64>(4200);
}
