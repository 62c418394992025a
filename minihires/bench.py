"""`python -m minihires bench [stitch|window_attn_pool|all]`: kernel benchmark tables."""
from __future__ import annotations

import argparse
import importlib

import torch

BENCHES = {"stitch": "minihires.benchmarks.stitch", "window_attn_pool": "minihires.benchmarks.window_attn_pool"}


def cli_bench(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m minihires bench", description=__doc__)
    p.add_argument("op", nargs="?", default="all", choices=[*BENCHES, "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="all", help="which sizes (see each benchmark): e.g. paper, large, all")
    p.add_argument("--out", help="also write the tables (Markdown) to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU")
    tables = []
    for op in BENCHES if args.op == "all" else [args.op]:
        table = importlib.import_module(BENCHES[op]).run(args.device, args.sizes)
        print(table + "\n", flush=True)
        tables.append(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(tables) + "\n")
    return 0
