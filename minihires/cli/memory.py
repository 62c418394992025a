"""`python -m minihires memory`: estimated GPU memory per rank for a training stage."""
from __future__ import annotations

import argparse

from minihires.analysis import memory
from minihires.analysis.budget import hires_tokens
from minihires.cli.errors import ArgumentParser, command, user_input
from minihires.cli.tokens import parse_size
from minihires.model.config import PRESETS, preset


@command
def cli_memory(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m minihires memory", description=memory.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--stage", choices=("pretrain", "finetune", "full"), default="finetune")
    p.add_argument("--world", type=int, default=8, help="GPUs (default 8)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per GPU per micro-batch (default 16: LLaVA-1.5 stage 2)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="tokens per sequence, padded (default 2048: LLaVA-1.5's maximum)")
    p.add_argument("--size", default="672x672", help="image size for the ViT's crops")
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--no-grad-checkpointing", dest="ckpt", action="store_false")
    p.add_argument("--ddp", dest="fsdp", action="store_false", help="no sharding")
    p.add_argument("--train-vision", action="store_true")
    args = p.parse_args(argv)
    for name in ("world", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.gpu_gb > 0:
        p.error(f"--gpu-gb must be > 0, got {args.gpu_gb}")
    if args.train_vision and args.stage != "finetune":
        p.error("--train-vision applies to --stage finetune only (as in `train`)")
    with user_input():
        size = parse_size(args.size)
    visual = hires_tokens(*size, preset(args.preset))[0]
    if args.seq_len <= visual:
        p.error(f"--seq-len {args.seq_len} does not hold the image's {visual} visual tokens "
                f"(--size {args.size}) and a question")
    for ckpt in ((args.ckpt, not args.ckpt) if args.ckpt else (False,)):
        e = memory.estimate(args.preset, args.stage, args.world, args.batch_size, args.seq_len,
                            ckpt, args.fsdp, args.train_vision, args.gpu_gb, size)
        print(memory.format_estimate(e))
    return 0
