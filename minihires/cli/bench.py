"""`python -m minihires bench [stitch|window_attn_pool|all]`: kernel benchmark tables.

Every flag is checked before anything is measured; a bad one ends the command with one line,
`error: ...`, and exit status 2. Each table is printed, and appended to --out, as soon as it
is measured, so a run cut short (tests/gpu/run.sh gives it a time limit) keeps the tables it
finished.
"""
from __future__ import annotations

import importlib
import os

import torch

from minihires.cli.errors import (
    ArgumentParser,
    UserError,
    check_device,
    command,
    user_input,
)

BENCHES = {"stitch": "minihires.benchmarks.stitch", "window_attn_pool": "minihires.benchmarks.window_attn_pool"}


@command
def cli_bench(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m minihires bench", description=__doc__)
    p.add_argument("op", nargs="?", default="all", choices=[*BENCHES, "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="all", help="which sizes: stitch has clip (= paper), large, all; "
                                                  "window_attn_pool has paper, large, all")
    p.add_argument("--out", help="also write the tables (Markdown) to this file")
    args = p.parse_args(argv)
    device = check_device(args.device)
    benches = {op: importlib.import_module(BENCHES[op]) for op in (BENCHES if args.op == "all" else [args.op])}
    for op, module in benches.items():
        if args.sizes not in module.SIZE_CHOICES:
            raise UserError(f"--sizes {args.sizes!r}: {op} has sizes {', '.join(module.SIZE_CHOICES)}")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise UserError(f"--out {args.out}: the folder {folder} does not exist")
        with user_input("--out: "):
            open(args.out, "w").close()  # writable, and empty before the first table
    for op, module in benches.items():
        table = module.run(device, args.sizes)
        print(table + "\n", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(table + "\n\n")
    return 0
