// Argument checks shared by the CPU and CUDA implementations (the Python front checks the
// same things first; these guard direct torch.ops.minihires calls). Every failure names
// the argument and what is wrong; nothing invalid reaches a kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "kernels/window_attn_pool.h"

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

// window_attn_pool and its backward. Returns the shape of the problem.
inline WindowShape check_window_attn_pool_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        int64_t kh, int64_t kw) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    check_floating(*t, name);
    TORCH_CHECK(t->dim() == 5, name, " must be [N, H, W, heads, d], got ", t->sizes());
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "q, k, v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(kh > 0 && kw > 0, "window (", kh, ", ", kw, ") must be positive");
  const WindowShape s{q.size(0), q.size(1), q.size(2), kh, kw, q.size(3), q.size(4)};
  TORCH_CHECK(s.d > 0, "q must have head size d > 0, got ", q.sizes());
  TORCH_CHECK(k.size(0) == s.N, "q has N = ", s.N, " but k has N = ", k.size(0));
  TORCH_CHECK(k.size(3) == s.nh && k.size(4) == s.d, "q has heads, d = ", s.nh, ", ", s.d, " but k has ",
              k.size(3), ", ", k.size(4));
  TORCH_CHECK(k.size(1) == s.Hq * kh && k.size(2) == s.Wq * kw, "window (", kh, ", ", kw,
              ") does not tile: k is ", k.size(1), " x ", k.size(2), " but q ", s.Hq, " x ", s.Wq, " needs ",
              s.Hq * kh, " x ", s.Wq * kw);
  return s;
}

inline void check_window_attn_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.device() == q.device(),
              "grad_out must match q's dtype and device");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 4) && lse.scalar_type() == acc && lse.device() == q.device(),
              "lse must be ", acc, " [N, Hq, Wq, heads] on q's device, got ", lse.scalar_type(), " ", lse.sizes());
}

}  // namespace minihires
