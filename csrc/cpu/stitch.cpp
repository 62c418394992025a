// stitch / split on the CPU. Index math: csrc/kernels/stitch.h.
//
// fast:  at::parallel_for over runs (w consecutive packed rows = w*C contiguous elements
//        in both layouts); each run is one memcpy, which the C library vectorises.
// naive: one loop iteration per element, the index recomputed each time (version 1).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "../checks.h"
#include "../kernels/stitch.h"

namespace minihires {
namespace {

enum class Direction { kStitch, kSplit };

// Copies between slice layout and packed layout. src and dst are contiguous.
void copy_runs(const at::Tensor& src, at::Tensor& dst, at::IntArrayRef grids, int64_t h, int64_t w,
               Direction dir, bool naive) {
  const int64_t n_images = grids.size() / 2;
  const int64_t rows = src.numel() == 0 ? 0 : src.numel() / src.size(-1);  // N*h*w
  if (rows == 0) return;
  const int64_t C = src.size(-1);
  const auto table = grid_table(grids);
  const int64_t* slice_start = table.data();
  const int64_t* cols = table.data() + n_images + 1;
  const int64_t esize = src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());

  if (!naive) {
    const int64_t run_bytes = w * C * esize;
    at::parallel_for(0, rows / w, /*grain_size=*/std::max<int64_t>(1, 16384 / std::max<int64_t>(1, run_bytes)),
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

at::Tensor stitch_impl(const at::Tensor& slices, at::IntArrayRef grids, bool naive) {
  check_stitch_args(slices, grids);
  const at::Tensor src = slices.contiguous();
  const int64_t N = src.size(0), h = src.size(1), w = src.size(2), C = src.size(3);
  at::Tensor packed = at::empty({N * h * w, C}, src.options());
  if (N > 0) copy_runs(src, packed, grids, h, w, Direction::kStitch, naive);
  return packed;
}

at::Tensor split_impl(const at::Tensor& packed, at::IntArrayRef grids, int64_t h, int64_t w, bool naive) {
  check_split_args(packed, grids, h, w);
  const at::Tensor src = packed.contiguous();
  const int64_t N = check_grids(grids), C = src.size(1);
  at::Tensor slices = at::empty({N, h, w, C}, src.options());
  if (N > 0) copy_runs(src, slices, grids, h, w, Direction::kSplit, naive);
  return slices;
}

at::Tensor stitch_cpu(const at::Tensor& slices, at::IntArrayRef grids) { return stitch_impl(slices, grids, false); }
at::Tensor split_cpu(const at::Tensor& packed, at::IntArrayRef grids, int64_t h, int64_t w) {
  return split_impl(packed, grids, h, w, false);
}
at::Tensor stitch_naive_cpu(const at::Tensor& slices, at::IntArrayRef grids) { return stitch_impl(slices, grids, true); }
at::Tensor split_naive_cpu(const at::Tensor& packed, at::IntArrayRef grids, int64_t h, int64_t w) {
  return split_impl(packed, grids, h, w, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(minihires, CPU, m) {
  m.impl("stitch", &stitch_cpu);
  m.impl("split", &split_cpu);
  m.impl("stitch_naive", &stitch_naive_cpu);
  m.impl("split_naive", &split_naive_cpu);
}

}  // namespace minihires
