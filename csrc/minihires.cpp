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
}
