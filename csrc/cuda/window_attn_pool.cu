// window_attn_pool on the GPU (llm.c dev/cuda style: versions from naive up). What the op
// computes, what each version adds, what the backward saves, the napkin math and the note
// on --use_fast_math: csrc/README.md; index math and the softmax backward:
// csrc/kernels/window_attn_pool.h.
//
// v1: a thread per output element (the header's functions, as the CPU `_naive` ops).
// v2: a group of G lanes per row, each lane holding CHUNKS chunks of VEC elements of it in
//    registers; online softmax forward; backward in two passes (dv and dq, then dk).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../checks.h"
#include "../dispatch.h"
#include "../kernels/window_attn_pool.h"

namespace minihires {

namespace {

constexpr int kThreads = 256;
constexpr int kCache = 16;  // v2 backward: p_t, dp_t of keys t < kCache stay in registers

// ------------------------------------------------------------------------------------------
// v1: one thread per output element.
template <typename T, typename Acc>
__global__ void forward_v1_kernel(const T* q, const T* k, const T* v, T* out, Acc* lse, WindowShape s, Acc scale) {
  const int64_t total = s.rows() * s.d;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
    naive_forward_element<Acc>(q, k, v, out, lse, s, e / s.d, e % s.d, scale);
}

template <typename T, typename Acc>
__global__ void backward_v1_kernel(const T* g, const T* q, const T* k, const T* v, const Acc* lse, T* dq, T* dk,
                                   T* dv, WindowShape s, Acc scale) {
  const int64_t total = s.rows() * s.d;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
    naive_backward_element<Acc>(g, q, k, v, lse, dq, dk, dv, s, e / s.d, e % s.d, scale);
}

// ------------------------------------------------------------------------------------------
// v2 helpers. A lane's share of a row: chunks glane + ch*G (ch < CHUNKS) of VEC elements.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T x[VEC];
};

struct Lane {
  int glane, G;    // lane inside its group, group size
  unsigned mask;   // the group's lanes, for __shfl_xor_sync
  int64_t nvec;    // chunks per row = d / VEC
  __device__ Lane(int G_, int64_t nvec_) : G(G_), nvec(nvec_) {
    const int lane = threadIdx.x % 32;
    glane = lane % G;
    mask = G == 32 ? 0xffffffffu : ((1u << G) - 1) << (lane - glane);
  }
  __device__ int64_t chunk(int ch) const { return glane + (int64_t)ch * G; }  // in units of VEC elements
  __device__ bool has(int ch) const { return chunk(ch) < nvec; }
};

template <typename Acc, typename T, int VEC, int CHUNKS>
__device__ __forceinline__ void load(const T* row, const Lane& ln, Acc (&x)[CHUNKS][VEC]) {
#pragma unroll
  for (int ch = 0; ch < CHUNKS; ++ch) {
    if (ln.has(ch)) {
      const Pack<T, VEC> p = reinterpret_cast<const Pack<T, VEC>*>(row)[ln.chunk(ch)];
#pragma unroll
      for (int i = 0; i < VEC; ++i) x[ch][i] = static_cast<Acc>(p.x[i]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) x[ch][i] = 0;
    }
  }
}

// row[chunk] = a * x[chunk], rounded to T.
template <typename Acc, typename T, int VEC, int CHUNKS>
__device__ __forceinline__ void store(T* row, const Lane& ln, const Acc (&x)[CHUNKS][VEC], Acc a) {
#pragma unroll
  for (int ch = 0; ch < CHUNKS; ++ch) {
    if (!ln.has(ch)) continue;
    Pack<T, VEC> p;
#pragma unroll
    for (int i = 0; i < VEC; ++i) p.x[i] = static_cast<T>(a * x[ch][i]);
    reinterpret_cast<Pack<T, VEC>*>(row)[ln.chunk(ch)] = p;
  }
}

// Sum over the group of the lanes' partial dot products; every lane gets the total.
template <typename Acc, int VEC, int CHUNKS>
__device__ __forceinline__ Acc group_dot(const Lane& ln, const Acc (&a)[CHUNKS][VEC], const Acc (&b)[CHUNKS][VEC]) {
  Acc sum = 0;
#pragma unroll
  for (int ch = 0; ch < CHUNKS; ++ch)
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += a[ch][i] * b[ch][i];
  for (int o = ln.G / 2; o > 0; o /= 2) sum += __shfl_xor_sync(ln.mask, sum, o);
  return sum;
}

// v2 forward: one group of G lanes per row (grid-stride over rows), online softmax.
template <typename T, int VEC, int CHUNKS>
__global__ void forward_v2_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  T* __restrict__ out, at::opmath_type<T>* __restrict__ lse, WindowShape s,
                                  at::opmath_type<T> scale, int G) {
  using Acc = at::opmath_type<T>;
  const Lane ln(G, s.d / VEC);
  const int64_t groups = (int64_t)gridDim.x * blockDim.x / G;
  for (int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / G; row < s.rows(); row += groups) {
    const int64_t w = row / s.nh, head = row % s.nh;
    Acc qr[CHUNKS][VEC], kt[CHUNKS][VEC], vt[CHUNKS][VEC], acc[CHUNKS][VEC] = {};
    load(q + row * s.d, ln, qr);
    Acc m = -INFINITY, l = 0;  // running max and sum of exp(s_t - m); exp(-inf) = 0 at t = 0
    for (int64_t t = 0; t < s.keys(); ++t) {
      const int64_t off = key_offset(s, w, head, t);
      load(k + off, ln, kt);
      load(v + off, ln, vt);
      const Acc x = scale * group_dot(ln, qr, kt);
      const Acc m_new = x > m ? x : m;
      const Acc corr = mh_exp(m - m_new), p = mh_exp(x - m_new);
      l = l * corr + p;
#pragma unroll
      for (int ch = 0; ch < CHUNKS; ++ch)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[ch][i] = acc[ch][i] * corr + p * vt[ch][i];
      m = m_new;
    }
    store(out + row * s.d, ln, acc, Acc(1) / l);
    if (ln.glane == 0) lse[row] = m + mh_log(l);
  }
}

// v2 backward: one group per row; pass 1 reads k and v once, pass 2 only writes dk.
template <typename T, int VEC, int CHUNKS>
__global__ void backward_v2_kernel(const T* __restrict__ g, const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, const at::opmath_type<T>* __restrict__ lse,
                                   T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv, WindowShape s,
                                   at::opmath_type<T> scale, int G) {
  using Acc = at::opmath_type<T>;
  const Lane ln(G, s.d / VEC);
  const int64_t groups = (int64_t)gridDim.x * blockDim.x / G, T_ = s.keys();
  for (int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / G; row < s.rows(); row += groups) {
    const int64_t w = row / s.nh, head = row % s.nh;
    const Acc lse_row = lse[row];
    Acc qr[CHUNKS][VEC], gr[CHUNKS][VEC], kt[CHUNKS][VEC], vt[CHUNKS][VEC];
    Acc A[CHUNKS][VEC] = {}, B[CHUNKS][VEC] = {};  // sum_t p_t dp_t k_t, sum_t p_t k_t
    Acc p_cache[kCache], dp_cache[kCache];
    load(q + row * s.d, ln, qr);
    load(g + row * s.d, ln, gr);
    Acc D = 0, psum = 0;
    // Pass 1: keys in blocks of kCache, the inner loop unrolled so the cache index is static.
    for (int64_t t0 = 0; t0 < T_; t0 += kCache) {
#pragma unroll
      for (int u = 0; u < kCache; ++u) {
        const int64_t t = t0 + u;
        if (t >= T_) break;
        const int64_t off = key_offset(s, w, head, t);
        load(k + off, ln, kt);
        load(v + off, ln, vt);
        const Acc p = mh_exp(scale * group_dot(ln, qr, kt) - lse_row);
        const Acc dp = group_dot(ln, gr, vt);
        D += p * dp;
        psum += p;
#pragma unroll
        for (int ch = 0; ch < CHUNKS; ++ch)
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            A[ch][i] += p * dp * kt[ch][i];
            B[ch][i] += p * kt[ch][i];
          }
        store(dv + off, ln, gr, p);  // dv_t = p_t dout
        if (t0 == 0) { p_cache[u] = p; dp_cache[u] = dp; }
      }
    }
    D /= psum;  // sum_t p_t = 1 up to lse's rounding: see the header on D
#pragma unroll
    for (int ch = 0; ch < CHUNKS; ++ch)
#pragma unroll
      for (int i = 0; i < VEC; ++i) A[ch][i] -= D * B[ch][i];
    store(dq + row * s.d, ln, A, scale);  // dq = scale (A - D B)
    // Pass 2: dk_t = scale p_t (dp_t - D) q.
    for (int64_t t0 = 0; t0 < T_; t0 += kCache) {
#pragma unroll
      for (int u = 0; u < kCache; ++u) {
        const int64_t t = t0 + u;
        if (t >= T_) break;
        const int64_t off = key_offset(s, w, head, t);
        Acc p, dp;
        if (t0 == 0) { p = p_cache[u]; dp = dp_cache[u]; }
        else {  // beyond the register cache: recompute from k_t and v_t
          load(k + off, ln, kt);
          load(v + off, ln, vt);
          p = mh_exp(scale * group_dot(ln, qr, kt) - lse_row);
          dp = group_dot(ln, gr, vt);
        }
        store(dk + off, ln, qr, scale * p * (dp - D));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Launch configuration.
int blocks_for(int64_t threads) {
  return (int)std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, 1 << 20));
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// v2 plan: VEC (16-byte vectors or scalars), lanes per row G, chunks per lane (1, 2, 4).
struct Plan {
  int vec, G, chunks;
  bool ok;  // false: a row does not fit 4 chunks per lane; run v1
};

template <typename T>
Plan plan_for(int64_t d, bool aligned) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = (aligned && d % kVec == 0) ? kVec : 1;
  const int64_t nvec = d / vec;
  int G = 1;
  while (G < 32 && G < nvec) G *= 2;
  const int64_t need = (nvec + G - 1) / G;
  const int chunks = need <= 1 ? 1 : need <= 2 ? 2 : 4;
  // A lane covers `chunks` chunks, and holds at most 16 elements of a row (more spill registers).
  return {vec, G, chunks, need <= chunks && chunks * vec <= 16};
}

template <typename T, int VEC>
void forward_v2_launch(const Plan& pl, const T* q, const T* k, const T* v, T* out, at::opmath_type<T>* lse,
                       const WindowShape& s, at::opmath_type<T> scale, cudaStream_t stream) {
  const int blocks = blocks_for(s.rows() * pl.G);
  switch (pl.chunks) {
    case 1: forward_v2_kernel<T, VEC, 1><<<blocks, kThreads, 0, stream>>>(q, k, v, out, lse, s, scale, pl.G); break;
    case 2: forward_v2_kernel<T, VEC, 2><<<blocks, kThreads, 0, stream>>>(q, k, v, out, lse, s, scale, pl.G); break;
    default: if constexpr (VEC <= 4) forward_v2_kernel<T, VEC, 4><<<blocks, kThreads, 0, stream>>>(q, k, v, out, lse, s, scale, pl.G);
  }
}

template <typename T, int VEC>
void backward_v2_launch(const Plan& pl, const T* g, const T* q, const T* k, const T* v,
                        const at::opmath_type<T>* lse, T* dq, T* dk, T* dv, const WindowShape& s,
                        at::opmath_type<T> scale, cudaStream_t stream) {
  const int blocks = blocks_for(s.rows() * pl.G);
  switch (pl.chunks) {
    case 1: backward_v2_kernel<T, VEC, 1><<<blocks, kThreads, 0, stream>>>(g, q, k, v, lse, dq, dk, dv, s, scale, pl.G); break;
    case 2: backward_v2_kernel<T, VEC, 2><<<blocks, kThreads, 0, stream>>>(g, q, k, v, lse, dq, dk, dv, s, scale, pl.G); break;
    default: if constexpr (VEC <= 4) backward_v2_kernel<T, VEC, 4><<<blocks, kThreads, 0, stream>>>(g, q, k, v, lse, dq, dk, dv, s, scale, pl.G);
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// What a launch ran, for last_kernel(): "<op> cuda v1" or "<op> cuda v2 vec=.. G=.. chunks=..".
std::string describe(const char* op, const Plan& pl, Version version) {
  if (version == Version::kNaive) return c10::str(op, " cuda v1");
  if (!pl.ok) return c10::str(op, " cuda v1 (row too long for v2)");
  return c10::str(op, " cuda v2 vec=", pl.vec, " G=", pl.G, " chunks=", pl.chunks);
}

template <Version V>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                           int64_t kh, int64_t kw, double scale) {
  const WindowShape s = check_window_attn_pool_args(q_, k_, v_, kh, kw, scale);
  c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(acc_type(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attn_pool_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    Acc* lp = lse.data_ptr<Acc>();
    const Plan pl = plan_for<scalar_t>(s.d, aligned16({qp, kp, vp, op}));
    if (V == Version::kNaive || !pl.ok)
      forward_v1_kernel<scalar_t, Acc><<<blocks_for(s.rows() * s.d), kThreads, 0, stream>>>(
          qp, kp, vp, op, lp, s, static_cast<Acc>(scale));
    else if (pl.vec == kVec)
      forward_v2_launch<scalar_t, kVec>(pl, qp, kp, vp, op, lp, s, static_cast<Acc>(scale), stream);
    else
      forward_v2_launch<scalar_t, 1>(pl, qp, kp, vp, op, lp, s, static_cast<Acc>(scale), stream);
    record_kernel(describe("window_attn_pool", pl, V));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

template <Version V>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& g_, const at::Tensor& q_,
                                                        const at::Tensor& k_, const at::Tensor& v_,
                                                        const at::Tensor& lse_, int64_t kh, int64_t kw,
                                                        double scale) {
  const WindowShape s = check_window_attn_pool_args(q_, k_, v_, kh, kw, scale);
  check_window_attn_pool_backward_args(g_, q_, lse_);
  c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor g = g_.contiguous(), q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(),
                   lse = lse_.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0) return {dq, dk, dv};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attn_pool_backward_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t *gp = g.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(),
                   *vp = v.data_ptr<scalar_t>();
    const Acc* lp = lse.data_ptr<Acc>();
    scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
    const Plan pl = plan_for<scalar_t>(s.d, aligned16({gp, qp, kp, vp, dqp, dkp, dvp}));
    const Acc sc = static_cast<Acc>(scale);
    if (V == Version::kNaive || !pl.ok)
      backward_v1_kernel<scalar_t, Acc><<<blocks_for(s.rows() * s.d), kThreads, 0, stream>>>(
          gp, qp, kp, vp, lp, dqp, dkp, dvp, s, sc);
    else if (pl.vec == kVec)
      backward_v2_launch<scalar_t, kVec>(pl, gp, qp, kp, vp, lp, dqp, dkp, dvp, s, sc, stream);
    else
      backward_v2_launch<scalar_t, 1>(pl, gp, qp, kp, vp, lp, dqp, dkp, dvp, s, sc, stream);
    record_kernel(describe("window_attn_pool_backward", pl, V));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(minihires, CUDA, m) {
  register_versions(m, "window_attn_pool", &forward<Version::kFast>, &forward<Version::kNaive>);
  register_versions(m, "window_attn_pool_backward", &backward<Version::kFast>, &backward<Version::kNaive>);
}

}  // namespace minihires
