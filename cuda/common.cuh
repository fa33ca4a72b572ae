// Error checking and small shared pieces of the CUDA backend.
//
// Every CUDA runtime and cuBLAS call goes through CUDA_CHECK / CUBLAS_CHECK, which throw
// blm::DeviceError with one line naming the call, the error string and what to do about it.
// Every kernel launch is followed by BLM_CHECK_LAUNCH("kernel name"), which reads the launch
// error; with BLM_CUDA_SYNC=1 in the environment it also synchronises, so an asynchronous fault
// (illegal address, ...) is reported against the kernel that caused it rather than a later call.
//
// This header compiles with the host compiler too (tests include it); the device-only helpers
// at the end are guarded by __CUDACC__.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/error.h"

namespace blm {
namespace cuda {

// The index in `choices` of environment variable `name`'s value, `fallback` when it is unset
// or empty; any other value is a ConfigError naming the variable, the value and the choices.
// (The BLM_* switches that choose a kernel or a path are read through this.)
int env_choice(const char* name, std::initializer_list<const char*> choices, int fallback);

// A whole number from environment variable `name` in [lo, hi] (decimal digits, an optional
// leading '-'); `fallback` when it is unset or empty; otherwise a ConfigError naming the
// variable, its value and `meaning` (what it should be).
long env_count(const char* name, long fallback, long lo, long hi, const char* meaning);

// "2.1 GiB", "12.0 MiB": sizes in messages.
std::string format_bytes(size_t bytes);

// The advice part of an error message for a CUDA error code.
std::string cuda_error_hint(cudaError_t e);

[[noreturn]] void throw_cuda_error(cudaError_t e, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t s, const char* call, const char* file,
                                     int line);
// Reads the error of the last launch (and synchronises when BLM_CUDA_SYNC=1).
void check_launch(const char* kernel, const char* file, int line);

// cudaMalloc with a message naming the size and the purpose on failure; never returns null for
// bytes > 0.
void* device_alloc(size_t bytes, const std::string& what);
void device_free(void* p) noexcept;

// One owned device allocation (move-only).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t bytes, const std::string& what) : ptr_(device_alloc(bytes, what)), bytes_(bytes) {}
  ~DeviceBuffer() { device_free(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      device_free(ptr_);
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      o.ptr_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Lays out typed pieces of one device buffer (or, with a null base, only measures): each piece
// starts on a 256-byte boundary (16-byte vector loads and cp.async need 16), and size() is
// rounded up to 256 too, so consecutive copies of one layout stay aligned.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(size_t count) {
    off_ = (off_ + 255) / 256 * 256;
    T* p = base_ ? reinterpret_cast<T*>(base_ + off_) : nullptr;
    off_ += count * sizeof(T);
    return p;
  }
  size_t size() const { return (off_ + 255) / 256 * 256; }

 private:
  char* base_;
  size_t off_ = 0;
};

}  // namespace cuda
}  // namespace blm

#define CUDA_CHECK(call)                                                           \
  do {                                                                             \
    cudaError_t blm_err_ = (call);                                                 \
    if (blm_err_ != cudaSuccess)                                                   \
      ::blm::cuda::throw_cuda_error(blm_err_, #call, __FILE__, __LINE__);          \
  } while (0)

#define CUBLAS_CHECK(call)                                                         \
  do {                                                                             \
    cublasStatus_t blm_st_ = (call);                                               \
    if (blm_st_ != CUBLAS_STATUS_SUCCESS)                                          \
      ::blm::cuda::throw_cublas_error(blm_st_, #call, __FILE__, __LINE__);         \
  } while (0)

#define BLM_CHECK_LAUNCH(kernel_name) ::blm::cuda::check_launch(kernel_name, __FILE__, __LINE__)

namespace blm {
namespace cuda {
// Kernels using more than 48 KiB of dynamic shared memory must opt in (per device, so it is
// done at every launch: it is a cheap host call).
template <class Kernel>
inline void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
}
}  // namespace cuda
}  // namespace blm

#if defined(__CUDACC__)
namespace blm {
namespace cuda {

// Sum over the 32 lanes of a warp; the butterfly order is fixed, so the result is deterministic
// and identical in every lane.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); `scratch` holds 32 values.  Every
// thread gets the result.  Fixed reduction order: deterministic.
template <class T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? scratch[lane] : T(0);
  return warp_sum(r);
}

// Activation storage types (bf16 precision): math is always in float; these load and store.
__device__ __forceinline__ float load_f(float x) { return x; }
__device__ __forceinline__ float load_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T store_as(float x);
template <>
__device__ __forceinline__ float store_as<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);  // round to nearest even
}

}  // namespace cuda
}  // namespace blm
#endif
