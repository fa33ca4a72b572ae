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

// One call, as matmul() received it; everything a plan depends on is in key().
struct LtMatmul::Request {
  bool trans_a, trans_b;
  int M, N, K;
  LtOperand A, B;
  const void* bias;
  bool add_c;
  float beta;
  const void* c_ptr;
  int ldc;
  Dtype d_type;
  int ldd;
  void* D;
  LtEpilogue ep;

  // The pointer the epilogue's vector attribute holds: the bias, or the bias gradient.
  const void* vector_ptr() const {
    return ep.kind == LtEpilogue::Kind::bias_grad || ep.kind == LtEpilogue::Kind::dgelu_bias_grad
               ? ep.bias_grad
               : bias;
  }
  bool has_aux() const {
    return ep.kind == LtEpilogue::Kind::gelu_aux_bias ||
           ep.kind == LtEpilogue::Kind::dgelu_bias_grad;
  }
  cublasLtEpilogue_t epilogue() const {
    switch (ep.kind) {
      case LtEpilogue::Kind::bias_grad: return CUBLASLT_EPILOGUE_BGRADB;  // our A is its B
      case LtEpilogue::Kind::gelu_aux_bias: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
      case LtEpilogue::Kind::dgelu_bias_grad: return CUBLASLT_EPILOGUE_DGELU_BGRAD;
      default: return bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    }
  }
  Key key() const {
    const void* v = vector_ptr();
    return Key{trans_a, trans_b, M, N, K, static_cast<int>(A.type), A.ld, B.ld,
               static_cast<int>(d_type), ldc, ldd, v ? alignment_of(v) : 0, add_c,
               alignment_of(A.ptr), alignment_of(B.ptr), alignment_of(c_ptr), alignment_of(D),
               static_cast<int>(ep.kind), static_cast<int>(ep.bias_grad_type), ep.aux_ld,
               has_aux() ? alignment_of(ep.aux) : 0, bias != nullptr};
  }
  std::string describe() const {
    static const char* names[] = {"", " with bias gradient", " with GELU (aux, bias)",
                                  " with GELU gradient and bias gradient"};
    return shape_text(trans_a, trans_b, M, N, K, A.type, d_type) +
           (ep.kind == LtEpilogue::Kind::none ? (bias ? " with bias" : "")
                                              : names[static_cast<int>(ep.kind)]);
  }
};

struct LtMatmul::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  std::string unsupported;  // non-empty: cuBLASLt cannot run this request (the reason)
  bool vector = false;  // the epilogue reads or writes a vector (bias or bias gradient)
  bool aux = false;     // ... and an aux matrix
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

namespace {

// Products with at least this many output elements are planned without workspace, so without
// split-K.  The heuristic splits K for the weight-gradient products dW = dY^T X (K = the batch's
// tokens) whatever their size; measured on the H200 (cuBLAS 13, 2026-11-29, CUPTI trace of a
// step), that pays for outputs below about a million elements ((b)'s 384 x 384 .. 1536 x 384:
// 0.74 against 0.89 ms a step without) and loses above ((a)'s 2304 x 768 and 3072 x 768: the
// split products and their reduction kernels 2.72 against 2.46 ms a step for the unsplit ones).
// BLM_LT_NO_WORKSPACE_FROM=n moves the bound (0: never any workspace).
constexpr int64_t kNoWorkspaceFrom = int64_t(1) << 20;

int64_t no_workspace_from() {
  static const long n = env_count("BLM_LT_NO_WORKSPACE_FROM", kNoWorkspaceFrom, 0, 1L << 40,
                                  "a number of output elements");
  return n;
}

}  // namespace

LtMatmul::LtMatmul(size_t workspace_bytes)
    : workspace_(workspace_bytes, "the cuBLASLt workspace") {
  BLM_LT_CHECK(cublasLtCreate(&handle_));
}

LtMatmul::~LtMatmul() {
  plans_.clear();
  if (handle_) cublasLtDestroy(handle_);
}

namespace {

template <class T>
void set_desc(cublasLtMatmulDesc_t op, cublasLtMatmulDescAttributes_t attr, const T& value) {
  BLM_LT_CHECK(cublasLtMatmulDescSetAttribute(op, attr, &value, sizeof value));
}

// The per-call pointers of an epilogue (the heuristic also reads their alignment from them).
void set_epilogue_pointers(cublasLtMatmulDesc_t op, const void* vector, const void* aux) {
  if (vector) set_desc(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, vector);
  if (aux) set_desc(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
}

}  // namespace

// The cached plan of a request; a request cuBLASLt cannot run gets a plan that says so.
LtMatmul::Plan& LtMatmul::plan_for(const Key& key, const Request& r) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  auto plan = std::make_unique<Plan>();
  try {
    build_plan(*plan, r);
  } catch (const DeviceError& e) {  // an attribute it refuses, or no algorithm
    plan->unsupported = e.what();
  }
  Plan& ref = *plan;
  plans_.emplace(key, std::move(plan));
  return ref;
}

// The heuristic's first algorithm for plan p (descriptors set) within ws bytes of workspace:
// false, with its status in st, when it has none.
bool LtMatmul::ask_heuristic(const Plan& p, const Request& r, size_t ws,
                             cublasLtMatmulHeuristicResult_t& result, cublasStatus_t& st) {
  cublasLtMatmulPreference_t pref = nullptr;
  BLM_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  // No "in place" split-K reduction: the others reduce in a fixed order through the workspace.
  const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE |
                           CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
  const uint32_t al[4] = {static_cast<uint32_t>(alignment_of(r.B.ptr)),
                          static_cast<uint32_t>(alignment_of(r.A.ptr)),
                          static_cast<uint32_t>(alignment_of(r.c_ptr)),
                          static_cast<uint32_t>(alignment_of(r.D))};
  int found = 0;
  st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                            sizeof ws);
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
  return st == CUBLAS_STATUS_SUCCESS && found > 0;
}

void LtMatmul::build_plan(Plan& p, const Request& r) {
  p.vector = r.vector_ptr() != nullptr;
  p.aux = r.has_aux();
  BLM_LT_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLASLt's A is our B, its B our A (see the top of this file).
  set_desc(p.op, CUBLASLT_MATMUL_DESC_TRANSA, r.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  set_desc(p.op, CUBLASLT_MATMUL_DESC_TRANSB, r.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  set_desc(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, r.epilogue());
  if (r.ep.kind == LtEpilogue::Kind::dgelu_bias_grad)
    set_desc(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
             static_cast<int32_t>(cuda_type(r.ep.bias_grad_type)));
  if (p.aux) {
    // Column-major, the aux matrix is D's shape [N, M] with leading dimension aux_ld: row-major
    // [M, N] with row stride aux_ld, like D.
    set_desc(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, static_cast<int64_t>(r.ep.aux_ld));
    set_desc(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE,
             static_cast<int32_t>(cuda_type(r.d_type)));
  }
  set_epilogue_pointers(p.op, r.vector_ptr(), p.aux ? r.ep.aux : nullptr);
  // Column-major shapes of what is stored: our B is [N, K] col-major when not transposed
  // (row-major [K, N]), [K, N] when transposed (row-major [N, K]); likewise A.
  const int m = r.N, n = r.M, k = r.K;
  const cudaDataType_t ab = cuda_type(r.A.type), cd = cuda_type(r.d_type);
  BLM_LT_CHECK(cublasLtMatrixLayoutCreate(&p.a, ab, r.trans_b ? k : m, r.trans_b ? m : k, r.B.ld));
  BLM_LT_CHECK(cublasLtMatrixLayoutCreate(&p.b, ab, r.trans_a ? n : k, r.trans_a ? k : n, r.A.ld));
  BLM_LT_CHECK(cublasLtMatrixLayoutCreate(&p.c, cd, m, n, r.ldc));
  BLM_LT_CHECK(cublasLtMatrixLayoutCreate(&p.d, cd, m, n, r.ldd));

  // Large outputs first without workspace (kNoWorkspaceFrom); where cuBLASLt then has nothing
  // (some epilogues need workspace), with it.
  const bool large = static_cast<int64_t>(r.M) * r.N >= no_workspace_from();
  cublasLtMatmulHeuristicResult_t result{};
  cublasStatus_t st = CUBLAS_STATUS_NOT_SUPPORTED;
  if (!large || !ask_heuristic(p, r, 0, result, st))
    if (!ask_heuristic(p, r, workspace_.bytes(), result, st))
      throw DeviceError("cuBLASLt has no algorithm for the product " + r.describe() +
                        " (status " + std::to_string(static_cast<int>(st)) + ")");
  p.algo = result.algo;
}

void LtMatmul::matmul(bool trans_a, bool trans_b, int M, int N, int K, LtOperand A, LtOperand B,
                      const void* bias, float beta, LtOperand C, void* D, Dtype d_type, int ldd,
                      cudaStream_t stream) {
  matmul(trans_a, trans_b, M, N, K, A, B, bias, beta, C, D, d_type, ldd, stream, LtEpilogue{});
}

namespace {

// The request of one call, after the checks every call needs.
template <class Request>
Request make_request(bool trans_a, bool trans_b, int M, int N, int K, LtOperand A, LtOperand B,
                     const void* bias, float beta, LtOperand C, void* D, Dtype d_type, int ldd,
                     const LtEpilogue& ep) {
  if (A.type != B.type)
    throw DeviceError("LtMatmul: operands A and B must have the same type");
  const bool add_c = beta != 0.0f;
  if (add_c && C.type != d_type) throw DeviceError("LtMatmul: C must have D's type");
  const bool grad = ep.kind == LtEpilogue::Kind::bias_grad ||
                    ep.kind == LtEpilogue::Kind::dgelu_bias_grad;
  if (grad && (ep.bias_grad == nullptr || bias != nullptr))
    throw DeviceError("LtMatmul: a bias-gradient epilogue needs bias_grad and takes no bias");
  if (ep.kind == LtEpilogue::Kind::gelu_aux_bias && bias == nullptr)
    throw DeviceError("LtMatmul: the GELU (aux, bias) epilogue needs a bias");
  const bool aux = ep.kind == LtEpilogue::Kind::gelu_aux_bias ||
                   ep.kind == LtEpilogue::Kind::dgelu_bias_grad;
  if (aux && (ep.aux == nullptr || ep.aux_ld < N || ep.aux_ld % 8 != 0))
    throw DeviceError("LtMatmul: a GELU epilogue needs an aux matrix with a row stride that is a "
                      "multiple of 8 and at least N = " + std::to_string(N) + " (got " +
                      std::to_string(ep.aux_ld) + ")");
  return Request{trans_a, trans_b, M, N, K, A, B, bias, add_c, beta, add_c ? C.ptr : D,
                 add_c ? C.ld : ldd, d_type, ldd, D, ep};
}

}  // namespace

bool LtMatmul::run(const Request& r, cudaStream_t stream, std::string& why) {
  Plan& p = plan_for(r.key(), r);
  if (!p.unsupported.empty()) {
    why = p.unsupported;
    return false;
  }
  set_epilogue_pointers(p.op, p.vector ? r.vector_ptr() : nullptr, p.aux ? r.ep.aux : nullptr);
  const float alpha = 1.0f, beta = r.add_c ? r.beta : 0.0f;
  const cublasStatus_t st =
      cublasLtMatmul(handle_, p.op, &alpha, r.B.ptr, p.a, r.A.ptr, p.b, &beta, r.c_ptr, p.c, r.D,
                     p.d, &p.algo, workspace_.get(), workspace_.bytes(), stream);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
    // Refused at launch (nothing ran): remembered like a missing algorithm.
    p.unsupported = "cuBLASLt refused the product " + r.describe() + " (status " +
                    std::to_string(static_cast<int>(st)) + ")";
    why = p.unsupported;
    return false;
  }
  BLM_LT_CHECK(st);
  return true;
}

void LtMatmul::matmul(bool trans_a, bool trans_b, int M, int N, int K, LtOperand A, LtOperand B,
                      const void* bias, float beta, LtOperand C, void* D, Dtype d_type, int ldd,
                      cudaStream_t stream, const LtEpilogue& ep) {
  if (M <= 0 || N <= 0) return;
  const Request r = make_request<Request>(trans_a, trans_b, M, N, K, A, B, bias, beta, C, D,
                                          d_type, ldd, ep);
  std::string why;
  if (!run(r, stream, why)) throw DeviceError(why);
}

bool LtMatmul::try_matmul(bool trans_a, bool trans_b, int M, int N, int K, LtOperand A,
                          LtOperand B, const void* bias, float beta, LtOperand C, void* D,
                          Dtype d_type, int ldd, cudaStream_t stream, const LtEpilogue& ep) {
  if (M <= 0 || N <= 0) return true;
  const Request r = make_request<Request>(trans_a, trans_b, M, N, K, A, B, bias, beta, C, D,
                                          d_type, ldd, ep);
  std::string why;
  return run(r, stream, why);
}

#undef BLM_LT_CHECK

}  // namespace cuda
}  // namespace blm
