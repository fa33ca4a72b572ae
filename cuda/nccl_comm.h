// Data parallelism over NCCL: one communicator per run, one rank per GPU (core/backend.h's
// DataParallel), and the bucketed gradient all-reduce the CUDA backend starts while its backward
// pass is still running.
//
// NCCL is loaded when the first communicator is made (dlopen of libnccl.so.2, or the file named
// by BLM_NCCL_LIBRARY), so barrierlm runs on one GPU without it; version 2.10 or later is needed
// (ncclAvg).  NCCL_NVLS_ENABLE is set to 0 (NVLink SHARP multicast off) unless already set.
//
// Gradient buckets.  The parameter layout (core/params.h) is wte, wpe, h0, ..., h{L-1}, lnf, each
// layer contiguous.  Backward finishes lnf first, then layers L-1 down to 0, then wte/wpe.  After
// layer l the range [begin(l), end of what is not yet reduced) is final; once it holds at least
// the bucket size (BLM_BUCKET_MB, default 25 MiB) it is averaged (ncclAvg, in place, fp32) on a
// communication stream that waits for an event recorded on the compute stream, so the next
// layers' backward overlaps the transfer.  The rest (layer 0's remainder, wpe, wte) goes last and
// the compute stream then waits for the communication stream.  The buckets depend only on the
// layout and the bucket size, identical on every rank; NCCL's ring all-reduce of a fixed count on
// a fixed topology is deterministic, so a run repeats bit for bit.
//
// Hangs and failures.  A watchdog thread polls every pending collective and
// ncclCommGetAsyncError: an NCCL error, or a collective (or blocking NCCL call) that makes no
// progress for the timeout (BLM_NCCL_TIMEOUT, default 30 s; communicator creation gets
// max(120 s, 4x)), ends the process through dist_fatal (core/dist_control.h), whose hook aborts
// the communicator (ncclCommAbort).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"

namespace blm {
namespace cuda {

class NcclComm final : public DataParallel {
 public:
  // A new NCCL unique id (128 opaque bytes), made by rank 0 and sent to the others.  Throws
  // DeviceError when NCCL cannot be loaded.
  static std::string unique_id();
  // Joins the communicator as `rank` of `world` on CUDA device `device` (blocks until every rank
  // has joined; the watchdog bounds the wait).
  NcclComm(const std::string& unique_id, int rank, int world, int device, double timeout_s);
  // Destroys the communicator (aborts it while an exception is unwinding: peers may be gone).
  ~NcclComm() override;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const override;
  int world_size() const override;
  void allreduce(double* values, int n, Op op) override;
  std::string description() const override;  // "NCCL 2.28.9"
  int device() const;

  // ---- gradient averaging, for the CUDA backend
  // grads: the gradient buffer [total] on this device; layer_begin[l]: offset of layer l's first
  // tensor (l in [0, L)).  bucket_floats 0: from BLM_BUCKET_MB.
  void set_gradient_layout(float* grads, std::vector<size_t> layer_begin, size_t total,
                           size_t bucket_floats = 0);
  void begin_backward();
  // Layer l's gradients (and every later layer's, and lnf's) are final on `compute`.
  void layer_done(int l, cudaStream_t compute);
  // Every gradient is final: reduce the rest, and make `compute` wait for all of it.
  void finish_backward(cudaStream_t compute);
  // The [begin, end) ranges the buckets of one backward cover, in launch order (tests, docs).
  std::vector<std::pair<size_t, size_t>> bucket_plan() const;

  // ---- testing the buckets on one GPU
  // Called for every bucket just before its all-reduce is queued, with the gradient buffer, the
  // bucket's range and the compute stream (a test enqueues a copy of the range there: what the
  // all-reduce will read).  With a probe set, a one-rank communicator reduces too (an identity),
  // so that a test can check on one GPU that no gradient is written after its bucket started.
  using BucketProbe =
      std::function<void(const float* grads, size_t begin, size_t end, cudaStream_t compute)>;
  void set_bucket_probe(BucketProbe probe);
  // Whether the CUDA backend should reduce through this communicator: more than one rank, or a
  // bucket probe set.
  bool reduces_gradients() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace cuda
}  // namespace blm
