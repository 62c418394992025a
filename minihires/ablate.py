"""`python -m minihires ablate`: the ablation table, every variant trained with the same budget.

    1 thumbnail only          no slices; all g*g thumbnail tokens (no compression), the
                              LLaVA-1.5-style baseline: low resolution, many tokens
    2 slices + avg pool       thumbnail + slices, each crop average-pooled by the window
    3 slices + SMS            average pooling replaced by the Self-Mining sampler
    4 slices + SMS + SRA      + SliceRestore adapters: HiRes-LLaVA
    5 overlap, no SRA         control: slices overlap by OVERLAP instead of restoring seams

Every variant trains from scratch with the same steps, batch size, learning rate and seeds
(`minihires.train`), on the same data stream, and is scored on the same test split. With
several seeds the table shows means (and the spread as min-max). Choices that are ours:
the variant list follows the issue, not the paper's tables; variant 1 keeps all thumbnail
tokens; variant 5 uses overlap 0.25, for which `slicing` shrinks the 2 x 2 canvas to
56 px before cutting (that resampling blurs the 1-pixel patterns too, so the control
measures overlap and resampling together).
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from . import checkpoint as ckpt
from . import train as T
from .cli_errors import ArgumentParser, UserError, command, user_input
from .data import results_table

OVERLAP = 0.25
VARIANTS = {
    "thumbnail": ("thumbnail only", dict(use_slices=False, compression="none")),
    "avg": ("slices + avg pool", dict(use_slices=True, use_sra=False, compression="avg")),
    "sms": ("slices + SMS", dict(use_slices=True, use_sra=False, compression="sms")),
    "sms+sra": ("slices + SMS + SRA", dict(use_slices=True, use_sra=True, compression="sms")),
    "overlap": (f"overlap {OVERLAP}, no SRA", dict(use_slices=True, use_sra=False,
                                                   compression="sms", overlap=OVERLAP)),
}
COLUMNS = [("accuracy", "overall"), ("recognition", "recog."), ("position", "position"),
           ("counting", "counting"), ("on_seam", "on-seam"), ("off_seam", "off-seam"),
           ("discrepancy", "discrep.")]


def _cell(values: list, signed: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    s = fmt.format(statistics.fmean(values))
    if len(values) > 1:
        s += f" ({min(values):.0f}-{max(values):.0f})"
    return s


def markdown_table(results: dict[str, list[dict]], tc: T.TrainConfig, seeds: list[int]) -> str:
    """results: variant key -> that variant's metrics, one per seed."""
    head = ["variant"] + [c[1] for c in COLUMNS] + ["visual tokens", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, runs in results.items():
        row = [VARIANTS[key][0]] + [_cell([r.get(k) for r in runs], k == "discrepancy")
                                    for k, _ in COLUMNS]
        row += [str(runs[0]["visual_tokens"]), f"{statistics.fmean(r['train_time_s'] for r in runs):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"EntityGrid-QA test split, n={tc.eval_n}; accuracy in %, discrepancy = off-seam "
                 f"minus on-seam in points. Each variant: preset {tc.preset}, {tc.steps} steps x "
                 f"{tc.batch_size} images x {tc.turns} questions, lr {tc.lr} "
                 f"(ViT encoder x {tc.vision_lr_scale}), seeds {', '.join(map(str, seeds))}"
                 f"{' (mean, min-max)' if len(seeds) > 1 else ''}.")
    return "\n".join(lines)


@command
def cli_ablate(argv: list[str]) -> int:
    d = T.TrainConfig()
    p = ArgumentParser(prog="python -m minihires ablate",
                       description="Train every ablation variant with one budget and print "
                                   "the table.")
    p.add_argument("--steps", type=int, default=d.steps, help=f"steps per variant (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--turns", type=int, default=d.turns, help=f"questions per training image "
                   f"(default {d.turns})")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    p.add_argument("--eval-n", type=int, default=d.eval_n)
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="which variants (default all, in table order)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads per run (default: torch's, one per core)")
    p.add_argument("--runs", default=None,
                   help="folder for the variants' run folders (default runs/ablate-<timestamp>)")
    p.add_argument("--out", default=None, help="write the Markdown table here (default RUNS/ablation.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.eval_n < 1:
        p.error(f"--eval-n must be >= 1 (the table needs test scores), got {args.eval_n}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has duplicates: {args.seeds}")
    base = T.TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                         turns=args.turns, lr=args.lr, eval_n=args.eval_n, device=args.device,
                         threads=args.threads)
    with user_input():
        for s in args.seeds:
            dataclasses.replace(base, seed=s).validate()
    if args.out is not None:                       # checked now, not after hours of training
        out = Path(args.out)
        parent = next((q for q in out.parents if q.exists()), Path("."))
        if out.is_dir():
            p.error(f"--out {out} is a folder; give the path of the Markdown file to write")
        if not parent.is_dir():
            p.error(f"--out {out}: {parent} is not a folder")
    if args.runs is not None and Path(args.runs).exists() and (
            not Path(args.runs).is_dir() or any(Path(args.runs).iterdir())):
        p.error(f"--runs {args.runs} is not an empty folder; choose another folder")
    with user_input():
        runs = ckpt.claim_run_dir(args.runs, prefix="ablate-", flag="--runs")
    out = Path(args.out) if args.out else runs / "ablation.md"

    results: dict[str, list[dict]] = {}
    for key in args.variants:
        name, switches = VARIANTS[key]
        for seed in args.seeds:
            tc = dataclasses.replace(base, seed=seed, **switches)
            print(f"== {name} (seed {seed}): {tc.steps} steps x {tc.batch_size}", flush=True)
            try:
                m = T.train(tc, runs / f"{key}-seed{seed}", progress=not args.quiet)
            except T.Diverged as e:
                raise UserError(f"{name}, seed {seed}: {e}") from e
            print(results_table(m, f"{name}, seed {seed}"), flush=True)
            results.setdefault(key, []).append(m)
    table = markdown_table(results, base, args.seeds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print("\n" + table)
    print(f"\nwrote {out}")
    return 0
