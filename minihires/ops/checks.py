"""Input validation shared by the kernel front (`minihires.ops`), the reference twin and the
fake (meta) kernels.

Every check raises a ValueError (a TypeError for a value of the wrong type) whose message
names the argument and what is wrong, so bad input never reaches a kernel (no out-of-bounds
access, no silent wrong answer). The C++ kernels check the same things again in
csrc/checks.h, for direct `torch.ops.minihires.*` calls; the fake kernels run these checks
and must make the same accept/reject decisions. Python ints never overflow, so where the C++
side rejects a size that does not fit int64, these checks compare with INT64_MAX.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INT64_MAX = 2**63 - 1


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def as_int(x, what: str) -> int:
    """x as a Python int. ints and other integer types (numpy integers, one-element integer
    tensors) pass; bools, floats and anything else raise a TypeError naming `what`
    (int(2.7) would silently truncate to 2)."""
    dtype = getattr(x, "dtype", None)
    is_bool = isinstance(x, bool) or dtype == torch.bool or getattr(dtype, "kind", None) == "b"
    if not is_bool:
        try:
            return operator.index(x)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an int, got {x!r} ({type(x).__name__})")


def normalize_grids(grids: Sequence[Sequence[int]] | torch.Tensor) -> list[tuple[int, int]]:
    """Grids as a list of (rows, cols) tuples of positive ints that fit int64."""
    if isinstance(grids, torch.Tensor):
        grids = grids.tolist()
    try:
        items = list(grids)
    except TypeError:
        raise TypeError(f"grids must be a sequence of (rows, cols) pairs, got {grids!r}") from None
    out = []
    for i, g in enumerate(items):
        try:
            pair = tuple(g)
        except TypeError:
            raise ValueError(f"grids[{i}] must be a (rows, cols) pair, got {g!r}") from None
        if len(pair) != 2:
            raise ValueError(f"grids[{i}] must be a (rows, cols) pair, got {pair}")
        r, c = as_int(pair[0], f"grids[{i}] rows"), as_int(pair[1], f"grids[{i}] cols")
        if r <= 0 or c <= 0:
            raise ValueError(f"grids[{i}] = ({r}, {c}): rows and cols must be positive")
        if r > INT64_MAX or c > INT64_MAX:
            raise ValueError(f"grids[{i}] = ({r}, {c}): rows and cols must fit int64")
        out.append((r, c))
    return out


def flat_grids(grids: list[tuple[int, int]]) -> list[int]:
    """[(r0, c0), (r1, c1), ...] -> [r0, c0, r1, c1, ...]: the int[] the schema takes."""
    return [x for rc in grids for x in rc]


def pair_grids(flat: Sequence[int]) -> list[tuple[int, int]]:
    """The schema's flat int[] back to validated (rows, cols) pairs (for the fake kernels)."""
    if len(flat) % 2:
        raise ValueError(f"grids must be (rows, cols) pairs, got {len(flat)} ints")
    return normalize_grids([(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)])


def slice_count(grids: list[tuple[int, int]]) -> int:
    """N = sum r_i*c_i, which the kernels need to fit int64."""
    n = sum(r * c for r, c in grids)
    if n > INT64_MAX:
        raise ValueError(f"grids hold {n} slices (sum of rows*cols), more than int64 holds")
    return n


def packed_rows(n: int, h: int, w: int) -> int:
    """N*h*w, the packed row count, which must fit int64."""
    rows = n * h * w
    if rows > INT64_MAX:
        raise ValueError(f"N*h*w = {n}*{h}*{w} packed rows is more than int64 holds")
    return rows


def check_stitch(slices: torch.Tensor, grids: list[tuple[int, int]]) -> None:
    check_float("slices", slices)
    if slices.dim() != 4:
        raise ValueError(f"slices must be [N, h, w, C], got shape {tuple(slices.shape)}")
    N, h, w, _ = slices.shape
    if h <= 0 or w <= 0:
        raise ValueError(f"slice size h x w = {h} x {w} must be positive")
    n = slice_count(grids)
    if n != N:
        raise ValueError(f"grids {grids} hold {n} slices but slices has N = {N}")
    packed_rows(N, h, w)


def check_split(packed: torch.Tensor, grids: list[tuple[int, int]], h: int, w: int) -> None:
    check_float("packed", packed)
    if packed.dim() != 2:
        raise ValueError(f"packed must be [rows, C], got shape {tuple(packed.shape)}")
    h, w = as_int(h, "h"), as_int(w, "w")
    if h <= 0 or w <= 0:
        raise ValueError(f"slice size h x w = {h} x {w} must be positive")
    C = packed.shape[1]
    if h * w * max(C, 1) > INT64_MAX:  # the output's first stride
        raise ValueError(f"a slice of h x w x C = {h} x {w} x {C} elements is more than int64 holds")
    rows = packed_rows(slice_count(grids), h, w)
    if packed.shape[0] != rows:
        raise ValueError(f"packed has {packed.shape[0]} rows but grids {grids} with "
                         f"h x w = {h} x {w} need {rows}")


def normalize_window(window: int | Sequence[int]) -> tuple[int, int]:
    """(kh, kw) from an int (a square window) or a pair of ints; positive, with kh*kw keys
    fitting int64."""
    seq = isinstance(window, (tuple, list, torch.Size))
    items = tuple(window) if seq else (window,)
    if seq and len(items) != 2:
        raise ValueError(f"window must be an int or a (kh, kw) pair, got {window!r}")
    try:
        kh, kw = (as_int(x, "window") for x in (items if seq else items * 2))
    except TypeError:
        raise TypeError(f"window must be an int or a (kh, kw) pair of ints, got {window!r}") from None
    if kh <= 0 or kw <= 0:
        raise ValueError(f"window ({kh}, {kw}) must be positive")
    if kh * kw > INT64_MAX:
        raise ValueError(f"window ({kh}, {kw}) has kh*kw = {kh * kw} keys, more than int64 holds")
    return kh, kw


def resolve_scale(scale, d: int) -> float:
    """The softmax scale: d^-0.5 when None, else a finite real number (not a bool)."""
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r} ({type(scale).__name__})")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return value


def check_window_attn_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           window: tuple[int, int]) -> None:
    """The tensors' dtypes, devices and shapes for a validated window (normalize_window)."""
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
    if d <= 0:
        raise ValueError(f"q must have head size d > 0, got shape {tuple(q.shape)}")
    if k.shape[0] != n:
        raise ValueError(f"q has N = {n} but k has N = {k.shape[0]}")
    if k.shape[3] != nh or k.shape[4] != d:
        raise ValueError(f"q has heads, d = {nh}, {d} but k has {k.shape[3]}, {k.shape[4]}")
    if k.shape[1] != hq * kh or k.shape[2] != wq * kw:
        raise ValueError(f"window {window} does not tile: k is {k.shape[1]} x {k.shape[2]} but "
                         f"q {hq} x {wq} needs {hq * kh} x {wq * kw}")


def check_window_attn_pool_backward(grad_out: torch.Tensor, q: torch.Tensor, lse: torch.Tensor) -> None:
    """The backward's extra inputs, after check_window_attn_pool."""
    if grad_out.shape != q.shape:
        raise ValueError(f"grad_out must have q's shape {tuple(q.shape)}, got {tuple(grad_out.shape)}")
    if grad_out.dtype != q.dtype or grad_out.device != q.device:
        raise ValueError(f"grad_out must match q's dtype and device, got {grad_out.dtype} on {grad_out.device}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if lse.shape != q.shape[:4] or lse.dtype != acc or lse.device != q.device:
        raise ValueError(f"lse must be {acc} [N, Hq, Wq, heads] on q's device, got {lse.dtype} "
                         f"{tuple(lse.shape)} on {lse.device}")
