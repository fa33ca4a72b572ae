// Fused softmax cross-entropy over the classifier logits, one block per row (position).
//
//   logits [N, V], targets [N] in [0, V)
//   m = max_c logits[n, c],  s = sum_c exp(logits[n, c] - m),  lse = m + log s
//   row_loss[n] = lse - logits[n, y]
//   row_hit[n]  = (argmax_c logits[n, c] == y), the first index among equal maxima
//   write_grad: logits[n, c] = (exp(logits[n, c] - m) / s - [c == y]) * grad_scale   (in place)
// The logits are fp32 or bf16 (the bf16 precision); the math is fp32 either way, the gradient is
// stored in their type.
//
// Bandwidth (V = 50304 bf16 is a 100 KB row): the row is read from HBM once.  Pass 1 streams it in
// 16-byte vectors keeping an online (max, sum of exp(x - max), first argmax) per thread, merged
// across the block in a fixed butterfly order (deterministic).  With write_grad, pass 1 also
// keeps the row in shared memory (when it fits twice per SM), and pass 2 recomputes exp from that
// copy and writes the gradient; each thread re-reads only the vectors it wrote, so the copy needs
// no barrier.  Rows too long for shared memory are re-read from global memory (mostly L2 hits).
// On sm_90+ (BLM_CE=bulk, the default) the cached row arrives by one bulk copy
// (cuda/bulk_copy.cuh) started by one thread, so all of its 100 KB are in flight at once (the
// vector loads, BLM_CE=vector and older GPUs, keep 512 x 4 x 16 = 32 KB in flight a round,
// three rounds a row) and pass 1 reads it from shared memory in the same order: the same bits.
// Measured on an H200 at (a) (4096 x 50304 bf16 rows, 2026-11-29, Nsight Compute): 270 us a
// launch against 317 us with the vector loads.
// exp(x) = exp2(x log2 e) via exp2f (MUFU.EX2, 2 ulp), argument (x - m) * log2 e.
#include <algorithm>
#include <climits>

#include "cuda/bulk_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/pdl.cuh"
#include "cuda/vector_io.cuh"

namespace blm {
namespace cuda {

namespace {

constexpr int kCeMaxThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;
// Vectors per thread loaded together.  8 measured slower at (a) (1.67 against 1.27 ms a step):
// 97 registers instead of 60 leave room for one block of 512 threads per SM instead of two.
constexpr int kBatch = 4;

// Online softmax state of a set of logits: maximum m, sum of exp(x - m), first index of m.
struct SoftmaxState {
  float m = -INFINITY;
  float s = 0.0f;
  int idx = INT_MAX;
};

// Merge of two states.  Ties of the maximum go to the smaller index (a total order for non-NaN
// values), and the sum is s1 e^(m1-M) + s2 e^(m2-M) (commutative, so both lanes of a butterfly
// get the same bits).  A state with no elements (m = -inf) contributes nothing.
__device__ __forceinline__ SoftmaxState merge(const SoftmaxState& a, const SoftmaxState& b) {
  SoftmaxState r;
  r.m = fmaxf(a.m, b.m);
  if (a.m > b.m || (a.m == b.m && a.idx < b.idx))
    r.idx = a.idx;
  else
    r.idx = b.idx;
  const float sa = a.m == -INFINITY ? 0.0f : a.s * exp2f((a.m - r.m) * kLog2e);
  const float sb = b.m == -INFINITY ? 0.0f : b.s * exp2f((b.m - r.m) * kLog2e);
  r.s = sa + sb;
  return r;
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState st) {
  for (int o = 16; o > 0; o >>= 1) {
    SoftmaxState other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, o);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, o);
    other.idx = __shfl_xor_sync(0xffffffffu, st.idx, o);
    st = merge(st, other);
  }
  return st;
}

// Every thread gets the block's merged state.  Fixed order: lanes by butterfly, then warps by
// butterfly over the 32 slots (empty slots are neutral).
__device__ SoftmaxState block_merge(SoftmaxState st) {
  __shared__ float sm[32], ss[32];
  __shared__ int si[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  st = warp_merge(st);
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
    si[warp] = st.idx;
  }
  __syncthreads();
  SoftmaxState w;
  if (lane < nwarps) {
    w.m = sm[lane];
    w.s = ss[lane];
    w.idx = si[lane];
  }
  return warp_merge(w);
}

// Adds a vector of K logits starting at column c to the thread's state.  Within a thread the
// columns ascend, so only a strictly larger maximum moves the argmax (first index kept).
template <int K>
__device__ __forceinline__ void absorb(SoftmaxState& st, const float (&x)[K], int c) {
  float vmax = x[0];
#pragma unroll
  for (int j = 1; j < K; ++j) vmax = fmaxf(vmax, x[j]);
  if (vmax > st.m) {
    int j0 = 0;
#pragma unroll
    for (int j = K - 1; j >= 0; --j)
      if (x[j] == vmax) j0 = j;
    st.s *= exp2f((st.m - vmax) * kLog2e);  // 0 while st.m = -inf (st.s is 0 then too)
    st.m = vmax;
    st.idx = c + j0;
  }
#pragma unroll
  for (int j = 0; j < K; ++j) st.s += exp2f((x[j] - st.m) * kLog2e);
}

// T: float or bf16 logits.  W: elements per vector (16 bytes, or 1 when the row is not a multiple
// of 16 bytes or the buffer is unaligned).  kCache: keep the row in dynamic shared memory for
// pass 2 (V * sizeof(T) bytes, rounded up to 16).  kBulk (with kCache, W 16 bytes, V * sizeof(T)
// a multiple of 16): the row comes into that memory by one bulk copy before pass 1.
template <class T, int W, bool kCache, bool kBulk = false>
__global__ void __launch_bounds__(kCeMaxThreads)
    cross_entropy_kernel(T* __restrict__ logits, const int32_t* __restrict__ targets, int V,
                         bool write_grad, float grad_scale, float* __restrict__ row_loss,
                         int32_t* __restrict__ row_hit) {
  static_assert(!kBulk || kCache, "the bulk copy fills the shared-memory row");
  extern __shared__ uint4 cache_raw[];
  T* cache = reinterpret_cast<T*>(cache_raw);
  __shared__ alignas(8) uint64_t row_arrived;  // (kBulk)
  if constexpr (kBulk) {
    if (threadIdx.x == 0) mbarrier_init(&row_arrived, 1);
    mbarrier_init_fence();
    __syncthreads();
  }
  pdl_wait();
  pdl_launch_dependents();
  const int64_t n = blockIdx.x;
  T* row = logits + n * V;
  const int nvec = V / W;
  if constexpr (kBulk) {
    if (threadIdx.x == 0)
      bulk_copy_to_shared(cache, row, static_cast<uint32_t>(V * sizeof(T)), &row_arrived);
  }
  const int y = targets[n];
  // Read before any thread overwrites the row (the writes follow block_merge's barrier).
  const float x_target = threadIdx.x == 0 ? load_f(row[y]) : 0.0f;

  // Batches of kBatch vectors per thread: all loads of a batch are issued before any is used
  // (bytes in flight), and they are absorbed in ascending column order.
  SoftmaxState st;
  if constexpr (kBulk) mbarrier_wait(&row_arrived, 0);
  const int step = blockDim.x;
  for (int v0 = threadIdx.x; v0 < nvec; v0 += kBatch * step) {
    float x[kBatch][W];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (v0 + u * step >= nvec) continue;
      if constexpr (kBulk)
        load_vec<W>(cache + (v0 + u * step) * W, x[u]);
      else
        load_vec<W>(row + static_cast<int64_t>(v0 + u * step) * W, x[u]);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int v = v0 + u * step;
      if (v >= nvec) break;
      if constexpr (kCache && !kBulk) store_vec<W>(cache + v * W, x[u]);  // exact: x came from T
      absorb<W>(st, x[u], v * W);
    }
  }
  st = block_merge(st);

  if (threadIdx.x == 0) {
    row_loss[n] = (st.m + logf(st.s)) - x_target;
    row_hit[n] = st.idx == y ? 1 : 0;
  }
  if (!write_grad) return;

  const float inv_s = 1.0f / st.s, m = st.m;
  for (int v0 = threadIdx.x; v0 < nvec; v0 += kBatch * step) {
    float x[kBatch][W];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int v = v0 + u * step;
      if (v >= nvec) break;
      if constexpr (kCache)
        load_vec<W>(cache + v * W, x[u]);  // this thread's own vector: no barrier needed
      else
        load_vec<W>(row + static_cast<int64_t>(v) * W, x[u]);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int v = v0 + u * step;
      if (v >= nvec) break;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float p = exp2f((x[u][j] - m) * kLog2e) * inv_s;
        x[u][j] = (p - (v * W + j == y ? 1.0f : 0.0f)) * grad_scale;
      }
      store_vec<W>(row + static_cast<int64_t>(v) * W, x[u]);
    }
  }
}

// BLM_CE: "bulk" (default: the cached row by one bulk copy; sm_90 and later, else the vector
// loads) or "vector".  Read on every call (a few calls a step), so tests can compare the two.
bool bulk_row_copy_chosen() {
  if (env_choice("BLM_CE", {"bulk", "vector"}, 0) != 0) return false;
  int dev = 0, major = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major >= 9;
}

// Largest dynamic shared memory one block may opt into on the current device.
int max_optin_smem() {
  int dev = 0, bytes = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

template <class T, int W, bool kCache, bool kBulk = false>
void launch_ce(T* logits, const int32_t* targets, int N, int V, bool write_grad, float grad_scale,
               float* row_loss, int32_t* row_hit, size_t smem, cudaStream_t stream) {
  auto kernel = cross_entropy_kernel<T, W, kCache, kBulk>;
  if (kCache) allow_dynamic_smem(kernel, smem);
  // About 4+ vectors per thread: enough bytes in flight per block without idle threads on short
  // rows.  A multiple of 32 (block_merge works on whole warps).
  const int nvec = V / W;
  const int threads = static_cast<int>(
      std::min<int64_t>(kCeMaxThreads, std::max<int64_t>(32, ceil_div(ceil_div(nvec, 4), 32) * 32)));
  launch_pdl(kernel, N, threads, kCache ? smem : 0, stream, logits, targets, V, write_grad,
             grad_scale, row_loss, row_hit);
}

template <class T>
void cross_entropy_impl(T* logits, const int32_t* targets, int N, int V, bool write_grad,
                        float grad_scale, float* row_loss, int32_t* row_hit, cudaStream_t stream,
                        const char* name) {
  if (N == 0) return;
  constexpr int W = kVecWidth<T>;
  const bool vec = V % W == 0 && aligned16(logits);
  const size_t smem = (static_cast<size_t>(V) * sizeof(T) + 15) / 16 * 16;
  // Cache only when two blocks still fit per SM (occupancy matters more than the re-read).
  const bool cache = write_grad && smem <= static_cast<size_t>(max_optin_smem()) / 2;
  if (vec && cache && V * sizeof(T) % 16 == 0 && bulk_row_copy_chosen())
    launch_ce<T, W, true, true>(logits, targets, N, V, write_grad, grad_scale, row_loss, row_hit,
                                smem, stream);
  else if (vec && cache)
    launch_ce<T, W, true>(logits, targets, N, V, write_grad, grad_scale, row_loss, row_hit, smem,
                          stream);
  else if (vec)
    launch_ce<T, W, false>(logits, targets, N, V, write_grad, grad_scale, row_loss, row_hit, smem,
                           stream);
  else if (cache)
    launch_ce<T, 1, true>(logits, targets, N, V, write_grad, grad_scale, row_loss, row_hit, smem,
                          stream);
  else
    launch_ce<T, 1, false>(logits, targets, N, V, write_grad, grad_scale, row_loss, row_hit, smem,
                           stream);
  BLM_CHECK_LAUNCH(name);
}

}  // namespace

void cross_entropy(float* logits, const int32_t* targets, int N, int V, bool write_grad,
                   float grad_scale, float* row_loss, int32_t* row_hit, cudaStream_t stream) {
  cross_entropy_impl(logits, targets, N, V, write_grad, grad_scale, row_loss, row_hit, stream,
                     "cross_entropy");
}

void cross_entropy(__nv_bfloat16* logits, const int32_t* targets, int N, int V, bool write_grad,
                   float grad_scale, float* row_loss, int32_t* row_hit, cudaStream_t stream) {
  cross_entropy_impl(logits, targets, N, V, write_grad, grad_scale, row_loss, row_hit, stream,
                     "cross_entropy(bf16)");
}

}  // namespace cuda
}  // namespace blm
