// The config parts of result files (config_json.h).
#include "cmd/config_json.h"

namespace blm {

JsonWriter& model_shape_json(JsonWriter& j, const ModelConfig& m) {
  return j.begin_object()
      .kv("n_layer", m.n_layer)
      .kv("n_head", m.n_head)
      .kv("d_model", m.d_model)
      .kv("seq_len", m.seq_len)
      .kv("vocab_size", m.vocab_size)
      .end_object();
}

std::vector<double> barrier_layer_list(const Config& cfg) {
  std::vector<double> out;
  for (int l = 0; l < cfg.model.n_layer; ++l)
    if (cfg.barrier.applies_to(l)) out.push_back(l);
  return out;
}

}  // namespace blm
