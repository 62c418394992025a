// stitch / split on the GPU (llm.c dev/cuda style: versions from naive up).
// Index math: csrc/kernels/stitch.h (shared with the CPU kernel and the ctest suite).
//
// v1 (naive): one thread per element. Each thread finds its image by binary search and
//    recomputes the full index, then copies one element. Reads along C are coalesced, but
//    every thread does ~20 integer ops (divisions) for one 2-4 byte copy, and element-sized
//    accesses issue 4-8x more memory transactions than needed.
// v2 (runs, vectorised): one block per run (w packed rows = w*C contiguous elements in both
//    layouts, csrc/kernels/stitch.h), index math once per block, then the block streams the
//    run with 16-byte (uint4) loads and stores when the run's byte size and both pointers
//    allow it (8/4/2/1-byte vectors otherwise). Consecutive threads touch consecutive 16-byte
//    words: fully coalesced along C.
//
// Napkin math: 2 * N*h*w*C*sizeof(T) bytes move (read once, write once). For the CLIP-L/336
//    shape (8 images of 2x2 slices, 24x24 tokens, C = 1024, bf16): 32*576*1024*2*2 = 75 MB,
//    about 16 us at H200's ~4.8 TB/s. A clone() of the tensor is the practical ceiling.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"
#include "../kernels/stitch.h"

namespace minihires {
namespace {

constexpr int kThreads = 256;

// v1: element e of the packed tensor <-> element of the slice tensor.
template <typename T, bool kStitch>
__global__ void stitch_v1_kernel(const T* __restrict__ src, T* __restrict__ dst, const int64_t* table,
                                 int64_t n_images, int64_t h, int64_t w, int64_t C, int64_t total) {
  const int64_t* slice_start = table;
  const int64_t* cols = table + n_images + 1;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = e / C, ch = e % C;
    const int64_t q = slice_row_of(slice_start, cols, n_images, h, w, p);
    if (kStitch) dst[p * C + ch] = src[q * C + ch];
    else dst[q * C + ch] = src[p * C + ch];
  }
}

// v2: block b copies run b (grid-stride over runs) with vectors of type V.
template <typename V, bool kStitch>
__global__ void stitch_v2_kernel(const char* __restrict__ src, char* __restrict__ dst, const int64_t* table,
                                 int64_t n_images, int64_t h, int64_t w, int64_t row_bytes, int64_t n_runs) {
  const int64_t* slice_start = table;
  const int64_t* cols = table + n_images + 1;
  const int64_t run_vecs = w * row_bytes / sizeof(V);
  for (int64_t k = blockIdx.x; k < n_runs; k += gridDim.x) {
    const int64_t p = k * w;                                             // packed row
    const int64_t q = slice_row_of(slice_start, cols, n_images, h, w, p);  // slice row
    const V* s = reinterpret_cast<const V*>(src + (kStitch ? q : p) * row_bytes);
    V* d = reinterpret_cast<V*>(dst + (kStitch ? p : q) * row_bytes);
    for (int64_t i = threadIdx.x; i < run_vecs; i += blockDim.x) d[i] = s[i];
  }
}

// Largest vector width (16, 8, 4, 2, 1 bytes) dividing the run size and both pointers.
int vector_bytes(int64_t run_bytes, const void* a, const void* b) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  for (int v = 16; v > 1; v /= 2)
    if (run_bytes % v == 0 && pa % v == 0 && pb % v == 0) return v;
  return 1;
}

template <bool kStitch>
void launch(const at::Tensor& src, at::Tensor& dst, at::IntArrayRef grids, int64_t h, int64_t w, bool naive) {
  const int64_t n_images = grids.size() / 2;
  const int64_t C = src.size(-1);
  const int64_t rows = src.numel() / C;  // N*h*w
  // Grid tables travel to the device as one small int64 tensor, copied on the current stream.
  const auto host = grid_table(grids);
  at::Tensor table = at::empty({(int64_t)host.size()}, src.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemcpyAsync(table.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t),
                                 cudaMemcpyHostToDevice, stream));
  const int64_t* t = table.data_ptr<int64_t>();
  if (naive) {
    const int64_t total = rows * C;
    const int blocks = (int)std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "stitch_v1", [&] {
      stitch_v1_kernel<scalar_t, kStitch><<<blocks, kThreads, 0, stream>>>(
          src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), t, n_images, h, w, C, total);
    });
  } else {
    const int64_t row_bytes = C * src.element_size();
    const int64_t n_runs = rows / w;
    const int blocks = (int)std::min<int64_t>(n_runs, 65535 * 8);
    const char* s = static_cast<const char*>(src.data_ptr());
    char* d = static_cast<char*>(dst.data_ptr());
    switch (vector_bytes(w * row_bytes, s, d)) {
      case 16: stitch_v2_kernel<uint4, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, t, n_images, h, w, row_bytes, n_runs); break;
      case 8: stitch_v2_kernel<uint2, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, t, n_images, h, w, row_bytes, n_runs); break;
      case 4: stitch_v2_kernel<uint32_t, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, t, n_images, h, w, row_bytes, n_runs); break;
      case 2: stitch_v2_kernel<uint16_t, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, t, n_images, h, w, row_bytes, n_runs); break;
      default: stitch_v2_kernel<uint8_t, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, t, n_images, h, w, row_bytes, n_runs);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor stitch_impl(const at::Tensor& slices, at::IntArrayRef grids, bool naive) {
  check_stitch_args(slices, grids);
  c10::cuda::CUDAGuard guard(slices.device());
  const at::Tensor src = slices.contiguous();
  const int64_t N = src.size(0), h = src.size(1), w = src.size(2), C = src.size(3);
  at::Tensor packed = at::empty({N * h * w, C}, src.options());
  if (packed.numel() > 0) launch<true>(src, packed, grids, h, w, naive);
  return packed;
}

at::Tensor split_impl(const at::Tensor& packed, at::IntArrayRef grids, int64_t h, int64_t w, bool naive) {
  check_split_args(packed, grids, h, w);
  c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor src = packed.contiguous();
  const int64_t N = check_grids(grids), C = src.size(1);
  at::Tensor slices = at::empty({N, h, w, C}, src.options());
  if (slices.numel() > 0) launch<false>(src, slices, grids, h, w, naive);
  return slices;
}

at::Tensor stitch_cuda(const at::Tensor& s, at::IntArrayRef g) { return stitch_impl(s, g, false); }
at::Tensor split_cuda(const at::Tensor& p, at::IntArrayRef g, int64_t h, int64_t w) { return split_impl(p, g, h, w, false); }
at::Tensor stitch_naive_cuda(const at::Tensor& s, at::IntArrayRef g) { return stitch_impl(s, g, true); }
at::Tensor split_naive_cuda(const at::Tensor& p, at::IntArrayRef g, int64_t h, int64_t w) { return split_impl(p, g, h, w, true); }

}  // namespace

TORCH_LIBRARY_IMPL(minihires, CUDA, m) {
  m.impl("stitch", &stitch_cuda);
  m.impl("split", &split_cuda);
  m.impl("stitch_naive", &stitch_naive_cuda);
  m.impl("split_naive", &split_naive_cuda);
}

}  // namespace minihires
