// The CUDA backend (fp32): the CPU reference's model (core/reference.h) on the GPU, with the
// same parameter layout (core/params.h), the same loss, barrier and gradients.
//
// Memory: parameters, gradients and the AdamW moments m, v are one device allocation each
// (fp32, [P] in the layout of core/params.h).  Activations live in one arena carved for the
// (B, T) of the call; it grows (never shrinks) when a larger batch comes.  Per layer l, for
// N = B*T positions:
//   resid[l] [N, d] (layer input)  ln1 [N, d]  qkv [N, 3d]  att [N, d]  lse [B, H, T]
//   mid [N, d] (after attention)   ln2 [N, d]  fc_pre, fc_act [N, 4d]     + LN stats [N]
// then lnf [N, d] and logits [N, V] (overwritten in place by dlogits in training).  (bf16 with
// BLM_RECOMPUTE=gelu: one fc_act for all layers, rebuilt from fc_pre in the backward.)
//
// One training step (forward_backward):
//   e = embedding(x) -> per layer: LN1, qkv = ln1 Wqkv^T + b, attention, [barrier_forward],
//   mid = resid + att Wo^T + bo, LN2, fc = gelu(ln2 Wfc^T + bfc), resid' = mid + fc Wp^T + bp
//   -> LNf -> logits = lnf wte^T -> fused softmax CE (loss, hits, dlogits in place)
//   -> the same in reverse; barrier_backward adds lambda / N_R * grad_scale * dR/d(q, k) into
//   dqkv after attention_backward wrote it.
// Gradients are zeroed at the start of a step (unless accumulating) and every op then adds into
// them.  Nothing uses floating-point atomics; two runs give bit-identical results.
//
// Precision bf16 (device.precision bf16 or auto): fp32 master weights, gradients, AdamW moments,
// residual stream, LayerNorm statistics and reductions; a bf16 copy of the weights (refreshed by
// the AdamW kernel) and bf16 GEMM inputs (LN outputs, attention output, MLP pre-activation and
// GELU output, the logits and their gradient, the activation gradients fed to GEMMs).  GEMMs go
// through cuBLASLt (cuda/matmul_lt.h) with fp32 accumulation, the bias as an epilogue and the
// residual add as C (beta = 1); the projections' bias gradients come from the weight-gradient
// products' epilogues (BLM_LT_EPILOGUES below), and the LayerNorm backward writes the bf16 copy of
// the residual gradient those products read (no column-sum or conversion pass for them).
// Attention through cuDNN (BLM_ATTENTION below) or the flash-style bf16 tensor-core kernels
// (cuda/attention_flash.h; BLM_ATTENTION=gemm: cuBLAS batched GEMMs with materialised scores).
// The qkv product writes bf16 where only the attention and the flash barrier read qkv
// (PlanFlags.qkv_bf16), else fp32, which the tile barriers and margins read.  The _bf16 member
// functions below are that path; the fp32 path is unchanged.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/optim.h"
#include "core/params.h"
#include "cuda/attention.h"
#include "cuda/attention_bf16.h"
#include "cuda/attention_cudnn.h"
#include "cuda/attention_flash.h"
#include "cuda/barrier_flash.h"
#include "cuda/barrier_tc.h"
#include "cuda/attn_common.cuh"
#include "cuda/common.cuh"
#include "cuda/cuda_backend.h"
#include "cuda/kernels.h"
#include "cuda/margins_host.h"
#include "cuda/matmul_lt.h"
#include "cuda/nccl_comm.h"
#include "cuda/reduce_columns.cuh"

namespace blm {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

// Whether cuDNN's attention (cuda/attention_cudnn.h) is the bf16 attention.  BLM_ATTENTION:
// "cudnn" -> yes (a DeviceError naming the reason when this build or machine has no cuDNN);
// "flash", "gemm" -> no (attention_*_bf16, which read the variable themselves); any other value
// -> ConfigError.  Unset or empty: cuDNN when it loads, for the calls that compute the loss
// (training steps and evaluation; measured 2026-11-28 on the H200 with a bf16 qkv: step 32.5 vs
// 36.9 ms at shape (a), 4.84 vs 5.25 ms at (b); docs/PERFORMANCE.md), and only for shapes cuDNN
// has an engine for (CudaBackend::cudnn_runs); the flash kernels otherwise.  Calls without the
// loss (sampling at a growing length, margins) keep the flash kernels: cuDNN would build a graph
// per new length.
enum class CudnnChoice { no, yes, if_shape_runs };
CudnnChoice bf16_attention_cudnn_choice(bool loss) {
  const int choice = env_choice("BLM_ATTENTION", {"flash", "gemm", "cudnn"}, -1);
  if (choice < 0)
    return loss && cudnn_attention_available() ? CudnnChoice::if_shape_runs : CudnnChoice::no;
  if (choice < 2) return CudnnChoice::no;
  if (!cudnn_attention_available())
    throw DeviceError("BLM_ATTENTION=cudnn: " + cudnn_attention_unavailable_reason());
  return CudnnChoice::yes;
}

struct LayerActs {
  float *ln1, *ln1_mean, *ln1_rstd;  // LN1 output [N, d], its stats [N]
  float* qkv;                        // [N, 3d], bias included
  float *att, *lse;                  // attention output [N, d], row log-sum-exp [B, H, T]
  float* mid;                        // residual stream after the attention block [N, d]
  float *ln2, *ln2_mean, *ln2_rstd;  // LN2 output [N, d], stats [N]
  float *fc_pre, *fc_act;            // MLP pre-activation (bias included) and GELU [N, 4d]
  // Precision bf16 (null in fp32, where the fp32 ln1, ln2, fc_pre, fc_act above are null
  // instead): bf16 LN outputs [N, d], attention output [N, d], pre-activation and GELU [N, 4d].
  // fc_act_h is null with BLM_RECOMPUTE=gelu: the GELU output then lives in the one shared
  // Activations::gelu_act, and the backward recomputes it (recompute_gelu_from_env).
  bf16 *ln1_h, *att_h, *ln2_h, *fc_pre_h, *fc_act_h;
  // bf16 and nothing but the attention (and the flash barrier, BLM_BARRIER_QKV=bf16) reads qkv
  // (PlanFlags.qkv_bf16): qkv [N, 3d] in bf16, and the fp32 qkv above is null.
  bf16* qkv_h;
};

// What a call needs besides the forward activations.
struct PlanFlags {
  bool barrier = false;   // phi/logdet buffers and the barrier workspace
  bool keep_qkv_f32 = false;  // the caller reads the fp32 qkv (margins)
  bool attn_cudnn = false;    // bf16 attention through cuDNN (BLM_ATTENTION=cudnn)
  bool qkv_bf16 = false;      // bf16 qkv only: no barrier but the flash one on cuDNN, not kept,
                              // an attention that reads bf16
  bool qkv_f32_transient = false;  // bf16, flash barrier on an fp32 qkv (BLM_BARRIER_QKV=f32),
                                   // cuDNN: the fp32 qkv only inside a layer's forward (one
                                   // buffer), a bf16 copy per layer
  bool backward = false;  // gradient scratch and the token groups of the embedding backward
  bool loss = false;      // targets and the per-row loss buffers
  bool bf16 = false;      // the bf16 precision's buffers instead of their fp32 counterparts
  bool recompute_gelu = false;  // bf16, BLM_RECOMPUTE=gelu: one shared GELU output, not per layer
  bool residual_ln = false;     // bf16, BLM_RESIDUAL_LN: projections in bf16, added by the next LN
  BarrierImpl barrier_impl = BarrierImpl::kernels;  // sizes the barrier's workspace
  bool barrier_fused = false;  // flash barrier, training: its backward runs in the forward
  int barrier_kmax = 0;     // ... sized for this many counted positions per sequence
  int head_rows = 0;        // bf16 classifier in chunks of this many rows (0: all N at once)
  int barrier_seqs = 0;     // sequences per barrier call: the barrier workspace is sized for these
};

struct Activations {
  int B = 0, T = 0;
  int head_rows = 0;  // bf16: rows per classifier chunk (classifier_chunk_rows; N: one chunk)
  int barrier_seqs = 0;  // the barrier runs on groups of this many sequences (its workspace's size)
  int32_t *tokens = nullptr, *targets = nullptr;  // [N]
  uint8_t* mask = nullptr;                        // [N] barrier positions
  int32_t *emb_used = nullptr, *emb_offsets = nullptr, *emb_positions = nullptr;
  std::vector<float*> resid;  // L + 1 of [N, d]: resid[l] is the input of layer l
  std::vector<LayerActs> layers;
  float *lnf = nullptr, *lnf_mean = nullptr, *lnf_rstd = nullptr;
  float* logits = nullptr;                   // [N, V]
  float *phi = nullptr, *logdet = nullptr;   // [Lb, B, H, T]
  float* row_loss = nullptr;                 // [N]
  int32_t* row_hit = nullptr;                // [N]
  float* proj_out = nullptr;                 // [N, d] a projection before its residual add
  // bf16 with PlanFlags.residual_ln: the same in bf16 (the attention's or the MLP's output
  // projection, bias included), added into the residual stream by the LayerNorm that follows.
  bf16* proj_out_h = nullptr;
  float *dresid = nullptr, *dln = nullptr;   // [N, d] residual-stream gradient, LN-output grad
  float *dqkv = nullptr, *dhidden = nullptr; // [N, 3d], [N, 4d]
  void *attn_ws = nullptr, *barrier_ws = nullptr;
  // Flash barrier, training: [Lb][N, 2d] dq, dk from the forward, fp32 (barrier_dqk) or, for the
  // bf16 precision, bf16 (barrier_dqk_h: its backward rounds the sum with the attention's part to
  // bf16 anyway; half the bytes, 0.6 instead of 1.2 GB at GPT-2 small, T 1024, B 16); the other
  // one null.
  float* barrier_dqk = nullptr;
  bf16* barrier_dqk_h = nullptr;
  // Precision bf16: LNf output [N, d] and logits / their gradient [N, V] (then lnf and logits
  // above are null, or [N, d] and [B, V] for last_logits when there is no loss); the residual
  // gradient [N, d], dqkv [N, 3d] and the MLP hidden gradient [N, 4d] as GEMM inputs.
  bf16 *lnf_h = nullptr, *logits_h = nullptr;
  bf16 *dres_h = nullptr, *dqkv_h = nullptr, *dhidden_h = nullptr;
  // BLM_RECOMPUTE=gelu: the GELU output [N, 4d] bf16 of the layer being computed (forward) or
  // differentiated (backward, recomputed there), shared by all layers; null otherwise.
  bf16* gelu_act = nullptr;
  void* attn16_ws = nullptr;  // cuda/attention_bf16.h's workspace (bf16 only), or cuDNN's
  bool attn_cudnn = false;    // PlanFlags.attn_cudnn of this arena
  bf16* datt_h = nullptr;     // [N, d] the attention output's gradient, bf16 (cuDNN, bf16 qkv)
  // [N, d] bf16 precision: a LayerNorm output's gradient, as the products write it (the
  // LayerNorm backward reads bf16: half the bytes of fp32, PyTorch autocast's precision).
  bf16* dln_h = nullptr;
  float* col_partial = nullptr;              // column-reduction scratch
  float* bias_grads = nullptr;  // bf16 backward: [6d] bias gradients the GEMM epilogues write
  double* red_partials = nullptr;            // kReducePartials
  float* min_partials = nullptr;             // kReducePartials
  double* results = nullptr;                 // [3]: CE sum, hits, phi sum
  float* min_logdet = nullptr;               // [1]
};

// The barrier workspace for one call on nb sequences of length T (either implementation).
size_t barrier_ws_bytes(const ModelConfig& m, int nb, int T, const PlanFlags& f) {
  const AttentionShape s{nb, T, m.n_head, m.head_dim()};
  switch (f.barrier_impl) {
    case BarrierImpl::kernels: return barrier_workspace_bytes(s);
    case BarrierImpl::flash: return barrier_flash_workspace_bytes(s, f.barrier_kmax);
    default: return barrier_tc_workspace_bytes(s, f.barrier_kmax);
  }
}

// cuDNN's graphs on bf16 tensors: the forward's workspace, or the larger of both directions'.
size_t cudnn_sdpa_bytes(const AttentionShape& s, bool backward) {
  const size_t fwd = cudnn_sdpa_workspace_bytes(s, false);
  return backward ? std::max(fwd, cudnn_sdpa_workspace_bytes(s, true)) : fwd;
}

// How many sequences one barrier call takes: all B when their workspace fits in `cap` bytes, else
// as many as fit (at least one).  The workspace grows like B H T dh^2 (the [T, dh^2] outer
// products of every (sequence, head)), so large batches run the barrier in groups of sequences;
// every (sequence, head) is computed on its own, so the results do not depend on the grouping.
int barrier_sequences_per_call(const ModelConfig& m, int B, int T, const PlanFlags& f, size_t cap) {
  const size_t one = std::max<size_t>(1, barrier_ws_bytes(m, 1, T, f));
  return static_cast<int>(std::max<size_t>(1, std::min<size_t>(B, cap / one)));
}

// Lays out (or, with a null base, measures) the arena for one call.
size_t carve(char* base, const ModelConfig& m, int Lb, int B, int T, const PlanFlags& f,
             Activations& a) {
  Carver c(base);
  const size_t N = static_cast<size_t>(B) * T, d = m.d_model, V = m.vocab_size;
  const size_t BHT = static_cast<size_t>(B) * m.n_head * T;
  const AttentionShape shape{B, T, m.n_head, m.head_dim()};
  // fp32 buffers the bf16 precision replaces, and the bf16 ones: null when not used.
  auto f32 = [&](size_t n) { return f.bf16 ? nullptr : c.take<float>(n); };
  auto h16 = [&](size_t n) { return f.bf16 ? c.take<bf16>(n) : nullptr; };
  a.B = B;
  a.T = T;
  a.tokens = c.take<int32_t>(N);
  a.resid.assign(m.n_layer + 1, nullptr);
  a.layers.assign(m.n_layer, LayerActs{});
  a.resid[0] = c.take<float>(N * d);
  // The fp32 qkv the flash barrier reads during a layer's forward, shared by the layers when
  // nothing reads it later (f.qkv_f32_transient).
  float* qkv_shared = f.qkv_f32_transient ? c.take<float>(N * 3 * d) : nullptr;
  for (int l = 0; l < m.n_layer; ++l) {
    LayerActs& la = a.layers[l];
    la.ln1 = f32(N * d);
    la.ln1_h = h16(N * d);
    la.ln1_mean = c.take<float>(N);
    la.ln1_rstd = c.take<float>(N);
    // (On the flag, not the pointer: the measuring pass gets null pointers from the Carver.)
    la.qkv = f.qkv_bf16 ? nullptr : f.qkv_f32_transient ? qkv_shared : c.take<float>(N * 3 * d);
    la.qkv_h = f.qkv_bf16 || f.qkv_f32_transient ? c.take<bf16>(N * 3 * d) : nullptr;
    la.att = f32(N * d);
    la.att_h = h16(N * d);
    la.lse = c.take<float>(BHT);
    la.mid = c.take<float>(N * d);
    la.ln2 = f32(N * d);
    la.ln2_h = h16(N * d);
    la.ln2_mean = c.take<float>(N);
    la.ln2_rstd = c.take<float>(N);
    la.fc_pre = f32(N * 4 * d);
    la.fc_act = f32(N * 4 * d);
    la.fc_pre_h = h16(N * 4 * d);
    la.fc_act_h = f.recompute_gelu ? nullptr : h16(N * 4 * d);
    a.resid[l + 1] = c.take<float>(N * d);
  }
  // bf16 without a loss (last_logits): the fp32 head of the last positions only.
  const bool f32_head = !f.bf16 || !f.loss;
  a.lnf = f32_head ? c.take<float>(N * d) : nullptr;
  a.lnf_mean = c.take<float>(N);
  a.lnf_rstd = c.take<float>(N);
  a.logits = f32_head ? c.take<float>(f.bf16 ? B * V : N * V) : nullptr;
  a.lnf_h = f.loss ? h16(N * d) : nullptr;
  a.head_rows = f.head_rows > 0 ? f.head_rows : static_cast<int>(N);
  a.logits_h = f.loss ? h16(static_cast<size_t>(a.head_rows) * V) : nullptr;
  a.proj_out = f32(N * d);
  a.proj_out_h = f.residual_ln ? h16(N * d) : nullptr;
  a.gelu_act = f.recompute_gelu ? h16(N * 4 * d) : nullptr;  // once, for every layer
  a.targets = f.loss ? c.take<int32_t>(N) : nullptr;
  a.row_loss = f.loss ? c.take<float>(N) : nullptr;
  a.row_hit = f.loss ? c.take<int32_t>(N) : nullptr;
  a.mask = f.barrier ? c.take<uint8_t>(N) : nullptr;
  a.phi = f.barrier ? c.take<float>(static_cast<size_t>(Lb) * BHT) : nullptr;
  a.logdet = f.barrier ? c.take<float>(static_cast<size_t>(Lb) * BHT) : nullptr;
  a.barrier_seqs = f.barrier_seqs;
  a.barrier_ws = f.barrier ? c.take<char>(barrier_ws_bytes(m, f.barrier_seqs, T, f)) : nullptr;
  a.barrier_dqk = f.barrier_fused ? f32(static_cast<size_t>(Lb) * N * 2 * d) : nullptr;
  a.barrier_dqk_h = f.barrier_fused ? h16(static_cast<size_t>(Lb) * N * 2 * d) : nullptr;
  a.attn_cudnn = f.attn_cudnn;
  a.attn16_ws = !f.bf16       ? nullptr
                : !f.attn_cudnn ? c.take<char>(attention_bf16_workspace_bytes(shape, f.backward))
                : f.qkv_bf16 || f.qkv_f32_transient ? c.take<char>(cudnn_sdpa_bytes(shape, f.backward))
                              : c.take<char>(cudnn_attention_workspace_bytes(shape, f.backward));
  if (f.backward) {
    const size_t used = std::min(N, V);
    a.emb_used = c.take<int32_t>(used);
    a.emb_offsets = c.take<int32_t>(used + 1);
    a.emb_positions = c.take<int32_t>(N);
    a.dresid = c.take<float>(N * d);
    // cuDNN on a bf16 qkv writes dqkv in bf16 (dqkv_h) and reads the attention's output gradient
    // in bf16: no fp32 dqkv, and no fp32 dln (the other bf16 attention paths use it for d att).
    const bool bf16_grads = f.attn_cudnn && (f.qkv_bf16 || f.qkv_f32_transient);
    a.dln = f.bf16 && bf16_grads ? nullptr : c.take<float>(N * d);
    a.dln_h = h16(N * d);
    a.dqkv = bf16_grads ? nullptr : c.take<float>(N * 3 * d);
    a.datt_h = bf16_grads ? c.take<bf16>(N * d) : nullptr;
    a.dhidden = f32(N * 4 * d);
    a.dres_h = h16(N * d);
    a.dqkv_h = h16(N * 3 * d);
    // The MLP hidden gradient [N, 4d]: its own buffer with the GELU recompute; else written over
    // the layer's GELU output, which the backward no longer reads once dWp is done.
    a.dhidden_h = f.recompute_gelu ? h16(N * 4 * d) : nullptr;
    a.attn_ws = f.bf16 ? nullptr : c.take<char>(attention_workspace_bytes(shape));
    const int Ni = static_cast<int>(N), di = m.d_model;
    a.col_partial = c.take<float>(
        std::max(column_partial_floats(Ni, 4 * di, 1), column_partial_floats(Ni, di, 3)));
    a.bias_grads = f.bf16 ? c.take<float>(6 * d) : nullptr;  // bp [d], bfc [4d], bo [d]
  } else {
    a.emb_used = a.emb_offsets = a.emb_positions = nullptr;
    a.dresid = a.dln = a.dqkv = a.dhidden = a.col_partial = a.bias_grads = nullptr;
    a.dres_h = a.dqkv_h = a.dhidden_h = a.datt_h = a.dln_h = nullptr;
    a.attn_ws = nullptr;
  }
  a.red_partials = c.take<double>(kReducePartials);
  a.min_partials = c.take<float>(kReducePartials);
  a.results = c.take<double>(3);
  a.min_logdet = c.take<float>(1);
  return c.size();
}

// Per-tensor decay table on the host: tensor start offsets (and the total) and decay flags.
void build_decay_table(const ParamLayout& layout, std::vector<int64_t>& starts,
                       std::vector<uint8_t>& flags) {
  starts.clear();
  flags.clear();
  for (const TensorSpec& t : layout.tensors()) {
    starts.push_back(static_cast<int64_t>(t.offset));
    flags.push_back(t.decay ? 1 : 0);
  }
  starts.push_back(static_cast<int64_t>(layout.total()));
}

// The backend's stream and cuBLAS handle, owned so that a constructor failing half-way (e.g. an
// allocation that does not fit) releases them.
struct StreamHandle {
  cudaStream_t stream = nullptr;
  StreamHandle() { CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); }
  ~StreamHandle() {
    cudaStreamSynchronize(stream);  // teardown cannot report errors usefully; never throw here
    cudaStreamDestroy(stream);
  }
  StreamHandle(const StreamHandle&) = delete;
  StreamHandle& operator=(const StreamHandle&) = delete;
};
struct EventHandle {
  cudaEvent_t event = nullptr;
  EventHandle() { CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming)); }
  ~EventHandle() { cudaEventDestroy(event); }
  EventHandle(const EventHandle&) = delete;
  EventHandle& operator=(const EventHandle&) = delete;
};
// The training step's device work as instantiated CUDA graphs (BLM_CUDA_GRAPHS, default 1), two
// per key of what its launches depend on (forward and backward; a few keys: gradient
// accumulation alternates two);
// `seen` holds the keys met once (those calls run eagerly, so lazy plans and workspaces exist
// before a capture).  `launches` counts graph launches (cuda_graph_launches, for the tests).  A
// run whose key keeps changing (say, a barrier plan that differs from batch to batch) would
// capture over and over, each capture costing more than it saves: after kMaxCaptures captures no
// new graph is made (the kept ones still replay), and `seen` is bounded the same way.
struct StepGraphs {
  static constexpr size_t kMaxGraphs = 8;  // a step is two graphs (forward, backward)
  static constexpr long kMaxCaptures = 32;
  static constexpr size_t kMaxSeen = 64;
  std::map<std::string, cudaGraphExec_t> exec;
  std::set<std::string> seen;
  long launches = 0;
  long captures = 0;
  StepGraphs() = default;
  ~StepGraphs() { clear(); }
  void clear() {
    for (auto& e : exec) cudaGraphExecDestroy(e.second);  // teardown: never throws
    exec.clear();
  }
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;
};

struct BlasHandle {
  cublasHandle_t handle;
  explicit BlasHandle(cudaStream_t s) : handle(create_cublas(s)) {}
  ~BlasHandle() { destroy_cublas(handle); }
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;
};

// Selects the device first: members constructed after it allocate on that device.
struct DeviceSelect {
  explicit DeviceSelect(int device) {
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    if (device < 0 || device >= count)
      throw DeviceError("CUDA device " + std::to_string(device) + " does not exist (" +
                        std::to_string(count) + " visible); check CUDA_VISIBLE_DEVICES");
    CUDA_CHECK(cudaSetDevice(device));
  }
};

// BLM_CLASSIFIER_ROWS: the bf16 classifier's chunk of rows (classifier_chunks_bf16); unset or
// empty: automatic (classifier_chunk_rows); 0: the whole [N, V] logits at once.
int classifier_rows_from_env() {
  return static_cast<int>(env_count("BLM_CLASSIFIER_ROWS", -1, 0, 1L << 30,
                                    "a row count (0 = one chunk, or a positive number of rows)"));
}

// The automatic chunk: the fewest equal chunks whose bf16 logits [rows, V] stay within 2 GiB, so
// GPT-2 small (N 16384, V 50304: 1.6 GB) takes one chunk; small vocabularies always do.  Chunks
// bound the memory of large vocabularies and batches, at a cost: each chunk's products are
// smaller, and dwte (fp32, 0.15 GB at GPT-2 small) is read and written once per chunk.  Measured
// at GPT-2 small (H200, 2026-11-29, barrierlm bench at lambda 0, 3 alternating rounds): one chunk
// 30.50 / 30.51 / 30.74 ms a step against 30.88 / 30.80 / 30.87 for 4 chunks of 4096 rows (the
// cap was 512 MiB until then), for 1.15 GiB more memory; 2 chunks, in a second A/B, 30.71 /
// 30.79 / 30.87 against 30.96 / 30.94 / 30.89.
int classifier_chunk_rows(int64_t N, int64_t V, int env_rows) {
  if (env_rows == 0 || N <= 0) return 0;
  if (env_rows > 0) return env_rows < N ? env_rows : 0;
  constexpr int64_t kCapBytes = int64_t{2} << 30;
  const int64_t chunks = (N * V * 2 + kCapBytes - 1) / kCapBytes;
  return chunks <= 1 ? 0 : static_cast<int>((N + chunks - 1) / chunks);
}

// BLM_LT_EPILOGUES: which of the bf16 step's elementwise passes cuBLASLt's epilogues replace
// (cuda/matmul_lt.h):
//   "gelu-forward" (default): the GELU forward (GELU_AUX_BIAS in the FC1 product writes fc_pre
//       and gelu(fc_pre)); the GELU backward stays ours (cuda/gelu.cuh);
//   "bias": the projections' bias gradients (BGRADB in the weight-gradient products), GELU ours;
//   "all": both, and the GELU backward with the FC1 bias gradient (DGELU_BGRAD in the dhidden
//       product);
//   "none": our kernels only.
// Without the bias epilogues (gelu-forward, none) the projections' bias gradients are the column
// sums of the residual gradient, added by the LayerNorm backward that writes it (no pass of their
// own; residual_bias_grad).  Measured on the H200 (barrierlm bench, lambda 0, 30 steps, two
// rounds, 2026-11-29 02:40 UTC, with BLM_RESIDUAL_LN and the GELU recompute): (a) bias 31.78 /
// 31.63 ms, none 31.43 / 31.48, gelu-forward 31.23 / 31.42; (b) bias 4.43 / 4.44, none 4.30 /
// 4.39, gelu-forward 4.26 / 4.34.  Earlier (commit 3a1d476, our GELU recompute absent) "all"
// measured slower than "bias" at both shapes: (b) 6.44 against 5.73 ms, (a) 40.3 against 38.0.
enum class LtEpilogues { none, bias, all, gelu_forward };
LtEpilogues lt_epilogues_from_env() {
  constexpr LtEpilogues kChoices[] = {LtEpilogues::gelu_forward, LtEpilogues::bias,
                                      LtEpilogues::all, LtEpilogues::none};
  return kChoices[env_choice("BLM_LT_EPILOGUES", {"gelu-forward", "bias", "all", "none"}, 0)];
}
// Whether the FC1 product computes the GELU in its epilogue (BLM_LT_EPILOGUES all, gelu-forward).
bool gelu_in_epilogue(LtEpilogues e) {
  return e == LtEpilogues::all || e == LtEpilogues::gelu_forward;
}
// Whether the projections' bias gradients come from the weight-gradient products' epilogues
// (bias, all); else (none, gelu-forward) from the LayerNorm backwards' column sums of the residual
// gradient (CudaBackend::residual_bias_grad).
bool lt_bias_grads(LtEpilogues e) { return e == LtEpilogues::bias || e == LtEpilogues::all; }

// BLM_RECOMPUTE: "gelu" -> the bf16 step keeps no GELU output per layer: the forward writes it into
// one shared [N, 4d] buffer (Activations::gelu_act) that the FC2 product reads, and the backward
// rebuilds it from fc_pre in the pass that applies gelu' (bit-identical results with our GELU
// forward kernel; within a bf16 rounding beside the gelu-forward epilogue; L - 1 [N, 4d]
// bf16 fewer: 250 MB at B 64 T 256 L 6 d 384; measured 1.82 -> 1.61 GiB peak at (b) with a bf16
// qkv, for 1% of the step).  "none" -> no recompute; unset or empty -> `by_default`.  Any other
// value -> ConfigError.  fp32: validated, no effect.
bool recompute_gelu_from_env(bool by_default) {
  const int choice = env_choice("BLM_RECOMPUTE", {"gelu", "none"}, -1);
  return choice < 0 ? by_default : choice == 0;
}

// BLM_BARRIER_WORKSPACE_MB: the most device memory the barrier's workspace may take (MiB, default
// 4096); larger batches run the barrier in groups of sequences (barrier_sequences_per_call).
size_t barrier_workspace_cap_from_env() {
  return static_cast<size_t>(env_count("BLM_BARRIER_WORKSPACE_MB", 4096, 1, 1L << 24,
                                       "a size in MiB (a positive number)"))
         << 20;
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(const Config& cfg, int device);

  std::string name() const override { return name_; }
  void set_parameters(const std::vector<float>& params) override;
  void get_parameters(std::vector<float>& params) override;
  void set_optimizer_state(const std::vector<float>& m, const std::vector<float>& v,
                           int64_t t) override;
  void get_optimizer_state(std::vector<float>& m, std::vector<float>& v, int64_t& t) override;
  void get_gradients(std::vector<float>& grads) override;
  LossTerms forward(const Batch& batch, const ForwardOptions& opts) override;
  LossTerms forward_backward(const Batch& batch, const ForwardOptions& opts) override;
  double grad_norm() override;
  void adamw_step(const AdamWHyper& hyper, double lr, double clip_scale) override;
  void last_logits(const Batch& batch, std::vector<float>& logits) override;
  Margins margins(const Batch& batch) override;
  void set_data_parallel(DataParallel* dp) override;

 private:
  // The barrier-related numbers of one call, known on the host before anything runs.
  struct BarrierPlan {
    bool compute = false;  // run barrier_forward on the barrier layers
    bool grad = false;     // run barrier_backward
    int64_t terms = 0;     // N_R
    const uint8_t* host_mask = nullptr;
    int kmax = 0;          // the most counted positions of one sequence (sizes barrier_tc's work)
  };

  void check_batch(const Batch& batch, bool need_targets) const;
  BarrierPlan plan_barrier(const Batch& batch, const ForwardOptions& opts, bool backward) const;
  void prepare(const Batch& batch, const PlanFlags& flags, const BarrierPlan& bp);
  void build_token_groups(const Batch& batch);
  void forward_layers(const ForwardOptions& opts, const BarrierPlan& bp);
  void forward_head();  // LNf, and in fp32 the logits of every position (bf16: with the CE)
  void loss_terms_start(bool write_grad, float grad_scale, const BarrierPlan& bp);
  LossTerms loss_terms_finish(const BarrierPlan& bp);
  void backward(const BarrierPlan& bp, float grad_scale);
  void backward_layer(int l, const BarrierPlan& bp, float barrier_scale);
  // The bf16 step's bias gradient that a LayerNorm backward adds as the column sums of the
  // residual gradient it writes: dL/d resid[l+1] (the LNf backward, or layer l+1's LN1 backward)
  // is the gradient of layer l's MLP output (mlp: its fcproj bias), dL/d mid of layer l (its LN2
  // backward) that of its attention output (its proj bias).  Null where the products' epilogues
  // compute them (lt_bias_grads) and in fp32.
  float* residual_bias_grad(int l, bool mlp) {
    if (!bf16_ || lt_bias_grads(epilogues_)) return nullptr;
    const LayerOffsets& o = layout_.layer(l);
    return G(mlp ? o.fcproj_b : o.proj_b);
  }
  // The bf16 precision's passes (see the top of this file).
  void forward_layers_bf16(const ForwardOptions& opts, const BarrierPlan& bp);
  void forward_head_bf16();
  template <class TOut>
  void input_layernorm(int l, const float* w, const float* b, TOut* y, float* mean, float* rstd);
  void classifier_chunks_bf16(bool write_grad, float grad_scale);
  void backward_layer_bf16(int l, const BarrierPlan& bp, float barrier_scale);
  // The barrier of layer l, by the implementation BLM_BARRIER selects (cuda/barrier_tc.h).
  // The flash barrier (BLM_BARRIER=flash) trains in the forward (barrier_forward_backward_flash):
  // its dq, dk wait in acts_.barrier_dqk (bf16: barrier_dqk_h) for the backward, which adds them
  // (barrier_gradient, barrier_gradient_h).
  // It reads layer l's fp32 qkv, or, where the plan keeps only the bf16 one (PlanFlags.qkv_bf16,
  // BLM_BARRIER_QKV=bf16: the flash barrier only), that one.  qkv_copy: null, or layer l's bf16
  // qkv, which the flash barrier then writes (from the fp32 qkv it reads anyway); returns whether
  // it did.
  struct Lane {  // where a layer's barrier is queued (barrier_lane)
    cudaStream_t stream;
    cublasHandle_t blas;
  };
  bool barrier_forward_layer(int l, const BarrierPlan& bp, float barrier_scale, Lane lane,
                             bf16* qkv_copy = nullptr);
  void barrier_backward_layer(int l, const BarrierPlan& bp, float barrier_scale);
  // lambda R's gradient scale: R is a mean over bp.terms terms.
  float barrier_grad_scale(const BarrierPlan& bp, float grad_scale) const {
    return bp.grad ? static_cast<float>(bar_.lambda / static_cast<double>(bp.terms) * grad_scale)
                   : 0.0f;
  }
  const bf16* P16(size_t offset) const { return params16_.as<bf16>() + offset; }
  AttentionShape shape() const { return {acts_.B, acts_.T, m_.n_head, m_.head_dim()}; }
  // The flash barrier's dq, dk of layer l from sequence b0 on ([B, T, 2d]; null: none), in fp32
  // (precision fp32) or bf16 (precision bf16: barrier_gradient_h; the other is then null).
  float* barrier_gradient(int l, int b0 = 0) const {
    return barrier_rows(acts_.barrier_dqk, l, b0);
  }
  bf16* barrier_gradient_h(int l, int b0 = 0) const {
    return barrier_rows(acts_.barrier_dqk_h, l, b0);
  }
  template <class Elem>
  Elem* barrier_rows(Elem* all_layers, int l, int b0) const {
    if (all_layers == nullptr || barrier_layers_[l] < 0) return nullptr;
    const size_t N = static_cast<size_t>(acts_.B) * acts_.T;
    const size_t row = 2 * static_cast<size_t>(m_.d_model);
    return all_layers + (barrier_layers_[l] * N + static_cast<size_t>(b0) * acts_.T) * row;
  }
  // The barrier's group of sequences [b0, b0 + acts_.barrier_seqs) (the last one may be shorter).
  AttentionShape barrier_group(int b0) const {
    return {std::min(acts_.barrier_seqs, acts_.B - b0), acts_.T, m_.n_head, m_.head_dim()};
  }
  const float* P(size_t offset) const { return params_.as<float>() + offset; }
  float* G(size_t offset) const { return grads_.as<float>() + offset; }
  void upload(void* dst, const void* src, size_t bytes);
  // forward_backward's device work: eagerly, or as CUDA graphs (BLM_CUDA_GRAPHS, default 1).
  std::string step_key(const Batch& batch, const ForwardOptions& opts, const BarrierPlan& bp) const;
  bool cudnn_runs(const AttentionShape& s, bool backward);
  std::map<std::array<int, 5>, bool> cudnn_shapes_;  // cudnn_runs' answers: B, T, H, dh, backward
  void run_as_graph(const std::string& key, const std::function<void()>& work);

 public:
  long graph_launches() const;  // CUDA graph launches so far (cuda_graph_launches)
  long barrier_forks() const { return barrier_forks_; }  // cuda_barrier_stream_forks

 private:
  void download(void* dst, const void* src, size_t bytes);

  ModelConfig m_;
  BarrierConfig bar_;
  ParamLayout layout_;
  int device_ = 0;
  int threads_ = 0;
  std::string name_;
  std::vector<int> barrier_layers_;  // layer l -> slot in phi/logdet, or -1
  int n_barrier_layers_ = 0;
  DeviceSelect select_;  // first: everything below lives on device_
  StreamHandle stream_holder_;
  // A second stream for work beside the step's main sequence (the gradients' zeroing during the
  // forward), forked from and joined into stream_ by events (also inside a graph capture).
  StreamHandle side_holder_;
  EventHandle fork_, join_;
  BlasHandle blas_holder_;
  cudaStream_t stream_;
  cublasHandle_t blas_;
  // The barrier's own stream (BLM_BARRIER_STREAM, default 1; the bf16 step with the flash barrier
  // on the bf16 qkv): layer l's barrier (its forward, inverses, backward tiles; nothing the
  // model's forward reads) forked from stream_ after the layer's qkv product, so that it runs
  // beside the model's next kernels and fills what they leave idle, and joined into stream_
  // before the loss reduces its terms.  The same kernels on the same data: the same bits.  Its own
  // cuBLAS handle and workspace (a handle's workspace must not serve two streams at once).
  // Measured on an H200 (2026-11-29, barrierlm bench, 2 alternating rounds, ms a step): GPT-2
  // small 16 positions 37.85 / 37.98 -> 37.21 / 37.38, 64 positions 51.41 / 51.30 -> 50.95 /
  // 51.19; the paper's size, exact, 37.02 / 36.91 -> 36.48 / 36.54.  0: one stream.  On when
  // barrier_blas_holder_ is made (the constructor).
  bool barrier_pending_ = false;  // barrier work forked and not joined yet
  long barrier_forks_ = 0;        // layers queued on the barrier stream (eagerly or captured)
  StreamHandle barrier_stream_holder_;
  EventHandle barrier_fork_, barrier_join_;
  std::unique_ptr<BlasHandle> barrier_blas_holder_;
  DeviceBuffer barrier_blas_workspace_;
  Lane barrier_lane(int l, const BarrierPlan& bp);
  void join_barrier_lane();
  DeviceBuffer params_, grads_, adam_m_, adam_v_;
  bool bf16_ = false;               // device.precision bf16 (or auto)
  int classifier_rows_ = -1;        // BLM_CLASSIFIER_ROWS: bf16 classifier chunk (-1: automatic)
  LtEpilogues epilogues_ = LtEpilogues::none;  // BLM_LT_EPILOGUES (bf16 only)
  bool recompute_gelu_ = false;     // BLM_RECOMPUTE=gelu (bf16 only)
  bool residual_ln_ = false;        // BLM_RESIDUAL_LN (bf16 only; forward_layer_bf16)
  size_t barrier_ws_cap_ = 0;       // BLM_BARRIER_WORKSPACE_MB, in bytes
  bool qkv_bf16_ = false;           // BLM_QKV_BF16: hold qkv in bf16 where only attention reads it
  bool barrier_qkv_bf16_ = false;   // BLM_BARRIER_QKV=bf16: the flash barrier reads that bf16 qkv
  bool graphs_ = false;             // BLM_CUDA_GRAPHS: the step's device work as CUDA graphs
  StepGraphs graphs_cache_;
  DeviceBuffer blas_workspace_;  // cuBLAS's workspace, fixed (the same in eager and graph runs)
  BarrierImpl barrier_impl_ = BarrierImpl::kernels;  // BLM_BARRIER (cuda/barrier_tc.h)
  DeviceBuffer params16_;           // bf16 copy of params_ (bf16 only)
  std::unique_ptr<LtMatmul> lt_;    // cuBLASLt products (bf16 only)
  DeviceBuffer decay_starts_, decay_flags_;
  DeviceBuffer norm_scratch_;  // kReducePartials + 1 doubles for grad_norm
  int n_decay_seg_ = 0;
  int64_t adam_t_ = 0;
  DeviceBuffer arena_;
  Activations acts_;
  // Host staging of the embedding backward's token groups (kept to avoid reallocating).
  std::vector<int32_t> group_count_, group_used_, group_offsets_, group_positions_;
  // Data parallelism (cuda/nccl_comm.h): null on one GPU; reduce_now_ for the current call.
  NcclComm* dp_ = nullptr;
  bool reduce_now_ = false;
};

CudaBackend::CudaBackend(const Config& cfg, int device)
    : m_(cfg.model), bar_(cfg.barrier), layout_(cfg.model), device_(device),
      threads_(cfg.device.threads), select_(device), blas_holder_(stream_holder_.stream),
      stream_(stream_holder_.stream), blas_(blas_holder_.handle) {
  bf16_ = cfg.device.precision == "bf16" || cfg.device.precision == "auto";
  // The barrier's implementation: BLM_BARRIER when set (cuda/barrier_tc.h), else by precision:
  // bf16 runs it as TF32 matrix products (tensor cores; the products' ~1e-3 relative error is
  // below bf16's), fp32 keeps the per-position fp32 kernels with the fp64 LU (tested to 1e-4).
  const char* barrier_env = std::getenv("BLM_BARRIER");
  barrier_impl_ = barrier_env != nullptr && *barrier_env != '\0' ? barrier_impl_from_env()
                  : bf16_ && barrier_flash_supported(m_.head_dim()) ? BarrierImpl::flash
                  : bf16_                               ? BarrierImpl::gemm_tf32
                                                        : BarrierImpl::kernels;
  classifier_rows_ = bf16_ ? classifier_rows_from_env() : 0;  // (fp32: one chunk)
  epilogues_ = bf16_ ? lt_epilogues_from_env() : LtEpilogues::none;
  // The GELU recompute is the bf16 default, except with BLM_LT_EPILOGUES=all, whose GELU
  // backward (DGELU in the dhidden product) does not rebuild the GELU output that dWp reads:
  // asking for both is refused.  Beside the GELU forward epilogue (gelu-forward) the recompute
  // rebuilds the output with our kernel from the kept bf16 fc_pre, while the forward's came from
  // the product's fp32 accumulator: the two differ by about one bf16 rounding (as gelu' in the
  // backward is taken at bf16(fc_pre) in every mode).
  const bool gelu_by_default = bf16_ && epilogues_ != LtEpilogues::all;
  recompute_gelu_ = recompute_gelu_from_env(gelu_by_default) && bf16_;  // (fp32: typos refused)
  if (recompute_gelu_ && epilogues_ == LtEpilogues::all)
    throw ConfigError("environment BLM_RECOMPUTE=gelu with BLM_LT_EPILOGUES=all: the recompute "
                      "needs our GELU backward (BLM_LT_EPILOGUES none, bias or gelu-forward)");
  // BLM_RESIDUAL_LN (default 1): the bf16 step's output projections (attention and MLP) write
  // bf16 with their bias, and the LayerNorm after each adds that into the fp32 residual stream in
  // the pass it reads the stream anyway (residual_layernorm_forward): PyTorch autocast's rounding
  // (a bf16 linear output added to the stream).  0: the products add into the fp32 stream
  // themselves (C = the stream, fp32 output), without that rounding.
  residual_ln_ = bf16_ && env_count("BLM_RESIDUAL_LN", 1, 0, 1, "0 or 1") == 1;
  barrier_ws_cap_ = barrier_workspace_cap_from_env();
  if (std::getenv("BLM_BARRIER_SAVE_MB") != nullptr)  // removed 2026-11-29: say it does nothing
    std::fprintf(stderr, "barrierlm: warning: BLM_BARRIER_SAVE_MB is ignored (the flash barrier "
                         "trains in the forward and keeps no G for the backward)\n");
  // BLM_QKV_BF16 (default 1): qkv in bf16 when nothing but the attention reads it
  // (PlanFlags.qkv_bf16); 0 keeps it in fp32.
  qkv_bf16_ = env_count("BLM_QKV_BF16", 1, 0, 1, "0 or 1") == 1;
  // BLM_BARRIER_QKV (bf16 precision, flash barrier, cuDNN attention): "bf16" (default) - the
  // barrier reads the bf16 qkv the attention reads (the same q, k and logits, spec section 7),
  // so the product writes qkv once, in bf16, and the barrier's preparation reads half the bytes
  // and copies nothing; "f32" - the product writes an fp32 qkv for the barrier and the barrier's
  // first pass makes the attention's bf16 copy.  Margins always read an fp32 qkv.
  barrier_qkv_bf16_ = env_choice("BLM_BARRIER_QKV", {"bf16", "f32"}, 0) == 0;
  // BLM_CUDA_GRAPHS (default 1): forward_backward's launches replayed as two CUDA graphs while the
  // batch shape and the barrier plan stay the same (not with BLM_CUDA_SYNC, which synchronises
  // after every launch, nor with data parallelism); 0 launches eagerly.
  const char* sync_env = std::getenv("BLM_CUDA_SYNC");
  graphs_ = env_count("BLM_CUDA_GRAPHS", 1, 0, 1, "0 or 1") == 1 &&
            !(sync_env && *sync_env && std::strcmp(sync_env, "0") != 0);
  // cuBLAS gets a fixed workspace (32 MiB, the size NVIDIA suggests for Hopper): otherwise it
  // allocates its own, and under stream capture a different one, which may change its choice of
  // algorithm between an eager and a captured step.
  blas_workspace_ = DeviceBuffer(size_t{32} << 20, "the cuBLAS workspace");
  CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_workspace_.get(), blas_workspace_.bytes()));
  const bool barrier_stream = env_count("BLM_BARRIER_STREAM", 1, 0, 1, "0 or 1") == 1;
  // Only where training computes the barrier (lambda > 0): the handle and its workspace hold about
  // 90 MiB of device memory (measured at lambda 0 on the H200 before this condition).  Without
  // them barrier_lane keeps a reported barrier (margins, eval at lambda 0) on stream_.
  if (barrier_stream && bar_.lambda > 0) {
    barrier_blas_holder_ = std::make_unique<BlasHandle>(barrier_stream_holder_.stream);
    barrier_blas_workspace_ =
        DeviceBuffer(size_t{32} << 20, "the barrier stream's cuBLAS workspace");
    CUBLAS_CHECK(cublasSetWorkspace(barrier_blas_holder_->handle, barrier_blas_workspace_.get(),
                                    barrier_blas_workspace_.bytes()));
  }
  name_ = std::string(bf16_ ? "cuda-bf16 (" : "cuda-fp32 (") + device_name(device) + ")";
  for (int l = 0; l < m_.n_layer; ++l)
    barrier_layers_.push_back(bar_.applies_to(l) ? n_barrier_layers_++ : -1);

  const size_t bytes = layout_.total() * sizeof(float);
  params_ = DeviceBuffer(bytes, "the parameters");
  grads_ = DeviceBuffer(bytes, "the gradients");
  adam_m_ = DeviceBuffer(bytes, "the AdamW first moments");
  adam_v_ = DeviceBuffer(bytes, "the AdamW second moments");
  CUDA_CHECK(cudaMemsetAsync(params_.get(), 0, bytes, stream_));
  CUDA_CHECK(cudaMemsetAsync(grads_.get(), 0, bytes, stream_));
  CUDA_CHECK(cudaMemsetAsync(adam_m_.get(), 0, bytes, stream_));
  CUDA_CHECK(cudaMemsetAsync(adam_v_.get(), 0, bytes, stream_));
  if (bf16_) {
    params16_ = DeviceBuffer(layout_.total() * sizeof(bf16), "the bf16 weights");
    CUDA_CHECK(cudaMemsetAsync(params16_.get(), 0, params16_.bytes(), stream_));
    lt_ = std::make_unique<LtMatmul>();
  }

  std::vector<int64_t> starts;
  std::vector<uint8_t> flags;
  build_decay_table(layout_, starts, flags);
  n_decay_seg_ = static_cast<int>(flags.size());
  decay_starts_ = DeviceBuffer(starts.size() * sizeof(int64_t), "the weight-decay table");
  decay_flags_ = DeviceBuffer(flags.size(), "the weight-decay table");
  upload(decay_starts_.get(), starts.data(), starts.size() * sizeof(int64_t));
  upload(decay_flags_.get(), flags.data(), flags.size());
  norm_scratch_ = DeviceBuffer((kReducePartials + 1) * sizeof(double), "the gradient norm");
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::upload(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  // From pageable memory: the call returns once the source has been staged, so the host buffer
  // may be reused right away.
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
}

void CudaBackend::download(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// ------------------------------------------------------------------ state in and out

static void check_size(const char* what, size_t got, size_t want) {
  if (got != want)
    throw Error(std::string(what) + ": got " + std::to_string(got) + " values, the model has " +
                std::to_string(want));
}

void CudaBackend::set_parameters(const std::vector<float>& params) {
  check_size("set_parameters", params.size(), layout_.total());
  upload(params_.get(), params.data(), params.size() * sizeof(float));
  if (bf16_)
    convert_to_bf16(params_.as<float>(), params16_.as<bf16>(),
                    static_cast<int64_t>(layout_.total()), stream_);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::get_parameters(std::vector<float>& params) {
  params.resize(layout_.total());
  download(params.data(), params_.get(), params.size() * sizeof(float));
}

void CudaBackend::set_optimizer_state(const std::vector<float>& m, const std::vector<float>& v,
                                      int64_t t) {
  if (t < 0) throw Error("set_optimizer_state: step count " + std::to_string(t) + " is negative");
  const size_t bytes = layout_.total() * sizeof(float);
  if (m.empty() && v.empty()) {  // a checkpoint without optimizer state: fresh moments
    CUDA_CHECK(cudaMemsetAsync(adam_m_.get(), 0, bytes, stream_));
    CUDA_CHECK(cudaMemsetAsync(adam_v_.get(), 0, bytes, stream_));
  } else {
    check_size("set_optimizer_state (m)", m.size(), layout_.total());
    check_size("set_optimizer_state (v)", v.size(), layout_.total());
    upload(adam_m_.get(), m.data(), bytes);
    upload(adam_v_.get(), v.data(), bytes);
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  adam_t_ = t;
}

void CudaBackend::get_optimizer_state(std::vector<float>& m, std::vector<float>& v, int64_t& t) {
  m.resize(layout_.total());
  v.resize(layout_.total());
  download(m.data(), adam_m_.get(), m.size() * sizeof(float));
  download(v.data(), adam_v_.get(), v.size() * sizeof(float));
  t = adam_t_;
}

void CudaBackend::get_gradients(std::vector<float>& grads) {
  grads.resize(layout_.total());
  download(grads.data(), grads_.get(), grads.size() * sizeof(float));
}

// ------------------------------------------------------------------ call setup

void CudaBackend::check_batch(const Batch& batch, bool need_targets) const {
  if (batch.B <= 0 || batch.T <= 0)
    throw Error("batch of " + std::to_string(batch.B) + " x " + std::to_string(batch.T) +
                " tokens: B and T must be positive");
  if (batch.T > m_.seq_len)
    throw Error("batch sequence length " + std::to_string(batch.T) + " exceeds model.seq_len " +
                std::to_string(m_.seq_len));
  if (batch.inputs == nullptr) throw Error("batch has no inputs");
  if (need_targets && batch.targets == nullptr) throw Error("this call needs batch.targets");
  const int64_t N = static_cast<int64_t>(batch.B) * batch.T;
  if (N > std::numeric_limits<int>::max())
    throw Error("batch of " + std::to_string(N) + " tokens is too large for one call (at most " +
                std::to_string(std::numeric_limits<int>::max()) + ")");
  const int V = m_.vocab_size;
  auto check_ids = [&](const int32_t* ids, const char* what) {
    for (int64_t n = 0; n < N; ++n)
      if (ids[n] < 0 || ids[n] >= V)
        throw DataError(std::string(what) + " token id " + std::to_string(ids[n]) +
                        " at (sequence " + std::to_string(n / batch.T) + ", position " +
                        std::to_string(n % batch.T) + ") is outside the vocabulary [0, " +
                        std::to_string(V) + ")");
  };
  check_ids(batch.inputs, "input");
  if (need_targets) check_ids(batch.targets, "target");
}

CudaBackend::BarrierPlan CudaBackend::plan_barrier(const Batch& batch, const ForwardOptions& opts,
                                                   bool backward) const {
  BarrierPlan bp;
  if (n_barrier_layers_ == 0 || !(bar_.enabled() || opts.report_barrier)) return bp;
  int64_t positions = 0;  // counted (b, t): t >= 2 and in the mask
  for (int b = 0; b < batch.B; ++b) {
    int counted = 0;
    for (int t = 2; t < batch.T; ++t)
      if (!opts.barrier_mask || opts.barrier_mask[static_cast<int64_t>(b) * batch.T + t])
        ++counted;
    positions += counted;
    bp.kmax = std::max(bp.kmax, counted);
  }
  bp.terms = positions * n_barrier_layers_ * m_.n_head;
  bp.compute = bp.terms > 0;
  bp.grad = bp.compute && backward && bar_.enabled();
  bp.host_mask = opts.barrier_mask;
  return bp;
}

void CudaBackend::prepare(const Batch& batch, const PlanFlags& flags, const BarrierPlan& bp) {
  CUDA_CHECK(cudaSetDevice(device_));
  PlanFlags f = flags;
  f.bf16 = bf16_;
  f.recompute_gelu = recompute_gelu_;
  f.residual_ln = residual_ln_;
  f.barrier_impl = barrier_impl_;
  // qkv in bf16 when only the attention reads it (no barrier, no margins) and the attention reads
  // bf16 (flash kernels or cuDNN; not the GEMM path): half the memory, and cuDNN without
  // conversions.
  if (f.bf16) {
    const CudnnChoice choice = bf16_attention_cudnn_choice(f.loss);
    const AttentionShape s{batch.B, batch.T, m_.n_head, m_.head_dim()};
    f.attn_cudnn = choice == CudnnChoice::yes ||
                   (choice == CudnnChoice::if_shape_runs && cudnn_runs(s, f.backward));
  }
  // The flash barrier with cuDNN: it may read the attention's bf16 qkv (BLM_BARRIER_QKV=bf16).
  const bool flash_barrier_cudnn = qkv_bf16_ && f.bf16 && f.barrier && !f.keep_qkv_f32 &&
                                   f.attn_cudnn && f.barrier_impl == BarrierImpl::flash;
  f.qkv_bf16 = qkv_bf16_ && f.bf16 && !f.keep_qkv_f32 &&
               (f.attn_cudnn || flash_attention_enabled()) &&
               (!f.barrier || (flash_barrier_cudnn && barrier_qkv_bf16_));
  // Else, with the flash barrier (which reads the fp32 qkv only in the layer's forward, as it
  // trains there) and cuDNN on a bf16 copy, the fp32 qkv need not outlive the layer's forward.
  f.qkv_f32_transient = flash_barrier_cudnn && !f.qkv_bf16;
  if (f.barrier_impl == BarrierImpl::flash && !barrier_flash_supported(m_.head_dim()))
    throw ConfigError("BLM_BARRIER=flash: head size " + std::to_string(m_.head_dim()) +
                      " unsupported (32 or 64); use tc");
  f.barrier_kmax = bp.kmax;
  const int rows = batch.B * batch.T;
  f.head_rows = f.bf16 && f.loss ? classifier_chunk_rows(rows, m_.vocab_size, classifier_rows_) : 0;
  f.barrier_seqs = f.barrier ? barrier_sequences_per_call(m_, batch.B, batch.T, f, barrier_ws_cap_) : 0;
  f.barrier_fused = f.barrier && bp.grad && f.barrier_impl == BarrierImpl::flash;
  const size_t need = carve(nullptr, m_, n_barrier_layers_, batch.B, batch.T, f, acts_);
  if (need > arena_.bytes()) {
    arena_ = DeviceBuffer();  // free first: old and new never need to coexist
    std::string what = "the activations (batch " + std::to_string(batch.B) + " x " +
                       std::to_string(batch.T);
    if (f.barrier) {  // the barrier's workspace can dominate: say so, and what shrinks it
      what += ", of which " + format_bytes(barrier_ws_bytes(m_, f.barrier_seqs, batch.T, f)) +
              " barrier workspace: a smaller batch, barrier.positions or barrier.layers shrink it";
    }
    arena_ = DeviceBuffer(need, what + ")");
  }
  // The measuring pass (null base: the Carver hands out nulls) and the real one must lay out the
  // same buffers: a choice made on a pointer instead of a flag would size a different arena.
  const size_t laid = carve(arena_.as<char>(), m_, n_barrier_layers_, batch.B, batch.T, f, acts_);
  if (laid != need)
    throw DeviceError("internal: the activation arena measured " + std::to_string(need) +
                      " bytes but lays out " + std::to_string(laid));
  const size_t N = static_cast<size_t>(batch.B) * batch.T;
  upload(acts_.tokens, batch.inputs, N * sizeof(int32_t));
  if (flags.loss) upload(acts_.targets, batch.targets, N * sizeof(int32_t));
  if (bp.compute && bp.host_mask) upload(acts_.mask, bp.host_mask, N);
  // (The embedding backward's token groups: forward_backward builds them while the forward runs.)
}

// Groups positions by token id for the atomic-free embedding backward, and uploads the groups.
void CudaBackend::build_token_groups(const Batch& batch) {
  group_positions_by_token(batch.inputs, batch.B * batch.T, m_.vocab_size, group_count_,
                           group_used_, group_offsets_, group_positions_);
  if (graphs_) {  // a fixed group count, min(N, V): a captured launch's grid cannot change
    const size_t cap = std::min<size_t>(static_cast<size_t>(batch.B) * batch.T, m_.vocab_size);
    group_used_.resize(cap, group_used_.empty() ? 0 : group_used_.back());
    group_offsets_.resize(cap + 1, group_offsets_.back());  // empty groups: the kernel skips them
  }
  upload(acts_.emb_used, group_used_.data(), group_used_.size() * sizeof(int32_t));
  upload(acts_.emb_offsets, group_offsets_.data(), group_offsets_.size() * sizeof(int32_t));
  upload(acts_.emb_positions, group_positions_.data(), group_positions_.size() * sizeof(int32_t));
}

// ------------------------------------------------------------------ forward

void CudaBackend::forward_layers(const ForwardOptions& opts, const BarrierPlan& bp) {
  if (bf16_) return forward_layers_bf16(opts, bp);
  const int B = acts_.B, T = acts_.T, N = B * T, d = m_.d_model;
  const AttentionShape s = shape();
  embedding_forward(acts_.tokens, P(layout_.wte()), P(layout_.wpe()), B, T, d, opts.noise_std,
                    opts.noise_seed, acts_.resid[0], stream_);
  for (int l = 0; l < m_.n_layer; ++l) {
    const LayerOffsets& o = layout_.layer(l);
    LayerActs& a = acts_.layers[l];
    // Attention block: mid = resid + attn(LN1(resid)) Wo^T + bo
    layernorm_forward(acts_.resid[l], P(o.ln1_w), P(o.ln1_b), N, d, a.ln1, a.ln1_mean,
                      a.ln1_rstd, stream_);
    gemm(blas_, false, true, N, 3 * d, d, 1.0f, a.ln1, d, P(o.qkv_w), d, 0.0f, a.qkv, 3 * d);
    add_bias(a.qkv, P(o.qkv_b), N, 3 * d, stream_);
    attention_forward(s, a.qkv, a.att, a.lse, stream_);
    barrier_forward_layer(l, bp, barrier_grad_scale(bp, opts.grad_scale), Lane{stream_, blas_});
    gemm(blas_, false, true, N, d, d, 1.0f, a.att, d, P(o.proj_w), d, 0.0f, acts_.proj_out, d);
    residual_bias_add(acts_.resid[l], acts_.proj_out, P(o.proj_b), a.mid, N, d, stream_);
    // MLP block: resid' = mid + gelu(LN2(mid) Wfc^T + bfc) Wp^T + bp
    layernorm_forward(a.mid, P(o.ln2_w), P(o.ln2_b), N, d, a.ln2, a.ln2_mean, a.ln2_rstd,
                      stream_);
    gemm(blas_, false, true, N, 4 * d, d, 1.0f, a.ln2, d, P(o.fc_w), d, 0.0f, a.fc_pre, 4 * d);
    bias_gelu_forward(a.fc_pre, P(o.fc_b), a.fc_act, N, 4 * d, stream_);
    gemm(blas_, false, true, N, d, 4 * d, 1.0f, a.fc_act, 4 * d, P(o.fcproj_w), 4 * d, 0.0f,
         acts_.proj_out, d);
    residual_bias_add(a.mid, acts_.proj_out, P(o.fcproj_b), acts_.resid[l + 1], N, d, stream_);
  }
}

void CudaBackend::forward_head() {
  if (bf16_) return forward_head_bf16();
  const int N = acts_.B * acts_.T, d = m_.d_model, V = m_.vocab_size;
  layernorm_forward(acts_.resid[m_.n_layer], P(layout_.lnf_w()), P(layout_.lnf_b()), N, d,
                    acts_.lnf, acts_.lnf_mean, acts_.lnf_rstd, stream_);
  // logits [N, V] = lnf [N, d] wte^T   (the tied classifier)
  gemm(blas_, false, true, N, V, d, 1.0f, acts_.lnf, d, P(layout_.wte()), d, 0.0f, acts_.logits,
       V);
}

// Launches the loss kernels and reductions; loss_terms_finish waits and reads them.
void CudaBackend::loss_terms_start(bool write_grad, float grad_scale, const BarrierPlan& bp) {
  const int N = acts_.B * acts_.T, V = m_.vocab_size;
  if (bf16_)
    classifier_chunks_bf16(write_grad, grad_scale);  // logits, CE and the classifier's backward
  else
    cross_entropy(acts_.logits, acts_.targets, N, V, write_grad, grad_scale / N, acts_.row_loss,
                  acts_.row_hit, stream_);
  reduce_sum(acts_.row_loss, N, acts_.red_partials, acts_.results + 0, stream_);
  reduce_sum(acts_.row_hit, N, acts_.red_partials, acts_.results + 1, stream_);
  join_barrier_lane();  // after the classifier: the last layers' barrier runs beside it
  if (bp.compute)
    barrier_reduce(acts_.phi, acts_.logdet, bp.host_mask ? acts_.mask : nullptr,
                   n_barrier_layers_, acts_.B, m_.n_head, acts_.T, acts_.red_partials,
                   acts_.min_partials, acts_.results + 2, acts_.min_logdet, stream_);
}

LossTerms CudaBackend::loss_terms_finish(const BarrierPlan& bp) {
  double r[3] = {0, 0, 0};
  float min_ld = 0;
  CUDA_CHECK(cudaMemcpyAsync(r, acts_.results, sizeof r, cudaMemcpyDeviceToHost, stream_));
  if (bp.compute)
    CUDA_CHECK(cudaMemcpyAsync(&min_ld, acts_.min_logdet, sizeof min_ld, cudaMemcpyDeviceToHost,
                               stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  LossTerms lt;
  lt.tokens = static_cast<int64_t>(acts_.B) * acts_.T;
  lt.ce = r[0] / static_cast<double>(lt.tokens);
  lt.correct = static_cast<int64_t>(std::llround(r[1]));
  if (bp.compute) {
    lt.barrier_terms = bp.terms;
    lt.barrier = r[2] / static_cast<double>(bp.terms);
    lt.min_logdet = min_ld;
  }
  lt.loss = lt.ce + bar_.lambda * lt.barrier;
  return lt;
}

LossTerms CudaBackend::forward(const Batch& batch, const ForwardOptions& opts) {
  check_batch(batch, true);
  const BarrierPlan bp = plan_barrier(batch, opts, false);
  PlanFlags flags;
  flags.barrier = bp.compute;
  flags.loss = true;
  prepare(batch, flags, bp);
  forward_layers(opts, bp);
  forward_head();
  loss_terms_start(false, 1.0f, bp);
  return loss_terms_finish(bp);
}

// ------------------------------------------------------------------ backward

LossTerms CudaBackend::forward_backward(const Batch& batch, const ForwardOptions& opts) {
  check_batch(batch, true);
  const BarrierPlan bp = plan_barrier(batch, opts, true);
  PlanFlags flags;
  flags.barrier = bp.compute;
  flags.loss = true;
  flags.backward = true;
  prepare(batch, flags, bp);
  reduce_now_ = dp_ != nullptr && opts.reduce_gradients;
  auto forward_work = [&] {
    // The gradients are zeroed on the side stream while the forward runs (nothing before the
    // classifier's backward in loss_terms_start touches them): 0.5 GB at GPT-2 small, off the
    // step's critical path.
    const cudaStream_t side = side_holder_.stream;
    if (!opts.accumulate) {
      CUDA_CHECK(cudaEventRecord(fork_.event, stream_));
      CUDA_CHECK(cudaStreamWaitEvent(side, fork_.event, 0));
      CUDA_CHECK(cudaMemsetAsync(grads_.get(), 0, layout_.total() * sizeof(float), side));
      CUDA_CHECK(cudaEventRecord(join_.event, side));
    }
    forward_layers(opts, bp);
    forward_head();
    if (!opts.accumulate) CUDA_CHECK(cudaStreamWaitEvent(stream_, join_.event, 0));
    loss_terms_start(true, opts.grad_scale, bp);  // logits now hold dlogits
  };
  auto backward_work = [&] { backward(bp, opts.grad_scale); };
  // Two launches (two graphs), so that the host groups the batch's positions by token for the
  // embedding backward (O(N + V): a few hundred microseconds at V = 50304) while the device runs
  // the forward, instead of before it; the backward is the first to read the groups.
  const bool as_graphs = graphs_ && dp_ == nullptr;
  const std::string key = as_graphs ? step_key(batch, opts, bp) : std::string();
  if (as_graphs)
    run_as_graph(key + " forward", forward_work);
  else
    forward_work();
  build_token_groups(batch);
  if (as_graphs)
    run_as_graph(key + " backward", backward_work);
  else
    backward_work();
  return loss_terms_finish(bp);
}

// Everything the captured launches depend on besides device memory contents: shapes, the barrier
// plan, the scalars passed to kernels, and where the arena is.  (The tokens, targets and mask are
// uploaded into the arena before the forward graph, the token groups before the backward one, so
// they may change.)
std::string CudaBackend::step_key(const Batch& batch, const ForwardOptions& opts,
                                  const BarrierPlan& bp) const {
  char key[256];
  std::snprintf(key, sizeof key, "%d %d %d %lld %d %d %d %a %a %llu %d %p", batch.B, batch.T,
                bp.kmax, static_cast<long long>(bp.terms), bp.compute, bp.grad,
                bp.host_mask != nullptr, static_cast<double>(opts.grad_scale), opts.noise_std,
                static_cast<unsigned long long>(opts.noise_seed), opts.accumulate, arena_.get());
  return key;
}

// Whether cuDNN has an engine for the attention of shape s (forward, and backward when asked),
// asked once per shape: building the graphs is what finds out, and they stay cached for the
// calls that follow.  A shape it cannot run falls back to the flash kernels, with one line on
// stderr, instead of failing the run (BLM_ATTENTION=cudnn still fails it, naming the reason).
bool CudaBackend::cudnn_runs(const AttentionShape& s, bool backward) {
  const std::array<int, 5> key{s.B, s.T, s.H, s.dh, backward ? 1 : 0};
  const auto found = cudnn_shapes_.find(key);
  if (found != cudnn_shapes_.end()) return found->second;
  bool runs = cudnn_attention_head_size_supported(s.dh);
  if (runs) {
    try {
      cudnn_sdpa_workspace_bytes(s, false);
      if (backward) cudnn_sdpa_workspace_bytes(s, true);
    } catch (const DeviceError& e) {
      std::fprintf(stderr,
                   "barrierlm: warning: cuDNN attention cannot run B=%d T=%d H=%d dh=%d (%s); "
                   "using the flash kernels for this shape\n",
                   s.B, s.T, s.H, s.dh, e.what());
      runs = false;
    }
  }
  cudnn_shapes_[key] = runs;
  return runs;
}

// The first call with a key runs `work` eagerly; the second captures it into a graph and
// launches that; later calls with the same key launch the graph again.  At most kMaxGraphs are
// kept (all dropped when a new one would exceed that: shapes that keep changing stay eager).
void CudaBackend::run_as_graph(const std::string& key, const std::function<void()>& work) {
  StepGraphs& g = graphs_cache_;
  const auto found = g.exec.find(key);
  if (found != g.exec.end()) {
    CUDA_CHECK(cudaGraphLaunch(found->second, stream_));
    ++g.launches;
    return;
  }
  if (g.captures >= StepGraphs::kMaxCaptures) {  // the keys keep changing: eagerly from now on
    work();
    return;
  }
  if (g.seen.size() >= StepGraphs::kMaxSeen) g.seen.clear();
  if (g.seen.insert(key).second) {  // first time: eagerly
    work();
    return;
  }
  if (g.exec.size() >= StepGraphs::kMaxGraphs) {
    g.clear();
    g.seen.clear();
  }
  // A capture that fails (a library call that cannot be captured, say) ran nothing: say so once,
  // make no more graphs, and run this step eagerly (a real error then surfaces from that run).
  auto eager_from_now_on = [&](const std::string& why) {
    std::fprintf(stderr, "barrierlm: warning: CUDA graph capture failed (%s); running eagerly\n",
                 why.c_str());
    g.captures = StepGraphs::kMaxCaptures;
    work();
  };
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  try {
    work();
  } catch (const std::exception& e) {
    cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();  // the capture's own error, not the device's
    eager_from_now_on(e.what());
    return;
  }
  const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
  cudaGraphExec_t exec = nullptr;
  const cudaError_t made = ended == cudaSuccess ? cudaGraphInstantiate(&exec, graph, 0) : ended;
  if (graph) cudaGraphDestroy(graph);
  if (made != cudaSuccess) {
    cudaGetLastError();
    eager_from_now_on(std::string(ended == cudaSuccess ? "cudaGraphInstantiate: "
                                                       : "cudaStreamEndCapture: ") +
                      cudaGetErrorString(made));
    return;
  }
  g.exec[key] = exec;
  ++g.captures;
  CUDA_CHECK(cudaGraphLaunch(exec, stream_));
  ++g.launches;
}

long CudaBackend::graph_launches() const { return graphs_cache_.launches; }

void CudaBackend::backward(const BarrierPlan& bp, float grad_scale) {
  const int B = acts_.B, T = acts_.T, N = B * T, d = m_.d_model, V = m_.vocab_size;
  // Classifier: dwte += dlogits^T lnf;  dlnf = dlogits wte.
  if (!bf16_) {  // (bf16: done with the cross-entropy, classifier_chunks_bf16)
    gemm(blas_, true, false, V, d, N, 1.0f, acts_.logits, V, acts_.lnf, d, 1.0f,
         G(layout_.wte()), d);
    gemm(blas_, false, false, N, d, V, 1.0f, acts_.logits, V, P(layout_.wte()), d, 0.0f,
         acts_.dln, d);
  }
  CUDA_CHECK(cudaMemsetAsync(acts_.dresid, 0, static_cast<size_t>(N) * d * sizeof(float), stream_));
  const float* x = acts_.resid[m_.n_layer];
  // (bf16: dln in bf16, and also dres_h = bf16(dresid), the first layer's product input.)
  if (bf16_)
    layernorm_backward_accumulate(acts_.dln_h, x, acts_.lnf_mean, acts_.lnf_rstd,
                                  P(layout_.lnf_w()), N, d, acts_.dresid, acts_.dres_h,
                                  acts_.col_partial, G(layout_.lnf_w()), G(layout_.lnf_b()),
                                  residual_bias_grad(m_.n_layer - 1, true), stream_);
  else
    layernorm_backward_accumulate(acts_.dln, x, acts_.lnf_mean, acts_.lnf_rstd,
                                  P(layout_.lnf_w()), N, d, acts_.dresid, acts_.col_partial,
                                  G(layout_.lnf_w()), G(layout_.lnf_b()), stream_);
  // The barrier's share of the loss gradient: lambda R with R a mean over N_R terms.
  const float barrier_scale = barrier_grad_scale(bp, grad_scale);
  // Data-parallel: each finished bucket of layers is averaged over the GPUs while the layers
  // below are still being differentiated.
  if (reduce_now_) dp_->begin_backward();
  for (int l = m_.n_layer - 1; l >= 0; --l) {
    backward_layer(l, bp, barrier_scale);
    if (reduce_now_) dp_->layer_done(l, stream_);
  }
  // Embedding: dwte[x] += dresid rows (grouped by token), dwpe[t] += sum_b dresid[b, t].
  embedding_backward_wte_accumulate(acts_.dresid, acts_.emb_used, acts_.emb_offsets,
                                    acts_.emb_positions, static_cast<int>(group_used_.size()), d,
                                    G(layout_.wte()), stream_);
  embedding_backward_wpe_accumulate(acts_.dresid, B, T, d, G(layout_.wpe()), stream_);
  if (reduce_now_) dp_->finish_backward(stream_);  // the stream then waits for every bucket
}

// On entry acts_.dresid is dL/d resid[l+1]; on exit dL/d resid[l].
void CudaBackend::backward_layer(int l, const BarrierPlan& bp, float barrier_scale) {
  if (bf16_) return backward_layer_bf16(l, bp, barrier_scale);
  const int N = acts_.B * acts_.T, d = m_.d_model;
  const LayerOffsets& o = layout_.layer(l);
  const LayerActs& a = acts_.layers[l];
  float* dres = acts_.dresid;
  float* dln = acts_.dln;
  float* dh = acts_.dhidden;
  float* part = acts_.col_partial;
  // MLP: resid' = mid + fc_act Wp^T + bp   (Wp [d, 4d])
  column_sum_accumulate(dres, N, d, part, G(o.fcproj_b), stream_);
  gemm(blas_, true, false, d, 4 * d, N, 1.0f, dres, d, a.fc_act, 4 * d, 1.0f, G(o.fcproj_w),
       4 * d);
  gemm(blas_, false, false, N, 4 * d, d, 1.0f, dres, d, P(o.fcproj_w), 4 * d, 0.0f, dh, 4 * d);
  // fc_pre = ln2 Wfc^T + bfc   (Wfc [4d, d]): dh *= gelu'(fc_pre), dbfc += column sums of dh
  gelu_backward_column_sum_accumulate(a.fc_pre, dh, N, 4 * d, part, G(o.fc_b), stream_);
  gemm(blas_, true, false, 4 * d, d, N, 1.0f, dh, 4 * d, a.ln2, d, 1.0f, G(o.fc_w), d);
  gemm(blas_, false, false, N, d, 4 * d, 1.0f, dh, 4 * d, P(o.fc_w), d, 0.0f, dln, d);
  layernorm_backward_accumulate(dln, a.mid, a.ln2_mean, a.ln2_rstd, P(o.ln2_w), N, d, dres, part,
                                G(o.ln2_w), G(o.ln2_b), stream_);
  // Attention: mid = resid + att Wo^T + bo   (Wo [d, d]); dln holds d att below.
  column_sum_accumulate(dres, N, d, part, G(o.proj_b), stream_);
  gemm(blas_, true, false, d, d, N, 1.0f, dres, d, a.att, d, 1.0f, G(o.proj_w), d);
  gemm(blas_, false, false, N, d, d, 1.0f, dres, d, P(o.proj_w), d, 0.0f, dln, d);
  const AttentionShape s = shape();
  attention_backward(s, a.qkv, a.att, dln, a.lse, acts_.dqkv, acts_.attn_ws, stream_);
  barrier_backward_layer(l, bp, barrier_scale);
  if (const float* g = barrier_gradient(l)) barrier_flash_add_gradient(g, N, d, acts_.dqkv, stream_);
  // qkv = ln1 Wqkv^T + bqkv   (Wqkv [3d, d])
  column_sum_accumulate(acts_.dqkv, N, 3 * d, part, G(o.qkv_b), stream_);
  gemm(blas_, true, false, 3 * d, d, N, 1.0f, acts_.dqkv, 3 * d, a.ln1, d, 1.0f, G(o.qkv_w), d);
  gemm(blas_, false, false, N, d, 3 * d, 1.0f, acts_.dqkv, 3 * d, P(o.qkv_w), d, 0.0f, dln, d);
  layernorm_backward_accumulate(dln, acts_.resid[l], a.ln1_mean, a.ln1_rstd, P(o.ln1_w), N, d,
                                dres, part, G(o.ln1_w), G(o.ln1_b), stream_);
}

// ------------------------------------------------------------------ data parallelism

void CudaBackend::set_data_parallel(DataParallel* dp) {
  auto* nccl = dynamic_cast<NcclComm*>(dp);
  // One rank has nothing to average (a test probing the buckets aside: NcclComm's
  // reduces_gradients).
  if (dp == nullptr || (nccl ? !nccl->reduces_gradients() : dp->world_size() <= 1)) {
    dp_ = nullptr;
    return;
  }
  if (nccl == nullptr)
    throw DeviceError("the CUDA backend reduces gradients through NCCL only (cuda/nccl_comm.h)");
  if (nccl->device() != device_)
    throw DeviceError("the NCCL communicator is on GPU " + std::to_string(nccl->device()) +
                      " but the backend on GPU " + std::to_string(device_));
  std::vector<size_t> layer_begin;
  for (int l = 0; l < m_.n_layer; ++l) layer_begin.push_back(layout_.layer(l).ln1_w);
  nccl->set_gradient_layout(G(0), layer_begin, layout_.total());
  dp_ = nccl;
}

// ------------------------------------------------------------------ precision bf16
// The bf16 passes: the same model as forward_layers / forward_head / backward_layer above, with
// the storage types and fusions described at the top of this file.  Shapes: N = B*T positions;
// W [out, in]; "lt(ta, tb, M, N, K, A, B, bias, beta, C, D)" is D[M,N] = op(A) op(B) + bias
// (+ C when beta = 1), see cuda/matmul_lt.h.

namespace {
LtOperand h16(const bf16* p, int ld) { return LtOperand{p, Dtype::bf16, ld}; }
LtOperand f32(const float* p, int ld) { return LtOperand{p, Dtype::f32, ld}; }
constexpr LtOperand kNoC{nullptr, Dtype::f32, 0};
}  // namespace

// Where layer l's barrier runs: on the barrier stream, forked from stream_ here (after the
// layer's qkv product), when BLM_BARRIER_STREAM is on (its handle made: lambda > 0) and the layer
// has a barrier; else stream_.
CudaBackend::Lane CudaBackend::barrier_lane(int l, const BarrierPlan& bp) {
  if (!barrier_blas_holder_ || !bp.compute || barrier_layers_[l] < 0) return Lane{stream_, blas_};
  CUDA_CHECK(cudaEventRecord(barrier_fork_.event, stream_));
  CUDA_CHECK(cudaStreamWaitEvent(barrier_stream_holder_.stream, barrier_fork_.event, 0));
  barrier_pending_ = true;
  ++barrier_forks_;
  return Lane{barrier_stream_holder_.stream, barrier_blas_holder_->handle};
}

// stream_ waits for the barrier work forked so far (the loss's reduction reads its terms, the
// backward its gradients; a graph capture must end with every forked stream joined).
void CudaBackend::join_barrier_lane() {
  if (!barrier_pending_) return;
  CUDA_CHECK(cudaEventRecord(barrier_join_.event, barrier_stream_holder_.stream));
  CUDA_CHECK(cudaStreamWaitEvent(stream_, barrier_join_.event, 0));
  barrier_pending_ = false;
}

bool CudaBackend::barrier_forward_layer(int l, const BarrierPlan& bp, float barrier_scale,
                                        Lane lane, bf16* qkv_copy) {
  if (!bp.compute || barrier_layers_[l] < 0) return false;
  if (barrier_impl_ != BarrierImpl::flash) qkv_copy = nullptr;
  const int B = acts_.B, T = acts_.T, H = m_.n_head, d = m_.d_model;
  const size_t slot = static_cast<size_t>(barrier_layers_[l]) * B * H * T;
  // Groups of acts_.barrier_seqs sequences (all B unless the workspace would exceed its cap):
  // qkv [B, T, 3d], mask [B, T], logdet/phi [B, H, T] of this layer, offset to sequence b0.
  for (int b0 = 0; b0 < B; b0 += acts_.barrier_seqs) {
    const AttentionShape s = barrier_group(b0);
    const uint8_t* mask = bp.host_mask ? acts_.mask + static_cast<size_t>(b0) * T : nullptr;
    const size_t rows = static_cast<size_t>(b0) * T * 3 * d;
    const size_t at = slot + static_cast<size_t>(b0) * H * T;
    if (acts_.layers[l].qkv == nullptr) {  // PlanFlags.qkv_bf16: the flash barrier on it
      const bf16* qkv_h = acts_.layers[l].qkv_h + rows;
      if (bp.grad)
        barrier_forward_backward_flash(s, qkv_h, mask, bp.kmax, bar_.eps, barrier_scale,
                                       acts_.logdet + at, acts_.phi + at,
                                       barrier_gradient_h(l, b0), acts_.barrier_ws, lane.blas,
                                       lane.stream);
      else
        barrier_forward_flash(s, qkv_h, mask, bp.kmax, bar_.eps, acts_.logdet + at,
                              acts_.phi + at, acts_.barrier_ws, lane.stream);
      continue;
    }
    const float* qkv = acts_.layers[l].qkv + rows;
    bf16* copy = qkv_copy ? qkv_copy + rows : nullptr;
    // Forward and backward, here; dq, dk in the precision's type.
    auto train = [&](auto* dqk) {
      barrier_forward_backward_flash(s, qkv, mask, bp.kmax, bar_.eps, barrier_scale,
                                     acts_.logdet + at, acts_.phi + at, dqk, acts_.barrier_ws,
                                     lane.blas, lane.stream, copy);
    };
    if (barrier_impl_ == BarrierImpl::flash && bp.grad) {
      if (bf16* g16 = barrier_gradient_h(l, b0)) train(g16);
      else train(barrier_gradient(l, b0));
    } else if (barrier_impl_ == BarrierImpl::flash)
      barrier_forward_flash(s, qkv, mask, bp.kmax, bar_.eps, acts_.logdet + at, acts_.phi + at,
                            acts_.barrier_ws, lane.stream, copy);
    else if (barrier_impl_ == BarrierImpl::kernels)
      barrier_forward(s, qkv, mask, bar_.eps, acts_.logdet + at, acts_.phi + at, acts_.barrier_ws,
                      lane.stream);
    else
      barrier_forward_tc(s, qkv, mask, bp.kmax, bar_.eps, acts_.logdet + at, acts_.phi + at,
                         acts_.barrier_ws, barrier_impl_ == BarrierImpl::gemm_tf32, lane.blas,
                         lane.stream);
  }
  return qkv_copy != nullptr;
}

// Adds the barrier's share of dq, dk into acts_.dqkv (after the attention backward wrote it), in
// the same groups of sequences as the forward.  The flash barrier's is already computed
// (barrier_gradient, barrier_gradient_h): the callers add it where they next read dqkv.
void CudaBackend::barrier_backward_layer(int l, const BarrierPlan& bp, float barrier_scale) {
  if (!bp.grad || barrier_layers_[l] < 0 || barrier_impl_ == BarrierImpl::flash) return;
  const int B = acts_.B, T = acts_.T, d = m_.d_model;
  for (int b0 = 0; b0 < B; b0 += acts_.barrier_seqs) {
    const AttentionShape s = barrier_group(b0);
    const uint8_t* mask = bp.host_mask ? acts_.mask + static_cast<size_t>(b0) * T : nullptr;
    const size_t rows = static_cast<size_t>(b0) * T * 3 * d;
    const float* qkv = acts_.layers[l].qkv + rows;
    if (barrier_impl_ == BarrierImpl::kernels)
      barrier_backward(s, qkv, mask, bar_.eps, barrier_scale, acts_.dqkv + rows,
                       acts_.barrier_ws, stream_);
    else
      barrier_backward_tc(s, qkv, mask, bp.kmax, bar_.eps, barrier_scale, acts_.dqkv + rows,
                          acts_.barrier_ws, barrier_impl_ == BarrierImpl::gemm_tf32, blas_,
                          stream_);
  }
}

void CudaBackend::forward_layers_bf16(const ForwardOptions& opts, const BarrierPlan& bp) {
  const int B = acts_.B, T = acts_.T, N = B * T, d = m_.d_model;
  embedding_forward(acts_.tokens, P(layout_.wte()), P(layout_.wpe()), B, T, d, opts.noise_std,
                    opts.noise_seed, acts_.resid[0], stream_);
  for (int l = 0; l < m_.n_layer; ++l) {
    const LayerOffsets& o = layout_.layer(l);
    LayerActs& a = acts_.layers[l];
    const float* resid = acts_.resid[l];
    // Attention block: mid = resid + attn(LN1(resid)) Wo^T + bo;  qkv [N, 3d] fp32
    input_layernorm(l, P(o.ln1_w), P(o.ln1_b), a.ln1_h, a.ln1_mean, a.ln1_rstd);
    const float barrier_scale = barrier_grad_scale(bp, opts.grad_scale);
    if (a.qkv) {  // fp32 qkv (the barrier, margins); with qkv_h also a bf16 copy for cuDNN
      lt_->matmul(false, true, N, 3 * d, d, h16(a.ln1_h, d), h16(P16(o.qkv_w), d), P(o.qkv_b),
                  0.0f, kNoC, a.qkv, Dtype::f32, 3 * d, stream_);
      // The barrier reads the fp32 qkv (nothing else does, barrier-free layers aside); the flash
      // barrier also writes qkv_h, the bf16 copy for cuDNN, in its own read of qkv.
      const bool copied =
          barrier_forward_layer(l, bp, barrier_scale, Lane{stream_, blas_}, a.qkv_h);
      if (a.qkv_h) {  // (PlanFlags.qkv_f32_transient: the fp32 qkv is gone after this layer)
        if (!copied) convert_to_bf16(a.qkv, a.qkv_h, static_cast<int64_t>(N) * 3 * d, stream_);
        cudnn_sdpa_forward(shape(), a.qkv_h, a.att_h, a.lse, acts_.attn16_ws, stream_);
      } else if (acts_.attn_cudnn) {
        cudnn_attention_forward(shape(), a.qkv, a.att_h, a.lse, acts_.attn16_ws, stream_);
      } else {
        attention_forward_bf16(shape(), a.qkv, a.att_h, a.lse, acts_.attn16_ws, blas_, stream_);
      }
    } else {  // bf16 qkv only: the attention and the flash barrier read it as the product wrote it
      lt_->matmul(false, true, N, 3 * d, d, h16(a.ln1_h, d), h16(P16(o.qkv_w), d), P16(o.qkv_b),
                  0.0f, kNoC, a.qkv_h, Dtype::bf16, 3 * d, stream_);
      barrier_forward_layer(l, bp, barrier_scale, barrier_lane(l, bp));
      if (acts_.attn_cudnn)
        cudnn_sdpa_forward(shape(), a.qkv_h, a.att_h, a.lse, acts_.attn16_ws, stream_);
      else
        flash_attention_forward(shape(), a.qkv_h, a.att_h, a.lse, stream_);
    }
    // MLP block: resid' = mid + gelu(LN2(mid) Wfc^T + bfc) Wp^T + bp;  fc_pre, fc_act bf16.
    // mid in LN2's pass from the product's bf16 output (BLM_RESIDUAL_LN), or by the product.
    if (acts_.proj_out_h != nullptr) {
      lt_->matmul(false, true, N, d, d, h16(a.att_h, d), h16(P16(o.proj_w), d), P16(o.proj_b),
                  0.0f, kNoC, acts_.proj_out_h, Dtype::bf16, d, stream_);
      residual_layernorm_forward(resid, acts_.proj_out_h, a.mid, P(o.ln2_w), P(o.ln2_b), N, d,
                                 a.ln2_h, a.ln2_mean, a.ln2_rstd, stream_);
    } else {
      lt_->matmul(false, true, N, d, d, h16(a.att_h, d), h16(P16(o.proj_w), d), P(o.proj_b), 1.0f,
                  f32(resid, d), a.mid, Dtype::f32, d, stream_);
      layernorm_forward(a.mid, P(o.ln2_w), P(o.ln2_b), N, d, a.ln2_h, a.ln2_mean, a.ln2_rstd,
                        stream_);
    }
    // fc_act = gelu(fc_pre) in the product's epilogue, or (BLM_LT_EPILOGUES, or where cuBLASLt
    // has no such algorithm) by our kernel; with BLM_RECOMPUTE=gelu into the shared buffer.
    bf16* fc_act = a.fc_act_h ? a.fc_act_h : acts_.gelu_act;
    LtEpilogue gelu;
    gelu.kind = LtEpilogue::Kind::gelu_aux_bias;
    gelu.aux = a.fc_pre_h;
    gelu.aux_ld = 4 * d;
    if (!gelu_in_epilogue(epilogues_) ||
        !lt_->try_matmul(false, true, N, 4 * d, d, h16(a.ln2_h, d), h16(P16(o.fc_w), d),
                         P16(o.fc_b), 0.0f, kNoC, fc_act, Dtype::bf16, 4 * d, stream_, gelu)) {
      lt_->matmul(false, true, N, 4 * d, d, h16(a.ln2_h, d), h16(P16(o.fc_w), d), P16(o.fc_b),
                  0.0f, kNoC, a.fc_pre_h, Dtype::bf16, 4 * d, stream_);
      gelu_forward(a.fc_pre_h, fc_act, static_cast<int64_t>(N) * 4 * d, stream_);
    }
    // resid[l + 1] = mid + this, by the next LayerNorm (input_layernorm) or by the product.
    if (acts_.proj_out_h != nullptr)
      lt_->matmul(false, true, N, d, 4 * d, h16(fc_act, 4 * d), h16(P16(o.fcproj_w), 4 * d),
                  P16(o.fcproj_b), 0.0f, kNoC, acts_.proj_out_h, Dtype::bf16, d, stream_);
    else
      lt_->matmul(false, true, N, d, 4 * d, h16(fc_act, 4 * d), h16(P16(o.fcproj_w), 4 * d),
                  P(o.fcproj_b), 1.0f, f32(a.mid, d), acts_.resid[l + 1], Dtype::f32, d, stream_);
  }
}

// The LayerNorm of layer l's input (l = L: the final one) into y.  With BLM_RESIDUAL_LN (the
// arena has proj_out_h) that input, resid[l] for l > 0, is formed in the same pass as
// mid[l - 1] + layer l-1's MLP output (bf16), so after forward_layers resid[L] is only written
// by the head's LayerNorm.
template <class TOut>
void CudaBackend::input_layernorm(int l, const float* w, const float* b, TOut* y, float* mean,
                                  float* rstd) {
  const int N = acts_.B * acts_.T, d = m_.d_model;
  if (acts_.proj_out_h != nullptr && l > 0)
    residual_layernorm_forward(acts_.layers[l - 1].mid, acts_.proj_out_h, acts_.resid[l], w, b, N,
                               d, y, mean, rstd, stream_);
  else
    layernorm_forward(acts_.resid[l], w, b, N, d, y, mean, rstd, stream_);
}

void CudaBackend::forward_head_bf16() {
  input_layernorm(m_.n_layer, P(layout_.lnf_w()), P(layout_.lnf_b()), acts_.lnf_h, acts_.lnf_mean,
                  acts_.lnf_rstd);
  // The logits follow in classifier_chunks_bf16, chunk by chunk, with the cross-entropy.
}

// dwte += dlogits^T lnf  [V, d];  dln_h = dlogits wte  [N, d] (bf16, for the LNf backward).
// The bf16 classifier, its cross-entropy and (write_grad) its backward, in chunks of
// acts_.head_rows rows (classifier_chunk_rows: a few chunks at large vocabularies, or
// BLM_CLASSIFIER_ROWS rows when set), so only [rows, V] of logits is ever held (at V = 50304,
// N = 16384 the whole [N, V] bf16 buffer is 1.6 GB).  Per chunk [r0, r0 + n): logits = lnf wte^T
// (tied classifier, fp32 accumulation), the cross-entropy (its gradient in place when
// write_grad), then dwte += dlogits^T lnf and dln_h = dlogits wte for those rows; with several chunks dwte is accumulated chunk after chunk
// (deterministic, another rounding order than one product).
void CudaBackend::classifier_chunks_bf16(bool write_grad, float grad_scale) {
  const int N = acts_.B * acts_.T, d = m_.d_model, V = m_.vocab_size, R = acts_.head_rows;
  float* dwte = G(layout_.wte());
  for (int r0 = 0; r0 < N; r0 += R) {
    const int n = std::min(R, N - r0);
    const bf16* lnf = acts_.lnf_h + static_cast<size_t>(r0) * d;
    lt_->matmul(false, true, n, V, d, h16(lnf, d), h16(P16(layout_.wte()), d), nullptr, 0.0f, kNoC,
                acts_.logits_h, Dtype::bf16, V, stream_);
    cross_entropy(acts_.logits_h, acts_.targets + r0, n, V, write_grad, grad_scale / N,
                  acts_.row_loss + r0, acts_.row_hit + r0, stream_);
    if (!write_grad) continue;
    lt_->matmul(true, false, V, d, n, h16(acts_.logits_h, V), h16(lnf, d), nullptr, 1.0f,
                f32(dwte, d), dwte, Dtype::f32, d, stream_);
    lt_->matmul(false, false, n, d, V, h16(acts_.logits_h, V), h16(P16(layout_.wte()), d), nullptr,
                0.0f, kNoC, acts_.dln_h + static_cast<size_t>(r0) * d, Dtype::bf16, d, stream_);
  }
}

// On entry acts_.dresid is dL/d resid[l+1] (fp32) and acts_.dres_h its bf16 copy (written by the
// LayerNorm backward that produced it); on exit the same for resid[l].  Weight gradients are
// accumulated in fp32 (C = D = the gradient, beta = 1) from bf16 operands.  Bias gradients: by
// the products' epilogues into acts_.bias_grads, added into the gradients at the end
// (BLM_LT_EPILOGUES all / bias), or by column sums (none); qkv's always by the column sum fused
// with dqkv's bf16 copy.
void CudaBackend::backward_layer_bf16(int l, const BarrierPlan& bp, float barrier_scale) {
  const int N = acts_.B * acts_.T, d = m_.d_model;
  const LayerOffsets& o = layout_.layer(l);
  const LayerActs& a = acts_.layers[l];
  float* dres = acts_.dresid;
  float* dln = acts_.dln;  // fp32 d att of the attention paths that read it (else null)
  bf16* dln_h = acts_.dln_h;
  float* part = acts_.col_partial;
  bf16* dres_h = acts_.dres_h;
  // dh [N, 4d]: over this layer's GELU output when it is kept (read only by dWp, which comes
  // first), else the shared buffer.
  bf16* dh = a.fc_act_h != nullptr ? a.fc_act_h : acts_.dhidden_h;
  const bool lt_bias = lt_bias_grads(epilogues_), lt_gelu = epilogues_ == LtEpilogues::all;
  // The epilogues' bias gradients of this layer, added into the gradients at the end:
  // acts_.bias_grads holds bp [d], bfc [4d] (fp32, or bf16 where cuBLASLt writes it in D's type),
  // bo [d].
  VectorAdd adds[3] = {{acts_.bias_grads, false, G(o.fcproj_b), 0},
                       {acts_.bias_grads + d, false, G(o.fc_b), 0},
                       {acts_.bias_grads + 5 * d, false, G(o.proj_b), 0}};
  // accumulate_into(g, ld): the weight gradient g as C and D of an accumulating product.
  auto acc = [](float* g, int ld) { return f32(g, ld); };
  // dW += dy^T x, with dy's column sums (the bias gradient) already added by the LayerNorm
  // backward that wrote dy (residual_bias_grad), or into `add` by the epilogue where enabled and
  // available, else by a column sum of the fp32 dy (into the gradient bias directly).
  auto weight_and_bias_grad = [&](int out, int in, const bf16* dy_h, const float* dy,
                                  const bf16* x_h, float* dw, VectorAdd& add) {
    if (!lt_bias) {
      lt_->matmul(true, false, out, in, N, h16(dy_h, out), h16(x_h, in), nullptr, 1.0f,
                  acc(dw, in), dw, Dtype::f32, in, stream_);
      return;
    }
    LtEpilogue e;
    e.kind = LtEpilogue::Kind::bias_grad;
    e.bias_grad = const_cast<void*>(add.src);
    if (lt_->try_matmul(true, false, out, in, N, h16(dy_h, out), h16(x_h, in), nullptr, 1.0f,
                        acc(dw, in), dw, Dtype::f32, in, stream_, e)) {
      add.n = out;
      return;
    }
    column_sum_accumulate(dy, N, out, part, add.dst, stream_);
    lt_->matmul(true, false, out, in, N, h16(dy_h, out), h16(x_h, in), nullptr, 1.0f, acc(dw, in),
                dw, Dtype::f32, in, stream_);
  };
  // MLP: resid' = mid + fc_act Wp^T + bp   (Wp [d, 4d]).  dWp += dres^T fc_act needs the GELU
  // output: kept per layer, or (BLM_RECOMPUTE=gelu: fc_act_h null) rebuilt into acts_.gelu_act by
  // the GELU backward below, so there that product comes after it (same operands, same results).
  const bool recompute_gelu = acts_.gelu_act != nullptr;
  if (!recompute_gelu)
    weight_and_bias_grad(d, 4 * d, dres_h, dres, a.fc_act_h, G(o.fcproj_w), adds[0]);
  // fc_pre = ln2 Wfc^T + bfc   (Wfc [4d, d]): dh = gelu'(fc_pre) * (dres Wp), dbfc = column sums
  // of dh: in the product's epilogue (its bias gradient in fp32, else in bf16), else by our kernel
  // (never the epilogue with the recompute: the constructor refuses that combination).
  bool dgelu_done = false;
  if (lt_gelu) {
    LtEpilogue dgelu;
    dgelu.kind = LtEpilogue::Kind::dgelu_bias_grad;
    dgelu.bias_grad = const_cast<void*>(adds[1].src);
    dgelu.aux = a.fc_pre_h;
    dgelu.aux_ld = 4 * d;
    for (const Dtype t : {Dtype::f32, Dtype::bf16}) {
      dgelu.bias_grad_type = t;
      dgelu_done = lt_->try_matmul(false, false, N, 4 * d, d, h16(dres_h, d),
                                   h16(P16(o.fcproj_w), 4 * d), nullptr, 0.0f, kNoC, dh,
                                   Dtype::bf16, 4 * d, stream_, dgelu);
      if (dgelu_done) {
        adds[1].src_bf16 = t == Dtype::bf16;
        adds[1].n = 4 * d;
        break;
      }
    }
  }
  if (!dgelu_done) {
    lt_->matmul(false, false, N, 4 * d, d, h16(dres_h, d), h16(P16(o.fcproj_w), 4 * d), nullptr,
                0.0f, kNoC, dh, Dtype::bf16, 4 * d, stream_);
    if (recompute_gelu)
      gelu_backward_recompute_column_sum_accumulate(a.fc_pre_h, dh, acts_.gelu_act, N, 4 * d, part,
                                                    G(o.fc_b), stream_);
    else
      gelu_backward_column_sum_accumulate(a.fc_pre_h, dh, N, 4 * d, part, G(o.fc_b), stream_);
  }
  if (recompute_gelu)
    weight_and_bias_grad(d, 4 * d, dres_h, dres, acts_.gelu_act, G(o.fcproj_w), adds[0]);
  lt_->matmul(true, false, 4 * d, d, N, h16(dh, 4 * d), h16(a.ln2_h, d), nullptr, 1.0f,
              acc(G(o.fc_w), d), G(o.fc_w), Dtype::f32, d, stream_);
  lt_->matmul(false, false, N, d, 4 * d, h16(dh, 4 * d), h16(P16(o.fc_w), d), nullptr, 0.0f,
              kNoC, dln_h, Dtype::bf16, d, stream_);
  layernorm_backward_accumulate(dln_h, a.mid, a.ln2_mean, a.ln2_rstd, P(o.ln2_w), N, d, dres,
                                dres_h, part, G(o.ln2_w), G(o.ln2_b), residual_bias_grad(l, false),
                                stream_);
  // Attention: mid = resid + att Wo^T + bo   (Wo [d, d]); dln (fp32, when allocated) holds d att
  // below on the paths other than cuDNN on a bf16 qkv.
  weight_and_bias_grad(d, d, dres_h, dres, a.att_h, G(o.proj_w), adds[2]);
  const AttentionShape s = shape();
  if (a.qkv_h && acts_.attn_cudnn) {
    // cuDNN on bf16 tensors: datt (bf16) -> dqkv_h (bf16) directly; the flash barrier's dq, dk
    // (from the forward) are added in the bias-gradient pass (the only barrier with a bf16 qkv).
    lt_->matmul(false, false, N, d, d, h16(dres_h, d), h16(P16(o.proj_w), d), nullptr, 0.0f,
                kNoC, acts_.datt_h, Dtype::bf16, d, stream_);
    cudnn_sdpa_backward(s, a.qkv_h, a.att_h, acts_.datt_h, a.lse, acts_.dqkv_h, acts_.attn16_ws,
                        stream_);
    if (const bf16* g = barrier_gradient_h(l))
      column_sum_add_accumulate(acts_.dqkv_h, g, 2 * d, N, 3 * d, part, G(o.qkv_b), stream_);
    else
      column_sum_accumulate(acts_.dqkv_h, N, 3 * d, part, G(o.qkv_b), stream_);
  } else {
    lt_->matmul(false, false, N, d, d, h16(dres_h, d), h16(P16(o.proj_w), d), nullptr, 0.0f,
                kNoC, dln, Dtype::f32, d, stream_);
    if (acts_.attn_cudnn)
      cudnn_attention_backward(s, a.qkv, a.att_h, dln, a.lse, acts_.dqkv, acts_.attn16_ws,
                               stream_);
    else if (a.qkv_h)
      flash_attention_backward(s, a.qkv_h, a.att_h, dln, a.lse, acts_.dqkv, acts_.attn16_ws,
                               stream_);
    else
      attention_backward_bf16(s, a.qkv, a.att_h, dln, a.lse, acts_.dqkv, acts_.attn16_ws, blas_,
                              stream_);
    barrier_backward_layer(l, bp, barrier_scale);
    // qkv = ln1 Wqkv^T + bqkv   (Wqkv [3d, d])
    // (+ the flash barrier's dq, dk from the forward, bf16, in the same pass)
    column_sum_convert_accumulate(acts_.dqkv, barrier_gradient_h(l), 2 * d, N, 3 * d, part,
                                  G(o.qkv_b), acts_.dqkv_h, stream_);
  }
  lt_->matmul(true, false, 3 * d, d, N, h16(acts_.dqkv_h, 3 * d), h16(a.ln1_h, d), nullptr, 1.0f,
              acc(G(o.qkv_w), d), G(o.qkv_w), Dtype::f32, d, stream_);
  lt_->matmul(false, false, N, d, 3 * d, h16(acts_.dqkv_h, 3 * d), h16(P16(o.qkv_w), d), nullptr,
              0.0f, kNoC, dln_h, Dtype::bf16, d, stream_);
  // dres_h for the layer below (layer 0's goes to the embedding backward, which reads dres).
  layernorm_backward_accumulate(dln_h, acts_.resid[l], a.ln1_mean, a.ln1_rstd, P(o.ln1_w), N, d,
                                dres, l > 0 ? dres_h : nullptr, part, G(o.ln1_w), G(o.ln1_b),
                                l > 0 ? residual_bias_grad(l - 1, true) : nullptr, stream_);
  // The epilogues' bias gradients into the gradients (the epilogues overwrite their outputs).
  if (adds[0].n + adds[1].n + adds[2].n > 0) add_vectors_accumulate(adds, 3, stream_);
}

// ------------------------------------------------------------------ optimizer

double CudaBackend::grad_norm() {
  CUDA_CHECK(cudaSetDevice(device_));
  double* scratch = norm_scratch_.as<double>();
  reduce_sum_squares(grads_.as<float>(), static_cast<int64_t>(layout_.total()), scratch,
                     scratch + kReducePartials, stream_);
  double sq = 0;
  download(&sq, scratch + kReducePartials, sizeof sq);
  return std::sqrt(sq);
}

void CudaBackend::adamw_step(const AdamWHyper& hyper, double lr, double clip_scale) {
  CUDA_CHECK(cudaSetDevice(device_));
  ++adam_t_;
  const AdamWScalars s = adamw_scalars(hyper, lr, adam_t_, clip_scale);
  DecayTable table;
  table.seg_start = decay_starts_.as<int64_t>();
  table.decay = decay_flags_.as<uint8_t>();
  table.n_seg = n_decay_seg_;
  adamw_update(params_.as<float>(), grads_.as<float>(), adam_m_.as<float>(), adam_v_.as<float>(),
               static_cast<int64_t>(layout_.total()), table, s,
               bf16_ ? params16_.as<bf16>() : nullptr, stream_);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// ------------------------------------------------------------------ sampling and margins

void CudaBackend::last_logits(const Batch& batch, std::vector<float>& logits) {
  check_batch(batch, false);
  const BarrierPlan none{};
  prepare(batch, PlanFlags{}, none);
  forward_layers(ForwardOptions{}, none);
  const int B = batch.B, T = batch.T, V = m_.vocab_size, d = m_.d_model;
  input_layernorm(m_.n_layer, P(layout_.lnf_w()), P(layout_.lnf_b()), acts_.lnf, acts_.lnf_mean,
                  acts_.lnf_rstd);
  // Rows t = T-1 of each sequence: a strided view of lnf (row stride T*d).  [B, V] = [B, d] wte^T
  gemm(blas_, false, true, B, V, d, 1.0f, acts_.lnf + static_cast<size_t>(T - 1) * d, T * d,
       P(layout_.wte()), d, 0.0f, acts_.logits, V);
  logits.resize(static_cast<size_t>(B) * V);
  download(logits.data(), acts_.logits, logits.size() * sizeof(float));
}

Margins CudaBackend::margins(const Batch& batch) {
  check_batch(batch, false);
  const BarrierPlan none{};
  PlanFlags flags;
  flags.keep_qkv_f32 = true;  // barrier_jacobians below read it
  prepare(batch, flags, none);
  forward_layers(ForwardOptions{}, none);
  const int B = batch.B, T = batch.T, H = m_.n_head, dh = m_.head_dim(), L = m_.n_layer;
  Margins out;
  out.B = B;
  out.L = L;
  out.H = H;
  out.T = T;
  out.sigma_min.assign(static_cast<size_t>(B) * L * H * T, 0.0f);
  out.logdet.assign(out.sigma_min.size(), 0.0f);
  // Jacobians [b, H, T, dh, dh] in chunks of sequences: as many as fit in ~256 MiB, but at least
  // one (a single sequence can be larger, e.g. 537 MB at H 16, T 2048, dh 64).
  const size_t per_seq = static_cast<size_t>(H) * T * dh * dh;
  const size_t cap = (size_t(256) << 20) / sizeof(float);
  const int chunk = static_cast<int>(std::max<size_t>(1, std::min<size_t>(B, cap / per_seq)));
  DeviceBuffer jac(chunk * per_seq * sizeof(float), "the barrier Jacobians of margins");
  std::vector<float> host(chunk * per_seq);
  std::vector<float> sig(static_cast<size_t>(chunk) * H * T), ld(sig.size());
  for (int l = 0; l < L; ++l) {
    for (int b0 = 0; b0 < B; b0 += chunk) {
      const int nb = std::min(chunk, B - b0);
      const AttentionShape s{nb, T, H, dh};
      const float* qkv = acts_.layers[l].qkv + static_cast<size_t>(b0) * T * 3 * m_.d_model;
      barrier_jacobians(s, qkv, jac.as<float>(), stream_);
      download(host.data(), jac.get(), nb * per_seq * sizeof(float));
      jacobian_margins(host.data(), static_cast<int64_t>(nb) * H * T, dh, sig.data(), ld.data(),
                       threads_);
      for (int bb = 0; bb < nb; ++bb)
        for (int h = 0; h < H; ++h)
          for (int t = 0; t < T; ++t) {
            const size_t src = (static_cast<size_t>(bb) * H + h) * T + t;
            out.at(out.sigma_min, b0 + bb, l, h, t) = sig[src];
            out.at(out.logdet, b0 + bb, l, h, t) = ld[src];
          }
    }
  }
  return out;
}

}  // namespace
}  // namespace cuda

// ------------------------------------------------------------------ entry points

int cuda_device_count(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear it: "no device" is an answer here, not a failure
    if (why) *why = cudaGetErrorString(e);
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device";
  return n;
}

std::string cuda_unsupported_reason(const Config& cfg) {
  if (cfg.device.precision == "fp64") return "fp64 runs on the CPU backend only";
  const int dh = cfg.model.n_head > 0 ? cfg.model.head_dim() : 0;
  if (!cuda::attention_head_size_supported(dh))
    return "head size " + std::to_string(dh) + " (the CUDA kernels support 32, 64 and 128)";
  return "";
}

long cuda_graph_launches(const Backend& backend) {
  const auto* gpu = dynamic_cast<const cuda::CudaBackend*>(&backend);
  return gpu ? gpu->graph_launches() : -1;
}

long cuda_barrier_stream_forks(const Backend& backend) {
  const auto* gpu = dynamic_cast<const cuda::CudaBackend*>(&backend);
  return gpu ? gpu->barrier_forks() : -1;
}

std::unique_ptr<Backend> make_cuda_backend(const Config& cfg, int device) {
  const std::string& p = cfg.device.precision;
  if (p == "fp64")
    throw DeviceError("device.precision=fp64: fp64 runs on the CPU backend only; use "
                      "device.backend=cpu or device.precision=fp32");
  if (p != "auto" && p != "fp32" && p != "bf16")
    throw DeviceError("device.precision: '" + p + "' is not one of auto, fp32, bf16, fp64");
  validate(cfg.model);  // the same model checks as the CPU reference (ConfigError naming the key)
  if (cfg.model.vocab_size < 2)
    throw ConfigError("model.vocab_size: " + std::to_string(cfg.model.vocab_size) +
                      " must be resolved from the tokenizer before the backend is made");
  const int dh = cfg.model.head_dim();
  if (!cuda::attention_head_size_supported(dh))
    throw DeviceError("model.d_model / model.n_head = " + std::to_string(dh) +
                      ": the CUDA backend supports head sizes 32, 64 and 128; change the model "
                      "or use device.backend=cpu");
  return std::make_unique<cuda::CudaBackend>(cfg, device);
}

}  // namespace blm
