// Torch-free helpers shared by the C++ (CPU) and CUDA kernels.
//
// Everything under csrc/kernels/ is plain C++ that compiles both with g++ and nvcc, so
// the CPU tests (and the ctest suite, which links no torch at all) exercise exactly the
// index math the GPU runs. MH_HD marks a function callable from host and device code.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MH_HD __host__ __device__ __forceinline__
#else
#define MH_HD inline
#endif

namespace minihires {

// Overflow-checked int64 arithmetic for the host-side checks (GCC/Clang builtins; nvcc
// hands host code to the same compilers). Each returns false, and leaves *out unspecified,
// when the exact result does not fit int64.
inline bool add_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }
inline bool mul_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

// The product of n non-negative factors, when the exact product fits int64. A zero factor
// makes the product 0 wherever it stands (so 5 * 2^62 * 0 is 0, not an overflow): the
// answer depends on the exact product alone, as Python's unbounded ints see it.
inline bool product_fits(const int64_t* factors, int n, int64_t* out) {
  for (int i = 0; i < n; ++i)
    if (factors[i] == 0) { *out = 0; return true; }
  int64_t p = 1;
  for (int i = 0; i < n; ++i)
    if (!mul_fits(p, factors[i], &p)) return false;
  *out = p;
  return true;
}

}  // namespace minihires
