"""Preflight of tests/gpu/run.sh: names everything the GPU check needs and cannot find.

    python tests/gpu/preflight.py [--dry-run]

Needed on the GPU machine: Python >= 3.10; torch built with CUDA, seeing a GPU; nvcc; setuptools
and ninja (the build); pytest, hypothesis, numpy (the kernel tests); triton (torch.compile on
CUDA, in the tests and the benchmarks). Optional: compute-sanitizer (without it the sanitizer
steps are skipped, and say so). With --dry-run (a machine without a GPU) the GPU, CUDA torch,
nvcc, triton and compute-sanitizer are reported but not required.
Exit status 0 when nothing needed is missing, else 1; one line per item either way.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    missing = []

    def item(name: str, ok: bool, detail: str, needed: bool = True) -> None:
        state = "ok" if ok else ("MISSING" if needed else "absent (not needed here)")
        print(f"  {name:<18} {state:<8} {detail}")
        if needed and not ok:
            missing.append(name)

    item("python >= 3.10", sys.version_info >= (3, 10), sys.version.split()[0])
    for module in ("torch", "numpy", "pytest", "hypothesis", "setuptools"):
        try:
            m = importlib.import_module(module)
            item(module, True, getattr(m, "__version__", ""))
        except ImportError as e:
            item(module, False, str(e))
    try:
        import triton
        item("triton", True, triton.__version__, needed=not dry)
    except ImportError as e:
        item("triton", False, str(e), needed=not dry)
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    except ImportError:
        print("preflight: torch is missing; nothing else can be checked")
        return 1
    item("ninja", is_ninja_available(), shutil.which("ninja") or "(torch builds serially without it)")
    item("torch with CUDA", torch.version.cuda is not None, f"torch {torch.__version__}, CUDA {torch.version.cuda}",
         needed=not dry)
    gpu = torch.cuda.is_available()
    item("a CUDA GPU", gpu, torch.cuda.get_device_name(0) if gpu else "torch.cuda.is_available() is False",
         needed=not dry)
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    item("nvcc", bool(nvcc and os.path.exists(nvcc)), nvcc or "not on PATH and no CUDA_HOME", needed=not dry)
    sanitizer = shutil.which("compute-sanitizer")
    if not sanitizer and nvcc and os.path.exists(os.path.join(os.path.dirname(nvcc), "compute-sanitizer")):
        sanitizer = os.path.join(os.path.dirname(nvcc), "compute-sanitizer")
    item("compute-sanitizer", bool(sanitizer), sanitizer or "not on PATH: the sanitizer steps will be skipped",
         needed=False)
    if missing:
        print(f"preflight: missing {', '.join(missing)}")
        return 1
    print("preflight: everything needed is here")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
