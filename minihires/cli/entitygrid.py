"""`python -m minihires entitygrid`: export EntityGrid-QA images and questions to a folder."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

from minihires.cli.errors import ArgumentParser, command, user_input
from minihires.data import llava
from minihires.data.batches import conversation
from minihires.data.entitygrid import (
    EXPORT_QUESTIONS,
    MAX_CANVAS_PIXELS,
    TASKS,
    TEST_SEED_BASE,
    TEST_SEED_SPAN,
    EntityGridConfig,
    _export,
    check_export_dir,
    is_export,
    is_test_seed,
    question_texts,
    remove_export,
    sample,
    stream,
    test_seeds,
)
from minihires.model.tokenizer import Tokenizer

LLAVA_JSON = "llava.json"


@command
def cli_entitygrid(argv: list[str]) -> int:
    """`python -m minihires entitygrid --split test --n 1000 --out DIR`."""
    p = ArgumentParser(prog="python -m minihires entitygrid",
                       description="Export EntityGrid-QA images and questions.")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=None,
                   help="first training seed (train split only; the test split is fixed)")
    p.add_argument("--slice-size", type=int, default=EntityGridConfig.slice_size)
    p.add_argument("--rows", type=int, default=EntityGridConfig.rows)
    p.add_argument("--cols", type=int, default=EntityGridConfig.cols)
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated tasks from {','.join(TASKS)} (default: all four "
                        "where continuity boards fit the canvas, as on the default 2x2 one; "
                        "else the first three)")
    p.add_argument("--format", choices=("questions", "llava"), default="questions",
                   help="questions: questions.jsonl only (default); llava: also llava.json "
                        "(LLaVA's conversation format, for `train --data` / `eval --data`) "
                        "and the benchmark's tokenizer.model")
    p.add_argument("--turns", type=int, default=1,
                   help="llava format: questions per image, as `train --turns` draws them "
                        "(default 1)")
    p.add_argument("--vocab-size", type=int, default=256,
                   help="llava format: the tokenizer's pieces (default 256, as `train` "
                        "trains its own)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing export (its files only) in --out")
    args = p.parse_args(argv)
    if not 1 <= args.n <= TEST_SEED_SPAN:
        p.error(f"--n must be in 1..{TEST_SEED_SPAN}, got {args.n}")
    if args.split == "test" and args.seed is not None:
        p.error("--seed applies to --split train only; the test split is fixed")
    if args.turns < 1:                    # before --out is touched (--force empties it)
        p.error(f"--turns must be >= 1, got {args.turns}")
    if args.vocab_size < 8:
        p.error(f"--vocab-size must be >= 8, got {args.vocab_size}")
    seed = 0 if args.seed is None else args.seed
    if args.split == "train" and (seed < 0 or is_test_seed(seed)):
        p.error(f"--seed must be >= 0 and outside the test range "
                f"[{TEST_SEED_BASE}, {TEST_SEED_BASE + TEST_SEED_SPAN}), got {seed}")
    with user_input():
        try:
            cfg = EntityGridConfig(slice_size=args.slice_size, rows=args.rows, cols=args.cols,
                                   tasks=None if args.tasks is None else
                                   tuple(t.strip() for t in args.tasks.split(",")))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--{'tasks' if 'tasks' in str(e) else 'slice-size/--rows/--cols'}"
                             f": {e}") from None
    if cfg.width * cfg.height > MAX_CANVAS_PIXELS:
        p.error(f"--slice-size {args.slice_size} with {args.rows}x{args.cols} slices makes a "
                f"{cfg.width}x{cfg.height} canvas, more than {MAX_CANVAS_PIXELS} pixels")
    out = Path(args.out)
    with user_input():
        check_export_dir(out, args.force)
        if is_export(out):
            remove_export(out)
        out.mkdir(parents=True, exist_ok=True)

    samples = ((sample(s, cfg) for s in test_seeds(args.n)) if args.split == "test"
               else itertools.islice(stream(seed, cfg), args.n))
    step = max(1, args.n // 10)
    print(f"EntityGrid-QA {args.split}: {args.n} samples, canvas {cfg.width}x{cfg.height} "
          f"({cfg.rows}x{cfg.cols} slices of {cfg.slice_size} px) -> {out}")

    def progress(i):
        if i % step == 0 or i == args.n:
            print(f"  {i}/{args.n}", flush=True)

    tasks, on_seam, total = dict.fromkeys(cfg.tasks, 0), 0, 0
    current: list = []

    def tap(it):                                       # the sample behind each record
        for s in it:
            current[:] = [s]
            yield s

    def records():
        nonlocal on_seam, total
        for r in _export(tap(samples), out, cfg, progress):
            tasks[r["task"]] += 1
            on_seam += r["on_seam"]
            total += 1
            yield r

    with user_input(f"--out {out}: "):                # e.g. the disk or the folder is full
        if args.format == "llava":
            llava.write_json_rows(out / LLAVA_JSON, (
                llava.entitygrid_row(i, r["image"], conversation(current[0], args.turns, cfg),
                                     task=r["task"], on_seam=r["on_seam"], seed=r["seed"])
                for i, r in enumerate(records())))
            Tokenizer.train(question_texts(cfg), args.vocab_size,
                            span_words=True).save(out / "tokenizer.model")
        else:
            for _ in records():
                pass
    print("per task: " + ", ".join(f"{t} {tasks[t]}" for t in cfg.tasks))
    print(f"on seam: {on_seam}/{total} ({100.0 * on_seam / total:.1f}%)")
    print(f"wrote {out / EXPORT_QUESTIONS} and {total} images in {out / 'images'}"
          + (f"; {out / LLAVA_JSON} and {out / 'tokenizer.model'}" if args.format == "llava"
             else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli_entitygrid(sys.argv[1:]))
