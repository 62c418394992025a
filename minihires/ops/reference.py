"""Pure-PyTorch twins of every kernel in `minihires.ops`, same signatures.

These are the specification: readable, differentiable by autograd, and used when the
compiled extension is missing. The kernels are tested against them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .checks import (
    as_int,
    check_split,
    check_stitch,
    check_window_attn_pool,
    normalize_grids,
    normalize_window,
    resolve_scale,
)


def stitch(slices: torch.Tensor, grids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Put each image's slices back on its canvas.

    slices [N, h, w, C], grids [(r_i, c_i)] with sum r_i*c_i = N
    -> packed [sum_i r_i*h * c_i*w, C], image i row-major over its [r_i*h, c_i*w] canvas.
    """
    grids = normalize_grids(grids)
    check_stitch(slices, grids)
    _, h, w, C = slices.shape
    out, start = [], 0
    for r, c in grids:
        x = slices[start:start + r * c]            # (r*c, h, w, C)
        x = x.reshape(r, c, h, w, C)               # (r, c, h, w, C)
        x = x.permute(0, 2, 1, 3, 4)               # (r, h, c, w, C)
        out.append(x.reshape(r * h * c * w, C))    # (r*h*c*w, C)
        start += r * c
    if not out:
        return slices.new_empty((0, C))
    return torch.cat(out, dim=0)


def split(packed: torch.Tensor, grids: Sequence[Sequence[int]], h: int, w: int) -> torch.Tensor:
    """The inverse of `stitch`: packed canvases -> slices [N, h, w, C]."""
    grids = normalize_grids(grids)
    check_split(packed, grids, h, w)
    h, w = as_int(h, "h"), as_int(w, "w")
    C = packed.shape[1]
    out, start = [], 0
    for r, c in grids:
        x = packed[start:start + r * h * c * w]   # (r*h*c*w, C)
        x = x.reshape(r, h, c, w, C)               # (r, h, c, w, C)
        x = x.permute(0, 2, 1, 3, 4)               # (r, c, h, w, C)
        out.append(x.reshape(r * c, h, w, C))      # (r*c, h, w, C)
        start += r * h * c * w
    if not out:
        return packed.new_empty((0, h, w, C))
    return torch.cat(out, dim=0)


def canvases(packed: torch.Tensor, grids: Sequence[Sequence[int]], h: int, w: int) -> list[torch.Tensor]:
    """Zero-copy views [r_i*h, c_i*w, C] of each image's canvas inside `packed`."""
    grids = normalize_grids(grids)
    check_split(packed, grids, h, w)
    h, w = as_int(h, "h"), as_int(w, "w")
    C = packed.shape[1]
    views, start = [], 0
    for r, c in grids:
        n = r * h * c * w
        views.append(packed[start:start + n].view(r * h, c * w, C))  # (r*h, c*w, C)
        start += n
    return views


def window_attn_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     window: int | Sequence[int], scale: float | None = None) -> torch.Tensor:
    """Each query (n, i, j, head) attends only to the kh*kw keys of window (i, j).

    q [N, Hq, Wq, nh, d], k, v [N, Hq*kh, Wq*kw, nh, d] -> [N, Hq, Wq, nh, d].
    Softmax is computed in float32 for reduced precisions.
    """
    kh, kw = normalize_window(window)
    check_window_attn_pool(q, k, v, (kh, kw))
    n, hq, wq, nh, d = q.shape
    scale = resolve_scale(scale, d)
    if q.numel() == 0:
        # No queries, an empty result. The windows are not gathered: with Hq or Wq = 0 any
        # window passes the checks, even one too large for a reshape to describe. The sums
        # keep k and v in the graph, so their (empty) gradients come back.
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())

    def windows(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(n, hq, kh, wq, kw, nh, d)          # (N, Hq, kh, Wq, kw, nh, d)
        x = x.permute(0, 1, 3, 5, 2, 4, 6)               # (N, Hq, Wq, nh, kh, kw, d)
        return x.reshape(n, hq, wq, nh, kh * kw, d)      # (N, Hq, Wq, nh, kh*kw, d)

    kw_, vw = windows(k), windows(v)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.einsum("nijhd,nijhtd->nijht", q.to(acc), kw_.to(acc)) * scale  # (N, Hq, Wq, nh, kh*kw)
    p = logits.softmax(dim=-1)
    out = torch.einsum("nijht,nijhtd->nijhd", p, vw.to(acc))                       # (N, Hq, Wq, nh, d)
    return out.to(q.dtype)


def window_attn_pool_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           window: int | Sequence[int], scale: float | None = None) -> torch.Tensor:
    """`window_attn_pool` as plain loops over queries and their window's keys (float64).

    Slow (Python loops over every query): only for tiny sizes, to check the vectorised
    reference above, whose reshape/permute window gathering is the part easy to get wrong.
    """
    kh, kw = normalize_window(window)
    check_window_attn_pool(q, k, v, (kh, kw))
    n, hq, wq, nh, d = q.shape
    scale = resolve_scale(scale, d)
    q64, k64, v64 = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(n):
        for i in range(hq):
            for j in range(wq):
                for h in range(nh):
                    keys = [k64[b, i * kh + a, j * kw + c, h] for a in range(kh) for c in range(kw)]
                    vals = [v64[b, i * kh + a, j * kw + c, h] for a in range(kh) for c in range(kw)]
                    logits = [scale * float(q64[b, i, j, h] @ key) for key in keys]
                    m = max(logits)
                    weights = [math.exp(x - m) for x in logits]
                    z = sum(weights)
                    out[b, i, j, h] = sum(w / z * val for w, val in zip(weights, vals))
    return out.to(device=q.device, dtype=q.dtype)
