// `barrierlm bench`: the training step's speed on random tokens, for scripts/bench.sh and
// docs/PERFORMANCE.md.  Its options, as main.cpp fills them, and its entry point.
//
// One timed step is exactly what `barrierlm train` does per optimizer step (cmd/trainer.cpp):
// train.grad_accum forward_backward calls of batch_size / grad_accum sequences of seq_len
// random tokens (never zeros), grad_norm, adamw_step with the global-norm clip, then a device
// synchronisation.  The learning rate is train.lr, constant (the schedule costs nothing).
// With barrier.positions = K > 0 each step draws its K positions per sequence as training does.
//
// Reported: median / min / max / mean step time over --steps timed steps after --warmup untimed
// ones, tokens per second (batch_size * seq_len / median), the model FLOPs per token
// 6N + 6 L d T (N = every parameter; causal attention counts half of 12 L d T; the barrier is
// not counted), achieved TFLOP/s and, with --peak-tflops, MFU; the device memory the backend
// holds at its peak (cudaMemGetInfo: used after the steps minus used before the backend was
// made, so the CUDA context is not counted, cuBLAS workspaces are), and the loss of each step.
#pragma once
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace blm {

struct BenchOptions {
  std::string config_path;             // YAML config (model, barrier, train.batch_size, device)
  std::vector<std::string> overrides;  // "section.key=value", applied in order
  int steps = 20;                      // timed steps
  int warmup = 5;                      // untimed steps first (allocation, cuBLAS heuristics)
  double peak_tflops = 0;              // > 0: also report MFU against this peak
  bool json = false;                   // JSON to stdout instead of the text summary
  std::string out;                     // also write the JSON here (atomically)
  uint64_t seed = 1;                   // random tokens and parameters
};

// Registers `bench` on app (filling o when parsed); main.cpp dispatches to run_bench.
CLI::App* add_bench_command(CLI::App& app, BenchOptions& o);
// Returns the exit status; throws blm::Error (one line) on bad input or a non-finite loss.
int run_bench(const BenchOptions& o);

}  // namespace blm
