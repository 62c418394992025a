"""`python -m minihires eval RUN_DIR`: re-score a run folder on the EntityGrid-QA test split.

Prints the same table as `train` (`scoring.results_table`), and on request two diagnostics of
what the model has not learned (docs/results.md quotes both):
    --by-entities  accuracy per task and number of entities in the image (`scoring.by_entities`)
    --attention    per LLM layer and head, attention from the answer position to the asked
                   entity and to the other one in two-entity images (`minihires.analysis.probe`)

The split is rendered and answered --batch-size samples at a time, so any --n up to the
split's size runs in bounded memory.
"""
from __future__ import annotations

import time

import torch

from minihires.analysis import probe
from minihires.cli.errors import (
    ArgumentParser,
    UserError,
    check_device,
    command,
    user_input,
)
from minihires.data import batches as data
from minihires.data.entitygrid import TEST_SEED_SPAN
from minihires.training import checkpoint as ckpt
from minihires.training import evaluate as scoring
from minihires.training.evaluate import results_table
from minihires.training.train import MAX_THREADS, TrainConfig

ATTENTION_TASKS = ("position", "recognition")


@command
def cli_eval(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m minihires eval",
                       description="Re-score a run folder on the EntityGrid-QA test split.")
    p.add_argument("run_dir", help="a folder written by `python -m minihires train`")
    p.add_argument("--n", type=int, default=None, help="test samples (default: the run's eval_n)")
    p.add_argument("--batch-size", type=int, default=180)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--by-entities", action="store_true",
                   help="also print accuracy per task and number of entities in the image")
    p.add_argument("--by-answer", action="store_true",
                   help="also print accuracy per true answer and seam side, for the tasks "
                        "with a few fixed answers (counting, continuity)")
    p.add_argument("--attention", action="store_true",
                   help="also print, per LLM layer and head, the attention from the answer "
                        "position to the asked entity and to the other one (two-entity "
                        "recognition and position questions; minihires.probe)")
    p.add_argument("--data", metavar="FILE.json", default=None,
                   help="score a LLaVA-format question file instead of the test split (each "
                        "row's first question; exact match and normalised accuracy)")
    p.add_argument("--image-folder", metavar="DIR", default=None,
                   help="the root of --data's image paths")
    p.add_argument("--max-new-tokens", type=int, default=None, help="with --data (default 32)")
    args = p.parse_args(argv)
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        p.error(f"--threads must be in 1..{MAX_THREADS}, got {args.threads}")
    check_device(args.device)
    if args.data is not None:
        if args.by_entities or args.by_answer or args.attention:
            p.error("--by-entities, --by-answer and --attention apply to the EntityGrid-QA "
                    "test split, not --data")
        return _eval_data(args)
    for flag in ("image_folder", "max_new_tokens"):
        if getattr(args, flag) is not None:
            p.error(f"--{flag.replace('_', '-')} applies to --data only")
    if args.n is not None and not 1 <= args.n <= TEST_SEED_SPAN:
        p.error(f"--n must be in 1..{TEST_SEED_SPAN} (the test split's size), got {args.n}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    with user_input():
        model, tokenizer, cfg = ckpt.load_run(args.run_dir, args.device)
    n = args.n
    if n is None:
        n = cfg["train"].get("eval_n", TrainConfig.eval_n)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= TEST_SEED_SPAN:
            p.error(f"{args.run_dir}/config.json: train.eval_n must be an int in "
                    f"0..{TEST_SEED_SPAN}, got {n!r} (or pass --n)")
        n = n or TrainConfig.eval_n                # the run skipped its evaluation (eval_n 0)
    if args.attention and (cfg["model"].mode != "hires" or cfg["model"].overlap):
        p.error("--attention needs a 'hires' model whose slices tile the image (overlap 0); "
                f"this run has mode {cfg['model'].mode!r}, overlap {cfg['model'].overlap}")
    if args.device == "cpu" and args.threads is not None:
        torch.set_num_threads(args.threads)
    autocast = torch.bfloat16 if model.language_model.embed_tokens.weight.is_cuda else None
    t0 = time.perf_counter()
    mass = {task: [None, 0] for task in ATTENTION_TASKS}    # summed mass, samples

    def attention(samples, answers):
        for task in ATTENTION_TASKS:
            asked = [s for s in samples if s.task == task and len(s.entities) == 2]
            if asked:
                m = probe.entity_attention(model, tokenizer, asked) * len(asked)
                total = mass[task]
                total[0] = m if total[0] is None else total[0] + m
                total[1] += len(asked)

    scores, tally = scoring.evaluate(model, tokenizer, cfg["data"], n, args.batch_size, autocast,
                                  on_batch=attention if args.attention else None)
    scores.update(eval_n=n, visual_tokens=data.visual_tokens(cfg["model"], cfg["data"]))
    print(results_table(scores, f"EntityGrid-QA test split, {args.run_dir}"))
    if args.by_entities:
        print(scoring.by_entities_table(tally.by_entities()))
    if args.by_answer:
        print(scoring.by_answer_table(tally.by_answer()))
    for task in ATTENTION_TASKS:
        total, count = mass[task]
        if count:
            print(probe.entity_attention_table(
                total / count, f"attention mass from the answer position, {task}, two entities "
                               f"(n={count}): tokens covering only the asked entity vs only "
                               "the other"))
    print(f"  eval time {time.perf_counter() - t0:.1f} s")
    return 0


def _eval_data(args) -> int:
    """`eval RUN --data FILE.json --image-folder DIR`: a LLaVA-format question file."""
    if args.max_new_tokens is None:
        args.max_new_tokens = 32
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be >= 1")
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.device == "cpu" and args.threads is not None:
        torch.set_num_threads(args.threads)
    with user_input():
        model, tokenizer, _ = ckpt.load_run(args.run_dir, args.device)
    autocast = torch.bfloat16 if model.language_model.embed_tokens.weight.is_cuda else None
    t0 = time.perf_counter()
    with user_input("--data: "):
        s = scoring.evaluate_llava(model, tokenizer, args.data, args.image_folder,
                                   args.batch_size, args.max_new_tokens, autocast, args.n)
    print(f"{args.data} ({args.run_dir}), n={s['n']}"
          + (f", {s['skipped_text_only']} text-only rows not asked" if s["skipped_text_only"]
             else ""))
    print(f"  accuracy (normalised)  {s['accuracy']:5.1f}\n  exact match            "
          f"{s['exact_match']:5.1f}")
    for task, acc in s["tasks"].items():
        print(f"  {task:<22} {acc:5.1f}")
    print(f"  eval time {time.perf_counter() - t0:.1f} s")
    return 0
