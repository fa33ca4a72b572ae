// barrierlm's parameters and Hugging Face GPT-2's, both ways: `barrierlm export` writes a
// checkpoint as a GPT2LMHeadModel directory (cmd/cmd_export.cpp), and train.init starts a run
// from such a directory, a .safetensors file (OpenAI's GPT-2 as the hub has it) or another
// barrierlm checkpoint (initial_weights).
//
// The model is GPT-2's architecture exactly, so the two differ only in names and in one
// transposition: barrierlm stores a linear map as W [out, in] (y = x W^T + b), GPT-2's Conv1D as
// [in, out] (y = x W + b).  The attention's fused qkv rows are Q, K, V blocks with head j at rows
// [j dh, (j + 1) dh) of each, the column order GPT-2 splits.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace blm {

// One tensor under both names: ParamLayout's ("h0.attn.qkv.w") and GPT2LMHeadModel's
// ("transformer.h.0.attn.c_attn.weight"); transposed: GPT-2 stores it as ours transposed.
struct Gpt2TensorName {
  std::string ours, theirs;
  bool transposed;
};
// Every tensor of an n_layer model, in ParamLayout's order.
std::vector<Gpt2TensorName> gpt2_tensor_names(int n_layer);
// The [rows, cols] row-major matrix at m as [cols, rows]: one orientation to the other.
std::vector<float> transposed(const float* m, int64_t rows, int64_t cols);

// The parameters to start training from (train.init), in ParamLayout(model)'s order:
//   - a barrierlm checkpoint, or a run directory holding checkpoint.bin (its weights only: the
//     optimizer starts afresh);
//   - a Hugging Face GPT-2 directory holding model.safetensors, or a .safetensors file (float32,
//     float16 or bfloat16; names with or without "transformer."; the attention mask buffers and
//     a tied lm_head.weight are skipped).
// Each tensor must have the model's shape, with two exceptions that fine-tuning needs: wpe may
// have more rows than model.seq_len (the first seq_len are taken), and wte fewer rows than
// model.vocab_size (a padded vocabulary: the extra rows are zero, as tokens that never occur).
// Throws Error naming the file, the tensor and the config key that disagrees.
struct InitialWeights {
  std::vector<float> params;
  // The source's tokenizer (Tokenizer::serialize()): a checkpoint's, or GPT-2's from vocab.json
  // and merges.txt beside the safetensors file; "" when there is none to read.
  std::string tokenizer;
};
InitialWeights initial_weights(const std::string& path, const ModelConfig& model);

}  // namespace blm
