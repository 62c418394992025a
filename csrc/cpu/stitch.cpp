// stitch / split on the CPU: fast (a memcpy per run, runs in parallel) and naive (a loop
// iteration per element). What they compute and how the versions differ: csrc/README.md;
// index math: csrc/kernels/stitch.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../checks.h"
#include "../dispatch.h"
#include "../kernels/stitch.h"

namespace minihires {
namespace {

enum class Direction { kStitch, kSplit };

// Copies between slice layout and packed layout (both contiguous, rows of C elements).
void copy_runs(const at::Tensor& src, at::Tensor& dst, const GridTable& grid, int64_t h, int64_t w, Direction dir,
               Version version) {
  const int64_t C = src.size(-1);
  const int64_t rows = grid.slices() * h * w;  // fits: checked by check_stitch_args / check_split_args
  if (rows == 0 || C == 0) return;
  const int64_t n_images = grid.images();
  const int64_t* slice_start = grid.slice_start.data();
  const int64_t* cols = grid.cols.data();
  const int64_t esize = src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());

  if (version == Version::kFast) {
    const int64_t run_bytes = w * C * esize;
    at::parallel_for(0, rows / w, /*grain_size=*/std::max<int64_t>(1, 16384 / run_bytes),
                     [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t p = k * w;  // first packed row of run k
        const int64_t q = slice_row_of(slice_start, cols, n_images, h, w, p);
        if (dir == Direction::kStitch) std::memcpy(d + p * C * esize, s + q * C * esize, run_bytes);
        else std::memcpy(d + q * C * esize, s + p * C * esize, run_bytes);
      }
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "stitch_naive", [&] {
    const scalar_t* sp = reinterpret_cast<const scalar_t*>(s);
    scalar_t* dp = reinterpret_cast<scalar_t*>(d);
    at::parallel_for(0, rows * C, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t p = e / C, ch = e % C;
        const int64_t q = slice_row_of(slice_start, cols, n_images, h, w, p);
        if (dir == Direction::kStitch) dp[p * C + ch] = sp[q * C + ch];
        else dp[q * C + ch] = sp[p * C + ch];
      }
    });
  });
}

const char* version_name(Version v) { return v == Version::kFast ? "fast" : "naive"; }

template <Version V>
at::Tensor stitch(const at::Tensor& slices, at::IntArrayRef grids) {
  const GridTable grid = check_stitch_args(slices, grids);
  const at::Tensor src = slices.contiguous();
  const int64_t N = src.size(0), h = src.size(1), w = src.size(2), C = src.size(3);
  at::Tensor packed = at::empty({N * h * w, C}, src.options());
  copy_runs(src, packed, grid, h, w, Direction::kStitch, V);
  record_kernel(std::string("stitch cpu ") + version_name(V));
  return packed;
}

template <Version V>
at::Tensor split(const at::Tensor& packed, at::IntArrayRef grids, int64_t h, int64_t w) {
  const GridTable grid = check_split_args(packed, grids, h, w);
  const at::Tensor src = packed.contiguous();
  at::Tensor slices = at::empty({grid.slices(), h, w, src.size(1)}, src.options());
  copy_runs(src, slices, grid, h, w, Direction::kSplit, V);
  record_kernel(std::string("split cpu ") + version_name(V));
  return slices;
}

}  // namespace

TORCH_LIBRARY_IMPL(minihires, CPU, m) {
  register_versions(m, "stitch", &stitch<Version::kFast>, &stitch<Version::kNaive>);
  register_versions(m, "split", &split<Version::kFast>, &split<Version::kNaive>);
}

}  // namespace minihires
