// make_backend: picks the backend a config asks for.
#include <cstdio>

#include "core/backend.h"
#include "core/error.h"
#if BLM_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace blm {

std::unique_ptr<Backend> make_backend(const Config& cfg, const std::string& setting) {
  const std::string& want = cfg.device.backend;
  // How the user sets the backend: the config key, or a command's flag.
  const auto set_to = [&](const char* value) {
    return setting + (setting.rfind("--", 0) == 0 ? " " : "=") + value;
  };
  std::string cpu_precision = cfg.device.precision == "auto" ? "fp32" : cfg.device.precision;
  if (want == "cpu") return make_cpu_backend(cfg.model, cfg.barrier, cpu_precision, cfg.device.threads);
#if BLM_HAVE_CUDA
  std::string why;
  const int n = cuda_device_count(&why);
  const std::string unsupported = n > 0 ? cuda_unsupported_reason(cfg) : "";
  if (n > 0 && want == "cuda" && !unsupported.empty())
    throw DeviceError(unsupported + "; change the model or use " + set_to("cpu"));
  if (n > 0 && unsupported.empty()) return make_cuda_backend(cfg, 0);
  if (n > 0)
    std::fprintf(stderr, "barrierlm: warning: the GPU cannot run this model (%s); using the CPU\n",
                 unsupported.c_str());
  if (want == "cuda")
    throw DeviceError(setting + " is 'cuda' but no GPU is usable (" + why + "); use " +
                      set_to("cpu") + " or auto");
#else
  if (want == "cuda")
    throw DeviceError(setting + " is 'cuda' but this barrierlm was built without CUDA; " +
                      "rebuild with nvcc on the PATH or use " + set_to("cpu"));
#endif
  if (cpu_precision == "bf16") {
    // bf16 is a GPU precision.  Said when the user's config asked for it (a command's model
    // takes its checkpoint's precision, which is no request of the user's).
    if (setting == "device.backend")
      std::fprintf(stderr, "barrierlm: note: device.precision bf16 is for GPUs; with no GPU the "
                           "CPU backend runs in fp32\n");
    cpu_precision = "fp32";
  }
  return make_cpu_backend(cfg.model, cfg.barrier, cpu_precision, cfg.device.threads);
}

}  // namespace blm
