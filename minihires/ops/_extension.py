"""Loads the compiled extension `minihires._C` once, or says clearly why not.

When the extension is missing (not built, or built for another torch), every op falls back
to its pure-PyTorch twin in `minihires.ops.reference`, and one warning says so.
"""
from __future__ import annotations

import warnings

import torch

try:
    from minihires import _C  # noqa: F401  (loading it registers torch.ops.minihires.*)
    LOADED, LOAD_ERROR = True, None
except ImportError as e:  # not built, or an ABI mismatch with this torch
    LOADED, LOAD_ERROR = False, e

_warned = False


def _registered_kernels() -> dict[tuple[str, str], bool]:
    """{(op, device_type): has a kernel}, read once from the dispatcher at import time
    (so the lookup is a plain dict read that torch.compile can trace)."""
    table = {}
    if not LOADED:
        return table
    for op in ("stitch", "split", "window_attn_pool", "window_attn_pool_backward"):
        if not hasattr(torch.ops.minihires, op):  # no schema: not built into this _C
            continue
        for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            table[op, dev] = torch._C._dispatch_has_kernel_for_dispatch_key(f"minihires::{op}", key)
    return table


KERNELS = _registered_kernels()


def has_kernel(op: str, device_type: str) -> bool:
    """True when torch.ops.minihires.<op> has a kernel registered for this device type."""
    return KERNELS.get((op, device_type), False)


def use_kernel(op: str, t: torch.Tensor) -> bool:
    """Whether `op` on tensor `t` runs a compiled kernel; warns once when none is built."""
    if has_kernel(op, t.device.type):
        return True
    if not LOADED:
        warn_fallback()
    return False


def warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"minihires._C is not available ({LOAD_ERROR}); using the pure-PyTorch reference "
                      "ops. Build the kernels with: pip install --no-build-isolation -e .",
                      RuntimeWarning, stacklevel=3)
