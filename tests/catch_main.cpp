// The one main of every test executable.  GPU test executables (BLM_GPU_TEST_MAIN) exit with 77,
// which ctest reports as "skipped", when no CUDA device is present: they never report "passed"
// without having run.
#if BLM_CATCH_MAJOR == 3
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif
#include <cstdio>

// Defined by the GPU test sources (tests/gpu/); weak so CPU test executables link without it.
extern "C" int blm_gpu_test_device_count() __attribute__((weak));

int main(int argc, char** argv) {
  if (blm_gpu_test_device_count) {
    const int n = blm_gpu_test_device_count();
    if (n <= 0) {
      std::printf("no CUDA device: GPU tests skipped\n");
      return 77;
    }
  }
  return Catch::Session().run(argc, argv);
}
