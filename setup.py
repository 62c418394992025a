"""Builds minihires and its one extension, minihires._C.

The C++ CPU kernels are always built. The CUDA kernels are built too when this torch has
CUDA and a CUDA toolkit is found, or when FORCE_CUDA=1 (FORCE_CUDA=0 builds CPU only).
TORCH_CUDA_ARCH_LIST is respected (e.g. TORCH_CUDA_ARCH_LIST=9.0 for an H200).
Build knobs for the CUDA kernels (tests/gpu/run.sh sets both):
    MINIHIRES_PTXAS_VERBOSE=1   print each kernel's registers, stack frame and spills (-Xptxas -v)
    MINIHIRES_NVCC_THREADS=N    nvcc --split-compile=N: optimise one .cu file on N threads (0 = all CPUs)

Install with the torch you already have:  pip install --no-build-isolation -e .
Nothing here touches the network.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit("minihires: torch must be installed first (pip install torch==2.13.0), then "
             "pip install --no-build-isolation -e .")

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> tuple[bool, str]:
    force = os.environ.get("FORCE_CUDA")
    if force == "1":
        return True, "FORCE_CUDA=1"
    if force == "0":
        return False, "FORCE_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def extensions():
    cpp = ["csrc/minihires.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    use_cuda, why = want_cuda()
    print(f"minihires: building the {'CPU + CUDA' if use_cuda else 'CPU'} kernels ({why}); "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}", flush=True)
    if use_cuda:
        # --use_fast_math: faster exp/log/division, so float32 results differ from the CPU's by
        # a few ulps (csrc/README.md); the tests' tolerances allow for it.
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        if os.environ.get("MINIHIRES_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        if os.environ.get("MINIHIRES_NVCC_THREADS"):
            nvcc.append(f"--split-compile={int(os.environ['MINIHIRES_NVCC_THREADS'])}")
        return [CUDAExtension("minihires._C", cpp + cu, include_dirs=[os.path.join(HERE, "csrc")],
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])]
    return [CppExtension("minihires._C", cpp, include_dirs=[os.path.join(HERE, "csrc")],
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


setup(
    name="minihires",
    version="0.1.0",
    description="A from-scratch, readable HiRes-LLaVA with hand-written C++/CUDA kernels",
    packages=find_packages(include=["minihires", "minihires.*"]),
    package_data={"minihires": ["weights/*.pt", "weights/README.md"]},   # the shipped encoders
    python_requires=">=3.10",
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
