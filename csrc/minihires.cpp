// Every op schema of minihires in one TORCH_LIBRARY (pytorch/extension-cpp style). What each
// op computes, its versions and its reference: csrc/README.md.
// Backends register implementations in csrc/cpu/*.cpp and csrc/cuda/*.cu; the fake (meta)
// kernels and autograd formulas live in Python (minihires/ops/), next to the checks.
//
// Grids travel as flat int[] [r0, c0, r1, c1, ...] so shapes are known without data.
#include <Python.h>
#include <torch/library.h>

#include "dispatch.h"

extern "C" {
// `import minihires._C` loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(minihires, m) {
  // Slice stitching: slices [N, h, w, C] <-> packed [N*h*w, C].
  m.def("stitch(Tensor slices, int[] grids) -> Tensor");
  m.def("split(Tensor packed, int[] grids, int h, int w) -> Tensor");
  // Windowed attention pooling: q [N, Hq, Wq, nh, d], k, v [N, Hq*kh, Wq*kw, nh, d]
  // -> out [N, Hq, Wq, nh, d] and lse [N, Hq, Wq, nh] (float32; float64 for float64).
  // The backward returns (grad_q, grad_k, grad_v).
  m.def("window_attn_pool(Tensor q, Tensor k, Tensor v, int kh, int kw, float scale) -> (Tensor, Tensor)");
  m.def("window_attn_pool_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, int kh, int kw, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  // Version 1 of each (one thread / one loop iteration per element), kept for teaching,
  // tests and benchmarks; the ops above run the fast versions.
  m.def("stitch_naive(Tensor slices, int[] grids) -> Tensor");
  m.def("split_naive(Tensor packed, int[] grids, int h, int w) -> Tensor");
  m.def("window_attn_pool_naive(Tensor q, Tensor k, Tensor v, int kh, int kw, float scale) -> (Tensor, Tensor)");
  m.def("window_attn_pool_backward_naive(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, int kh, "
        "int kw, float scale) -> (Tensor, Tensor, Tensor)");

  // Debugging aid for tests: which kernel (and variant) the latest minihires call ran,
  // e.g. "window_attn_pool cuda v2 vec=8 G=8 chunks=1" (csrc/dispatch.h).
  m.def("last_kernel() -> str", &minihires::last_kernel);
}
