// The CUDA backend's entry points (the rest of cuda/ is private to it).
#pragma once
#include <memory>
#include <string>

#include "core/backend.h"

namespace blm {

// Number of usable CUDA devices; 0 with the reason in *why when there is none.
int cuda_device_count(std::string* why);
// Why the CUDA backend cannot run this model ("" when it can): head sizes without kernels,
// fp64.  make_backend's "auto" falls back to the CPU backend for these, with a warning.
std::string cuda_unsupported_reason(const Config& cfg);
// Throws DeviceError naming the failing call when the backend cannot start.
std::unique_ptr<Backend> make_cuda_backend(const Config& cfg, int device);
// How many times a CUDA backend launched a captured training step (BLM_CUDA_GRAPHS); -1 for
// another backend.  For tests and benchmarks.
long cuda_graph_launches(const Backend& backend);
// How many layers' barriers a CUDA backend queued on its barrier stream (BLM_BARRIER_STREAM); -1
// for another backend.  For tests.
long cuda_barrier_stream_forks(const Backend& backend);

}  // namespace blm
