// NcclComm (cuda/nccl_comm.h): NCCL loaded at run time, the communicator, host and gradient
// all-reduces, and the watchdog that turns a stalled or failed collective into a clear exit.
#include "cuda/nccl_comm.h"

#include <dlfcn.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "core/dist_control.h"
#include "core/error.h"
#include "cuda/common.cuh"

namespace blm {
namespace cuda {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// ------------------------------------------------------------------ NCCL, loaded at run time

struct NcclApi {
  void* handle = nullptr;
  int version = 0;
  decltype(&ncclGetVersion) GetVersion = nullptr;
  decltype(&ncclGetUniqueId) GetUniqueId = nullptr;
  decltype(&ncclCommInitRank) CommInitRank = nullptr;
  decltype(&ncclCommDestroy) CommDestroy = nullptr;
  decltype(&ncclCommAbort) CommAbort = nullptr;
  decltype(&ncclCommGetAsyncError) CommGetAsyncError = nullptr;
  decltype(&ncclAllReduce) AllReduce = nullptr;
  decltype(&ncclGetErrorString) GetErrorString = nullptr;
  decltype(&ncclGetLastError) GetLastError = nullptr;  // NCCL >= 2.13; may stay null
};

template <class F>
void load_symbol(void* handle, const char* name, F& out, bool required, const std::string& lib) {
  out = reinterpret_cast<F>(::dlsym(handle, name));
  if (!out && required)
    throw DeviceError("the NCCL library '" + lib + "' has no " + name +
                      " (too old? barrierlm needs NCCL 2.10 or later)");
}

NcclApi load_nccl() {
  NcclApi api;
  std::vector<std::string> names;
  if (const char* p = std::getenv("BLM_NCCL_LIBRARY"); p && *p) names.push_back(p);
  names.insert(names.end(), {"libnccl.so.2", "libnccl.so", "/usr/local/cuda/lib64/libnccl.so.2",
                             "/usr/lib/x86_64-linux-gnu/libnccl.so.2"});
  std::string tried;
  for (const std::string& n : names) {
    api.handle = ::dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (api.handle) {
      tried = n;
      break;
    }
    const char* e = ::dlerror();
    if (tried.empty()) tried = e ? e : n;
  }
  if (!api.handle)
    throw DeviceError("cannot load NCCL (" + tried + "); multi-GPU training needs it: install "
                      "libnccl2 (or set BLM_NCCL_LIBRARY to libnccl.so.2)");
  load_symbol(api.handle, "ncclGetVersion", api.GetVersion, true, tried);
  load_symbol(api.handle, "ncclGetUniqueId", api.GetUniqueId, true, tried);
  load_symbol(api.handle, "ncclCommInitRank", api.CommInitRank, true, tried);
  load_symbol(api.handle, "ncclCommDestroy", api.CommDestroy, true, tried);
  load_symbol(api.handle, "ncclCommAbort", api.CommAbort, true, tried);
  load_symbol(api.handle, "ncclCommGetAsyncError", api.CommGetAsyncError, true, tried);
  load_symbol(api.handle, "ncclAllReduce", api.AllReduce, true, tried);
  load_symbol(api.handle, "ncclGetErrorString", api.GetErrorString, true, tried);
  load_symbol(api.handle, "ncclGetLastError", api.GetLastError, false, tried);
  api.GetVersion(&api.version);
  if (api.version < 21000)  // ncclAvg arrived in 2.10 (codes are MAJOR*10000 + MINOR*100 + PATCH)
    throw DeviceError("NCCL " + std::to_string(api.version) + " at '" + tried +
                      "' is too old: barrierlm needs NCCL 2.10 or later");
  return api;
}

const NcclApi& nccl() {
  static std::once_flag once;
  static NcclApi api;
  static std::string error;
  std::call_once(once, [] {
    try {
      api = load_nccl();
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  if (!error.empty()) throw DeviceError(error);
  return api;
}

std::string version_text(int v) {
  // 2.28.9 is 22809; versions before 2.9 used MAJOR*1000 + MINOR*100 + PATCH.
  const int major = v >= 10000 ? v / 10000 : v / 1000;
  const int minor = v >= 10000 ? (v / 100) % 100 : (v / 100) % 10;
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(v % 100);
}

std::string nccl_error(ncclResult_t r, ncclComm_t comm) {
  std::string s = nccl().GetErrorString(r);
  if (nccl().GetLastError) {
    const char* last = nccl().GetLastError(comm);
    if (last && *last) s += ": " + std::string(last);
  }
  return s;
}

}  // namespace

// ------------------------------------------------------------------ the communicator

struct NcclComm::Impl {
  int rank = 0, world = 1, device = 0;
  double timeout_s = 30;
  ncclComm_t comm = nullptr;
  cudaStream_t comm_stream = nullptr;
  cudaEvent_t joined = nullptr;  // recorded on the comm stream after the last bucket
  DeviceBuffer scratch;         // host all-reduce staging
  int hook_id = 0;

  // Gradient buckets.
  float* grads = nullptr;
  std::vector<size_t> layer_begin;
  size_t total = 0, bucket_floats = 0, pending_end = 0;
  BucketProbe probe;  // tests only (set_bucket_probe)

  // Watchdog state.  A blocking NCCL call in progress (communicator creation, a collective's
  // launch) is `host_call_since` (0: none); launched collectives wait in `pending` for their
  // completion event.  A bucket's clock starts when its `ready` event (the compute stream
  // reaching it) has completed, not when the host queued it: the host runs far ahead of the GPU,
  // and a long backward is no stall.
  struct Pending {
    cudaEvent_t ready = nullptr;  // null: could start at once
    cudaEvent_t done = nullptr;
    int64_t seq = 0;
    bool started = false;
    Clock::time_point since;
  };
  std::mutex mu;
  std::deque<Pending> pending;
  std::vector<cudaEvent_t> free_events;
  std::atomic<int64_t> host_call_since{0};  // steady_clock ticks
  std::atomic<double> host_call_limit{0};
  std::string host_call_what;
  int64_t issued = 0;
  std::atomic<bool> stop{false};
  std::atomic<bool> comm_ready{false};
  std::mutex comm_mu;  // the watchdog's error query vs the communicator's destruction
  std::thread watchdog;

  void watch();
  bool check_pending();
  void begin_host_call(const std::string& what, double limit_s);
  void end_host_call() { host_call_since = 0; }
  cudaEvent_t take_event();
  // Launches one all-reduce on the comm stream (after `ready`, when given) and records it for
  // the watchdog.
  void collective(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                  const char* what, cudaEvent_t ready);
  void reduce_range(size_t begin, size_t end, cudaStream_t compute);
};

void NcclComm::Impl::begin_host_call(const std::string& what, double limit_s) {
  {
    std::lock_guard<std::mutex> lock(mu);
    host_call_what = what;
  }
  host_call_limit = limit_s;
  host_call_since = std::max<int64_t>(1, Clock::now().time_since_epoch().count());
}

cudaEvent_t NcclComm::Impl::take_event() {
  std::lock_guard<std::mutex> lock(mu);
  if (!free_events.empty()) {
    cudaEvent_t e = free_events.back();
    free_events.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

void NcclComm::Impl::collective(const void* send, void* recv, size_t count, ncclDataType_t type,
                                ncclRedOp_t op, const char* what, cudaEvent_t ready) {
  begin_host_call(what, timeout_s);
  const ncclResult_t r = nccl().AllReduce(send, recv, count, type, op, comm, comm_stream);
  end_host_call();
  if (r != ncclSuccess && r != ncclInProgress)
    throw DeviceError(std::string("ncclAllReduce (") + what + ") failed on rank " +
                      std::to_string(rank) + ": " + nccl_error(r, comm));
  cudaEvent_t done = take_event();
  CUDA_CHECK(cudaEventRecord(done, comm_stream));
  std::lock_guard<std::mutex> lock(mu);
  ++issued;
  dist_note_progress(issued);
  Pending p;
  p.ready = ready;
  p.done = done;
  p.seq = issued;
  p.started = ready == nullptr;
  p.since = Clock::now();
  pending.push_back(p);
}

// The watchdog: true while everything is fine.
bool NcclComm::Impl::check_pending() {
  ncclResult_t async = ncclSuccess;
  {
    std::lock_guard<std::mutex> lock(comm_mu);
    if (comm_ready) nccl().CommGetAsyncError(comm, &async);
  }
  if (async != ncclSuccess && async != ncclInProgress)
    dist_fatal("NCCL failed on rank " + std::to_string(rank) + ": " + nccl_error(async, comm));
  const int64_t since = host_call_since;
  if (since != 0) {
    const double waited = std::chrono::duration<double>(
                              Clock::now() - Clock::time_point(Clock::duration(since)))
                              .count();
    if (waited > host_call_limit) {
      std::string what;
      {
        std::lock_guard<std::mutex> lock(mu);
        what = host_call_what;
      }
      int64_t next = 0;
      {
        std::lock_guard<std::mutex> lock(mu);
        next = issued + 1;
      }
      dist_fatal(what + " on rank " + std::to_string(rank) + " blocked for " +
                 std::to_string(static_cast<int>(waited)) + " s; " +
                 dist_describe_stall(next, waited));
    }
  }
  for (;;) {
    Pending p;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (pending.empty()) return true;
      p = pending.front();
    }
    auto failed = [&](cudaError_t e) {
      dist_fatal("a CUDA error on rank " + std::to_string(rank) + " around collective #" +
                 std::to_string(p.seq) + ": " + cudaGetErrorString(e));
    };
    if (!p.started) {
      const cudaError_t r = cudaEventQuery(p.ready);
      if (r == cudaErrorNotReady) return true;  // the backward has not got there yet
      if (r != cudaSuccess) failed(r);
      std::lock_guard<std::mutex> lock(mu);
      pending.front().started = true;
      pending.front().since = p.since = Clock::now();
    }
    const cudaError_t e = cudaEventQuery(p.done);
    if (e == cudaErrorNotReady) {
      const double waited = seconds_since(p.since);
      if (waited > timeout_s) dist_fatal(dist_describe_stall(p.seq, waited));
      return true;
    }
    if (e != cudaSuccess) failed(e);
    std::lock_guard<std::mutex> lock(mu);
    pending.pop_front();
    free_events.push_back(p.done);
    if (p.ready) free_events.push_back(p.ready);
  }
}

void NcclComm::Impl::watch() {
  cudaSetDevice(device);
  while (!stop) {
    check_pending();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void NcclComm::Impl::reduce_range(size_t begin, size_t end, cudaStream_t compute) {
  if (end <= begin) return;
  CUDA_CHECK(cudaSetDevice(device));  // the events are made on the current device
  if (probe) probe(grads, begin, end, compute);
  cudaEvent_t ready = take_event();  // back to the pool once the watchdog saw the bucket done
  CUDA_CHECK(cudaEventRecord(ready, compute));
  CUDA_CHECK(cudaStreamWaitEvent(comm_stream, ready, 0));
  collective(grads + begin, grads + begin, end - begin, ncclFloat32, ncclAvg, "gradient bucket",
             ready);
}

std::string NcclComm::unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = nccl().GetUniqueId(&id);
  if (r != ncclSuccess)
    throw DeviceError(std::string("ncclGetUniqueId failed: ") + nccl().GetErrorString(r) +
                      " (no usable network interface? see NCCL_SOCKET_IFNAME)");
  return std::string(id.internal, sizeof id.internal);
}

NcclComm::NcclComm(const std::string& unique_id, int rank, int world, int device, double timeout_s)
    : impl_(std::make_unique<Impl>()) {
  Impl& c = *impl_;
  c.rank = rank;
  c.world = world;
  c.device = device;
  c.timeout_s = timeout_s;
  if (unique_id.size() != sizeof(ncclUniqueId))
    throw DeviceError("the NCCL unique id from rank 0 has " + std::to_string(unique_id.size()) +
                      " bytes, expected " + std::to_string(sizeof(ncclUniqueId)));
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof id.internal);
  ::setenv("NCCL_NVLS_ENABLE", "0", 0);  // NVLink SHARP multicast off unless the user set it
  nccl();  // load (or throw) before anything is allocated
  CUDA_CHECK(cudaSetDevice(device));
  CUDA_CHECK(cudaStreamCreateWithFlags(&c.comm_stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaEventCreateWithFlags(&c.joined, cudaEventDisableTiming));
  c.scratch = DeviceBuffer(64 * sizeof(double), "the data-parallel scalars");
  c.watchdog = std::thread([&c] { c.watch(); });
  c.begin_host_call("creating the NCCL communicator", std::max(120.0, 4 * timeout_s));
  ncclComm_t comm = nullptr;
  const ncclResult_t r = nccl().CommInitRank(&comm, world, id, rank);
  c.end_host_call();
  if (r != ncclSuccess) {
    c.stop = true;
    c.watchdog.join();
    throw DeviceError("ncclCommInitRank failed on rank " + std::to_string(rank) + " (GPU " +
                      std::to_string(device) + "): " + nccl_error(r, nullptr));
  }
  c.comm = comm;
  c.comm_ready = true;
  Impl* raw = impl_.get();
  c.hook_id = add_abort_hook([raw] { nccl().CommAbort(raw->comm); });
}

NcclComm::~NcclComm() {
  Impl& c = *impl_;
  const bool unwinding = std::uncaught_exceptions() > 0;
  remove_abort_hook(c.hook_id);
  if (!unwinding) cudaStreamSynchronize(c.comm_stream);  // the watchdog still guards this wait
  if (c.comm) {
    // The watchdog keeps timing this call, but stops asking the communicator for errors.
    {
      std::lock_guard<std::mutex> lock(c.comm_mu);
      c.comm_ready = false;
    }
    c.begin_host_call("destroying the NCCL communicator", std::max(60.0, 2 * c.timeout_s));
    // Peers may be gone when an error unwinds the stack: abort never waits for them.
    if (unwinding)
      nccl().CommAbort(c.comm);
    else
      nccl().CommDestroy(c.comm);
    c.end_host_call();
  }
  c.stop = true;
  if (c.watchdog.joinable()) c.watchdog.join();
  for (cudaEvent_t e : c.free_events) cudaEventDestroy(e);
  for (const auto& p : c.pending) {
    cudaEventDestroy(p.done);
    if (p.ready) cudaEventDestroy(p.ready);
  }
  if (c.joined) cudaEventDestroy(c.joined);
  if (c.comm_stream) cudaStreamDestroy(c.comm_stream);
}

int NcclComm::rank() const { return impl_->rank; }
int NcclComm::world_size() const { return impl_->world; }
int NcclComm::device() const { return impl_->device; }

std::string NcclComm::description() const { return "NCCL " + version_text(nccl().version); }

void NcclComm::allreduce(double* values, int n, Op op) {
  Impl& c = *impl_;
  if (n <= 0) return;
  CUDA_CHECK(cudaSetDevice(c.device));  // events and buffers below belong to this GPU
  if (static_cast<size_t>(n) * sizeof(double) > c.scratch.bytes())
    c.scratch = DeviceBuffer(static_cast<size_t>(n) * sizeof(double), "the data-parallel scalars");
  double* dev = c.scratch.as<double>();
  const size_t bytes = static_cast<size_t>(n) * sizeof(double);
  CUDA_CHECK(cudaMemcpyAsync(dev, values, bytes, cudaMemcpyHostToDevice, c.comm_stream));
  c.collective(dev, dev, static_cast<size_t>(n), ncclFloat64, op == Op::kSum ? ncclSum : ncclMax,
               "scalar all-reduce", nullptr);
  CUDA_CHECK(cudaMemcpyAsync(values, dev, bytes, cudaMemcpyDeviceToHost, c.comm_stream));
  CUDA_CHECK(cudaStreamSynchronize(c.comm_stream));  // the watchdog bounds this wait
}

void NcclComm::set_gradient_layout(float* grads, std::vector<size_t> layer_begin, size_t total,
                                   size_t bucket_floats) {
  Impl& c = *impl_;
  c.grads = grads;
  c.layer_begin = std::move(layer_begin);
  c.total = total;
  if (bucket_floats == 0) {
    double mb = 25;
    if (const char* v = std::getenv("BLM_BUCKET_MB"); v && *v) {
      char* end = nullptr;
      mb = std::strtod(v, &end);
      if (end == v || *end != '\0' || !(mb > 0))
        throw ConfigError(std::string("environment variable BLM_BUCKET_MB='") + v +
                          "' must be a positive number of MiB");
    }
    bucket_floats = static_cast<size_t>(mb * 1024 * 1024 / sizeof(float));
  }
  c.bucket_floats = std::max<size_t>(1, bucket_floats);
  c.pending_end = total;
}

void NcclComm::begin_backward() { impl_->pending_end = impl_->total; }

void NcclComm::layer_done(int l, cudaStream_t compute) {
  Impl& c = *impl_;
  const size_t begin = c.layer_begin.at(l);
  if (c.pending_end - begin < c.bucket_floats) return;
  c.reduce_range(begin, c.pending_end, compute);
  c.pending_end = begin;
}

void NcclComm::finish_backward(cudaStream_t compute) {
  Impl& c = *impl_;
  c.reduce_range(0, c.pending_end, compute);
  c.pending_end = c.total;
  CUDA_CHECK(cudaEventRecord(c.joined, c.comm_stream));
  CUDA_CHECK(cudaStreamWaitEvent(compute, c.joined, 0));
}

void NcclComm::set_bucket_probe(BucketProbe probe) { impl_->probe = std::move(probe); }

bool NcclComm::reduces_gradients() const {
  return impl_->world > 1 || static_cast<bool>(impl_->probe);
}

std::vector<std::pair<size_t, size_t>> NcclComm::bucket_plan() const {
  const Impl& c = *impl_;
  std::vector<std::pair<size_t, size_t>> plan;
  size_t end = c.total;
  for (int l = static_cast<int>(c.layer_begin.size()) - 1; l >= 0; --l)
    if (end - c.layer_begin[l] >= c.bucket_floats) {
      plan.push_back({c.layer_begin[l], end});
      end = c.layer_begin[l];
    }
  if (end > 0) plan.push_back({0, end});
  return plan;
}

}  // namespace cuda
}  // namespace blm
