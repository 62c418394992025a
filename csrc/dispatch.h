// What the CPU and CUDA backends share besides the checks: the kernel version, one helper
// that registers an op's fast and _naive versions, and a record of the kernel (and
// variant) that ran last, which torch.ops.minihires.last_kernel() returns so a test can
// assert which code path a dispatcher chose.
#pragma once
#include <torch/library.h>

#include <mutex>
#include <string>
#include <utility>

namespace minihires {

// kNaive is version 1 (one thread / loop iteration per element), kept for teaching, tests
// and benchmarks and registered as `<op>_naive`; kFast is what `<op>` runs.
enum class Version { kFast, kNaive };

// Registers fast as `op` and naive as `op`_naive, e.g.
//   register_versions(m, "stitch", &stitch<Version::kFast>, &stitch<Version::kNaive>);
template <typename Fn>
void register_versions(torch::Library& m, const std::string& op, Fn* fast, Fn* naive) {
  m.impl(op.c_str(), fast);
  m.impl((op + "_naive").c_str(), naive);
}

// The latest launch's description, e.g. "window_attn_pool cuda v2 vec=8 G=8 chunks=1".
// A string under a mutex: well under a microsecond per call, next to a kernel launch.
// (Autograd runs CUDA backward passes on its own thread, so this is process-wide.)
inline std::mutex last_kernel_mutex;
inline std::string last_kernel_name = "none";

inline void record_kernel(std::string description) {
  std::lock_guard<std::mutex> lock(last_kernel_mutex);
  last_kernel_name = std::move(description);
}

inline std::string last_kernel() {
  std::lock_guard<std::mutex> lock(last_kernel_mutex);
  return last_kernel_name;
}

}  // namespace minihires
