// Matrix products through cuBLASLt for the bf16 precision: bf16 (or fp32) operands, fp32
// accumulation, bf16 or fp32 output, an optional bias epilogue and an optional added matrix C
// (beta = 1), so "residual + x W^T + b" is one call.  Row-major, like cuda/kernels.h's gemm:
//
//   D[M,N] = op(A)[M,K] op(B)[K,N] (+ bias[N] broadcast over rows) (+ beta * C[M,N])
//
// op(A) = A^T when trans_a (A stored [K, M]); lda/ldb/ldc/ldd are row strides in elements.
// A and B have the same type; C (when beta != 0) has D's type; the bias has D's type (cuBLASLt's
// rule).  C may be D itself (in-place accumulation, dW += ...).
//
// Plans (operation descriptor, layouts, the heuristic's algorithm) are cached per shape, types,
// epilogue and pointer alignment, so a training step asks the heuristic only on its first call.
// Reductions of split-K algorithms use workspace (never "in place" in the output), so a product
// gives bit-identical results on every run.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "cuda/common.cuh"

namespace blm {
namespace cuda {

enum class Dtype : int { f32 = 0, bf16 = 1 };

struct LtOperand {
  const void* ptr;
  Dtype type;
  int ld;  // row stride (elements)
};

class LtMatmul {
 public:
  // Creates the cuBLASLt handle and a workspace of workspace_bytes on the current device.
  explicit LtMatmul(size_t workspace_bytes = size_t(32) << 20);
  ~LtMatmul();
  LtMatmul(const LtMatmul&) = delete;
  LtMatmul& operator=(const LtMatmul&) = delete;

  // D = op(A) op(B) [+ bias] [+ beta C]; see the top of this file.  bias: null or [N] of D's
  // type.  C: ignored when beta == 0.  Throws DeviceError naming the shape when cuBLASLt has no
  // algorithm for it.
  void matmul(bool trans_a, bool trans_b, int M, int N, int K, LtOperand A, LtOperand B,
              const void* bias, float beta, LtOperand C, void* D, Dtype d_type, int ldd,
              cudaStream_t stream);

  size_t plans() const { return plans_.size(); }

 private:
  struct Plan;
  using Key = std::tuple<int, int, int, int, int, int, int, int, int, int, int, int, int, int,
                         int, int, int>;
  Plan& plan_for(const Key& key, bool trans_a, bool trans_b, int M, int N, int K, Dtype ab,
                 int lda, int ldb, Dtype cd, int ldc, int ldd, const void* bias, int align_a,
                 int align_b, int align_c, int align_d);

  cublasLtHandle_t handle_ = nullptr;
  DeviceBuffer workspace_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace cuda
}  // namespace blm
