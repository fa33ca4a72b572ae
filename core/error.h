// Errors that reach the user.  Every failure a user can cause (bad config, bad data file, bad
// checkpoint, a diverging run) is thrown as a blm::Error whose what() is one line that names the
// problem: the file, the key, the line.  cmd/main.cpp prints it and exits non-zero.
#pragma once
#include <stdexcept>
#include <string>

namespace blm {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ConfigError : Error {
  using Error::Error;
};
struct DataError : Error {
  using Error::Error;
};
struct CheckpointError : Error {
  using Error::Error;
};
// Training produced a non-finite loss or gradient.
struct DivergenceError : Error {
  using Error::Error;
};
// A backend cannot run here (no GPU, failed CUDA call, out of memory).
struct DeviceError : Error {
  using Error::Error;
};

}  // namespace blm
