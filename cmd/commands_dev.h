// Developer subcommands, kept apart from the user commands of commands.h: their options, as
// main.cpp fills them from the command line, and their entry points.
//
// `barrierlm gradients`: one forward_backward of a checkpoint's model on the first batch of a
// file, written out for the PyTorch cross-check (scripts/crosscheck.py):
//   DIR/batch.bin    int32 little-endian: inputs [B, T], then targets [B, T]
//   DIR/grads.bin    float32 little-endian: d(CE + lambda R)/d params, [P] in the layout of
//                    core/params.h
//   DIR/result.json  loss terms, B, T, lambda, eps, barrier layers, the model config, the backend
//                    and the parameter layout (name, shape, offset of every tensor)
// result.json is written last, so its presence means the set is complete.
#pragma once
#include <string>

namespace CLI {
class App;
}

namespace blm {

struct GradientsOptions {
  std::string checkpoint;         // checkpoint file or run directory
  std::string data;               // text or .bin file; its first B windows form the batch
  int batch = 4;                  // B: sequences
  int seq_len = 0;                // T: 0 means the model's seq_len
  bool have_lambda = false;       // lambda given: it replaces the checkpoint's barrier.lambda
  double lambda = 0;
  std::string backend = "cpu";    // cpu | cuda
  std::string precision = "fp32"; // fp32 | fp64 (fp64 on the CPU only)
  int threads = 0;                // CPU threads, 0: all cores
  std::string out;                // output directory (created when missing)
};

// Registers `gradients` on app (filling o when parsed); main.cpp dispatches to run_gradients.
CLI::App* add_gradients_command(CLI::App& app, GradientsOptions& o);
// Returns the exit status; throws blm::Error (one line) on bad input.
int run_gradients(const GradientsOptions& o);

}  // namespace blm
