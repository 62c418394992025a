// window_attn_pool index math and naive math (csrc/kernels/window_attn_pool.h) against
// nested loops written straight from the definition over [N, H, W, nh, d] tensors.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "kernels/window_attn_pool.h"

using minihires::key_offset;
using minihires::WindowShape;

namespace {

// Offset of element (n, y, x, head, c) of a contiguous [N, H, W, nh, d] tensor.
int64_t at5(const WindowShape& s, int64_t n, int64_t y, int64_t x, int64_t head, int64_t c) {
  const int64_t H = s.Hq * s.kh, W = s.Wq * s.kw;
  return (((n * H + y) * W + x) * s.nh + head) * s.d + c;
}

// key_offset for every (n, i, j, head, a, b) equals the definition: image row i*kh + a,
// col j*kw + b; and every key of k is hit exactly once per head (windows tile the keys).
bool index_matches(const WindowShape& s) {
  const int64_t H = s.Hq * s.kh, W = s.Wq * s.kw;
  std::vector<int> hits(s.N * H * W * s.nh, 0);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t i = 0; i < s.Hq; ++i)
      for (int64_t j = 0; j < s.Wq; ++j)
        for (int64_t head = 0; head < s.nh; ++head)
          for (int64_t a = 0; a < s.kh; ++a)
            for (int64_t b = 0; b < s.kw; ++b) {
              const int64_t w = (n * s.Hq + i) * s.Wq + j, t = a * s.kw + b;
              const int64_t want = at5(s, n, i * s.kh + a, j * s.kw + b, head, 0);
              if (key_offset(s, w, head, t) != want) return false;
              hits[want / s.d]++;
              int64_t w2 = -1, t2 = -1;  // the inverse map gives the window back
              minihires::window_of_key(s, n * H + i * s.kh + a, j * s.kw + b, &w2, &t2);
              if (w2 != w || t2 != t) return false;
            }
  for (int h : hits)
    if (h != 1) return false;
  return true;
}

WindowShape random_shape(std::mt19937& rng) {
  return WindowShape{1 + (int64_t)(rng() % 3), 1 + (int64_t)(rng() % 4), 1 + (int64_t)(rng() % 4),
                     1 + (int64_t)(rng() % 4), 1 + (int64_t)(rng() % 4), 1 + (int64_t)(rng() % 3),
                     1 + (int64_t)(rng() % 9)};
}

std::vector<double> randn(std::mt19937& rng, int64_t n) {
  std::normal_distribution<double> dist;
  std::vector<double> x(n);
  for (auto& e : x) e = dist(rng);
  return x;
}

}  // namespace

TEST(window_index_fixed_shapes) {
  CHECK(index_matches({1, 1, 1, 1, 1, 1, 1}));
  CHECK(index_matches({2, 3, 2, 2, 2, 4, 5}));
  CHECK(index_matches({1, 2, 3, 1, 4, 2, 3}));  // non-square window
  CHECK(index_matches({3, 1, 5, 3, 1, 1, 7}));
}

TEST(window_index_random_shapes) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) CHECK(index_matches(random_shape(rng)));
}

// The naive forward and backward (what the CPU _naive ops and CUDA v1 run) against a direct
// loop: softmax over the window's keys, then sums; gradients against central differences.
TEST(window_naive_math_vs_loops) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 30; ++trial) {
    const WindowShape s = random_shape(rng);
    const int64_t H = s.Hq * s.kh, W = s.Wq * s.kw, d = s.d;
    const auto q = randn(rng, s.rows() * d), k = randn(rng, s.N * H * W * s.nh * d),
               v = randn(rng, s.N * H * W * s.nh * d);
    const double scale = 1.0 / std::sqrt((double)d);
    std::vector<double> out(q.size()), lse(s.rows());
    for (int64_t row = 0; row < s.rows(); ++row)
      for (int64_t c = 0; c < d; ++c)
        minihires::naive_forward_element<double>(q.data(), k.data(), v.data(), out.data(), lse.data(), s, row, c,
                                                 scale);
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t i = 0; i < s.Hq; ++i)
        for (int64_t j = 0; j < s.Wq; ++j)
          for (int64_t head = 0; head < s.nh; ++head) {
            const int64_t row = ((n * s.Hq + i) * s.Wq + j) * s.nh + head;
            std::vector<double> logits, weights;
            double z = 0;
            for (int64_t a = 0; a < s.kh; ++a)
              for (int64_t b = 0; b < s.kw; ++b) {
                double x = 0;
                for (int64_t c = 0; c < d; ++c) x += q[row * d + c] * k[at5(s, n, i * s.kh + a, j * s.kw + b, head, c)];
                logits.push_back(scale * x);
                z += std::exp(scale * x);
              }
            CHECK(std::abs(lse[row] - std::log(z)) < 1e-12 * (1 + std::abs(lse[row])));
            for (int64_t c = 0; c < d; ++c) {
              double want = 0;
              int64_t t = 0;
              for (int64_t a = 0; a < s.kh; ++a)
                for (int64_t b = 0; b < s.kw; ++b, ++t)
                  want += std::exp(logits[t]) / z * v[at5(s, n, i * s.kh + a, j * s.kw + b, head, c)];
              CHECK(std::abs(out[row * d + c] - want) < 1e-12);
            }
          }
  }
}

TEST(window_naive_backward_vs_finite_differences) {
  std::mt19937 rng(13);
  for (int trial = 0; trial < 10; ++trial) {
    const WindowShape s = random_shape(rng);
    const int64_t d = s.d, nk = s.N * s.Hq * s.kh * s.Wq * s.kw * s.nh * d;
    auto q = randn(rng, s.rows() * d), k = randn(rng, nk), v = randn(rng, nk);
    const auto g = randn(rng, s.rows() * d);
    const double scale = 0.7;
    std::vector<double> out(q.size()), lse(s.rows());
    // loss = sum(g * out(q, k, v))
    auto loss = [&]() {
      double L = 0;
      for (int64_t row = 0; row < s.rows(); ++row)
        for (int64_t c = 0; c < d; ++c) {
          minihires::naive_forward_element<double>(q.data(), k.data(), v.data(), out.data(), lse.data(), s, row,
                                                   c, scale);
          L += g[row * d + c] * out[row * d + c];
        }
      return L;
    };
    loss();  // fills lse
    std::vector<double> dq(q.size()), dk(nk), dv(nk);
    for (int64_t row = 0; row < s.rows(); ++row)
      for (int64_t c = 0; c < d; ++c)
        minihires::naive_backward_element<double>(g.data(), q.data(), k.data(), v.data(), lse.data(), dq.data(),
                                                  dk.data(), dv.data(), s, row, c, scale);
    const double eps = 1e-6;
    for (auto [x, dx] : {std::pair{&q, &dq}, {&k, &dk}, {&v, &dv}}) {
      for (int probe = 0; probe < 5; ++probe) {
        const int64_t e = rng() % x->size();
        const double x0 = (*x)[e];
        (*x)[e] = x0 + eps;
        const double up = loss();
        (*x)[e] = x0 - eps;
        const double down = loss();
        (*x)[e] = x0;
        CHECK(std::abs((up - down) / (2 * eps) - (*dx)[e]) < 1e-6 * (1 + std::abs((*dx)[e])));
      }
    }
  }
}
