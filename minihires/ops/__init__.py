"""minihires.ops: the hand-written kernels behind one Python front.

    stitch(slices, grids)            slices [N, h, w, C] -> packed canvases [N*h*w, C]
    split(packed, grids, h, w)       the inverse
    canvases(packed, grids, h, w)    zero-copy views [r*h, c*w, C], one per image
    window_attn_pool(q, k, v, window, scale=None)
                                     each query attends only to its own window of keys

Every op has a pure-PyTorch twin with the same signature in `minihires.ops.reference`.
`backend(op, device)` says which implementation runs.
"""
from __future__ import annotations

import torch

from . import reference  # noqa: F401
from ._extension import LOADED, has_kernel
from .stitch import canvases, split, stitch  # noqa: F401
from .window_attn_pool import window_attn_pool  # noqa: F401

OPS = ("stitch", "split", "window_attn_pool")


def backend(op: str, device: str | torch.device = "cpu") -> str:
    """'cuda kernel', 'cpu kernel' or 'reference': what `op` runs for tensors on `device`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; minihires.ops has {OPS}")
    dev = torch.device(device).type
    if has_kernel(op, dev):
        return f"{dev} kernel"
    return "reference"


__all__ = ["stitch", "split", "canvases", "window_attn_pool", "backend", "reference", "LOADED"]
