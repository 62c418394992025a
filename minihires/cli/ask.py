"""`python -m minihires ask`: answer one question about one image, with the KV cache.

    python -m minihires ask RUN_DIR IMAGE "question"             a folder written by `train`
    python -m minihires ask --hf-llava DIR IMAGE "question"      a LLaVA-1.5 HF checkpoint

`--hf-llava DIR` is a local folder in the transformers LlavaForConditionalGeneration layout
(config.json, model.safetensors or shards, and the LLaMA tokenizer.model), e.g.
llava-hf/llava-1.5-7b-hf downloaded beforehand; it runs as HiResLLaVA in "llava15" mode
(see `minihires.model.hf`). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import math

import torch

from minihires.cli.errors import ArgumentParser, check_device, command, user_input
from minihires.model.slicing import load_image


def load_model(args) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) for the parsed arguments."""
    if args.hf_llava:
        from minihires.model import hf
        return hf.load_llava(args.hf_llava, hf.parse_dtype(args.dtype), args.device)
    # a trained run folder (owned by the training side: minihires.training.checkpoint)
    from minihires.training.checkpoint import load_run
    model, tokenizer, _ = load_run(args.run_dir, args.device)
    return model, tokenizer


@command
def cli_ask(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m minihires ask", description=__doc__,
                       usage="%(prog)s [options] (RUN_DIR | --hf-llava DIR) IMAGE QUESTION",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-llava", metavar="DIR",
                   help="a LLaVA-1.5 checkpoint folder in the HF layout (instead of RUN_DIR)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="RUN_DIR IMAGE QUESTION, or IMAGE QUESTION with --hf-llava")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (--hf-llava only; a run folder keeps its own)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    args = p.parse_args(argv)
    want = 2 if args.hf_llava else 3
    if len(args.paths) != want:
        p.error("expected --hf-llava DIR IMAGE QUESTION" if args.hf_llava
                else "expected RUN_DIR IMAGE QUESTION (or --hf-llava DIR IMAGE QUESTION)")
    if args.hf_llava:
        args.run_dir, (image, question) = None, args.paths
    else:
        args.run_dir, image, question = args.paths
    check_device(args.device)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < 2 ** 63:
        p.error(f"--seed must be in 0..2**63-1, got {args.seed}")
    if not question.strip():
        p.error("QUESTION is empty")
    with user_input():
        picture = load_image(image)                   # before the model: a bad image is quick
        model, tokenizer = load_model(args)
    generator = None
    if args.temperature > 0:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    with user_input():                                # the question: too long, "<image>" in it
        answer = model.generate(picture, question, tokenizer, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p,
                                generator=generator)[0]
    print(answer)
    return 0
