// GPU tests of the CUDA kernels at shapes whose element offsets pass 2^31 (where a 32-bit index
// product would wrap), and of the launchers' shape checks (a refused shape throws blm::Error, an
// empty one launches nothing).
//
// Large shapes: a kernel whose work per row / per (sequence, head) does not depend on where the
// row sits must give, for the rows past 2^31 elements, exactly the bits of the same rows run on
// their own (a small call with the same inputs).  A wrapped offset reads or writes another row and
// breaks that identity.  The small calls' correctness against float64 is tested elsewhere
// (test_cuda_kernels.cpp, test_barrier.cu); these check the indexing at scale.
//   cross-entropy: N = 43008 rows of V = 50304 (N * V = 2.16e9 > 2^31), fp32 (8.7 GB) and bf16
//                  (4.3 GB) logits, with the gradient written in place.
//   classifier products (cuBLAS fp32 as the fp32 backend calls it, cuBLASLt bf16 as the bf16
//                  backend does): logits [N, V] = lnf [N, K] wte^T, dwte += dlogits^T lnf and
//                  dlnf = dlogits wte with N = 43008, V = 50304, K = 64 (the [N, V] operand or
//                  result past 2^31 elements), against float64 for the rows past 2^31.
//   barrier (per-position kernels): B = 40, H = 16, T = 256, dh = 128: the backward's workspace
//                  G [B*H*T, dh, dh] has 2.7e9 floats (10.9 GB); the last sequence's slots start
//                  at 2.6e9.
// Both take about a second on an H200.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/attention_bf16.h"
#include "cuda/attention_flash.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/matmul_lt.h"
#include "tests/catch.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

using blm::cuda::AttentionShape;
using namespace blm::gputest;

// Storage of the logits: fp32, or bf16 bits in uint16_t (passed to the kernel as __nv_bfloat16).
template <class S>
std::vector<S> as_storage(const std::vector<float>& x);
template <>
std::vector<float> as_storage<float>(const std::vector<float>& x) {
  return x;
}
template <>
std::vector<uint16_t> as_storage<uint16_t>(const std::vector<float>& x) {
  return to_bits(x);
}
void run_ce(float* z, const int32_t* t, int N, int V, bool grad, float scale, float* loss,
            int32_t* hit) {
  blm::cuda::cross_entropy(z, t, N, V, grad, scale, loss, hit, nullptr);
}
void run_ce(uint16_t* z, const int32_t* t, int N, int V, bool grad, float scale, float* loss,
            int32_t* hit) {
  blm::cuda::cross_entropy(reinterpret_cast<__nv_bfloat16*>(z), t, N, V, grad, scale, loss, hit,
                           nullptr);
}

// Fills rows [P, N) of x [N, V] by doubling copies of rows [0, P) (row n = row n % P).
template <class S>
void tile_rows(S* x, int64_t P, int64_t N, int64_t V) {
  for (int64_t have = P; have < N;) {
    const int64_t n = std::min(have, N - have);
    CUDA_CHECK(cudaMemcpy(x + have * V, x, static_cast<size_t>(n * V) * sizeof(S),
                          cudaMemcpyDeviceToDevice));
    have += n;
  }
}

template <class S>
void check_cross_entropy_past_2g(const char* name) {
  constexpr int V = 50304, N = 43008, P = 8;  // N % P == 0: the last P rows are rows 0..P-1
  static_assert(static_cast<int64_t>(N - P) * V > (int64_t{1} << 31), "last rows past 2^31");
  INFO(name << ": N " << N << " V " << V);
  const std::vector<S> base = as_storage<S>(randn(static_cast<size_t>(P) * V, 9101, 3.0));
  const std::vector<int32_t> targets = randint(N, 9102, V);
  const float scale = 0.9f / N;

  // The last P rows on their own.
  const std::vector<int32_t> tail_targets(targets.end() - P, targets.end());
  DeviceArray<S> small(base);
  DeviceArray<int32_t> small_t(tail_targets), small_hit(P);
  DeviceArray<float> small_loss(P);
  run_ce(small.get(), small_t.get(), P, V, true, scale, small_loss.get(), small_hit.get());
  const std::vector<S> want_grad = small.download();
  const std::vector<float> want_loss = small_loss.download();
  const std::vector<int32_t> want_hit = small_hit.download();

  // All N rows: rows n = base[n % P].
  DeviceArray<S> big(static_cast<size_t>(N) * V);
  CUDA_CHECK(cudaMemcpy(big.get(), base.data(), base.size() * sizeof(S), cudaMemcpyHostToDevice));
  tile_rows(big.get(), P, N, V);
  DeviceArray<int32_t> big_t(targets), big_hit(N);
  DeviceArray<float> big_loss(N);
  poison(big_loss);
  run_ce(big.get(), big_t.get(), N, V, true, scale, big_loss.get(), big_hit.get());
  CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<S> got_grad(static_cast<size_t>(P) * V);
  CUDA_CHECK(cudaMemcpy(got_grad.data(), big.get() + static_cast<size_t>(N - P) * V,
                        got_grad.size() * sizeof(S), cudaMemcpyDeviceToHost));
  const std::vector<float> all_loss = big_loss.download();
  const std::vector<int32_t> all_hit = big_hit.download();
  const std::vector<float> got_loss(all_loss.end() - P, all_loss.end());
  const std::vector<int32_t> got_hit(all_hit.end() - P, all_hit.end());
  CHECK(bit_identical(got_loss, want_loss));
  CHECK(got_hit == want_hit);
  CHECK(std::memcmp(got_grad.data(), want_grad.data(), got_grad.size() * sizeof(S)) == 0);
  // The gradient was written (not the inputs left in place).
  CHECK(std::memcmp(got_grad.data(), base.data(), got_grad.size() * sizeof(S)) != 0);
}

// One sequence's slice [T, 3d] of qkv / dqkv for sequence b.
std::vector<float> sequence_slice(const std::vector<float>& x, int b, int T, int d) {
  const size_t len = static_cast<size_t>(T) * 3 * d;
  return std::vector<float>(x.begin() + b * len, x.begin() + (b + 1) * len);
}

// The values storage S holds for x, as float (x itself, or x rounded to bf16).
std::vector<float> stored_values(const std::vector<float>& x, bool bf16) {
  return bf16 ? rounded_bf16(x) : x;
}

// The classifier's shapes and float64 references.  lnf [N, K], wte [V, K] (values as stored);
// logits = lnf wte^T; with dlogits rows n = base[n % P] ([P, V]): dwte = dlogits^T lnf [V, K],
// dlnf = dlogits wte [N, K].
struct Classifier {
  static constexpr int N = 43008, V = 50304, K = 64, P = 8, kRows = 4;  // rows checked at the end
  static_assert(static_cast<int64_t>(N - kRows) * V > (int64_t{1} << 31), "rows past 2^31");
  std::vector<float> lnf, wte, base;
  // logits of rows N - kRows .. N - 1: [kRows, V]
  std::vector<double> logits_tail() const {
    std::vector<double> r(static_cast<size_t>(kRows) * V);
    for (int i = 0; i < kRows; ++i)
      for (int v = 0; v < V; ++v) {
        double s = 0;
        for (int k = 0; k < K; ++k)
          s += static_cast<double>(lnf[static_cast<size_t>(N - kRows + i) * K + k]) *
               wte[static_cast<size_t>(v) * K + k];
        r[static_cast<size_t>(i) * V + v] = s;
      }
    return r;
  }
  std::vector<double> dwte() const {
    std::vector<double> lsum(static_cast<size_t>(P) * K, 0.0);  // sum of lnf rows n = p mod P
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k) lsum[static_cast<size_t>(n % P) * K + k] += lnf[static_cast<size_t>(n) * K + k];
    std::vector<double> r(static_cast<size_t>(V) * K, 0.0);
    for (int v = 0; v < V; ++v)
      for (int p = 0; p < P; ++p) {
        const double g = base[static_cast<size_t>(p) * V + v];
        for (int k = 0; k < K; ++k) r[static_cast<size_t>(v) * K + k] += g * lsum[static_cast<size_t>(p) * K + k];
      }
    return r;
  }
  // dlnf of rows N - kRows .. N - 1: [kRows, K]
  std::vector<double> dlnf_tail() const {
    std::vector<double> r(static_cast<size_t>(kRows) * K, 0.0);
    for (int i = 0; i < kRows; ++i) {
      const float* g = &base[static_cast<size_t>((N - kRows + i) % P) * V];
      for (int v = 0; v < V; ++v)
        for (int k = 0; k < K; ++k)
          r[static_cast<size_t>(i) * K + k] += static_cast<double>(g[v]) * wte[static_cast<size_t>(v) * K + k];
    }
    return r;
  }
};

Classifier make_classifier(bool bf16) {
  Classifier c;
  c.lnf = stored_values(randn(static_cast<size_t>(Classifier::N) * Classifier::K, 9301), bf16);
  c.wte = stored_values(randn(static_cast<size_t>(Classifier::V) * Classifier::K, 9302, 0.1), bf16);
  c.base = stored_values(randn(static_cast<size_t>(Classifier::P) * Classifier::V, 9303, 0.01), bf16);
  return c;
}

// The last kRows rows [kRows, cols] of a device [rows, cols] matrix.
template <class S>
std::vector<S> download_tail(const S* x, int rows, int cols, int tail) {
  std::vector<S> h(static_cast<size_t>(tail) * cols);
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(h.data(), x + static_cast<size_t>(rows - tail) * cols, h.size() * sizeof(S),
                        cudaMemcpyDeviceToHost));
  return h;
}

}  // namespace

TEST_CASE("large shapes: classifier products past 2^31 elements (fp32 cuBLAS)", "[gpu][large]") {
  using C = Classifier;
  const Classifier c = make_classifier(false);
  cublasHandle_t h = blm::cuda::create_cublas(nullptr);
  DeviceArray<float> lnf(c.lnf), wte(c.wte), big(static_cast<size_t>(C::N) * C::V);
  // logits = lnf wte^T  (cuda_backend.cu forward_head)
  blm::cuda::gemm(h, false, true, C::N, C::V, C::K, 1.0f, lnf.get(), C::K, wte.get(), C::K, 0.0f,
                  big.get(), C::V);
  GPU_CHECK_REL("logits (last rows)", download_tail(big.get(), C::N, C::V, C::kRows),
                c.logits_tail(), 1e-5);
  // dlogits rows n = base[n % P]; dwte += dlogits^T lnf, dlnf = dlogits wte  (backward)
  CUDA_CHECK(cudaMemcpy(big.get(), c.base.data(), c.base.size() * sizeof(float),
                        cudaMemcpyHostToDevice));
  tile_rows(big.get(), C::P, C::N, C::V);
  DeviceArray<float> dwte(std::vector<float>(static_cast<size_t>(C::V) * C::K, 0.0f));
  DeviceArray<float> dlnf(static_cast<size_t>(C::N) * C::K);
  poison(dlnf);
  blm::cuda::gemm(h, true, false, C::V, C::K, C::N, 1.0f, big.get(), C::V, lnf.get(), C::K, 1.0f,
                  dwte.get(), C::K);
  blm::cuda::gemm(h, false, false, C::N, C::K, C::V, 1.0f, big.get(), C::V, wte.get(), C::K, 0.0f,
                  dlnf.get(), C::K);
  GPU_CHECK_REL("dwte", dwte.download(), c.dwte(), 1e-4);
  GPU_CHECK_REL("dlnf (last rows)", download_tail(dlnf.get(), C::N, C::K, C::kRows), c.dlnf_tail(),
                1e-4);
  blm::cuda::destroy_cublas(h);
}

TEST_CASE("large shapes: classifier products past 2^31 elements (bf16 cuBLASLt)", "[gpu][large]") {
  using C = Classifier;
  using blm::cuda::Dtype;
  using blm::cuda::LtOperand;
  const Classifier c = make_classifier(true);
  blm::cuda::LtMatmul lt;
  DeviceArray<uint16_t> lnf(as_storage<uint16_t>(c.lnf)), wte(as_storage<uint16_t>(c.wte));
  DeviceArray<uint16_t> big(static_cast<size_t>(C::N) * C::V);
  const LtOperand no_c{nullptr, Dtype::f32, 0};
  // logits [N, V] bf16 = lnf wte^T  (forward_head_bf16)
  lt.matmul(false, true, C::N, C::V, C::K, LtOperand{lnf.get(), Dtype::bf16, C::K},
            LtOperand{wte.get(), Dtype::bf16, C::K}, nullptr, 0.0f, no_c, big.get(), Dtype::bf16,
            C::V, nullptr);
  const std::vector<uint16_t> tail = download_tail(big.get(), C::N, C::V, C::kRows);
  std::vector<float> tail_f(tail.size());
  for (size_t i = 0; i < tail.size(); ++i) tail_f[i] = bf16_value(tail[i]);
  GPU_CHECK_REL("logits bf16 (last rows)", tail_f, c.logits_tail(), 4e-3);  // bf16 output: <= 2^-8 each, ~1-2e-3 RMS
  // dwte += dlogits^T lnf (C = D = dwte), dlnf = dlogits wte  (classifier_backward_bf16)
  const std::vector<uint16_t> base16 = as_storage<uint16_t>(c.base);
  CUDA_CHECK(cudaMemcpy(big.get(), base16.data(), base16.size() * sizeof(uint16_t),
                        cudaMemcpyHostToDevice));
  tile_rows(big.get(), C::P, C::N, C::V);
  DeviceArray<float> dwte(std::vector<float>(static_cast<size_t>(C::V) * C::K, 0.0f));
  DeviceArray<float> dlnf(static_cast<size_t>(C::N) * C::K);
  poison(dlnf);
  lt.matmul(true, false, C::V, C::K, C::N, LtOperand{big.get(), Dtype::bf16, C::V},
            LtOperand{lnf.get(), Dtype::bf16, C::K}, nullptr, 1.0f,
            LtOperand{dwte.get(), Dtype::f32, C::K}, dwte.get(), Dtype::f32, C::K, nullptr);
  lt.matmul(false, false, C::N, C::K, C::V, LtOperand{big.get(), Dtype::bf16, C::V},
            LtOperand{wte.get(), Dtype::bf16, C::K}, nullptr, 0.0f, no_c, dlnf.get(), Dtype::f32,
            C::K, nullptr);
  GPU_CHECK_REL("dwte (bf16 operands)", dwte.download(), c.dwte(), 1e-3);
  GPU_CHECK_REL("dlnf (bf16 operands, last rows)", download_tail(dlnf.get(), C::N, C::K, C::kRows),
                c.dlnf_tail(), 1e-3);
}

TEST_CASE("large shapes: cross-entropy rows past 2^31 logits (fp32)", "[gpu][large]") {
  check_cross_entropy_past_2g<float>("fp32");
}

TEST_CASE("large shapes: cross-entropy rows past 2^31 logits (bf16)", "[gpu][large]") {
  check_cross_entropy_past_2g<uint16_t>("bf16");
}

TEST_CASE("large shapes: barrier kernels with a workspace past 2^31 floats", "[gpu][large]") {
  const int B = 40, H = 16, T = 256, dh = 128, d = H * dh;
  const AttentionShape big{B, T, H, dh}, one{1, T, H, dh};
  REQUIRE(static_cast<int64_t>(B - 1) * H * T * dh * dh > (int64_t{1} << 31));
  const size_t seq = static_cast<size_t>(T) * 3 * d;
  // Sequences 0 .. B-2 share one random sequence, the last has its own (what is checked).
  const std::vector<float> common = randn(seq, 9201, 0.3), last = randn(seq, 9202, 0.3);
  std::vector<float> qkv(seq * B);
  for (int b = 0; b < B; ++b)
    std::copy((b == B - 1 ? last : common).begin(), (b == B - 1 ? last : common).end(),
              qkv.begin() + b * seq);
  const std::vector<float> dq_seq = randn(seq, 9203, 1.0);  // the same initial dqkv per sequence
  std::vector<float> dqkv0(seq * B);
  for (int b = 0; b < B; ++b) std::copy(dq_seq.begin(), dq_seq.end(), dqkv0.begin() + b * seq);
  const double eps = 0.05;
  const float scale = 0.37f;

  // The last sequence on its own.
  DeviceArray<float> q1(last), dq1(sequence_slice(dqkv0, B - 1, T, d));
  DeviceArray<float> ld1(static_cast<size_t>(H) * T), phi1(ld1.size());
  DeviceArray<char> ws1(blm::cuda::barrier_workspace_bytes(one));
  blm::cuda::barrier_forward(one, q1.get(), nullptr, eps, ld1.get(), phi1.get(), ws1.get(), nullptr);
  blm::cuda::barrier_backward(one, q1.get(), nullptr, eps, scale, dq1.get(), ws1.get(), nullptr);
  const std::vector<float> want_ld = ld1.download(), want_phi = phi1.download(),
                           want_dq = dq1.download();

  DeviceArray<float> qb(qkv), dqb(dqkv0);
  DeviceArray<float> ldb(static_cast<size_t>(B) * H * T), phib(ldb.size());
  poison(ldb);
  poison(phib);
  const size_t ws_bytes = blm::cuda::barrier_workspace_bytes(big);
  REQUIRE(ws_bytes > (size_t{1} << 31) * sizeof(float));
  DeviceArray<char> wsb(ws_bytes);
  blm::cuda::barrier_forward(big, qb.get(), nullptr, eps, ldb.get(), phib.get(), wsb.get(), nullptr);
  blm::cuda::barrier_backward(big, qb.get(), nullptr, eps, scale, dqb.get(), wsb.get(), nullptr);
  const std::vector<float> all_ld = ldb.download(), all_phi = phib.download(),
                           all_dq = dqb.download();
  const size_t bht = static_cast<size_t>(H) * T;
  const std::vector<float> got_ld(all_ld.end() - bht, all_ld.end()),
      got_phi(all_phi.end() - bht, all_phi.end());
  CHECK(bit_identical(got_ld, want_ld));
  CHECK(bit_identical(got_phi, want_phi));
  CHECK(bit_identical(sequence_slice(all_dq, B - 1, T, d), want_dq));
  // The checked values are real: finite log-determinants and a gradient that changed dqkv.
  bool finite = true;
  for (float v : want_ld) finite = finite && std::isfinite(v);
  CHECK(finite);
  CHECK_FALSE(bit_identical(want_dq, sequence_slice(dqkv0, B - 1, T, d)));
}

TEST_CASE("shape checks: refused shapes throw blm::Error before any launch", "[gpu][large]") {
  DeviceArray<float> any(64), lse(64);
  DeviceArray<uint16_t> out16(64);
  auto* out = reinterpret_cast<__nv_bfloat16*>(out16.get());
  char ws[1];
  // Head sizes the kernels lack.
  for (int dh : {16, 48, 96, 256}) {
    INFO("dh " << dh);
    const AttentionShape s{1, 4, 2, dh};
    CHECK_THROWS_AS(blm::cuda::attention_forward(s, any.get(), any.get(), lse.get(), nullptr),
                    blm::Error);
    CHECK_THROWS_AS(blm::cuda::barrier_forward(s, any.get(), nullptr, 0.1, any.get(), any.get(),
                                               ws, nullptr),
                    blm::Error);
    CHECK_THROWS_AS(blm::cuda::barrier_backward(s, any.get(), nullptr, 0.1, 1.0f, any.get(), ws,
                                                nullptr),
                    blm::Error);
    CHECK_THROWS_AS(blm::cuda::barrier_jacobians(s, any.get(), any.get(), nullptr), blm::Error);
    CHECK_THROWS_AS(blm::cuda::flash_attention_forward(s, any.get(), out, lse.get(), nullptr),
                    blm::Error);
  }
  // (b, h) on the grid's y axis: B*H > 65535 is refused, not launched with a truncated grid.
  const AttentionShape wide{65536, 1, 1, 64};
  CHECK_THROWS_AS(blm::cuda::attention_forward(wide, any.get(), any.get(), lse.get(), nullptr),
                  blm::Error);
  CHECK_THROWS_AS(blm::cuda::barrier_forward(wide, any.get(), nullptr, 0.1, any.get(), any.get(),
                                             ws, nullptr),
                  blm::Error);
  CHECK_THROWS_AS(blm::cuda::flash_attention_forward(wide, any.get(), out, lse.get(), nullptr),
                  blm::Error);
  // No heads: a grid with y = 0 would be an invalid launch.
  const AttentionShape headless{2, 8, 0, 64};
  CHECK_THROWS_AS(blm::cuda::attention_forward(headless, any.get(), any.get(), lse.get(), nullptr),
                  blm::Error);
  CHECK_THROWS_AS(blm::cuda::flash_attention_forward(headless, any.get(), out, lse.get(), nullptr),
                  blm::Error);
  CHECK_THROWS_AS(blm::cuda::flash_attention_backward(headless, any.get(), out, any.get(),
                                                      lse.get(), any.get(), any.get(), nullptr),
                  blm::Error);
  CHECK(cudaGetLastError() == cudaSuccess);  // nothing was launched
}

TEST_CASE("shape checks: empty tensors launch nothing and raise no error", "[gpu][large]") {
  CUDA_CHECK(cudaDeviceSynchronize());
  REQUIRE(cudaGetLastError() == cudaSuccess);
  DeviceArray<double> partials(blm::cuda::kReducePartials + 1);
  // N = 0 rows (a null pointer would fault if anything were launched on it).
  CHECK_NOTHROW(blm::cuda::cross_entropy(static_cast<float*>(nullptr), nullptr, 0, 50304, true,
                                         1.0f, nullptr, nullptr, nullptr));
  CHECK_NOTHROW(blm::cuda::layernorm_forward(nullptr, nullptr, nullptr, 0, 768,
                                             static_cast<float*>(nullptr), nullptr, nullptr,
                                             nullptr));
  CHECK_NOTHROW(blm::cuda::layernorm_backward_accumulate(nullptr, nullptr, nullptr, nullptr,
                                                         nullptr, 0, 768, nullptr, nullptr,
                                                         nullptr, nullptr, nullptr));
  CHECK_NOTHROW(blm::cuda::column_sum_accumulate(static_cast<const float*>(nullptr), 0, 768,
                                                 nullptr, nullptr, nullptr));
  CHECK_NOTHROW(blm::cuda::add_bias(nullptr, nullptr, 0, 768, nullptr));
  CHECK_NOTHROW(blm::cuda::embedding_forward(nullptr, nullptr, nullptr, 0, 16, 64, 0.0, 1,
                                             nullptr, nullptr));
  CHECK_NOTHROW(blm::cuda::embedding_forward(nullptr, nullptr, nullptr, 4, 0, 64, 0.0, 1,
                                             nullptr, nullptr));
  CHECK_NOTHROW(blm::cuda::embedding_backward_wte_accumulate(nullptr, nullptr, nullptr, nullptr, 0,
                                                             64, nullptr, nullptr));
  CHECK_NOTHROW(blm::cuda::embedding_backward_wpe_accumulate(nullptr, 4, 0, 64, nullptr, nullptr));
  CHECK_NOTHROW(blm::cuda::adamw_update(nullptr, nullptr, nullptr, nullptr, 0,
                                        blm::cuda::DecayTable{}, blm::AdamWScalars{}, nullptr));
  // B = 0 or T = 0 sequences.
  for (const AttentionShape& s : {AttentionShape{0, 16, 4, 64}, AttentionShape{2, 0, 4, 64}}) {
    INFO("B " << s.B << " T " << s.T);
    CHECK_NOTHROW(blm::cuda::attention_forward(s, nullptr, nullptr, nullptr, nullptr));
    CHECK_NOTHROW(blm::cuda::attention_backward(s, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                nullptr, nullptr));
    CHECK_NOTHROW(blm::cuda::barrier_forward(s, nullptr, nullptr, 0.1, nullptr, nullptr, nullptr,
                                             nullptr));
    CHECK_NOTHROW(blm::cuda::barrier_backward(s, nullptr, nullptr, 0.1, 1.0f, nullptr, nullptr,
                                              nullptr));
    CHECK_NOTHROW(blm::cuda::barrier_jacobians(s, nullptr, nullptr, nullptr));
    CHECK_NOTHROW(blm::cuda::flash_attention_forward(s, static_cast<const float*>(nullptr), nullptr,
                                                     nullptr, nullptr));
  }
  // Reductions over nothing give 0 (one block of stage 1 still runs, reading nothing).
  blm::cuda::reduce_sum(static_cast<const float*>(nullptr), 0, partials.get(),
                        partials.get() + blm::cuda::kReducePartials, nullptr);
  CHECK(partials.download()[blm::cuda::kReducePartials] == 0.0);
  CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(cudaGetLastError() == cudaSuccess);
}
