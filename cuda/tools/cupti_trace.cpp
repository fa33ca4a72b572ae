// A kernel timeline recorder for any CUDA program, loaded by the CUDA driver itself:
//
//   CUDA_INJECTION64_PATH=build/cuda/libblm_cupti_trace.so BLM_TRACE_CSV=trace.csv PROGRAM ...
//
// It writes one CSV row per kernel, copy and memset the GPU ran (graph nodes one by one), and,
// with BLM_TRACE_API=1, one per CUDA runtime call the host made:
//   "Start (ns)","Duration (ns)","Strm","Name"
// (one clock for both; kernel names demangled, runtime calls as "[api] cudaMemcpyAsync", Strm 0)
// the columns scripts/py/timeline_gaps.py reads (scripts/timeline-gaps.sh runs both).  It is the
// part of Nsight Systems' trace that the step analysis needs, for machines without nsys.
//
// How: CUPTI's activity API.  The driver calls InitializeInjection() when the program first
// initialises CUDA; it enables the kernel, memcpy and memset records (with BLM_TRACE_API=1 also
// the runtime calls) and asks CUPTI to hand over its buffers every kFlushMs, so rows reach the
// file while the program runs (whatever is still buffered when the program exits is flushed by
// an atexit handler, which may run after the CUDA runtime has shut down: then those last rows
// are lost, never the earlier ones).
#include <cupti.h>
#include <cxxabi.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

namespace {

constexpr size_t kBufferBytes = 8u << 20;
constexpr uint32_t kFlushMs = 20;

std::mutex g_mutex;
FILE* g_file = nullptr;

std::string demangle(const char* name) {
  if (name == nullptr) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && d != nullptr ? d : name;
  std::free(d);
  return out;
}

// One CSV row; the name quoted (its quotes doubled: template arguments may hold any character).
void write_row(uint64_t start, uint64_t end, uint32_t stream, const std::string& name) {
  std::string quoted;
  for (char c : name) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  std::fprintf(g_file, "%llu,%llu,%u,\"%s\"\n", static_cast<unsigned long long>(start),
               static_cast<unsigned long long>(end - start), stream, quoted.c_str());
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(g_mutex);
  CUpti_Activity* rec = nullptr;
  while (g_file != nullptr && cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
        write_row(k->start, k->end, k->streamId, demangle(k->name));
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
        write_row(m->start, m->end, m->streamId, "[memcpy]");
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME: {
        const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(rec);
        const char* name = nullptr;
        cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &name);
        write_row(a->start, a->end, 0, std::string("[api] ") + (name != nullptr ? name : "?"));
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
        write_row(m->start, m->end, m->streamId, "[memset]");
        break;
      }
      default:
        break;
    }
  }
  if (g_file != nullptr) std::fflush(g_file);
  std::free(buffer);
}

void finish() {
  cuptiActivityFlushAll(1);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_file != nullptr) std::fclose(g_file);
  g_file = nullptr;
}

bool api_calls() {
  const char* v = std::getenv("BLM_TRACE_API");
  return v != nullptr && std::string(v) == "1";
}

bool ok(CUptiResult r, const char* call) {
  if (r == CUPTI_SUCCESS) return true;
  const char* s = nullptr;
  cuptiGetResultString(r, &s);
  std::fprintf(stderr, "blm_cupti_trace: %s failed: %s (no trace is written)\n", call,
               s != nullptr ? s : "?");
  return false;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int InitializeInjection() {
  const char* path = std::getenv("BLM_TRACE_CSV");
  if (path == nullptr || *path == '\0') path = "cupti_trace.csv";
  g_file = std::fopen(path, "w");
  if (g_file == nullptr) {
    std::fprintf(stderr, "blm_cupti_trace: cannot write %s (BLM_TRACE_CSV)\n", path);
    return 0;
  }
  std::fprintf(g_file, "\"Start (ns)\",\"Duration (ns)\",\"Strm\",\"Name\"\n");
  if (!ok(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed),
          "cuptiActivityRegisterCallbacks") ||
      !ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL),
          "cuptiActivityEnable(CONCURRENT_KERNEL)") ||
      !ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "cuptiActivityEnable(MEMCPY)") ||
      !ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET), "cuptiActivityEnable(MEMSET)") ||
      !ok(cuptiActivityFlushPeriod(kFlushMs), "cuptiActivityFlushPeriod") ||
      (api_calls() && !ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME),
                          "cuptiActivityEnable(RUNTIME)"))) {
    std::fclose(g_file);
    g_file = nullptr;
    return 0;
  }
  std::atexit(finish);
  return 1;
}
