"""Benchmark: window_attn_pool forward and backward vs the reference and vs clone().

Sizes (q [N, Hq, Wq, nh, d], k, v [N, Hq*k, Wq*k, nh, d]):
  paper  the Self-Mining sampler at paper scale: N = 20 crops of 24x24 CLIP-L/336 tokens,
         window 2x2, nh = 16 heads of d = 64 (C = 1024) -> 12x12 queries per crop.
  large  GPU-filling (CUDA only): the same with N = 256 crops (k and v ~300 MB each in bf16).
Bytes that must move: forward reads q, k, v once and writes out once; backward reads
grad_out, q, k, v and writes grad_q, grad_k, grad_v once (the kernels' lse, 1/d of q's bytes,
is not counted). GB/s is against those bytes; "of clone()" divides by the bandwidth of
k.clone() measured in the same run, the practical ceiling of a memory-bound kernel.
Default dtype: float32 on CPU, bfloat16 on CUDA (the training dtype there).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import ops
from ..ops import reference
from .common import clone_bandwidth, device_name, format_table, gbps, median_time

SIZES = {"paper": (20, 12, 12, 2, 16, 64), "large": (256, 12, 12, 2, 16, 64)}  # N, Hq, Wq, window, nh, d
SIZE_CHOICES = ("paper", "large", "all")


def size_names(device: str, which: str) -> list[str]:
    if which not in SIZE_CHOICES:
        raise ValueError(f"sizes must be one of {', '.join(SIZE_CHOICES)}, got {which!r}")
    names = ["paper", "large"] if which == "all" else [which]
    return [n for n in names if n != "large" or device == "cuda"]


def _impls(device: str, window: int) -> list[tuple[str, callable]]:
    """(label, fn(q, k, v) -> out) for every implementation runnable on this device."""
    ref = lambda q, k, v: reference.window_attn_pool(q, k, v, window)  # noqa: E731
    impls = [("reference", ref), ("reference + torch.compile", torch.compile(ref, fullgraph=True))]
    if ops.backend("window_attn_pool", device) != "reference":
        if device == "cuda":
            impls.append(("cuda v1 (naive)", lambda q, k, v: torch.ops.minihires.window_attn_pool_naive(
                q, k, v, window, window, q.shape[-1] ** -0.5)[0]))
            impls.append(("cuda v2", lambda q, k, v: ops.window_attn_pool(q, k, v, window)))
        else:
            impls.append((f"{device} kernel", lambda q, k, v: ops.window_attn_pool(q, k, v, window)))
    return impls


HEADERS = ["size", "pass", "impl", "median ms", "GB/s", "of clone()", "vs reference"]


def measure(name: str, shape: tuple[int, int, int, int, int, int], device: str = "cpu",
            dtype: torch.dtype | None = None, iters: int | None = None,
            impls: Sequence[str] | None = None) -> list[dict]:
    """Time forward and backward at shape (N, Hq, Wq, window, nh, d), like SIZES' entries.

    -> one dict per (pass, impl), keyed by HEADERS, plus "clone GB/s" (the limit it is
    compared with) and "moved bytes". impls: the labels to time (default: every one
    runnable here; "reference" is always timed, as the others are compared with it).
    iters: timed calls per implementation (default 10 on CPU, 50 on CUDA)."""
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    iters = iters or (50 if device == "cuda" else 10)
    n, hq, wq, win, nh, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(n, hq, wq, nh, d, device=device, dtype=dtype, generator=gen)             # (N, Hq, Wq, nh, d)
    k = torch.randn(n, hq * win, wq * win, nh, d, device=device, dtype=dtype, generator=gen)  # (N, H, W, nh, d)
    v = torch.randn_like(k)
    g = torch.randn_like(q)
    qb, kb = q.numel() * q.element_size(), k.numel() * k.element_size()
    moved = {"forward": 2 * qb + 2 * kb, "backward": 3 * qb + 4 * kb}
    limit = clone_bandwidth(k, iters=iters)
    chosen = [(label, fn) for label, fn in _impls(device, win)
              if impls is None or label == "reference" or label in impls]
    times = {}
    for label, fn in chosen:
        with torch.no_grad():
            times[label, "forward"] = median_time(lambda: fn(q, k, v), device, iters=iters)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        out = fn(qg, kg, vg)  # one graph, its backward timed again and again
        times[label, "backward"] = median_time(
            lambda: torch.autograd.grad(out, (qg, kg, vg), g, retain_graph=True), device, iters=iters)
    limit = max(limit, clone_bandwidth(k, iters=iters))  # again after: the faster one is the ceiling
    rows = []
    for direction in ("forward", "backward"):
        for label, _ in chosen:
            t = times[label, direction]
            bw = gbps(moved[direction], t)
            rows.append(dict(zip(HEADERS, [name, direction, label, t * 1e3, bw, bw / limit,
                                           times["reference", direction] / t]),
                             **{"clone GB/s": limit, "moved bytes": moved[direction]}))
    return rows


def run(device: str = "cpu", sizes: str = "all", dtype: torch.dtype | None = None) -> str:
    """Times every implementation; returns (and does not print) the Markdown table."""
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    rows, notes = [], []
    for name in size_names(device, sizes):
        n, hq, wq, win, nh, d = SIZES[name]
        measured = measure(name, SIZES[name], device, dtype)
        rows += measured
        notes.append(f"{name}: q [{n}, {hq}, {wq}, {nh}, {d}], k, v [{n}, {hq * win}, {wq * win}, {nh}, {d}], "
                     f"window {win}x{win}; clone() of k: {measured[0]['clone GB/s']:.1f} GB/s")
    if not rows:
        return f"window_attn_pool: no sizes to run on {device} for sizes={sizes!r} (large is CUDA only)"
    table = format_table(HEADERS, [[r[h] for h in HEADERS] for r in rows])
    return (f"window_attn_pool on {device_name(device)}, {dtype}\n" + "\n".join(notes) + "\n\n" + table)
