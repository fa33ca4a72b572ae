// A model description for tests in one call, every size named where it is used:
//   model_config(V, d, H, L, seq_len)   vocabulary, width, heads, layers, context length
// Header-only: every tests/test_*.cpp is an executable of its own (the GPU tests include it
// through tests/gpu/backend_test_util.h).
#pragma once
#include "core/config.h"

namespace blm {

inline ModelConfig model_config(int V, int d, int H, int L, int seq_len) {
  ModelConfig m;
  m.vocab_size = V;
  m.d_model = d;
  m.n_head = H;
  m.n_layer = L;
  m.seq_len = seq_len;
  return m;
}

}  // namespace blm
