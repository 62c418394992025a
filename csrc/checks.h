// Argument checks shared by the CPU and CUDA implementations (the Python front checks the
// same things first; these guard direct torch.ops.minihires calls). Every failure names
// the argument and what is wrong; nothing invalid reaches a kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace minihires {

inline void check_floating(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", s);
}

// Validates flat grids [r0, c0, ...] and returns N = sum r_i*c_i.
inline int64_t check_grids(at::IntArrayRef grids) {
  TORCH_CHECK(grids.size() % 2 == 0, "grids must be (rows, cols) pairs, got ", grids.size(), " ints");
  int64_t n = 0;
  for (size_t i = 0; i < grids.size(); i += 2) {
    TORCH_CHECK(grids[i] > 0 && grids[i + 1] > 0, "grids[", i / 2, "] = (", grids[i], ", ",
                grids[i + 1], "): rows and cols must be positive");
    n += grids[i] * grids[i + 1];
  }
  return n;
}

inline void check_stitch_args(const at::Tensor& slices, at::IntArrayRef grids) {
  check_floating(slices, "slices");
  TORCH_CHECK(slices.dim() == 4, "slices must be [N, h, w, C], got ", slices.sizes());
  const int64_t n = check_grids(grids);
  TORCH_CHECK(n == slices.size(0), "grids hold ", n, " slices but slices has N = ", slices.size(0));
}

inline void check_split_args(const at::Tensor& packed, at::IntArrayRef grids, int64_t h, int64_t w) {
  check_floating(packed, "packed");
  TORCH_CHECK(packed.dim() == 2, "packed must be [rows, C], got ", packed.sizes());
  TORCH_CHECK(h > 0 && w > 0, "slice size h x w = ", h, " x ", w, " must be positive");
  const int64_t n = check_grids(grids);
  TORCH_CHECK(packed.size(0) == n * h * w, "packed has ", packed.size(0), " rows but grids with h x w = ",
              h, " x ", w, " need ", n * h * w);
}

// slice_start (n+1) then cols (n), as one int64 vector, for the kernels' lookups.
inline std::vector<int64_t> grid_table(at::IntArrayRef grids) {
  const int64_t n = grids.size() / 2;
  std::vector<int64_t> table(2 * n + 1);
  int64_t start = 0;
  for (int64_t i = 0; i < n; ++i) {
    table[i] = start;
    table[n + 1 + i] = grids[2 * i + 1];
    start += grids[2 * i] * grids[2 * i + 1];
  }
  table[n] = start;
  return table;
}

}  // namespace minihires
