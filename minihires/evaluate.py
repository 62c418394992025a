"""`python -m minihires eval RUN_DIR`: re-score a run folder on the EntityGrid-QA test split.

Prints the same table as `train` (`data.results_table`), and on request two diagnostics of
what the model has not learned (README, "What is left"):
    --by-entities  accuracy per task and number of entities in the image (`data.by_entities`)
    --attention    per LLM layer and head, attention from the answer position to the asked
                   entity and to the other one in two-entity images (`minihires.probe`)
"""
from __future__ import annotations

import argparse
import time

import torch

from . import checkpoint as ckpt
from . import data, probe
from .data import results_table
from .entitygrid import test_split
from .train import TrainConfig


def cli_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m minihires eval",
                                description="Re-score a run folder on the EntityGrid-QA test split.")
    p.add_argument("run_dir", help="a folder written by `python -m minihires train`")
    p.add_argument("--n", type=int, default=None, help="test samples (default: the run's eval_n)")
    p.add_argument("--batch-size", type=int, default=180)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--by-entities", action="store_true",
                   help="also print accuracy per task and number of entities in the image")
    p.add_argument("--attention", action="store_true",
                   help="also print, per LLM layer and head, the attention from the answer "
                        "position to the asked entity and to the other one (two-entity "
                        "recognition and position questions; minihires.probe)")
    args = p.parse_args(argv)
    try:
        model, tokenizer, cfg = ckpt.load_run(args.run_dir, args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        p.error(str(e))
    n = (cfg["train"].get("eval_n") or TrainConfig.eval_n) if args.n is None else args.n
    if n < 1 or args.batch_size < 1:
        p.error(f"--n and --batch-size must be >= 1, got {n} and {args.batch_size}")
    if args.device == "cpu" and args.threads is not None:
        torch.set_num_threads(args.threads)
    autocast = torch.bfloat16 if model.language_model.embed_tokens.weight.is_cuda else None
    t0 = time.perf_counter()
    samples = test_split(n, cfg["data"])                 # rendered once, for every table below
    scores, answers = data.score_samples(model, tokenizer, cfg["data"], samples, args.batch_size,
                                         autocast)
    scores.update(eval_n=n, visual_tokens=data.visual_tokens(cfg["model"], cfg["data"]))
    print(results_table(scores, f"EntityGrid-QA test split, {args.run_dir}"))
    if args.by_entities:
        print(data.by_entities_table(data.by_entities(answers, samples)))
    if args.attention:
        for task in ("position", "recognition"):
            asked = [s for s in samples if s.task == task and len(s.entities) == 2]
            if not asked:
                continue
            try:
                mass = probe.entity_attention(model, tokenizer, asked)
            except ValueError as e:             # e.g. overlapping slices: no token boxes
                p.error(f"--attention: {e}")
            print(probe.entity_attention_table(
                mass, f"attention mass from the answer position, {task}, two entities "
                      f"(n={len(asked)}): tokens covering only the asked entity vs only the other"))
    print(f"  eval time {time.perf_counter() - t0:.1f} s")
    return 0
