// cuBLASLt matrix products for the bf16 precision (cuda/matmul_lt.h says what they compute).
//
// Row-major to column-major, as in cuda/matmul.cu: a row-major X [r, c] with row stride ld is the
// column-major X^T [c, r] with leading dimension ld.  So the row-major D[M,N] = op(A) op(B) is
// the column-major D^T[N,M] = op(B)^T op(A)^T: cuBLASLt's "A" is our B and its "B" is our A,
// m = N, n = M, k = K.  cuBLASLt's bias is a vector over the m rows of its column-major D, i.e.
// over our N columns: one value per output feature, as y = x W^T + b needs.
#include <string>

#include "cuda/matmul_lt.h"

namespace blm {
namespace cuda {

namespace {

#define BLM_LT_CHECK(call) CUBLAS_CHECK(call)

cudaDataType_t cuda_type(Dtype t) { return t == Dtype::bf16 ? CUDA_R_16BF : CUDA_R_32F; }

// The largest power of two (<= 256) dividing the address: what the heuristic may assume.
int alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int al = 256;
  while (al > 1 && (a % al) != 0) al >>= 1;
  return al;
}

std::string shape_text(bool ta, bool tb, int M, int N, int K, Dtype ab, Dtype cd) {
  return std::string("[") + std::to_string(M) + " x " + std::to_string(K) + "]" + (ta ? "^T" : "") +
         " x [" + std::to_string(K) + " x " + std::to_string(N) + "]" + (tb ? "^T" : "") + " (" +
         (ab == Dtype::bf16 ? "bf16" : "fp32") + " in, " + (cd == Dtype::bf16 ? "bf16" : "fp32") +
         " out)";
}

}  // namespace

struct LtMatmul::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool bias = false;
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

LtMatmul::LtMatmul(size_t workspace_bytes)
    : workspace_(workspace_bytes, "the cuBLASLt workspace") {
  BLM_LT_CHECK(cublasLtCreate(&handle_));
}

LtMatmul::~LtMatmul() {
  plans_.clear();
  if (handle_) cublasLtDestroy(handle_);
}

LtMatmul::Plan& LtMatmul::plan_for(const Key& key, bool trans_a, bool trans_b, int M, int N,
                                   int K, Dtype ab, int lda, int ldb, Dtype cd, int ldc, int ldd,
                                   const void* bias, int align_a, int align_b, int align_c,
                                   int align_d) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  auto plan = std::make_unique<Plan>();
  Plan& p = *plan;
  p.bias = bias != nullptr;
  BLM_LT_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLASLt's A is our B, its B our A (see the top of this file).
  const cublasOperation_t op_lt_a = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_lt_b = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  BLM_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_lt_a,
                                              sizeof op_lt_a));
  BLM_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_lt_b,
                                              sizeof op_lt_b));
  const cublasLtEpilogue_t epilogue = p.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  BLM_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                              sizeof epilogue));
  // The heuristic reads the bias pointer's alignment from its value: set it before asking.
  if (p.bias)
    BLM_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof bias));
  // Column-major shapes of what is stored: our B is [N, K] col-major when not transposed
  // (row-major [K, N]), [K, N] when transposed (row-major [N, K]); likewise A.
  const int m = N, n = M, k = K;
  BLM_LT_CHECK(cublasLtMatrixLayoutCreate(&p.a, cuda_type(ab), trans_b ? k : m, trans_b ? m : k, ldb));
  BLM_LT_CHECK(cublasLtMatrixLayoutCreate(&p.b, cuda_type(ab), trans_a ? n : k, trans_a ? k : n, lda));
  BLM_LT_CHECK(cublasLtMatrixLayoutCreate(&p.c, cuda_type(cd), m, n, ldc));
  BLM_LT_CHECK(cublasLtMatrixLayoutCreate(&p.d, cuda_type(cd), m, n, ldd));

  cublasLtMatmulPreference_t pref = nullptr;
  BLM_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = workspace_.bytes();
  // No "in place" split-K reduction: the others reduce in a fixed order through the workspace.
  const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE |
                           CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
  const uint32_t al[4] = {static_cast<uint32_t>(align_b), static_cast<uint32_t>(align_a),
                          static_cast<uint32_t>(align_c), static_cast<uint32_t>(align_d)};
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                              &schemes, sizeof schemes);
  const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4 && st == CUBLAS_STATUS_SUCCESS; ++i)
    st = cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &al[i], sizeof al[i]);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.d, pref, 1, &result,
                                        &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    throw DeviceError("cuBLASLt has no algorithm for the product " +
                      shape_text(trans_a, trans_b, M, N, K, ab, cd) + (p.bias ? " with bias" : "") +
                      " (status " + std::to_string(static_cast<int>(st)) + ")");
  p.algo = result.algo;
  Plan& ref = p;
  plans_.emplace(key, std::move(plan));
  return ref;
}

void LtMatmul::matmul(bool trans_a, bool trans_b, int M, int N, int K, LtOperand A, LtOperand B,
                      const void* bias, float beta, LtOperand C, void* D, Dtype d_type, int ldd,
                      cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  if (A.type != B.type)
    throw DeviceError("LtMatmul: operands A and B must have the same type");
  const bool add_c = beta != 0.0f;
  if (add_c && C.type != d_type) throw DeviceError("LtMatmul: C must have D's type");
  const void* c_ptr = add_c ? C.ptr : D;
  const int ldc = add_c ? C.ld : ldd;
  const int align_a = alignment_of(A.ptr), align_b = alignment_of(B.ptr);
  const int align_c = alignment_of(c_ptr), align_d = alignment_of(D);
  const Key key{trans_a, trans_b, M, N, K, static_cast<int>(A.type), A.ld, B.ld,
                static_cast<int>(d_type), ldc, ldd, bias ? alignment_of(bias) : 0, add_c,
                align_a, align_b, align_c, align_d};
  Plan& p = plan_for(key, trans_a, trans_b, M, N, K, A.type, A.ld, B.ld, d_type, ldc, ldd, bias,
                     align_a, align_b, align_c, align_d);
  if (p.bias)
    BLM_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof bias));
  const float alpha = 1.0f;
  BLM_LT_CHECK(cublasLtMatmul(handle_, p.op, &alpha, B.ptr, p.a, A.ptr, p.b, &beta, c_ptr, p.c, D,
                              p.d, &p.algo, workspace_.get(), workspace_.bytes(), stream));
}

#undef BLM_LT_CHECK

}  // namespace cuda
}  // namespace blm
