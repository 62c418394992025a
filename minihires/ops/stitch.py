"""stitch / split / canvases: the kernel front (checks, fake kernels, autograd).

slices [N, h, w, C] --stitch--> packed [N*h*w, C] (each image's canvas [r*h, c*w, C],
row-major, images one after another) --split--> slices. One call handles a ragged batch
(images with different grids) in one kernel launch. The two are each other's adjoint, so
each one's backward is the other op. Kernels: csrc/cpu/stitch.cpp, csrc/cuda/stitch.cu;
reference twin: minihires.ops.reference.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import reference
from ._extension import LOADED, use_kernel
from .checks import (
    as_int,
    check_split,
    check_stitch,
    flat_grids,
    normalize_grids,
    pair_grids,
    slice_count,
)


def stitch(slices: torch.Tensor, grids: Sequence[Sequence[int]]) -> torch.Tensor:
    """slices [N, h, w, C], grids [(r_i, c_i)] -> packed canvases [N*h*w, C]."""
    grids = normalize_grids(grids)
    check_stitch(slices, grids)
    if use_kernel("stitch", slices):
        return torch.ops.minihires.stitch(slices, flat_grids(grids))
    return reference.stitch(slices, grids)


def split(packed: torch.Tensor, grids: Sequence[Sequence[int]], h: int, w: int) -> torch.Tensor:
    """packed canvases [N*h*w, C] -> slices [N, h, w, C]; the inverse of stitch."""
    grids = normalize_grids(grids)
    check_split(packed, grids, h, w)
    h, w = as_int(h, "h"), as_int(w, "w")
    if use_kernel("split", packed):
        return torch.ops.minihires.split(packed, flat_grids(grids), h, w)
    return reference.split(packed, grids, h, w)


def canvases(packed: torch.Tensor, grids: Sequence[Sequence[int]], h: int, w: int) -> list[torch.Tensor]:
    """Zero-copy views [r_i*h, c_i*w, C] of each image's canvas inside `packed`."""
    return reference.canvases(packed, grids, h, w)


if LOADED:
    # Fake (meta) kernels: output shapes from the int[] grids alone, no data needed. They
    # run the checks of the C++ kernels (csrc/checks.h), so both reject the same input.
    @torch.library.register_fake("minihires::stitch")
    def _stitch_fake(slices, grids):
        check_stitch(slices, pair_grids(grids))
        N, h, w, C = slices.shape
        return slices.new_empty((N * h * w, C))

    @torch.library.register_fake("minihires::split")
    def _split_fake(packed, grids, h, w):
        pairs = pair_grids(grids)
        check_split(packed, pairs, h, w)
        return packed.new_empty((slice_count(pairs), h, w, packed.shape[1]))

    torch.library.register_fake("minihires::stitch_naive")(_stitch_fake)
    torch.library.register_fake("minihires::split_naive")(_split_fake)

    # Autograd: stitch and split are permutations and each other's inverse, hence adjoint:
    # each one's backward is the other op (of the same version), itself differentiable, so
    # double backward works too.
    def _make_autograd(suffix: str):
        stitch_op = getattr(torch.ops.minihires, "stitch" + suffix)
        split_op = getattr(torch.ops.minihires, "split" + suffix)

        def stitch_setup(ctx, inputs, output):
            slices, grids = inputs
            ctx.grids, ctx.h, ctx.w = grids, slices.shape[1], slices.shape[2]

        def stitch_backward(ctx, grad):
            return split_op(grad, ctx.grids, ctx.h, ctx.w), None

        def split_setup(ctx, inputs, output):
            ctx.grids = inputs[1]

        def split_backward(ctx, grad):
            return stitch_op(grad, ctx.grids), None, None, None

        torch.library.register_autograd(f"minihires::stitch{suffix}", stitch_backward, setup_context=stitch_setup)
        torch.library.register_autograd(f"minihires::split{suffix}", split_backward, setup_context=split_setup)

    for _suffix in ("", "_naive"):
        _make_autograd(_suffix)
