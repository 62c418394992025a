"""Benchmark: stitch and split vs the reference and vs clone() of the same bytes.

Sizes:
  clip   8 images of mixed grids (1x1, 1x2, 2x1, 2x2, 2x3, 3x2, 1x3, 2x2 = 28 slices) with
         24x24 tokens and C = 1024: the CLIP-L/336 feature map of a realistic batch.
  large  the same grids repeated to >= 256 MB (GPU) / ~64 MB (CPU): bandwidth-bound.
Bytes moved: each element read once and written once (2 * numel * itemsize).
"""
from __future__ import annotations

import torch

from .. import ops
from ..ops import reference
from .common import clone_bandwidth, device_name, format_table, gbps, median_time

GRIDS = [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2), (1, 3), (2, 2)]
SIZE_CHOICES = ("clip", "paper", "large", "all")  # paper: the same as clip


def sizes(device: str, which: str) -> list[tuple[str, list[tuple[int, int]], int, int]]:
    """(name, grids, g, C) for each benchmark size."""
    if which not in SIZE_CHOICES:
        raise ValueError(f"sizes must be one of {', '.join(SIZE_CHOICES)}, got {which!r}")
    out = []
    if which in ("clip", "all", "paper"):
        out.append(("clip", GRIDS, 24, 1024))
    if which in ("large", "all"):
        target = (256 if device == "cuda" else 64) * 2**20  # bytes of one tensor, fp32
        per = sum(r * c for r, c in GRIDS) * 24 * 24 * 1024 * 4
        out.append(("large", GRIDS * max(1, -(-target // per)), 24, 1024))
    return out


HEADERS = ["size", "slices", "op", "impl", "median ms", "GB/s", "of clone()", "vs reference"]


def measure(name: str, grids: list[tuple[int, int]], g: int, C: int, device: str = "cpu",
            dtype: torch.dtype = torch.float32, iters: int | None = None) -> list[dict]:
    """Time stitch and split of slices [N, g, g, C] with these grids, every implementation.

    -> one dict per (impl, op), keyed by HEADERS, plus "clone GB/s" (the limit it is compared
    with). iters: timed calls per implementation (default 10 on CPU, 50 on CUDA)."""
    iters = iters or (10 if device == "cpu" else 50)
    n = sum(r * c for r, c in grids)
    x = torch.randn(n, g, g, C, device=device, dtype=dtype)
    packed = ops.stitch(x, grids)
    nbytes = 2 * x.numel() * x.element_size()
    limit = clone_bandwidth(x)
    flat = [v for rc in grids for v in rc]
    cands = [("reference", lambda: reference.stitch(x, grids), lambda: reference.split(packed, grids, g, g)),
             (f"{device} kernel v1 (naive)", lambda: torch.ops.minihires.stitch_naive(x, flat),
              lambda: torch.ops.minihires.split_naive(packed, flat, g, g)),
             (f"{device} kernel", lambda: ops.stitch(x, grids), lambda: ops.split(packed, grids, g, g))]
    if ops.backend("stitch", device) == "reference":
        cands = cands[:1]
    times = {}
    for label, fs, fp in cands:
        for op, fn in (("stitch", fs), ("split", fp)):
            times[label, op] = median_time(fn, device, iters=iters)
    limit = max(limit, clone_bandwidth(x))  # again after the kernels: the faster one is the ceiling
    rows = []
    for (label, op), t in times.items():
        bw = gbps(nbytes, t)
        rows.append(dict(zip(HEADERS, [name, f"{n}x{g}x{g}x{C}", op, label, t * 1e3, bw, bw / limit,
                                       times["reference", op] / t]), **{"clone GB/s": limit}))
    return rows


def run(device: str = "cpu", which: str = "all", dtype: torch.dtype = torch.float32) -> str:
    """Times every size; returns (and does not print) the Markdown table."""
    rows = [row for name, grids, g, C in sizes(device, which)
            for row in measure(name, grids, g, C, device, dtype)]
    table = format_table(HEADERS, [[r[h] for h in HEADERS] for r in rows])
    return f"stitch/split on {device_name(device)}, {dtype}, clone() limit measured per size\n\n{table}"
