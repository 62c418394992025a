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
