// The parts of a config that barrierlm's result files write alike (bench's JSON, gradients'
// result.json): the model's shape as a JSON object, and the layers the barrier applies to with
// "all" resolved.
#pragma once
#include <vector>

#include "cmd/json.h"
#include "core/config.h"

namespace blm {

// Writes {"n_layer", "n_head", "d_model", "seq_len", "vocab_size"} as the next value of j.
JsonWriter& model_shape_json(JsonWriter& j, const ModelConfig& m);

// The layers l < model.n_layer that barrier.applies_to, ascending (doubles, for
// JsonWriter::numbers).
std::vector<double> barrier_layer_list(const Config& cfg);

}  // namespace blm
