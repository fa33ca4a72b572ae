// Placeholder until the CUDA backend lands: reports the device count and refuses to start.
#include <cuda_runtime.h>

#include "core/error.h"
#include "cuda/cuda_backend.h"

namespace blm {

int cuda_device_count(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why) *why = cudaGetErrorString(e);
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device";
  return n;
}

std::unique_ptr<Backend> make_cuda_backend(const Config&, int) {
  throw DeviceError("the CUDA backend is not implemented yet");
}

}  // namespace blm
