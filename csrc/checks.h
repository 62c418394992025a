// Argument checks shared by the CPU and CUDA kernels. Every direct torch.ops.minihires.*
// call (fast and _naive, forward and backward, CPU and CUDA) runs them before touching
// memory, so nothing invalid reaches a kernel: every failure raises a RuntimeError that
// names the argument and what is wrong. Sizes are multiplied and summed with overflow
// checks (kernels/common.h), so crafted grids or windows cannot wrap around int64 and
// pass. The Python front and the fake (meta) kernels check the same things in
// minihires/ops/checks.py and make the same accept/reject decisions.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/common.h"
#include "kernels/stitch.h"
#include "kernels/window_attn_pool.h"

namespace minihires {

inline void check_floating(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", s);
}

// a*b as text for messages: the value, or "a*b (more than int64 holds)".
inline std::string product_text(int64_t a, int64_t b) {
  int64_t p = 0;
  if (mul_fits(a, b, &p)) return std::to_string(p);
  return std::to_string(a) + "*" + std::to_string(b) + " (more than int64 holds)";
}

// ---- stitch / split ----------------------------------------------------------------------
// The validated grids as the kernels' lookup tables (built by grid_tables, kernels/stitch.h).
struct GridTable {
  std::vector<int64_t> slice_start;  // n_images + 1 prefix sums of r_i*c_i
  std::vector<int64_t> cols;         // c_i
  int64_t images() const { return static_cast<int64_t>(cols.size()); }
  int64_t slices() const { return slice_start.back(); }  // N = sum_i r_i*c_i
};

// Validates flat grids [r0, c0, r1, c1, ...] and returns their tables.
inline GridTable check_grids(at::IntArrayRef grids) {
  TORCH_CHECK(grids.size() % 2 == 0, "grids must be (rows, cols) pairs, got ", grids.size(), " ints");
  const int64_t n = static_cast<int64_t>(grids.size() / 2);
  GridTable t{std::vector<int64_t>(n + 1), std::vector<int64_t>(n)};
  const int64_t bad = grid_tables(grids.data(), n, t.slice_start.data(), t.cols.data());
  if (bad >= 0) {
    const int64_t r = grids[2 * bad], c = grids[2 * bad + 1];
    TORCH_CHECK(r > 0 && c > 0, "grids[", bad, "] = (", r, ", ", c, "): rows and cols must be positive");
    TORCH_CHECK(false, "grids[", bad, "] = (", r, ", ", c, "): the slice count of grids[0..", bad,
                "] (sum of rows*cols) is more than int64 holds");
  }
  return t;
}

// N*h*w, the packed row count, or an error when it does not fit int64.
inline int64_t packed_rows(int64_t N, int64_t h, int64_t w) {
  const int64_t f[3] = {N, h, w};
  int64_t rows = 0;
  TORCH_CHECK(product_fits(f, 3, &rows), "N*h*w = ", N, "*", h, "*", w,
              " packed rows is more than int64 holds");
  return rows;
}

inline GridTable check_stitch_args(const at::Tensor& slices, at::IntArrayRef grids) {
  check_floating(slices, "slices");
  TORCH_CHECK(slices.dim() == 4, "slices must be [N, h, w, C], got ", slices.sizes());
  TORCH_CHECK(slices.size(1) > 0 && slices.size(2) > 0, "slice size h x w = ", slices.size(1), " x ",
              slices.size(2), " must be positive");
  GridTable t = check_grids(grids);
  TORCH_CHECK(t.slices() == slices.size(0), "grids hold ", t.slices(), " slices but slices has N = ", slices.size(0));
  packed_rows(slices.size(0), slices.size(1), slices.size(2));
  return t;
}

inline GridTable check_split_args(const at::Tensor& packed, at::IntArrayRef grids, int64_t h, int64_t w) {
  check_floating(packed, "packed");
  TORCH_CHECK(packed.dim() == 2, "packed must be [rows, C], got ", packed.sizes());
  TORCH_CHECK(h > 0 && w > 0, "slice size h x w = ", h, " x ", w, " must be positive");
  // The output [N, h, w, C] needs its first stride, h*w*C (C = 0 counted as 1), to fit int64.
  const int64_t slice[3] = {h, w, std::max<int64_t>(packed.size(1), 1)};
  int64_t slice_numel = 0;
  TORCH_CHECK(product_fits(slice, 3, &slice_numel), "a slice of h x w x C = ", h, " x ", w, " x ", packed.size(1),
              " elements is more than int64 holds");
  GridTable t = check_grids(grids);
  const int64_t rows = packed_rows(t.slices(), h, w);
  TORCH_CHECK(packed.size(0) == rows, "packed has ", packed.size(0), " rows but grids with h x w = ", h, " x ", w,
              " need ", rows);
  return t;
}

// ---- window_attn_pool and its backward ---------------------------------------------------
// Returns the shape of the problem.
inline WindowShape check_window_attn_pool_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               int64_t kh, int64_t kw, double scale) {
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
  int64_t keys = 0;
  TORCH_CHECK(mul_fits(kh, kw, &keys), "window (", kh, ", ", kw, ") has kh*kw = ", product_text(kh, kw), " keys");
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  const WindowShape s{q.size(0), q.size(1), q.size(2), kh, kw, q.size(3), q.size(4)};
  TORCH_CHECK(s.d > 0, "q must have head size d > 0, got ", q.sizes());
  TORCH_CHECK(k.size(0) == s.N, "q has N = ", s.N, " but k has N = ", k.size(0));
  TORCH_CHECK(k.size(3) == s.nh && k.size(4) == s.d, "q has heads, d = ", s.nh, ", ", s.d, " but k has ",
              k.size(3), ", ", k.size(4));
  int64_t H = 0, W = 0;
  const bool fits = mul_fits(s.Hq, kh, &H) && mul_fits(s.Wq, kw, &W);
  TORCH_CHECK(fits && k.size(1) == H && k.size(2) == W, "window (", kh, ", ", kw, ") does not tile: k is ",
              k.size(1), " x ", k.size(2), " but q ", s.Hq, " x ", s.Wq, " needs ", product_text(s.Hq, kh), " x ",
              product_text(s.Wq, kw));
  return s;
}

inline void check_window_attn_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.device() == q.device(),
              "grad_out must match q's dtype and device, got ", grad_out.scalar_type(), " on ", grad_out.device());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 4) && lse.scalar_type() == acc && lse.device() == q.device(),
              "lse must be ", acc, " [N, Hq, Wq, heads] on q's device, got ", lse.scalar_type(), " ", lse.sizes(),
              " on ", lse.device());
}

}  // namespace minihires
