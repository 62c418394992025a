"""What a training step computes, against what this machine can compute: model-FLOPs utilisation.

    step_flops(fn)     FLOPs of one call of fn (a forward and backward), counted by
                       torch.utils.flop_counter.FlopCounterMode, in total and per module
    matmul_peak()      FLOP/s of a float32 n x n matmul on this machine, now, with torch's
                       current thread count: the practical limit of dense float32 arithmetic
    utilisation        achieved FLOP/s (step FLOPs x steps / train time) / matmul_peak

Why: samples/s alone says nothing about whether a run is slow because the model is large
or because time goes somewhere else (small ops, memory traffic, Python). Measuring the
limit in the same process, with the same threads, makes the ratio comparable across
machines that differ in vector width, clock and load, where absolute times are not.

Counting conventions are FlopCounterMode's: 2 x multiply-adds of matrix products,
convolutions and attention (dense, T x S: what the kernels compute here, where packed
questions pass a mask); elementwise ops, norms, softmax and the minihires kernels (stitch,
window_attn_pool) count zero. So the figure is the matmul work only, the usual meaning of
"model FLOPs". torch counts the GPU attention kernels but not the CPU one; `step_flops`
adds it with torch's own formulas.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten
CPU_ATTENTION = {   # {op: flops(shapes...)}: F.scaled_dot_product_attention's CPU kernel
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs:
            sdpa_backward_flop_count(grad, q, k, v),
}


def step_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per module path) of one call of fn; the global RNG is left as it was.

    The per-module dict holds every module level FlopCounterMode tracks ("Global" is the
    total; e.g. "HiResLLaVA.vision_tower" a submodule, counted in each of its parents)."""
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    by_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    return counter.get_total_flops(), by_module


def matmul_peak(n: int = 1024, seconds: float = 0.5, min_reps: int = 5,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs): the median of timed calls (at least
    `min_reps`, for at least `seconds`) after two warm-up calls, with torch's current thread
    count. Uses its own generator, so the global RNG is untouched."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype, device=device)
    b = torch.randn(n, n, generator=g, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def once() -> float:
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        return time.perf_counter() - t0

    once(), once()                          # warm-up: first touch, kernel selection
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < seconds:
        times.append(once())
    return 2 * n ** 3 / statistics.median(times)


def utilisation(flops: float, seconds: float, peak: float) -> float:
    """Achieved FLOP/s (flops / seconds) as a fraction of `peak` FLOP/s."""
    return flops / seconds / peak
