// stitch / split: the index math (torch-free, host and device). What the ops compute, their
// contract and their versions: csrc/README.md.
//
// Layouts: slices [N, h, w, C] (N = sum_i r_i*c_i slices of h x w tokens) and packed
//   [N*h*w, C] (image i's canvas [r_i*h, c_i*w, C], row-major, images one after another).
//   Both ops permute rows of C channels, so the kernels never look at the values.
//
// Index math. Let s_i = sum_{j<i} r_j*c_j be image i's first slice. Image i owns packed
//   rows [s_i*h*w, s_{i+1}*h*w). For a packed row p of image i:
//       local = p - s_i*h*w
//       y = local / (c_i*w), x = local % (c_i*w)        canvas coordinates
//       sr = y / h, yy = y % h, sc = x / w, xx = x % w   slice (sr, sc), pixel (yy, xx) in it
//       slice = s_i + sr*c_i + sc
//       slice row = (slice*h + yy)*w + xx
//   A "run" is w consecutive packed rows starting at a multiple of w: they come from one
//   slice row (same slice, same yy, xx = 0..w-1), so a run is w*C contiguous elements in
//   both layouts. There are N*h runs; run k starts at packed row k*w. The fast kernels
//   copy whole runs; the naive ones recompute the index for every element.
//   csrc/checks.h has checked the sizes first (grid_tables below does the sums): every
//   product here fits int64.
#pragma once
#include "common.h"

namespace minihires {

// The image owning packed row p: the largest i with slice_start[i]*h*w <= p.
// slice_start has n_images + 1 entries (prefix sums of r_i*c_i, last one = N).
MH_HD int64_t image_of_row(const int64_t* slice_start, int64_t n_images, int64_t hw, int64_t p) {
  int64_t lo = 0, hi = n_images - 1;
  while (lo < hi) {  // binary search: O(log images) per lookup
    int64_t mid = (lo + hi + 1) / 2;
    if (slice_start[mid] * hw <= p) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The slice-layout row ([N*h*w] rows of slices [N, h, w, C]) holding packed row p.
MH_HD int64_t slice_row_of(const int64_t* slice_start, const int64_t* cols, int64_t n_images,
                           int64_t h, int64_t w, int64_t p) {
  const int64_t i = image_of_row(slice_start, n_images, h * w, p);
  const int64_t c = cols[i];
  const int64_t local = p - slice_start[i] * h * w;
  const int64_t y = local / (c * w), x = local % (c * w);  // canvas coordinates
  const int64_t sr = y / h, yy = y % h, sc = x / w, xx = x % w;
  const int64_t slice = slice_start[i] + sr * c + sc;
  return (slice * h + yy) * w + xx;
}

// The one builder of the grid tables (the CPU and CUDA kernels and the ctest suite all use
// it): slice_start[0..n] = prefix sums of r_i*c_i (slice_start[n] = N, the slice count) and
// cols[0..n) = c_i, from flat grids [r0, c0, r1, c1, ...]. Host only.
// Returns -1 when every r_i, c_i is positive and every product and running sum fits int64;
// otherwise the first image i where that fails (its r_i or c_i is not positive, or r_i*c_i
// or slice_start[i+1] overflows), and the tables past i are left unset.
inline int64_t grid_tables(const int64_t* flat_grids, int64_t n_images, int64_t* slice_start, int64_t* cols) {
  slice_start[0] = 0;
  for (int64_t i = 0; i < n_images; ++i) {
    const int64_t r = flat_grids[2 * i], c = flat_grids[2 * i + 1];
    int64_t rc = 0;
    if (r <= 0 || c <= 0 || !mul_fits(r, c, &rc) || !add_fits(slice_start[i], rc, &slice_start[i + 1])) return i;
    cols[i] = c;
  }
  return -1;
}

}  // namespace minihires
