// Error reporting and device allocation for the CUDA backend (see common.cuh).
#include "cuda/common.cuh"
#include "cuda/pdl.cuh"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace blm {
namespace cuda {

int env_choice(const char* name, std::initializer_list<const char*> choices, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  std::string list;
  int index = 0;
  for (const char* c : choices) {
    if (std::strcmp(v, c) == 0) return index;
    list += (index++ ? ", " : "") + std::string(c);
  }
  throw ConfigError(std::string("environment ") + name + ": '" + v + "' is not one of " + list);
}

long env_count(const char* name, long fallback, long lo, long hi, const char* meaning) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  // (strtol alone would also take leading blanks and a '+')
  const bool starts_right = (*v >= '0' && *v <= '9') || *v == '-';
  const long n = starts_right ? std::strtol(v, &end, 10) : 0;
  if (!starts_right || *end != '\0' || n < lo || n > hi)
    throw ConfigError(std::string("environment ") + name + ": '" + v + "' is not " + meaning);
  return n;
}

bool pdl_enabled() {
  static const bool enabled = env_choice("BLM_PDL", {"0", "1"}, 1) == 1;
  return enabled;
}

std::string format_bytes(size_t bytes) {
  char buf[64];
  const double b = static_cast<double>(bytes);
  if (b >= 1024.0 * 1024 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f TiB", b / (1024.0 * 1024 * 1024 * 1024));
  else if (b >= 1024.0 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f GiB", b / (1024.0 * 1024 * 1024));
  else if (b >= 1024.0 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1024.0 * 1024));
  else if (b >= 1024.0)
    std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024.0);
  else
    std::snprintf(buf, sizeof buf, "%zu B", bytes);
  return buf;
}

std::string cuda_error_hint(cudaError_t e) {
  switch (e) {
    case cudaErrorMemoryAllocation:
      return "reduce train.batch_size or the model size";
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
      return "check the GPU and driver (nvidia-smi) or use device.backend=cpu";
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
      return "a kernel faulted: this is a bug, rerun with BLM_CUDA_SYNC=1 to locate it";
    default:
      return "this is a bug or a broken device; rerun with BLM_CUDA_SYNC=1 to locate it";
  }
}

static const char* base_name(const char* path) {
  const char* slash = path;
  for (const char* p = path; *p; ++p)
    if (*p == '/') slash = p + 1;
  return slash;
}

void throw_cuda_error(cudaError_t e, const char* call, const char* file, int line) {
  // Clear the thread's last-error slot: a failed runtime call (cudaSetDevice of a missing device,
  // a refused cudaMalloc) would otherwise resurface at the next launch check as that kernel's
  // failure.  Sticky errors (a faulted context) stay and are reported again, as they should be.
  (void)cudaGetLastError();
  throw DeviceError(std::string(call) + " failed: " + cudaGetErrorString(e) + " (" +
                    base_name(file) + ":" + std::to_string(line) + "); " + cuda_error_hint(e));
}

static const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "unknown cuBLAS status";
  }
}

void throw_cublas_error(cublasStatus_t s, const char* call, const char* file, int line) {
  std::string hint = s == CUBLAS_STATUS_ALLOC_FAILED
                         ? "reduce train.batch_size or the model size"
                         : "this is a bug or a broken device";
  throw DeviceError(std::string(call) + " failed: " + cublas_status_name(s) + " (" +
                    std::to_string(static_cast<int>(s)) + ", " + base_name(file) + ":" +
                    std::to_string(line) + "); " + hint);
}

static bool sync_after_launch() {
  static const bool on = [] {
    const char* v = std::getenv("BLM_CUDA_SYNC");
    return v && *v && std::string(v) != "0";
  }();
  return on;
}

void check_launch(const char* kernel, const char* file, int line) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess && sync_after_launch()) e = cudaDeviceSynchronize();
  if (e != cudaSuccess)
    throw DeviceError(std::string("kernel ") + kernel + " failed: " + cudaGetErrorString(e) +
                      " (" + base_name(file) + ":" + std::to_string(line) + "); " +
                      cuda_error_hint(e));
}

void* device_alloc(size_t bytes, const std::string& what) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free allocation error so later calls are not blamed
    throw DeviceError("cudaMalloc of " + format_bytes(bytes) + " for " + what +
                      " failed: " + cudaGetErrorString(e) + "; " + cuda_error_hint(e));
  }
  return p;
}

void device_free(void* p) noexcept {
  if (p) cudaFree(p);  // errors at teardown cannot be reported usefully; never throw here
}

}  // namespace cuda
}  // namespace blm
