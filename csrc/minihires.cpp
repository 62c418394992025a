// Every op schema of minihires in one TORCH_LIBRARY (pytorch/extension-cpp style).
// Backends register implementations in csrc/cpu/*.cpp and csrc/cuda/*.cu; the fake (meta)
// kernels and autograd formulas live in Python (minihires/ops/), next to the checks.
//
// Grids travel as flat int[] [r0, c0, r1, c1, ...] so shapes are known without data.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import minihires._C` loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(minihires, m) {
  // Slice stitching (csrc/kernels/stitch.h). slices [N, h, w, C] <-> packed [N*h*w, C].
  m.def("stitch(Tensor slices, int[] grids) -> Tensor");
  m.def("split(Tensor packed, int[] grids, int h, int w) -> Tensor");
  // Version 1 of each (one thread / one loop iteration per element), kept for teaching and
  // for benchmarks; the ops above run the fast versions.
  m.def("stitch_naive(Tensor slices, int[] grids) -> Tensor");
  m.def("split_naive(Tensor packed, int[] grids, int h, int w) -> Tensor");

  // Windowed attention pooling (csrc/kernels/window_attn_pool.h). q [N, Hq, Wq, nh, d],
  // k, v [N, Hq*kh, Wq*kw, nh, d] -> out [N, Hq, Wq, nh, d] and lse [N, Hq, Wq, nh]
  // (log-sum-exp of each query's logits, float32, float64 for float64: the backward's
  // softmax normaliser). The backward returns (grad_q, grad_k, grad_v). The _naive pair is
  // version 1 (one thread / loop iteration per output element), for tests and benchmarks.
  m.def("window_attn_pool(Tensor q, Tensor k, Tensor v, int kh, int kw, float scale) -> (Tensor, Tensor)");
  m.def("window_attn_pool_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, int kh, int kw, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("window_attn_pool_naive(Tensor q, Tensor k, Tensor v, int kh, int kw, float scale) -> (Tensor, Tensor)");
  m.def("window_attn_pool_backward_naive(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, int kh, "
        "int kw, float scale) -> (Tensor, Tensor, Tensor)");
}
