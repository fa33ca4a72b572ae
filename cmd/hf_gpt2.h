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

#include "core/checkpoint.h"
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
// Throws Error naming the file, the tensor and the config key that disagrees, or the tensor
// and index of a value that is not finite.
struct InitialWeights {
  std::vector<float> params;
  // The source's tokenizer (Tokenizer::serialize()): a checkpoint's, or GPT-2's from vocab.json
  // and merges.txt beside the safetensors file; "" when there is none to read.
  std::string tokenizer;
};
InitialWeights initial_weights(const std::string& path, const ModelConfig& model);

// The tokenizer files a model directory may hold: GPT-2's vocabulary as Hugging Face names it
// (vocab.json, merges.txt) and as OpenAI does (encoder.json, vocab.bpe), and transformers' fast
// tokenizer (tokenizer.json).  Left beside another model's weights they describe the wrong
// tokenizer, so an export's barrierlm.json must agree with those present.
const std::vector<std::string>& hf_vocabulary_files();
// Those and the files that configure a tokenizer for transformers (tokenizer_config.json, ...):
// what `export` removes from its directory when it does not write them itself.
const std::vector<std::string>& hf_tokenizer_files();

// A directory without checkpoint.bin that holds config.json or model.safetensors: a Hugging Face
// GPT-2 model (an export, or a hub model), which eval, margins, sample and export take in place
// of a checkpoint (checkpoint_from_hf_dir names the file when one of the two is missing).
bool is_hf_gpt2_dir(const std::string& path);
// Such a directory as a checkpoint without optimizer state:
//   - the model from config.json (n_layer, n_head, n_embd, n_positions or n_ctx, vocab_size),
//     refused with the key named when it is not barrierlm's architecture (another activation,
//     LayerNorm epsilon, untied embeddings, n_inner other than 4 n_embd, ...);
//   - the weights from model.safetensors, refused with the tensor and index named when one is
//     not finite;
//   - an export (barrierlm.json beside them): the tokenizer barrierlm.json names, which must
//     agree with the tokenizer files there (gpt2: vocab.json and merges.txt of its size; byte,
//     char or bin: its description, and no vocabulary files), and the run's step, tokens seen,
//     barrier settings (lambda, eps, positions, layers) and the train settings eval's windows
//     come from (batch_size, grad_accum, eval_batches; the defaults in an older export);
//   - a hub model (no barrierlm.json): step 0, lambda 0 on every layer, and the tokenizer from
//     vocab.json and merges.txt beside it, else none: token ids (.bin data), with a note;
//   - no data paths: evaluating it needs --data (or margins' --text).
// Throws Error naming the file and key.
Checkpoint checkpoint_from_hf_dir(const std::string& dir);

}  // namespace blm
