// stitch / split on the GPU (llm.c dev/cuda style: versions from naive up). What the op
// computes, what each version adds and the napkin math: csrc/README.md; index math:
// csrc/kernels/stitch.h (shared with the CPU kernel and the ctest suite).
//
// v1: a thread per element. v2: a block per run, the widest vector load that fits.
// The grid tables travel by value as a kernel argument (GridChunk), one launch per
// kMaxImages images, so CUDA graph capture and replay need nothing on the host.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "../dispatch.h"
#include "../kernels/stitch.h"

namespace minihires {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxImages = 128;  // images per launch

// The grid tables (csrc/kernels/stitch.h) of up to kMaxImages consecutive images, with
// slice_start counted from the chunk's first slice. 2 KB: well inside the 4 KB that a
// kernel's arguments may take on every CUDA version.
struct GridChunk {
  int64_t n_images;
  int64_t slice_start[kMaxImages + 1];
  int64_t cols[kMaxImages];
};
static_assert(sizeof(GridChunk) <= 4000, "kernel arguments must stay under 4 KB");

// v1: element e of the chunk's packed rows <-> element of its slice rows.
template <typename T, bool kStitch>
__global__ void stitch_v1_kernel(const T* __restrict__ src, T* __restrict__ dst, const GridChunk g, int64_t h,
                                 int64_t w, int64_t C, int64_t total) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = e / C, ch = e % C;
    const int64_t q = slice_row_of(g.slice_start, g.cols, g.n_images, h, w, p);
    if (kStitch) dst[p * C + ch] = src[q * C + ch];
    else dst[q * C + ch] = src[p * C + ch];
  }
}

// v2: block b copies run b (grid-stride over runs) with vectors of type V.
template <typename V, bool kStitch>
__global__ void stitch_v2_kernel(const char* __restrict__ src, char* __restrict__ dst, const GridChunk g, int64_t h,
                                 int64_t w, int64_t row_bytes, int64_t n_runs) {
  const int64_t run_vecs = w * row_bytes / sizeof(V);
  for (int64_t k = blockIdx.x; k < n_runs; k += gridDim.x) {
    const int64_t p = k * w;                                                    // packed row
    const int64_t q = slice_row_of(g.slice_start, g.cols, g.n_images, h, w, p);  // slice row
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
void launch_v2(int vec, const char* s, char* d, const GridChunk& g, int64_t h, int64_t w, int64_t row_bytes,
               int64_t n_runs, cudaStream_t stream) {
  const int blocks = (int)std::min<int64_t>(n_runs, 65535 * 8);
  switch (vec) {
    case 16: stitch_v2_kernel<uint4, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, g, h, w, row_bytes, n_runs); break;
    case 8: stitch_v2_kernel<uint2, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, g, h, w, row_bytes, n_runs); break;
    case 4: stitch_v2_kernel<uint32_t, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, g, h, w, row_bytes, n_runs); break;
    case 2: stitch_v2_kernel<uint16_t, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, g, h, w, row_bytes, n_runs); break;
    default: stitch_v2_kernel<uint8_t, kStitch><<<blocks, kThreads, 0, stream>>>(s, d, g, h, w, row_bytes, n_runs);
  }
}

// Copies src (slice layout for stitch, packed for split) to dst, one launch per chunk of
// up to kMaxImages images. In both layouts a chunk's rows start at row slice_start*h*w of
// its first slice, so src and dst move by the same byte offset.
template <bool kStitch>
void launch(const at::Tensor& src, at::Tensor& dst, const GridTable& grid, int64_t h, int64_t w, Version version) {
  const int64_t C = src.size(-1);
  const int64_t row_bytes = C * src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  // Chunks start at whole runs (w rows), so one vector width fits every chunk.
  const int vec = vector_bytes(w * row_bytes, s, d);
  auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t launches = 0;
  for (int64_t first = 0; first < grid.images(); first += kMaxImages, ++launches) {
    GridChunk g{};
    g.n_images = std::min<int64_t>(kMaxImages, grid.images() - first);
    const int64_t s0 = grid.slice_start[first];
    for (int64_t i = 0; i <= g.n_images; ++i) g.slice_start[i] = grid.slice_start[first + i] - s0;
    for (int64_t i = 0; i < g.n_images; ++i) g.cols[i] = grid.cols[first + i];
    const int64_t offset = s0 * h * w * row_bytes, rows = g.slice_start[g.n_images] * h * w;
    if (version == Version::kNaive) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "stitch_v1", [&] {
        const int64_t total = rows * C;
        const int blocks = (int)std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8);
        stitch_v1_kernel<scalar_t, kStitch><<<blocks, kThreads, 0, stream>>>(
            reinterpret_cast<const scalar_t*>(s + offset), reinterpret_cast<scalar_t*>(d + offset), g, h, w, C,
            total);
      });
    } else {
      launch_v2<kStitch>(vec, s + offset, d + offset, g, h, w, row_bytes, rows / w, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  record_kernel(c10::str(kStitch ? "stitch" : "split", " cuda ",
                         version == Version::kNaive ? "v1" : c10::str("v2 vec=", vec, "B"), " launches=", launches));
}

template <Version V>
at::Tensor stitch(const at::Tensor& slices, at::IntArrayRef grids) {
  const GridTable grid = check_stitch_args(slices, grids);
  c10::cuda::CUDAGuard guard(slices.device());
  const at::Tensor src = slices.contiguous();
  const int64_t N = src.size(0), h = src.size(1), w = src.size(2), C = src.size(3);
  at::Tensor packed = at::empty({N * h * w, C}, src.options());
  if (packed.numel() > 0) launch<true>(src, packed, grid, h, w, V);
  return packed;
}

template <Version V>
at::Tensor split(const at::Tensor& packed, at::IntArrayRef grids, int64_t h, int64_t w) {
  const GridTable grid = check_split_args(packed, grids, h, w);
  c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor src = packed.contiguous();
  at::Tensor slices = at::empty({grid.slices(), h, w, src.size(1)}, src.options());
  if (slices.numel() > 0) launch<false>(src, slices, grid, h, w, V);
  return slices;
}

}  // namespace

TORCH_LIBRARY_IMPL(minihires, CUDA, m) {
  register_versions(m, "stitch", &stitch<Version::kFast>, &stitch<Version::kNaive>);
  register_versions(m, "split", &split<Version::kFast>, &split<Version::kNaive>);
}

}  // namespace minihires
