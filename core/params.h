// The model's parameters live in one flat float buffer; gradients and the AdamW moments use the
// same layout.  ParamLayout names every tensor, its shape and its offset.
//
// Layout (W is [out, in], row-major, so y = x W^T + b as in torch.nn.Linear):
//   wte            [V, d]        token embedding, tied with the output projection
//   wpe            [T, d]        position embedding
//   for l in 0..L-1, prefix "h{l}.":
//     ln1.w, ln1.b   [d]
//     attn.qkv.w     [3d, d]     rows [0,d) = Q, [d,2d) = K, [2d,3d) = V; head j owns rows
//     attn.qkv.b     [3d]        [j*dh, (j+1)*dh) of each block
//     attn.proj.w    [d, d]
//     attn.proj.b    [d]
//     ln2.w, ln2.b   [d]
//     mlp.fc.w       [4d, d]
//     mlp.fc.b       [4d]
//     mlp.proj.w     [d, 4d]
//     mlp.proj.b     [d]
//   lnf.w, lnf.b     [d]
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace blm {

struct TensorSpec {
  std::string name;
  std::vector<int> shape;
  size_t offset = 0;        // in floats, from the start of the buffer
  size_t size = 0;          // product of shape
  bool decay = false;       // AdamW weight decay applies (matrices and embeddings, not biases/LN)
  bool residual_out = false;  // projection into the residual stream: init std / sqrt(2L)
};

// Offsets of one layer's tensors, for the backends' inner loops.
struct LayerOffsets {
  size_t ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, fcproj_w, fcproj_b;
};

class ParamLayout {
 public:
  explicit ParamLayout(const ModelConfig& cfg);

  const ModelConfig& config() const { return cfg_; }
  const std::vector<TensorSpec>& tensors() const { return tensors_; }
  size_t total() const { return total_; }
  // Throws blm::Error if no tensor has that name.
  const TensorSpec& find(const std::string& name) const;

  size_t wte() const { return wte_; }
  size_t wpe() const { return wpe_; }
  const LayerOffsets& layer(int l) const { return layers_[l]; }
  size_t lnf_w() const { return lnf_w_; }
  size_t lnf_b() const { return lnf_b_; }

 private:
  size_t add(const std::string& name, std::vector<int> shape, bool decay, bool residual_out);
  ModelConfig cfg_;
  std::vector<TensorSpec> tensors_;
  std::vector<LayerOffsets> layers_;
  size_t total_ = 0, wte_ = 0, wpe_ = 0, lnf_w_ = 0, lnf_b_ = 0;
};

// GPT-2 initialisation, deterministic in seed: weights N(0, 0.02), residual projections
// N(0, 0.02 / sqrt(2L)), biases 0, LayerNorm gains 1.
std::vector<float> init_parameters(const ParamLayout& layout, uint64_t seed);

// Number of parameters that count for FLOP estimates (all of them; wte is shared).
size_t count_parameters(const ModelConfig& cfg);

}  // namespace blm
