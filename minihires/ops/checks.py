"""Input validation shared by the kernel front (`minihires.ops`) and the reference twin.

Every check raises a ValueError whose message names the argument and what is wrong, so
bad input never reaches a kernel (no out-of-bounds access, no silent wrong answer).
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def normalize_grids(grids: Sequence[Sequence[int]] | torch.Tensor) -> list[tuple[int, int]]:
    """Grids as a list of (rows, cols) tuples of positive ints."""
    if isinstance(grids, torch.Tensor):
        grids = grids.tolist()
    out = []
    for i, g in enumerate(grids):
        if len(g) != 2:
            raise ValueError(f"grids[{i}] must be a (rows, cols) pair, got {tuple(g)}")
        r, c = int(g[0]), int(g[1])
        if r <= 0 or c <= 0:
            raise ValueError(f"grids[{i}] = ({r}, {c}): rows and cols must be positive")
        out.append((r, c))
    return out


def flat_grids(grids: list[tuple[int, int]]) -> list[int]:
    """[(r0, c0), (r1, c1), ...] -> [r0, c0, r1, c1, ...]: the int[] the schema takes."""
    return [x for rc in grids for x in rc]


def pair_grids(flat: Sequence[int]) -> list[tuple[int, int]]:
    if len(flat) % 2:
        raise ValueError(f"flat grids must have even length, got {len(flat)}")
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def check_stitch(slices: torch.Tensor, grids: list[tuple[int, int]]) -> None:
    check_float("slices", slices)
    if slices.dim() != 4:
        raise ValueError(f"slices must be [N, h, w, C], got shape {tuple(slices.shape)}")
    n = sum(r * c for r, c in grids)
    if n != slices.shape[0]:
        raise ValueError(f"grids {grids} hold {n} slices but slices has N = {slices.shape[0]}")
    h, w, _ = slices.shape[1:]
    if slices.shape[0] > 0 and (h <= 0 or w <= 0):
        raise ValueError(f"slice size h x w = {h} x {w} must be positive")


def check_split(packed: torch.Tensor, grids: list[tuple[int, int]], h: int, w: int) -> None:
    check_float("packed", packed)
    if packed.dim() != 2:
        raise ValueError(f"packed must be [rows, C], got shape {tuple(packed.shape)}")
    if h <= 0 or w <= 0:
        raise ValueError(f"slice size h x w = {h} x {w} must be positive")
    rows = sum(r * c for r, c in grids) * h * w
    if packed.shape[0] != rows:
        raise ValueError(f"packed has {packed.shape[0]} rows but grids {grids} with "
                         f"h x w = {h} x {w} need {rows}")


def normalize_window(window: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(window, int):
        window = (window, window)
    if len(window) != 2:
        raise ValueError(f"window must be an int or a (kh, kw) pair, got {window}")
    kh, kw = int(window[0]), int(window[1])
    if kh <= 0 or kw <= 0:
        raise ValueError(f"window ({kh}, {kw}) must be positive")
    return kh, kw


def check_window_attn_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           window: tuple[int, int]) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 5:
            raise ValueError(f"{name} must be [N, H, W, heads, d], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    n, hq, wq, nh, d = q.shape
    kh, kw = window
    if k.shape[0] != n:
        raise ValueError(f"q has N = {n} but k has N = {k.shape[0]}")
    if k.shape[3] != nh or k.shape[4] != d:
        raise ValueError(f"q has heads, d = {nh}, {d} but k has {k.shape[3]}, {k.shape[4]}")
    if k.shape[1] != hq * kh or k.shape[2] != wq * kw:
        raise ValueError(f"window {window} does not tile: k is {k.shape[1]} x {k.shape[2]} but "
                         f"q {hq} x {wq} needs {hq * kh} x {wq * kw}")
