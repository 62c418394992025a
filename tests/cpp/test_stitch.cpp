// stitch index math (csrc/kernels/stitch.h) against naive nested loops over canvases, and
// the one grid-table builder (grid_tables) with its overflow checks.
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "kernels/stitch.h"

using minihires::grid_tables;
using minihires::slice_row_of;

namespace {

// Naive: walk every image, canvas pixel (y, x) in row-major order; that is packed order.
std::vector<int64_t> naive_map(const std::vector<int64_t>& grids, int64_t h, int64_t w) {
  std::vector<int64_t> map;
  int64_t first_slice = 0;
  for (size_t i = 0; i < grids.size(); i += 2) {
    const int64_t r = grids[i], c = grids[i + 1];
    for (int64_t y = 0; y < r * h; ++y)
      for (int64_t x = 0; x < c * w; ++x) {
        const int64_t slice = first_slice + (y / h) * c + (x / w);
        map.push_back((slice * h + y % h) * w + x % w);
      }
    first_slice += r * c;
  }
  return map;
}

bool matches(const std::vector<int64_t>& grids, int64_t h, int64_t w) {
  const int64_t n = grids.size() / 2;
  std::vector<int64_t> start(n + 1), cols(n);
  if (grid_tables(grids.data(), n, start.data(), cols.data()) != -1) return false;
  const auto want = naive_map(grids, h, w);
  for (int64_t p = 0; p < (int64_t)want.size(); ++p)
    if (slice_row_of(start.data(), cols.data(), n, h, w, p) != want[p]) return false;
  // Runs: w consecutive packed rows from p = k*w are w consecutive slice rows.
  for (int64_t p = 0; p < (int64_t)want.size(); p += w)
    for (int64_t j = 1; j < w; ++j)
      if (want[p + j] != want[p] + j) return false;
  return true;
}

}  // namespace

TEST(stitch_single_images) {
  CHECK(matches({1, 1}, 3, 2));
  CHECK(matches({2, 2}, 4, 4));
  CHECK(matches({1, 5}, 2, 3));
  CHECK(matches({6, 1}, 3, 1));
}

TEST(stitch_ragged_batch) {
  CHECK(matches({1, 1, 1, 3, 2, 2, 3, 2}, 5, 3));
}

TEST(stitch_random_grids) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 200; ++trial) {
    const int images = 1 + rng() % 5;
    std::vector<int64_t> grids;
    for (int i = 0; i < images; ++i) { grids.push_back(1 + rng() % 4); grids.push_back(1 + rng() % 4); }
    const int64_t h = 1 + rng() % 6, w = 1 + rng() % 6;
    CHECK(matches(grids, h, w));
  }
}

TEST(stitch_is_a_permutation) {
  const std::vector<int64_t> grids = {2, 3, 1, 1, 3, 1};
  const int64_t h = 3, w = 2, n = 3;
  std::vector<int64_t> start(n + 1), cols(n);
  CHECK(grid_tables(grids.data(), n, start.data(), cols.data()) == -1);
  const int64_t rows = start[3] * h * w;
  std::vector<int> seen(rows, 0);
  for (int64_t p = 0; p < rows; ++p) seen[slice_row_of(start.data(), cols.data(), 3, h, w, p)]++;
  for (int s : seen) CHECK(s == 1);
}

// grid_tables: prefix sums and columns, and the first bad image when there is one.
int64_t first_bad(const std::vector<int64_t>& grids) {
  const int64_t n = grids.size() / 2;
  std::vector<int64_t> start(n + 1), cols(n);
  return grid_tables(grids.data(), n, start.data(), cols.data());
}

TEST(grid_tables_prefix_sums) {
  const std::vector<int64_t> grids = {2, 3, 1, 1, 4, 2};
  std::vector<int64_t> start(4), cols(3);
  CHECK(grid_tables(grids.data(), 3, start.data(), cols.data()) == -1);
  CHECK(start == (std::vector<int64_t>{0, 6, 7, 15}));
  CHECK(cols == (std::vector<int64_t>{3, 1, 2}));
  CHECK(first_bad({}) == -1);  // no images: N = 0
}

TEST(grid_tables_rejects_non_positive) {
  CHECK(first_bad({1, 1, 0, 2}) == 1);
  CHECK(first_bad({1, -1}) == 0);
  CHECK(first_bad({2, 2, 3, 3, -4, 1}) == 2);
}

TEST(grid_tables_rejects_overflow) {
  const int64_t big = std::numeric_limits<int64_t>::max();
  CHECK(first_bad({big, 1}) == -1);                       // fits exactly
  CHECK(first_bad({big, 2}) == 0);                        // r*c overflows
  CHECK(first_bad({big, 1, 1, 1}) == 1);                  // the running sum overflows
  CHECK(first_bad({int64_t(1) << 32, int64_t(1) << 30, 1, 1 << 30, 2, 1 << 30}) == -1);  // 2^62 + 3*2^30
  CHECK(first_bad({int64_t(1) << 32, int64_t(1) << 31}) == 0);                           // 2^63
  CHECK(first_bad({1, 1, int64_t(1) << 62, 2}) == 1);
  // A sum that wraps past 2^64 to a small number must not pass (the kernels would index
  // past their buffers): 3458764513820540928 + 2*3458764513820540928 + 8070450532247928834.
  CHECK(first_bad({1, 3458764513820540928, 2, 3458764513820540928, 1, 8070450532247928834}) == 1);
}

TEST(product_fits_is_exact) {
  int64_t p = -1;
  const int64_t ok[3] = {1 << 20, 1 << 20, 1 << 20};
  CHECK(minihires::product_fits(ok, 3, &p) && p == int64_t(1) << 60);
  const int64_t over[3] = {2, int64_t(1) << 62, 1};
  CHECK(!minihires::product_fits(over, 3, &p));
  const int64_t zero[3] = {5, int64_t(1) << 62, 0};  // a zero anywhere: the exact product is 0
  CHECK(minihires::product_fits(zero, 3, &p) && p == 0);
  const int64_t none[1] = {7};
  CHECK(minihires::product_fits(none, 0, &p) && p == 1);
}
