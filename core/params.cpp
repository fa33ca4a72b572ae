#include "core/params.h"

#include <cmath>

#include "core/error.h"
#include "core/rng.h"

namespace blm {

size_t ParamLayout::add(const std::string& name, std::vector<int> shape, bool decay,
                        bool residual_out) {
  TensorSpec t;
  t.name = name;
  t.size = 1;
  for (int s : shape) t.size *= static_cast<size_t>(s);
  t.shape = std::move(shape);
  t.offset = total_;
  t.decay = decay;
  t.residual_out = residual_out;
  total_ += t.size;
  tensors_.push_back(std::move(t));
  return tensors_.back().offset;
}

ParamLayout::ParamLayout(const ModelConfig& cfg) : cfg_(cfg) {
  const int V = cfg.vocab_size, T = cfg.seq_len, d = cfg.d_model;
  wte_ = add("wte", {V, d}, true, false);
  wpe_ = add("wpe", {T, d}, true, false);
  for (int l = 0; l < cfg.n_layer; ++l) {
    const std::string p = "h" + std::to_string(l) + ".";
    LayerOffsets o;
    o.ln1_w = add(p + "ln1.w", {d}, false, false);
    o.ln1_b = add(p + "ln1.b", {d}, false, false);
    o.qkv_w = add(p + "attn.qkv.w", {3 * d, d}, true, false);
    o.qkv_b = add(p + "attn.qkv.b", {3 * d}, false, false);
    o.proj_w = add(p + "attn.proj.w", {d, d}, true, true);
    o.proj_b = add(p + "attn.proj.b", {d}, false, false);
    o.ln2_w = add(p + "ln2.w", {d}, false, false);
    o.ln2_b = add(p + "ln2.b", {d}, false, false);
    o.fc_w = add(p + "mlp.fc.w", {4 * d, d}, true, false);
    o.fc_b = add(p + "mlp.fc.b", {4 * d}, false, false);
    o.fcproj_w = add(p + "mlp.proj.w", {d, 4 * d}, true, true);
    o.fcproj_b = add(p + "mlp.proj.b", {d}, false, false);
    layers_.push_back(o);
  }
  lnf_w_ = add("lnf.w", {d}, false, false);
  lnf_b_ = add("lnf.b", {d}, false, false);
}

const TensorSpec& ParamLayout::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return t;
  throw Error("no parameter tensor named '" + name + "'");
}

static bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<float> init_parameters(const ParamLayout& layout, uint64_t seed) {
  std::vector<float> p(layout.total(), 0.0f);
  const double std_base = 0.02;
  const double std_resid = std_base / std::sqrt(2.0 * layout.config().n_layer);
  for (size_t ti = 0; ti < layout.tensors().size(); ++ti) {
    const TensorSpec& t = layout.tensors()[ti];
    if (ends_with(t.name, "ln1.w") || ends_with(t.name, "ln2.w") || t.name == "lnf.w") {
      for (size_t i = 0; i < t.size; ++i) p[t.offset + i] = 1.0f;
    } else if (t.shape.size() == 2) {
      // Each tensor draws from its own counter range, so adding a tensor never shifts another's.
      const uint64_t tseed = hash2(seed, ti);
      const double sd = t.residual_out ? std_resid : std_base;
      for (size_t i = 0; i < t.size; ++i) p[t.offset + i] = static_cast<float>(sd * normal01(tseed, i));
    }
  }
  return p;
}

size_t count_parameters(const ModelConfig& cfg) { return ParamLayout(cfg).total(); }

}  // namespace blm
