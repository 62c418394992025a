// window_attn_pool on the CPU: fast (parallel over query rows) and naive (a loop iteration
// per output element, the header's functions, which CUDA v1 runs too). What they compute,
// how the versions differ and what the backward saves: csrc/README.md; index math and the
// softmax backward: csrc/kernels/window_attn_pool.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "../kernels/window_attn_pool.h"

namespace minihires {

namespace {

// Dot product of n elements in Acc; `omp simd` lets the compiler split the sum into lanes.
template <typename Acc, typename T>
inline Acc dot(const Acc* a, const T* b, int64_t n) {
  Acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += a[c] * static_cast<Acc>(b[c]);
  return sum;
}

template <typename T>
void forward_rows(const T* q, const T* k, const T* v, T* out, at::opmath_type<T>* lse, const WindowShape& s,
                  at::opmath_type<T> scale) {
  using Acc = at::opmath_type<T>;
  const int64_t d = s.d, T_ = s.keys();
  at::parallel_for(0, s.rows(), std::max<int64_t>(1, 32768 / std::max<int64_t>(1, T_ * d)),
                   [&](int64_t begin, int64_t end) {
    std::vector<Acc> q_acc(d), out_acc(d), logits(T_);  // scratch, one set per thread chunk
    for (int64_t row = begin; row < end; ++row) {
      const int64_t w = row / s.nh, head = row % s.nh;
      for (int64_t c = 0; c < d; ++c) q_acc[c] = static_cast<Acc>(q[row * d + c]);
      Acc m = 0;
      for (int64_t t = 0; t < T_; ++t) {  // s_t = scale * q.k_t, and their max
        logits[t] = scale * dot(q_acc.data(), k + key_offset(s, w, head, t), d);
        m = t == 0 ? logits[t] : std::max(m, logits[t]);
      }
      Acc l = 0;
      for (int64_t t = 0; t < T_; ++t) l += mh_exp(logits[t] - m);
      const Acc lse_row = m + mh_log(l);
      std::fill(out_acc.begin(), out_acc.end(), Acc(0));
      for (int64_t t = 0; t < T_; ++t) {  // out = sum_t p_t v_t
        const Acc p = mh_exp(logits[t] - lse_row);
        const T* vt = v + key_offset(s, w, head, t);
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) out_acc[c] += p * static_cast<Acc>(vt[c]);
      }
      for (int64_t c = 0; c < d; ++c) out[row * d + c] = static_cast<T>(out_acc[c]);
      lse[row] = lse_row;
    }
  });
}

template <typename T>
void backward_rows(const T* dout, const T* q, const T* k, const T* v, const at::opmath_type<T>* lse, T* dq, T* dk,
                   T* dv, const WindowShape& s, at::opmath_type<T> scale) {
  using Acc = at::opmath_type<T>;
  const int64_t d = s.d, T_ = s.keys();
  at::parallel_for(0, s.rows(), std::max<int64_t>(1, 16384 / std::max<int64_t>(1, T_ * d)),
                   [&](int64_t begin, int64_t end) {
    std::vector<Acc> q_acc(d), g_acc(d), dq_acc(d), p(T_), dp(T_);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t w = row / s.nh, head = row % s.nh;
      for (int64_t c = 0; c < d; ++c) {
        q_acc[c] = static_cast<Acc>(q[row * d + c]);
        g_acc[c] = static_cast<Acc>(dout[row * d + c]);
      }
      Acc D = 0, psum = 0;
      for (int64_t t = 0; t < T_; ++t) {  // p_t from the saved lse, dp_t = dout.v_t
        const int64_t off = key_offset(s, w, head, t);
        p[t] = mh_exp(scale * dot(q_acc.data(), k + off, d) - lse[row]);
        dp[t] = dot(g_acc.data(), v + off, d);
        D += p[t] * dp[t];
        psum += p[t];
      }
      D /= psum;  // sum_t p_t = 1 up to lse's rounding: see the header on D
      std::fill(dq_acc.begin(), dq_acc.end(), Acc(0));
      for (int64_t t = 0; t < T_; ++t) {  // key t belongs to this window only: plain stores
        const int64_t off = key_offset(s, w, head, t);
        const Acc ds = scale * p[t] * (dp[t] - D);  // scale folded in: ds/dlogit * scale
        const T* kt = k + off;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          dq_acc[c] += ds * static_cast<Acc>(kt[c]);
          dk[off + c] = static_cast<T>(ds * q_acc[c]);
          dv[off + c] = static_cast<T>(p[t] * g_acc[c]);
        }
      }
      for (int64_t c = 0; c < d; ++c) dq[row * d + c] = static_cast<T>(dq_acc[c]);
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <Version V>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                           int64_t kh, int64_t kw, double scale) {
  const WindowShape s = check_window_attn_pool_args(q_, k_, v_, kh, kw, scale);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(acc_type(q.scalar_type())));
  record_kernel(V == Version::kFast ? "window_attn_pool cpu fast" : "window_attn_pool cpu naive");
  if (out.numel() == 0) return {out, lse};  // N, Hq, Wq or nh is 0 (d > 0 is checked): lse is empty too
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attn_pool_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    Acc* lp = lse.data_ptr<Acc>();
    if constexpr (V == Version::kFast) {
      forward_rows<scalar_t>(qp, kp, vp, op, lp, s, static_cast<Acc>(scale));
    } else {
      at::parallel_for(0, s.rows() * s.d, 256, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e)
          naive_forward_element<Acc>(qp, kp, vp, op, lp, s, e / s.d, e % s.d, static_cast<Acc>(scale));
      });
    }
  });
  return {out, lse};
}

template <Version V>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out_, const at::Tensor& q_,
                                                        const at::Tensor& k_, const at::Tensor& v_,
                                                        const at::Tensor& lse_, int64_t kh, int64_t kw,
                                                        double scale) {
  const WindowShape s = check_window_attn_pool_args(q_, k_, v_, kh, kw, scale);
  check_window_attn_pool_backward_args(grad_out_, q_, lse_);
  const at::Tensor g = grad_out_.contiguous(), q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(),
                   lse = lse_.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  record_kernel(V == Version::kFast ? "window_attn_pool_backward cpu fast" : "window_attn_pool_backward cpu naive");
  if (q.numel() == 0) return {dq, dk, dv};  // then k and v are empty too
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attn_pool_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t *gp = g.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(),
                   *vp = v.data_ptr<scalar_t>();
    const Acc* lp = lse.data_ptr<Acc>();
    scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
    if constexpr (V == Version::kFast) {
      backward_rows<scalar_t>(gp, qp, kp, vp, lp, dqp, dkp, dvp, s, static_cast<Acc>(scale));
    } else {
      at::parallel_for(0, s.rows() * s.d, 256, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e)
          naive_backward_element<Acc>(gp, qp, kp, vp, lp, dqp, dkp, dvp, s, e / s.d, e % s.d,
                                      static_cast<Acc>(scale));
      });
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(minihires, CPU, m) {
  register_versions(m, "window_attn_pool", &forward<Version::kFast>, &forward<Version::kNaive>);
  register_versions(m, "window_attn_pool_backward", &backward<Version::kFast>, &backward<Version::kNaive>);
}

}  // namespace minihires
