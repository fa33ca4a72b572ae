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
// Epilogues besides the bias (LtEpilogue, the overload of matmul taking one), in the same
// row-major terms:
//   bias_grad:       bias_grad[i] = sum_k op(A)[i, k]   (i < M; D's type): the bias gradient of a
//                    weight-gradient product dW = dY^T X, read from the dY operand it multiplies
//                    (cuBLASLt's BGRADB: our A is its B).  The product itself is unchanged.
//   gelu_aux_bias:   aux = op(A) op(B) + bias, D = gelu_tanh(aux)   (aux [M, N], D's type)
//   dgelu_bias_grad: D = gelu_tanh'(aux) * (op(A) op(B)),  bias_grad[j] = sum_i D[i, j]  (j < N;
//                    bias_grad_type, fp32 or D's type)
// A bias gradient is written (overwritten), never added to.  cuBLASLt's GELU is its own
// (GELU_AUX_BIAS / DGELU_BGRAD); tests/gpu/test_lt_epilogues.cpp checks it against the tanh form
// the spec uses, gelu_ref.  The backend uses bias_grad by default; the GELU kinds measured slower
// on the H200 than the separate GELU kernels (cuda/cuda_backend.cu, BLM_LT_EPILOGUES).
//
// Plans (operation descriptor, layouts, the heuristic's algorithm) are cached per shape, types,
// epilogue and pointer alignment, so a training step asks the heuristic only on its first call.
// Reductions of split-K algorithms use workspace (never "in place" in the output), so a product
// gives bit-identical results on every run.  Products with large outputs (at least 2^20 elements,
// BLM_LT_NO_WORKSPACE_FROM) are planned without workspace, so without split-K: measured faster
// on the H200 (matmul_lt.cu, kNoWorkspaceFrom).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

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

// An epilogue beyond "+ bias" (see the top of this file).
struct LtEpilogue {
  enum class Kind : int { none = 0, bias_grad = 1, gelu_aux_bias = 2, dgelu_bias_grad = 3 };
  Kind kind = Kind::none;
  void* bias_grad = nullptr;            // bias_grad, dgelu_bias_grad: [M] resp. [N], written
  Dtype bias_grad_type = Dtype::f32;    // dgelu_bias_grad only (bias_grad: D's type)
  void* aux = nullptr;                  // gelu_aux_bias: written; dgelu_bias_grad: read
  int aux_ld = 0;                       // aux row stride (elements, a multiple of 8, >= N)
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
  // The same with an epilogue (gelu_aux_bias takes `bias`; the bias-gradient kinds take none).
  void matmul(bool trans_a, bool trans_b, int M, int N, int K, LtOperand A, LtOperand B,
              const void* bias, float beta, LtOperand C, void* D, Dtype d_type, int ldd,
              cudaStream_t stream, const LtEpilogue& epilogue);
  // The same, but returning false (and computing nothing) where cuBLASLt has no algorithm for
  // this epilogue at this shape and these types, so the caller can use its own kernels instead;
  // the answer is kept with the plan (asked once).  Other errors throw as matmul.
  bool try_matmul(bool trans_a, bool trans_b, int M, int N, int K, LtOperand A, LtOperand B,
                  const void* bias, float beta, LtOperand C, void* D, Dtype d_type, int ldd,
                  cudaStream_t stream, const LtEpilogue& epilogue);

  size_t plans() const { return plans_.size(); }

 private:
  struct Plan;
  struct Request;  // one call's shapes, types, pointers and epilogue (matmul_lt.cu)
  using Key = std::array<int, 22>;
  Plan& plan_for(const Key& key, const Request& r);
  void build_plan(Plan& p, const Request& r);
  bool ask_heuristic(const Plan& p, const Request& r, size_t ws,
                     cublasLtMatmulHeuristicResult_t& result, cublasStatus_t& st);
  // Runs r (false: cuBLASLt cannot, nothing ran; `why` says why).
  bool run(const Request& r, cudaStream_t stream, std::string& why);

  cublasLtHandle_t handle_ = nullptr;
  DeviceBuffer workspace_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace cuda
}  // namespace blm
