"""Timing and reporting shared by the kernel benchmarks.

Speed is reported as ratios measured in the same run (kernel vs reference, kernel vs a
plain clone() of the same bytes), because these machines are shared and noisy: absolute
times drift, ratios much less.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 3,
                iters: int = 20, min_time: float = 0.0) -> float:
    """Median wall time of fn() in seconds (CUDA: synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def clone_bandwidth(t: torch.Tensor, **kw) -> float:
    """GB/s of t.clone() (read + write): the practical limit for a pure copy, same run.

    clone() allocates its output as the kernels do, so both pay the same allocation and
    first-touch cost (large on a CPU, where big buffers come fresh from the OS); the
    benchmarks measure it before and after the kernels and keep the faster."""
    secs = median_time(lambda: t.clone(), t.device, **kw)
    return 2 * t.numel() * t.element_size() / secs / 1e9


def gbps(nbytes: int, secs: float) -> float:
    return nbytes / secs / 1e9


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable in a terminal and pasteable into docs/results.md)."""
    def cell(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)
    body = [[cell(x) for x in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in body])


def parse_tables(text: str) -> list[tuple[str, list[dict]]]:
    """The tables of a saved benchmark report (what `python -m minihires bench --out` writes)
    -> [(title, rows)], each row a dict keyed by the table's headers, numbers as floats.
    A table's title is the first non-blank line after the previous table."""
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    def value(c: str):
        try:
            return float(c)
        except ValueError:
            return c

    tables, title, expect_title, block = [], "", True, []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(cells(line))
            continue
        if block:                                     # a table just ended; block[1] is |---|
            tables.append((title, [dict(zip(block[0], map(value, r))) for r in block[2:]]))
            block, expect_title = [], True
        if line.strip() and expect_title:
            title, expect_title = line.strip(), False
    return tables


def device_name(device: torch.device | str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"CPU ({torch.get_num_threads()} threads)"
