"""`python -m minihires ablate`: train the ablation variants and print their table."""
from __future__ import annotations

import json
import os
from pathlib import Path

from minihires.cli.errors import ArgumentParser, UserError, command, user_input
from minihires.cli.train import block_list
from minihires.training import checkpoint as ckpt
from minihires.training import train as T
from minihires.training.encoders import BUNDLED, resolve
from minihires.training.pretrain_vit import BadWeights, file_sha256, read_weights
from minihires.training.ablate import (VARIANTS, finished_run, markdown_table, summary,
                                       variant_config)
from minihires.training.evaluate import results_table


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
    p.add_argument("--tasks", type=lambda v: [t.strip() for t in v.split(",")], default=None,
                   metavar="T1,T2,...", help="EntityGrid-QA tasks (default: train's, all "
                   "four with the box thumbnail)")
    p.add_argument("--thumbnail-filter", choices=("bicubic", "box"), default=None,
                   help="thumbnail resampling for every variant (default: the preset's; tiny: box)")
    p.add_argument("--token-shift", type=int, default=None, metavar="N",
                   help="the LLM's token shift for every variant (default: the preset's; "
                        "0 turns it off)")
    p.add_argument("--sra-layers", type=block_list, default=None, metavar="B1,B2,...",
                   help="ViT blocks that SliceRestore follows in the SRA variant (default: the "
                        "preset's)")
    p.add_argument("--vit-init", metavar="FILE|none", default=None,
                   help="start every variant's vision tower from these weights (`pretrain-vit "
                        "--out`), or none: from scratch (default: each variant from the "
                        "shipped encoder of its kind, minihires/weights)")
    p.add_argument("--sra-vit-init", metavar="FILE|none", default=None,
                   help="the variants with SliceRestore start from these instead (a file "
                        "pretrained with their adapters), or none: from scratch")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads per run (default: torch's, one per core)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--runs", default=None,
                       help="folder for the variants' run folders (default "
                            "runs/ablate-<timestamp>)")
    where.add_argument("--resume", metavar="RUNS", default=None,
                       help="go on in an earlier ablation's folder: finished runs of the same "
                            "configuration are read back, interrupted ones resumed, missing "
                            "ones trained")
    p.add_argument("--out", default=None, help="write the Markdown table here (default RUNS/ablation.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.eval_n < 1:
        p.error(f"--eval-n must be >= 1 (the table needs test scores), got {args.eval_n}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has duplicates: {args.seeds}")
    base = T.TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                         turns=args.turns, lr=args.lr, eval_n=args.eval_n, device=args.device,
                         threads=args.threads, tasks=args.tasks,
                         thumbnail_filter=args.thumbnail_filter, sra_layers=args.sra_layers,
                         token_shift=args.token_shift)

    sra = [k for k in args.variants if VARIANTS[k][1].get("use_sra")]
    if args.sra_vit_init is not None and not sra:
        p.error("--sra-vit-init is for the variants with SliceRestore, and none is chosen")
    if args.vit_init is not None and args.sra_vit_init is not None \
            and len(sra) == len(args.variants):
        p.error("--vit-init is for the variants without SliceRestore, and none is chosen")
    vit_init = BUNDLED if args.vit_init is None else None if args.vit_init == "none" \
        else args.vit_init
    sra_vit_init = vit_init if args.sra_vit_init is None else None \
        if args.sra_vit_init == "none" else args.sra_vit_init
    sha = {}                               # file -> SHA-256, read once, before any training
    for flag, path in (("--vit-init", vit_init), ("--sra-vit-init", sra_vit_init)):
        if path not in (None, BUNDLED):
            with user_input(f"{flag}: "):          # missing or unreadable: one line
                read_weights(path)
                sha[path] = file_sha256(path)

    def encoder(key: str) -> tuple[str, str] | None:
        """(absolute path, SHA-256) of the weights variant `key` starts from, or None."""
        path = sra_vit_init if key in sra else vit_init
        if path == BUNDLED:                # the shipped file of the variant's kind, if any
            shipped = resolve(variant_config(base, key))
            return None if shipped.vit_init is None else \
                (os.path.abspath(shipped.vit_init), shipped.vit_init_sha256)
        return None if path is None else (os.path.abspath(path), sha[path])

    starts = {}                            # variant -> encoder(variant), found once

    def run_config(key: str, seed: int) -> T.TrainConfig:
        path, digest = starts[key] or (None, None)
        return variant_config(base, key, seed=seed, vit_init=path, vit_init_sha256=digest)

    def run_dir(key: str, seed: int) -> Path:
        return runs / f"{key}-seed{seed}"

    with user_input():                     # every run's config, before any training
        for key in args.variants:
            try:
                starts[key] = encoder(key)
                for s in args.seeds:
                    run_config(key, s).validate()
                if starts[key]:                    # the weights fit the variant's ViT
                    T.check_vit_init(run_config(key, args.seeds[0]))
            except ValueError as e:
                raise ValueError(f"variant {key}: {e}") from None
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
    done: dict[tuple[str, int], dict | None] = {}
    if args.resume is not None:
        runs = Path(args.resume)
        if not runs.is_dir():
            p.error(f"--resume {runs}: no such folder")
        with user_input("--resume: "):         # every run folder checked before any training
            for key in args.variants:
                for seed in args.seeds:
                    if (run_dir(key, seed) / ckpt.CONFIG).is_file():   # else: train
                        done[key, seed] = finished_run(run_config(key, seed), run_dir(key, seed))
    else:
        with user_input():
            runs = ckpt.claim_run_dir(args.runs, prefix="ablate-", flag="--runs")
    out = Path(args.out) if args.out else runs / "ablation.md"

    results: dict[str, list[dict]] = {}
    for key in args.variants:
        name = VARIANTS[key][0]
        for seed in args.seeds:
            tc = run_config(key, seed)
            m = done.get((key, seed))
            if m is not None:
                print(f"== {name} (seed {seed}): finished in {run_dir(key, seed)}, "
                      f"read back", flush=True)
                print(results_table(m, f"{name}, seed {seed}"), flush=True)
                results.setdefault(key, []).append(m)
                continue
            print(f"== {name} (seed {seed}): {tc.steps} steps x {tc.batch_size}", flush=True)
            try:
                m = T.train(tc, run_dir(key, seed), resume=(key, seed) in done,
                            progress=not args.quiet)
            except (T.Diverged, BadWeights) as e:     # BadWeights: a file changed meanwhile
                raise UserError(f"{name}, seed {seed}: {e}") from e
            print(results_table(m, f"{name}, seed {seed}"), flush=True)
            results.setdefault(key, []).append(m)
    encoders = {key: starts[key] for key in results}
    table = markdown_table(results, base, args.seeds, encoders)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    figures = out.with_suffix(".json")
    figures.write_text(json.dumps(summary(results, args.seeds, base, encoders), indent=2) + "\n")
    print("\n" + table)
    print(f"\nwrote {out} and {figures}")
    return 0
