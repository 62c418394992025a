// window_attn_pool: the index math and the naive per-element math (torch-free, host and
// device). What the op computes, its contract and its versions: csrc/README.md.
//
// Layouts (all contiguous): q [N, Hq, Wq, nh, d], k, v [N, H, W, nh, d] with H = Hq*kh,
//   W = Wq*kw. Query (n, i, j, head) attends to the T = kh*kw keys of its window: rows
//   i*kh .. i*kh+kh-1, cols j*kw .. j*kw+kw-1.
//
// Index math. Number the windows w = (n*Hq + i)*Wq + j and the query rows
//   row = w*nh + head, so q/out row `row` starts at element row*d (lse at element row).
//   Key t of the window (t = a*kw + b, row-major inside the window) sits at image row
//   i*kh + a, col j*kw + b. Because n*H = n*Hq*kh, the global key row over all images is
//       key_row = (n*Hq + i)*kh + a = (w / Wq)*kh + a,   key_col = (w % Wq)*kw + b
//   and its element offset in k (and v) is ((key_row*W + key_col)*nh + head)*d.
//   The inverse (window_of_key) maps every key (key_row, key_col) to exactly one
//   (window, t): windows tile the key grid, so each key has one owner. The backward uses
//   this: every dk, dv element is written by exactly one query, with no atomics.
//   No window is ever copied out: kernels read keys in place with this strided math.
//   csrc/checks.h has checked the sizes first: every offset here fits int64.
//
// Softmax per row: s_t = scale * q.k_t, lse = log sum_t exp(s_t), p_t = exp(s_t - lse),
//   out = sum_t p_t v_t. Backward (p from the saved lse; csrc/README.md says what is saved):
//   dv_t = p_t dout, dp_t = dout.v_t, D = sum_t p_t dp_t, ds_t = p_t (dp_t - D),
//   dq = scale * sum_t ds_t k_t, dk_t = scale * ds_t q.
//   D is computed as sum_t p_t dp_t / sum_t p_t. In exact math sum_t p_t = 1; in floating
//   point, p_t = exp(s_t - lse) all carry the same relative error e from the rounding of lse,
//   and dp_t - D then has an error e*D that no longer scales with ds_t: when the dp_t are
//   close to each other (ds_t small, by cancellation) that error dominates. Dividing by
//   sum_t p_t removes the common factor, so the error stays relative to ds_t.
#pragma once
#include <cmath>

#include "common.h"

namespace minihires {

struct WindowShape {
  int64_t N, Hq, Wq, kh, kw, nh, d;
  MH_HD int64_t windows() const { return N * Hq * Wq; }
  MH_HD int64_t rows() const { return N * Hq * Wq * nh; }  // query rows (window, head)
  MH_HD int64_t keys() const { return kh * kw; }           // T, keys per window
  MH_HD int64_t W() const { return Wq * kw; }              // key columns per image row
};

// Element offset of key t of window w for head `head` in k / v [N, H, W, nh, d].
MH_HD int64_t key_offset(const WindowShape& s, int64_t w, int64_t head, int64_t t) {
  const int64_t key_row = (w / s.Wq) * s.kh + t / s.kw;  // over all images: n*H + i*kh + a
  const int64_t key_col = (w % s.Wq) * s.kw + t % s.kw;
  return ((key_row * s.W() + key_col) * s.nh + head) * s.d;
}

// The inverse: key (key_row over all images, key_col) belongs to window *w as its key *t.
MH_HD void window_of_key(const WindowShape& s, int64_t key_row, int64_t key_col, int64_t* w, int64_t* t) {
  *w = (key_row / s.kh) * s.Wq + key_col / s.kw;
  *t = (key_row % s.kh) * s.kw + key_col % s.kw;
}

MH_HD float mh_exp(float x) { return expf(x); }
MH_HD double mh_exp(double x) { return exp(x); }
MH_HD float mh_log(float x) { return logf(x); }
MH_HD double mh_log(double x) { return log(x); }

// scale * q_row . k_t, accumulated in Acc (T may be half / bfloat16: converted per element).
template <typename Acc, typename T>
MH_HD Acc logit(const T* q, const T* k, const WindowShape& s, int64_t row, int64_t t, Acc scale) {
  const T* qr = q + row * s.d;
  const T* kt = k + key_offset(s, row / s.nh, row % s.nh, t);
  Acc dot = 0;
  for (int64_t c = 0; c < s.d; ++c) dot += static_cast<Acc>(qr[c]) * static_cast<Acc>(kt[c]);
  return scale * dot;
}

// log sum_t exp(s_t) of one row, in one pass (online max; T >= 1 so s_0 seeds the max).
template <typename Acc, typename T>
MH_HD Acc row_logsumexp(const T* q, const T* k, const WindowShape& s, int64_t row, Acc scale) {
  Acc m = logit<Acc>(q, k, s, row, 0, scale), l = 1;
  for (int64_t t = 1; t < s.keys(); ++t) {
    const Acc x = logit<Acc>(q, k, s, row, t, scale);
    if (x > m) { l = l * mh_exp(m - x) + 1; m = x; }
    else l += mh_exp(x - m);
  }
  return m + mh_log(l);
}

// Version 1 forward, one output element (row, c): recomputes the row's logits (d-fold
// redundant work across the row's d elements; simple, and the loads hit cache).
// Writes out[row, c], and lse[row] when c == 0.
template <typename Acc, typename T>
MH_HD void naive_forward_element(const T* q, const T* k, const T* v, T* out, Acc* lse, const WindowShape& s,
                                 int64_t row, int64_t c, Acc scale) {
  const Acc lse_row = row_logsumexp<Acc>(q, k, s, row, scale);
  Acc acc = 0;
  for (int64_t t = 0; t < s.keys(); ++t) {
    const Acc p = mh_exp(logit<Acc>(q, k, s, row, t, scale) - lse_row);
    acc += p * static_cast<Acc>(v[key_offset(s, row / s.nh, row % s.nh, t) + c]);
  }
  out[row * s.d + c] = static_cast<T>(acc);
  if (c == 0) lse[row] = lse_row;
}

// dp_t = dout_row . v_t
template <typename Acc, typename T>
MH_HD Acc dprob(const T* dout, const T* v, const WindowShape& s, int64_t row, int64_t t) {
  const T* g = dout + row * s.d;
  const T* vt = v + key_offset(s, row / s.nh, row % s.nh, t);
  Acc dot = 0;
  for (int64_t c = 0; c < s.d; ++c) dot += static_cast<Acc>(g[c]) * static_cast<Acc>(vt[c]);
  return dot;
}

// Version 1 backward, channel c of one row: writes dq[row, c] and, for every key t of the
// row's window, dk_t[c] and dv_t[c]. p_t is recomputed from the saved lse; D = sum p_t dp_t
// is recomputed from the row's own dp_t (all of them are needed for ds_t anyway).
template <typename Acc, typename T>
MH_HD void naive_backward_element(const T* dout, const T* q, const T* k, const T* v, const Acc* lse, T* dq,
                                  T* dk, T* dv, const WindowShape& s, int64_t row, int64_t c, Acc scale) {
  const int64_t w = row / s.nh, head = row % s.nh;
  Acc D = 0, psum = 0;
  for (int64_t t = 0; t < s.keys(); ++t) {
    const Acc p = mh_exp(logit<Acc>(q, k, s, row, t, scale) - lse[row]);
    D += p * dprob<Acc>(dout, v, s, row, t);
    psum += p;
  }
  D /= psum;  // see the note on D at the top of this file
  Acc dq_c = 0;
  for (int64_t t = 0; t < s.keys(); ++t) {
    const int64_t off = key_offset(s, w, head, t);
    const Acc p = mh_exp(logit<Acc>(q, k, s, row, t, scale) - lse[row]);
    const Acc ds = p * (dprob<Acc>(dout, v, s, row, t) - D);
    dq_c += scale * ds * static_cast<Acc>(k[off + c]);
    dk[off + c] = static_cast<T>(scale * ds * static_cast<Acc>(q[row * s.d + c]));
    dv[off + c] = static_cast<T>(p * static_cast<Acc>(dout[row * s.d + c]));
  }
  dq[row * s.d + c] = static_cast<T>(dq_c);
}

}  // namespace minihires
