// Causal attention through cuDNN's fused flash-attention engines (the v9 backend graph API; no
// cudnn_frontend).  Interface and conventions: cuda/attention_cudnn.h.
//
// cuDNN recognises a fused attention by the shape of its operation graph.  The graphs below are
// the node sequences cuDNN's documented SDPA patterns use (facts from the cuDNN / cudnn_frontend
// documentation; shapes per (b, h): q [T, dh], K^T [dh, T], scores [T, T]):
//
// forward:  S = Q K^T (fp32) -> S * scale -> causal mask (row >= col, else -inf) ->
//           m = rowmax S, E = exp(S - m), l = rowsum E, lse = m + log l (the Stats output),
//           P = E / l (bf16) -> O = P V
// backward: D = rowsum(dO * O) (the non-virtual softmax_sum tensor, in our workspace);
//           S = Q K^T * scale - lse -> causal mask -> P = exp(S);  dV = P^T dO;
//           dS = (dO V^T - D) * P * scale;  dK = dS^T Q;  dQ = dS K  (or, not deterministic,
//           dQ_accum (fp32, workspace) = dS K, dQ = identity(dQ_accum))
// The causal mask is GEN_INDEX(axis 2) >= GEN_INDEX(axis 3) feeding a BINARY_SELECT; P^T, dS^T
// and K (from K^T) are RESHAPE nodes (transposed strides), as the engines expect.
//
// Tensors are strided views: Q [B, H, T, dh] strides (T 3d, dh, 3d, 1) at qkv, K^T [B, H, dh, T]
// strides (T 3d, dh, 1, 3d) at qkv + d, V at qkv + 2d; O, dO [B, H, T, dh] strides (T d, dh, d, 1);
// lse [B, H, T, 1] packed; dQ, dK, dV as Q, K, V in dqkv.  Built graphs, chosen plans and their
// workspace sizes are cached per (device, shape, kind).  Nothing here uses floating-point atomics
// on the deterministic paths; the elementwise conversions are plain maps.
#include "cuda/attention_cudnn.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"

#ifdef BLM_HAVE_CUDNN
#include <cudnn.h>
#endif

namespace blm {
namespace cuda {

namespace {

using bf16 = __nv_bfloat16;

// ------------------------------------------------------------------ elementwise conversions

// out[i] = float(in[i]) (exact), n elements.
template <bool kVector>
__global__ void widen_to_fp32_kernel(const bf16* __restrict__ in, float* __restrict__ out,
                                     int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kVector) {
    const int64_t n4 = n / 4;
    for (int64_t i = first; i < n4; i += stride) {
      const float2 a = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(in)[2 * i]);
      const float2 b = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(in)[2 * i + 1]);
      reinterpret_cast<float4*>(out)[i] = make_float4(a.x, a.y, b.x, b.y);
    }
    for (int64_t i = 4 * n4 + first; i < n; i += stride) out[i] = __bfloat162float(in[i]);
  } else {
    for (int64_t i = first; i < n; i += stride) out[i] = __bfloat162float(in[i]);
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void widen_to_fp32(const bf16* in, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (aligned(in, 8) && aligned(out, 16))
    widen_to_fp32_kernel<true><<<grid_for(n / 4 + 1), kThreads, 0, stream>>>(in, out, n);
  else
    widen_to_fp32_kernel<false><<<grid_for(n), kThreads, 0, stream>>>(in, out, n);
  BLM_CHECK_LAUNCH("widen_to_fp32_kernel");
}

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

void check_shape(const AttentionShape& s, const char* what) {
  if (!cudnn_attention_head_size_supported(s.dh))
    throw ConfigError(std::string("attention (cuDNN): head size dh = ") + std::to_string(s.dh) +
                      " is not supported (32, 64 or 128)");
  if (s.B < 0 || s.T < 0 || s.H <= 0)
    throw DeviceError(std::string("attention (cuDNN) ") + what + ": bad shape B=" +
                      std::to_string(s.B) + " T=" + std::to_string(s.T) +
                      " H=" + std::to_string(s.H));
}

bool empty_shape(const AttentionShape& s) { return s.B == 0 || s.T == 0; }

}  // namespace

bool cudnn_attention_head_size_supported(int dh) { return dh == 32 || dh == 64 || dh == 128; }

#ifdef BLM_HAVE_CUDNN

namespace {

// ------------------------------------------------------------------ errors and descriptors

// One line: cuDNN's last error message may span several.
std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

[[noreturn]] void throw_cudnn(cudnnStatus_t st, const std::string& call) {
  char detail[1024] = "";
  cudnnGetLastErrorString(detail, sizeof detail);
  std::string msg = "cuDNN attention: " + call + " failed: " + cudnnGetErrorString(st);
  if (detail[0]) msg += " (" + one_line(detail) + ")";
  throw DeviceError(msg);
}

#define BLM_CUDNN_CHECK(call, what)                              \
  do {                                                           \
    const cudnnStatus_t blm_st_ = (call);                        \
    if (blm_st_ != CUDNN_STATUS_SUCCESS) throw_cudnn(blm_st_, what); \
  } while (0)

// An owned backend descriptor with a label for messages ("tensor Q", "op P V").
class Desc {
 public:
  Desc(cudnnBackendDescriptorType_t type, std::string label) : label_(std::move(label)) {
    BLM_CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_),
                    "cudnnBackendCreateDescriptor(" + label_ + ")");
  }
  ~Desc() {
    if (d_) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }

  void set(cudnnBackendAttributeName_t attr, cudnnBackendAttributeType_t type, int64_t count,
           const void* values) {
    BLM_CUDNN_CHECK(cudnnBackendSetAttribute(d_, attr, type, count, values),
                    "cudnnBackendSetAttribute(" + label_ + ", attribute " +
                        std::to_string(static_cast<int>(attr)) + ")");
  }
  void set_int(cudnnBackendAttributeName_t attr, int64_t v) { set(attr, CUDNN_TYPE_INT64, 1, &v); }
  void set_type(cudnnBackendAttributeName_t attr, cudnnDataType_t t) {
    set(attr, CUDNN_TYPE_DATA_TYPE, 1, &t);
  }
  void set_desc(cudnnBackendAttributeName_t attr, const Desc& other) {
    cudnnBackendDescriptor_t o = other.get();
    set(attr, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &o);
  }
  void finalize() { BLM_CUDNN_CHECK(cudnnBackendFinalize(d_), "cudnnBackendFinalize(" + label_ + ")"); }
  // Finalize without throwing (an engine configuration that does not fit this graph).
  cudnnStatus_t try_finalize() { return cudnnBackendFinalize(d_); }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
  std::string label_;
};

using Dims = std::array<int64_t, 4>;

// Unique ids of the non-virtual tensors (the variant pack's keys).
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kNegInf, kDO, kDQ, kDK, kDV, kOne, kSoftmaxSum, kDQAccum,
  kFirstVirtual = 100
};

// Collects the tensors and operations of one operation graph and keeps their descriptors alive.
class GraphBuilder {
 public:
  const Desc& tensor(const std::string& name, int64_t uid, cudnnDataType_t type, const Dims& dims,
                     const Dims& strides, bool is_virtual = false, bool by_value = false) {
    Desc& t = keep(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor " + name);
    t.set_type(CUDNN_ATTR_TENSOR_DATA_TYPE, type);
    t.set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data());
    t.set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data());
    t.set_int(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid);
    t.set_int(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16);
    t.set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) t.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    t.finalize();
    return t;
  }
  // An intermediate that lives only inside the fused kernel.
  const Desc& virt(const std::string& name, cudnnDataType_t type, const Dims& dims,
                   const Dims& strides) {
    return tensor(name, next_virtual_++, type, dims, strides, true);
  }
  // A host fp32 scalar passed by value (scale, -inf, 1).
  const Desc& scalar(const std::string& name, int64_t uid) {
    return tensor(name, uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }

  void matmul(const std::string& name, const Desc& a, const Desc& b, const Desc& c) {
    Desc& mm = keep(CUDNN_BACKEND_MATMUL_DESCRIPTOR, "matmul " + name);
    mm.set_type(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT);
    mm.finalize();
    Desc& op = keep(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "op " + name);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm);
    add_op(op);
  }

  // y = mode(x[, b][, t]); GEN_INDEX takes an axis.  Binary select: y = t ? x : b.
  void pointwise(const std::string& name, cudnnPointwiseMode_t mode, cudnnDataType_t math,
                 const Desc& x, const Desc& y, const Desc* b = nullptr, const Desc* t = nullptr,
                 int64_t axis = -1) {
    Desc& pw = keep(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "pointwise " + name);
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    pw.set_type(CUDNN_ATTR_POINTWISE_MATH_PREC, math);
    if (axis >= 0) pw.set_int(CUDNN_ATTR_POINTWISE_AXIS, axis);
    pw.finalize();
    Desc& op = keep(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "op " + name);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    if (t) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    add_op(op);
  }

  // y = reduce(x) over the dimensions where y has extent 1.
  void reduction(const std::string& name, cudnnReduceTensorOp_t mode, const Desc& x,
                 const Desc& y) {
    Desc& red = keep(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "reduction " + name);
    red.set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
    red.set_type(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT);
    red.finalize();
    Desc& op = keep(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "op " + name);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, red);
    add_op(op);
  }

  // y: the same elements as x under other dimensions / strides (a transpose here).
  void reshape(const std::string& name, const Desc& x, const Desc& y) {
    Desc& op = keep(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, "op " + name);
    op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x);
    op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    add_op(op);
  }

  // The finalized operation graph (the builder must outlive it: it holds the operations).
  std::unique_ptr<Desc> finish(cudnnHandle_t handle, const std::string& label) {
    auto g = std::make_unique<Desc>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, label);
    g->set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
           static_cast<int64_t>(ops_.size()), ops_.data());
    g->set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    g->finalize();
    return g;
  }

 private:
  Desc& keep(cudnnBackendDescriptorType_t type, const std::string& label) {
    descs_.push_back(std::make_unique<Desc>(type, label));
    return *descs_.back();
  }
  void add_op(Desc& op) {
    op.finalize();
    ops_.push_back(op.get());
  }
  std::vector<std::unique_ptr<Desc>> descs_;
  std::vector<cudnnBackendDescriptor_t> ops_;
  int64_t next_virtual_ = kFirstVirtual;
};

// ------------------------------------------------------------------ the graphs

// Dimensions and strides of the views, in elements.
struct Views {
  Dims bhtd, q_strides, kt_dims, kt_strides, o_strides;  // Q/K/V (as Q), K^T, O/dO
  Dims bht1, stat_strides;                               // lse, row statistics
  Dims bhtt, s_strides, st_strides;                      // scores, and their transpose
  Dims bhtd_packed;                                      // dQ_accum [B, H, T, dh] packed
};

Views views(const AttentionShape& s) {
  const int64_t B = s.B, H = s.H, T = s.T, D = s.dh, d = H * D, d3 = 3 * d;
  Views v;
  v.bhtd = {B, H, T, D};
  v.q_strides = {T * d3, D, d3, 1};
  v.kt_dims = {B, H, D, T};
  v.kt_strides = {T * d3, D, 1, d3};
  v.o_strides = {T * d, D, d, 1};
  v.bht1 = {B, H, T, 1};
  v.stat_strides = {H * T, T, 1, 1};
  v.bhtt = {B, H, T, T};
  v.s_strides = {H * T * T, T * T, T, 1};
  v.st_strides = {H * T * T, T * T, 1, T};
  v.bhtd_packed = {H * T * D, T * D, D, 1};
  return v;
}

// scores with everything above the diagonal (col > row) replaced by -inf.
const Desc& causal_mask(GraphBuilder& g, const Views& v, const Desc& scores, const Desc& neg_inf) {
  const Desc& row = g.virt("row index", CUDNN_DATA_INT32, v.bhtt, v.s_strides);
  g.pointwise("row index", CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, scores, row, nullptr,
              nullptr, 2);
  const Desc& col = g.virt("column index", CUDNN_DATA_INT32, v.bhtt, v.s_strides);
  g.pointwise("column index", CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, scores, col, nullptr,
              nullptr, 3);
  const Desc& keep = g.virt("row >= column", CUDNN_DATA_BOOLEAN, v.bhtt, v.s_strides);
  g.pointwise("row >= column", CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, keep, &col);
  const Desc& masked = g.virt("masked scores", CUDNN_DATA_FLOAT, v.bhtt, v.s_strides);
  g.pointwise("causal select", CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, scores, masked,
              &neg_inf, &keep);
  return masked;
}

void build_forward(GraphBuilder& g, const Views& v) {
  const auto F = CUDNN_DATA_FLOAT, H16 = CUDNN_DATA_BFLOAT16;
  const Desc& q = g.tensor("Q", kQ, H16, v.bhtd, v.q_strides);
  const Desc& kt = g.tensor("K^T", kK, H16, v.kt_dims, v.kt_strides);
  const Desc& val = g.tensor("V", kV, H16, v.bhtd, v.q_strides);
  const Desc& o = g.tensor("O", kO, H16, v.bhtd, v.o_strides);
  const Desc& lse = g.tensor("lse", kStats, F, v.bht1, v.stat_strides);
  const Desc& scale = g.scalar("scale", kScale);
  const Desc& neg_inf = g.scalar("-inf", kNegInf);

  const Desc& s = g.virt("Q K^T", F, v.bhtt, v.s_strides);
  g.matmul("Q K^T", q, kt, s);
  const Desc& z = g.virt("scaled scores", F, v.bhtt, v.s_strides);
  g.pointwise("scale", CUDNN_POINTWISE_MUL, F, s, z, &scale);
  const Desc& zm = causal_mask(g, v, z, neg_inf);
  const Desc& m = g.virt("row max", F, v.bht1, v.stat_strides);
  g.reduction("row max", CUDNN_REDUCE_TENSOR_MAX, zm, m);
  const Desc& shifted = g.virt("scores - max", F, v.bhtt, v.s_strides);
  g.pointwise("scores - max", CUDNN_POINTWISE_SUB, F, zm, shifted, &m);
  const Desc& e = g.virt("exp", F, v.bhtt, v.s_strides);
  g.pointwise("exp", CUDNN_POINTWISE_EXP, F, shifted, e);
  const Desc& l = g.virt("row sum", F, v.bht1, v.stat_strides);
  g.reduction("row sum", CUDNN_REDUCE_TENSOR_ADD, e, l);
  const Desc& log_l = g.virt("log row sum", F, v.bht1, v.stat_strides);
  g.pointwise("log row sum", CUDNN_POINTWISE_LOG, F, l, log_l);
  g.pointwise("max + log sum", CUDNN_POINTWISE_ADD, F, m, lse, &log_l);
  // P in the i/o type: the second product's A operand (the engines expect bf16 here).
  const Desc& p = g.virt("P", H16, v.bhtt, v.s_strides);
  g.pointwise("exp / sum", CUDNN_POINTWISE_DIV, F, e, p, &l);
  g.matmul("P V", p, val, o);
}

void build_backward(GraphBuilder& g, const Views& v, bool deterministic) {
  const auto F = CUDNN_DATA_FLOAT, H16 = CUDNN_DATA_BFLOAT16;
  const Desc& q = g.tensor("Q", kQ, H16, v.bhtd, v.q_strides);
  const Desc& kt = g.tensor("K^T", kK, H16, v.kt_dims, v.kt_strides);
  const Desc& vt = g.tensor("V^T", kV, H16, v.kt_dims, v.kt_strides);  // V's columns, as K's
  const Desc& o = g.tensor("O", kO, H16, v.bhtd, v.o_strides);
  const Desc& dout = g.tensor("dO", kDO, H16, v.bhtd, v.o_strides);
  const Desc& lse = g.tensor("lse", kStats, F, v.bht1, v.stat_strides);
  const Desc& dq = g.tensor("dQ", kDQ, H16, v.bhtd, v.q_strides);
  const Desc& dk = g.tensor("dK", kDK, H16, v.bhtd, v.q_strides);
  const Desc& dv = g.tensor("dV", kDV, H16, v.bhtd, v.q_strides);
  const Desc& scale = g.scalar("scale", kScale);
  const Desc& neg_inf = g.scalar("-inf", kNegInf);
  const Desc& one = g.scalar("1", kOne);

  // D_t = sum_i dO_ti O_ti, kept (non-virtual) in our workspace as the engines require.
  const Desc& prod = g.virt("dO * O", F, v.bhtd, v.o_strides);
  g.pointwise("dO * O", CUDNN_POINTWISE_MUL, F, dout, prod, &o);
  const Desc& dsum = g.virt("rowsum dO * O", F, v.bht1, v.stat_strides);
  g.reduction("rowsum dO * O", CUDNN_REDUCE_TENSOR_ADD, prod, dsum);
  const Desc& softmax_sum = g.tensor("softmax_sum", kSoftmaxSum, F, v.bht1, v.stat_strides);
  g.pointwise("softmax_sum", CUDNN_POINTWISE_MUL, F, dsum, softmax_sum, &one);

  // P = exp(Q K^T * scale - lse), causal.
  const Desc& s = g.virt("Q K^T", F, v.bhtt, v.s_strides);
  g.matmul("Q K^T", q, kt, s);
  const Desc& z = g.virt("scaled scores", F, v.bhtt, v.s_strides);
  g.pointwise("scale", CUDNN_POINTWISE_MUL, F, s, z, &scale);
  const Desc& zc = g.virt("scores - lse", F, v.bhtt, v.s_strides);
  g.pointwise("scores - lse", CUDNN_POINTWISE_SUB, F, z, zc, &lse);
  const Desc& zm = causal_mask(g, v, zc, neg_inf);
  const Desc& p = g.virt("P", F, v.bhtt, v.s_strides);
  g.pointwise("exp", CUDNN_POINTWISE_EXP, F, zm, p);

  // dV = P^T dO.
  const Desc& pt = g.virt("P^T", H16, v.bhtt, v.st_strides);
  g.reshape("P^T", p, pt);
  g.matmul("P^T dO", pt, dout, dv);

  // dS = P (dO V^T - D) * scale.
  const Desc& dp = g.virt("dO V^T", F, v.bhtt, v.s_strides);
  g.matmul("dO V^T", dout, vt, dp);
  const Desc& dpc = g.virt("dP - D", F, v.bhtt, v.s_strides);
  g.pointwise("dP - D", CUDNN_POINTWISE_SUB, F, dp, dpc, &softmax_sum);
  const Desc& ds0 = g.virt("P (dP - D)", F, v.bhtt, v.s_strides);
  g.pointwise("P (dP - D)", CUDNN_POINTWISE_MUL, F, dpc, ds0, &p);
  const Desc& ds = g.virt("dS", F, v.bhtt, v.s_strides);
  g.pointwise("dS scale", CUDNN_POINTWISE_MUL, F, ds0, ds, &scale);

  // dK = dS^T Q.
  const Desc& dst = g.virt("dS^T", H16, v.bhtt, v.st_strides);
  g.reshape("dS^T", ds, dst);
  g.matmul("dS^T Q", dst, q, dk);

  // dQ = dS K, K read back from K^T's storage.
  const Desc& k = g.virt("K", H16, v.bhtd, v.q_strides);
  g.reshape("K", kt, k);
  if (deterministic) {
    g.matmul("dS K", ds, k, dq);
  } else {
    const Desc& acc = g.tensor("dQ_accum", kDQAccum, F, v.bhtd, v.bhtd_packed);
    g.matmul("dS K", ds, k, acc);
    g.pointwise("dQ from dQ_accum", CUDNN_POINTWISE_IDENTITY, F, acc, dq);
  }
}

// ------------------------------------------------------------------ handles, plans, cache

enum class Kind { forward, backward, backward_nondeterministic };

const char* kind_name(Kind k) {
  return k == Kind::forward ? "forward" : k == Kind::backward ? "backward" : "backward (atomic dQ)";
}

std::mutex g_mutex;  // guards the handles, the plan cache and the handles' streams

// One handle per device, created on first use and kept for the process (destroying it at exit
// could run after the CUDA context is gone).
cudnnHandle_t handle_for_current_device() {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  static std::map<int, cudnnHandle_t> handles;
  auto it = handles.find(dev);
  if (it != handles.end()) return it->second;
  if (cudnnGetVersion() < 90000)
    throw DeviceError("cuDNN attention: cuDNN " + std::to_string(cudnnGetVersion()) +
                      " is loaded; the backend graph SDPA needs cuDNN 9");
  cudnnHandle_t h = nullptr;
  BLM_CUDNN_CHECK(cudnnCreate(&h), "cudnnCreate");
  handles[dev] = h;
  return h;
}

// A built graph with its chosen execution plan.  The scalars live here so their host addresses
// stay valid for every execution.
struct Plan {
  GraphBuilder builder;
  std::unique_ptr<Desc> graph;
  std::unique_ptr<Desc> plan;
  int64_t workspace = 0;  // the plan's own scratch, bytes
  float scale = 0, neg_inf = 0, one = 1;
};

bool engine_is_nondeterministic(const Desc& cfg) {
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR, "engine");
  cudnnBackendDescriptor_t e = engine.get();
  int64_t n = 0;
  BLM_CUDNN_CHECK(cudnnBackendGetAttribute(cfg.get(), CUDNN_ATTR_ENGINECFG_ENGINE,
                                           CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &e),
                  "cudnnBackendGetAttribute(engine config, engine)");
  cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
  n = 0;
  BLM_CUDNN_CHECK(cudnnBackendGetAttribute(e, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
                                           CUDNN_TYPE_NUMERICAL_NOTE,
                                           CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &n, notes),
                  "cudnnBackendGetAttribute(engine, numerical notes)");
  for (int64_t i = 0; i < n; ++i)
    if (notes[i] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC) return true;
  return false;
}

// The engine configurations cuDNN's heuristics (mode `mode`) propose for the graph, best first.
std::vector<std::unique_ptr<Desc>> heuristic_configs(const Desc& graph, cudnnBackendHeurMode_t mode) {
  Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "heuristics");
  heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph);
  heur.set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
  heur.finalize();
  int64_t count = 0;
  BLM_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                           CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr),
                  "cudnnBackendGetAttribute(heuristics, result count)");
  std::vector<std::unique_ptr<Desc>> cfgs;
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i) {
    cfgs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "engine config"));
    raw.push_back(cfgs.back()->get());
  }
  int64_t got = 0;
  if (count > 0)
    BLM_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                             CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got, raw.data()),
                    "cudnnBackendGetAttribute(heuristics, results)");
  cfgs.resize(static_cast<size_t>(got));
  return cfgs;
}

// The first proposed configuration that finalizes into an execution plan (and, when
// `deterministic`, whose engine does not declare itself non-deterministic).
void choose_plan(Plan& p, cudnnHandle_t handle, bool deterministic, const std::string& what) {
  cudnnStatus_t last = CUDNN_STATUS_NOT_SUPPORTED;
  int tried = 0, skipped = 0;
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    for (auto& cfg : heuristic_configs(*p.graph, mode)) {
      if (deterministic && engine_is_nondeterministic(*cfg)) {
        ++skipped;
        continue;
      }
      auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, "execution plan");
      plan->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
      plan->set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *cfg);
      ++tried;
      last = plan->try_finalize();
      if (last != CUDNN_STATUS_SUCCESS) continue;
      int64_t n = 0;
      BLM_CUDNN_CHECK(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                               CUDNN_TYPE_INT64, 1, &n, &p.workspace),
                      "cudnnBackendGetAttribute(execution plan, workspace size)");
      p.plan = std::move(plan);
      return;
    }
  }
  throw_cudnn(last, "no engine for the " + what + " graph (" + std::to_string(tried) +
                        " configurations tried, " + std::to_string(skipped) +
                        " non-deterministic skipped); last cudnnBackendFinalize(execution plan)");
}

std::string shape_text(const AttentionShape& s) {
  return "B=" + std::to_string(s.B) + " T=" + std::to_string(s.T) + " H=" + std::to_string(s.H) +
         " dh=" + std::to_string(s.dh);
}

// The cached plan of (current device, shape, kind); built on first use.  Caller holds g_mutex.
Plan& plan_for(const AttentionShape& s, Kind kind) {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  using Key = std::tuple<int, int, int, int, int, int>;
  static std::map<Key, std::unique_ptr<Plan>> cache;
  const Key key{dev, s.B, s.T, s.H, s.dh, static_cast<int>(kind)};
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  cudnnHandle_t handle = handle_for_current_device();
  const std::string what = std::string(kind_name(kind)) + " " + shape_text(s);
  auto p = std::make_unique<Plan>();
  p->scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.dh)));
  p->neg_inf = -std::numeric_limits<float>::infinity();
  const Views v = views(s);
  if (kind == Kind::forward)
    build_forward(p->builder, v);
  else
    build_backward(p->builder, v, kind == Kind::backward);
  p->graph = p->builder.finish(handle, "operation graph (" + what + ")");
  choose_plan(*p, handle, kind != Kind::backward_nondeterministic, what);
  return *cache.emplace(key, std::move(p)).first->second;
}

// Runs the plan with the given (uid, pointer) pairs and scratch.  Caller holds g_mutex.
void execute(Plan& p, const std::vector<std::pair<int64_t, void*>>& tensors, void* scratch,
             cudaStream_t stream) {
  std::vector<int64_t> uids;
  std::vector<void*> ptrs;
  for (const auto& [uid, ptr] : tensors) {
    uids.push_back(uid);
    ptrs.push_back(ptr);
  }
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, "variant pack");
  pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<int64_t>(uids.size()),
           uids.data());
  pack.set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
           static_cast<int64_t>(ptrs.size()), ptrs.data());
  pack.set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &scratch);
  pack.finalize();
  cudnnHandle_t handle = handle_for_current_device();
  BLM_CUDNN_CHECK(cudnnSetStream(handle, stream), "cudnnSetStream");
  BLM_CUDNN_CHECK(cudnnBackendExecute(handle, p.plan->get(), pack.get()), "cudnnBackendExecute");
}

void check_aligned(const void* p, const char* name) {
  if (!aligned(p, 16))
    throw DeviceError(std::string("attention (cuDNN): ") + name + " is not 16-byte aligned");
}

// The backward's scratch: softmax_sum [B, H, T] fp32, dQ_accum when not deterministic, then the
// plan's own workspace.
struct BackwardScratch {
  float* softmax_sum;
  float* dq_accum;
  void* plan;
};
size_t backward_extra_bytes(const AttentionShape& s, bool deterministic) {
  const size_t rows = static_cast<size_t>(s.B) * s.H * s.T;
  return align256(rows * sizeof(float)) + (deterministic ? 0 : align256(rows * s.dh * sizeof(float)));
}
BackwardScratch backward_scratch(const AttentionShape& s, void* base, bool deterministic) {
  const size_t rows = static_cast<size_t>(s.B) * s.H * s.T;
  char* p = static_cast<char*>(base);
  BackwardScratch w{};
  w.softmax_sum = reinterpret_cast<float*>(p);
  p += align256(rows * sizeof(float));
  w.dq_accum = deterministic ? nullptr : reinterpret_cast<float*>(p);
  if (!deterministic) p += align256(rows * s.dh * sizeof(float));
  w.plan = p;
  return w;
}

}  // namespace

bool cudnn_attention_available() {
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    handle_for_current_device();
    return true;
  } catch (const Error&) {
    return false;
  }
}

std::string cudnn_attention_unavailable_reason() {
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    handle_for_current_device();
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

std::string cudnn_attention_version() {
  return "cuDNN " + std::to_string(cudnnGetVersion()) + " loaded, built against " +
         std::to_string(CUDNN_VERSION);
}

size_t cudnn_sdpa_workspace_bytes(const AttentionShape& s, bool backward, bool deterministic) {
  check_shape(s, "workspace");
  if (empty_shape(s)) return 0;
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t fwd = plan_for(s, Kind::forward).workspace;
  if (!backward) return static_cast<size_t>(fwd);
  const Kind kind = deterministic ? Kind::backward : Kind::backward_nondeterministic;
  const int64_t bwd = plan_for(s, kind).workspace;
  return std::max(static_cast<size_t>(fwd),
                  backward_extra_bytes(s, deterministic) + static_cast<size_t>(bwd));
}

void cudnn_sdpa_forward(const AttentionShape& s, const bf16* qkv, bf16* out, float* lse,
                        void* workspace, cudaStream_t stream) {
  check_shape(s, "forward");
  if (empty_shape(s)) return;
  check_aligned(qkv, "qkv");
  check_aligned(out, "out");
  check_aligned(lse, "lse");
  const size_t d = static_cast<size_t>(s.H) * s.dh;
  bf16* q = const_cast<bf16*>(qkv);  // cuDNN's variant pack takes void*; inputs are only read
  std::lock_guard<std::mutex> lock(g_mutex);
  Plan& p = plan_for(s, Kind::forward);
  execute(p,
          {{kQ, q}, {kK, q + d}, {kV, q + 2 * d}, {kO, out}, {kStats, lse}, {kScale, &p.scale},
           {kNegInf, &p.neg_inf}},
          workspace, stream);
}

void cudnn_sdpa_backward(const AttentionShape& s, const bf16* qkv, const bf16* out,
                         const bf16* dout, const float* lse, bf16* dqkv, void* workspace,
                         cudaStream_t stream, bool deterministic) {
  check_shape(s, "backward");
  if (empty_shape(s)) return;
  for (const auto& [ptr, name] : {std::pair<const void*, const char*>{qkv, "qkv"}, {out, "out"},
                                  {dout, "dout"}, {lse, "lse"}, {dqkv, "dqkv"}})
    check_aligned(ptr, name);
  const size_t d = static_cast<size_t>(s.H) * s.dh;
  bf16* q = const_cast<bf16*>(qkv);  // read only (void* in the variant pack)
  const BackwardScratch w = backward_scratch(s, workspace, deterministic);
  std::lock_guard<std::mutex> lock(g_mutex);
  Plan& p = plan_for(s, deterministic ? Kind::backward : Kind::backward_nondeterministic);
  std::vector<std::pair<int64_t, void*>> tensors{
      {kQ, q},
      {kK, q + d},
      {kV, q + 2 * d},
      {kO, const_cast<bf16*>(out)},
      {kDO, const_cast<bf16*>(dout)},
      {kStats, const_cast<float*>(lse)},
      {kDQ, dqkv},
      {kDK, dqkv + d},
      {kDV, dqkv + 2 * d},
      {kScale, &p.scale},
      {kNegInf, &p.neg_inf},
      {kOne, &p.one},
      {kSoftmaxSum, w.softmax_sum}};
  if (!deterministic) tensors.push_back({kDQAccum, w.dq_accum});
  execute(p, tensors, w.plan, stream);
}

#else  // !BLM_HAVE_CUDNN: the stub

namespace {
[[noreturn]] void not_built() {
  throw DeviceError("attention (cuDNN): not available (this build has no cuDNN: cudnn.h or "
                    "libcudnn was not found at configure time)");
}
}  // namespace

bool cudnn_attention_available() { return false; }
std::string cudnn_attention_version() { return "no cuDNN in this build"; }
std::string cudnn_attention_unavailable_reason() {
  return "this build has no cuDNN (cudnn.h or libcudnn was not found at configure time)";
}
size_t cudnn_sdpa_workspace_bytes(const AttentionShape&, bool, bool) { not_built(); }
void cudnn_sdpa_forward(const AttentionShape&, const bf16*, bf16*, float*, void*, cudaStream_t) {
  not_built();
}
void cudnn_sdpa_backward(const AttentionShape&, const bf16*, const bf16*, const bf16*,
                         const float*, bf16*, void*, cudaStream_t, bool) {
  not_built();
}

#endif  // BLM_HAVE_CUDNN

// ------------------------------------------------------------------ fp32 interface

namespace {

// The fp32 interface's staging: bf16 qkv [N, 3d], then (backward) dout [N, d] and dqkv [N, 3d],
// then the cuDNN scratch.
struct Staging {
  bf16 *qkv, *dout, *dqkv;
  void* sdpa;
};
size_t staging_bytes(const AttentionShape& s, bool backward) {
  const size_t N = static_cast<size_t>(s.B) * s.T, d = static_cast<size_t>(s.H) * s.dh;
  size_t bytes = align256(N * 3 * d * sizeof(bf16));
  if (backward) bytes += align256(N * d * sizeof(bf16)) + align256(N * 3 * d * sizeof(bf16));
  return bytes;
}
Staging staging(const AttentionShape& s, void* base, bool backward) {
  const size_t N = static_cast<size_t>(s.B) * s.T, d = static_cast<size_t>(s.H) * s.dh;
  char* p = static_cast<char*>(base);
  Staging w{};
  w.qkv = reinterpret_cast<bf16*>(p);
  p += align256(N * 3 * d * sizeof(bf16));
  if (backward) {
    w.dout = reinterpret_cast<bf16*>(p);
    p += align256(N * d * sizeof(bf16));
    w.dqkv = reinterpret_cast<bf16*>(p);
    p += align256(N * 3 * d * sizeof(bf16));
  }
  w.sdpa = p;
  return w;
}

}  // namespace

size_t cudnn_attention_workspace_bytes(const AttentionShape& s, bool backward) {
  check_shape(s, "workspace");
  if (empty_shape(s)) return 0;
  const size_t fwd = staging_bytes(s, false) + cudnn_sdpa_workspace_bytes(s, false);
  if (!backward) return fwd;
  return std::max(fwd, staging_bytes(s, true) + cudnn_sdpa_workspace_bytes(s, true));
}

void cudnn_attention_forward(const AttentionShape& s, const float* qkv, bf16* out, float* lse,
                             void* workspace, cudaStream_t stream) {
  check_shape(s, "forward");
  if (empty_shape(s)) return;
  const int64_t n = static_cast<int64_t>(s.B) * s.T * 3 * s.H * s.dh;
  const Staging w = staging(s, workspace, false);
  convert_to_bf16(qkv, w.qkv, n, stream);
  cudnn_sdpa_forward(s, w.qkv, out, lse, w.sdpa, stream);
}

void cudnn_attention_backward(const AttentionShape& s, const float* qkv, const bf16* out,
                              const float* dout, const float* lse, float* dqkv, void* workspace,
                              cudaStream_t stream) {
  check_shape(s, "backward");
  if (empty_shape(s)) return;
  const int64_t n_out = static_cast<int64_t>(s.B) * s.T * s.H * s.dh, n_qkv = 3 * n_out;
  // qkv is rounded again: the forward's copy may since have been overwritten by another layer.
  const Staging w = staging(s, workspace, true);
  convert_to_bf16(qkv, w.qkv, n_qkv, stream);
  convert_to_bf16(dout, w.dout, n_out, stream);
  cudnn_sdpa_backward(s, w.qkv, out, w.dout, lse, w.dqkv, w.sdpa, stream, true);
  widen_to_fp32(w.dqkv, dqkv, n_qkv, stream);
}

}  // namespace cuda
}  // namespace blm
