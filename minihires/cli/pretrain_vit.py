"""`python -m minihires pretrain-vit`: teach the tiny ViT the entities before the main job.

    python -m minihires pretrain-vit --stage slices --out vit-slices.pt
    python -m minihires pretrain-vit --stage canvas --init vit-slices.pt --sra-layers 0,1,2 \\
        --out vit-sra.pt
    python -m minihires train --vit-init vit-sra.pt

(`minihires.training.pretrain_vit` explains the two stages; the shipped files in
minihires/weights/ were made this way, their README gives the commands.)
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from minihires.cli.errors import ArgumentParser, UserError, command, user_input
from minihires.cli.train import block_list
from minihires.data.batches import MAX_RUN_SEED
from minihires.model.config import tiny
from minihires.training import checkpoint as ckpt
from minihires.training import pretrain_vit as P
from minihires.training.train import MAX_THREADS

DEFAULT_STEPS = {"slices": 1500, "canvas": 800}


def sra_blocks(value: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; 'none' -> []."""
    blocks = [] if value == "none" else block_list(value)
    if any(b < 0 for b in blocks):
        raise argparse.ArgumentTypeError(f"blocks are numbered from 0, got {value!r}")
    return blocks


@command
def cli_pretrain_vit(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m minihires pretrain-vit",
                       description="Pretrain the tiny ViT on labelled entities: single slices, "
                                   "then whole sliced canvases (a file for train --vit-init).")
    p.add_argument("--stage", choices=P.STAGES, required=True,
                   help="slices: one slice holding one whole entity; canvas: whole canvases, "
                        "encoded as the variant that loads the file encodes them")
    p.add_argument("--out", required=True, help="the weights file to write (not overwritten)")
    p.add_argument("--init", default=None,
                   help="canvas: start from this file (the slices stage's; default: fresh)")
    p.add_argument("--sra-layers", type=sra_blocks, default=[], metavar="B1,B2,...|none",
                   help="canvas: SliceRestore adapters after these ViT blocks (default none)")
    p.add_argument("--whole", action="store_true",
                   help="canvas: one ViT pass over the whole canvas, nothing cut (for the "
                        "whole-canvas control)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"(default: slices {DEFAULT_STEPS['slices']}, "
                        f"canvas {DEFAULT_STEPS['canvas']})")
    p.add_argument("--batch", type=int, default=None,
                   help="slices or canvases per step (default: slices 64, canvas 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=100, help="score the held-out set every N steps")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, one per core)")
    args = p.parse_args(argv)
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[args.stage]
    for flag, value in (("--steps", steps), ("--every", args.every), ("--batch", args.batch)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.seed <= MAX_RUN_SEED:
        p.error(f"--seed must be in 0..{MAX_RUN_SEED}, got {args.seed}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        p.error(f"--threads must be in 1..{MAX_THREADS}, got {args.threads}")
    if args.stage == "slices" and (args.init or args.sra_layers or args.whole):
        p.error("--init, --sra-layers and --whole belong to --stage canvas; the slices stage "
                "starts fresh and sees one slice at a time")
    if args.whole and args.sra_layers:
        p.error("--whole cuts nothing, so it takes no adapters: drop --sra-layers")
    blocks = tiny().vit.num_hidden_layers
    if any(b >= blocks for b in args.sra_layers):
        p.error(f"--sra-layers: the tiny ViT has blocks 0..{blocks - 1}, got {args.sra_layers}")
    out = Path(args.out)
    if out.exists() or out.is_symlink():
        p.error(f"--out {out} exists; choose another path (pretrain-vit never overwrites)")
    if not out.parent.is_dir():
        p.error(f"--out {out}: {out.parent} is not a folder")
    init = None
    if args.init:
        with user_input("--init: "):         # a missing, unreadable or misfitting file: one line
            init = P.read_weights(args.init)
            P.build_vit(tuple(args.sra_layers), init)      # fits, or says what does not
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    blocks = "blocks " + ",".join(map(str, args.sra_layers)) if args.sra_layers else "no block"
    view = ("the whole canvas" if args.whole else "single slices" if args.stage == "slices"
            else f"sliced canvases, SRA after {blocks}")
    print(f"minihires pretrain-vit: stage {args.stage} ({view}), {steps} steps, seed {args.seed}"
          f"{', from ' + args.init if args.init else ''}, {torch.get_num_threads()} thread(s)",
          flush=True)
    t = time.time()
    try:
        vit, _ = P.pretrain(args.stage, steps, tuple(args.sra_layers), init, args.whole,
                            args.seed, args.batch, args.every,
                            progress=lambda line: print(line, flush=True))
    except FloatingPointError as e:
        raise UserError(f"{e}; nothing was written") from None
    try:
        ckpt.atomic_create(out, lambda tmp: torch.save(P.saved_weights(vit, args.stage), tmp))
    except FileExistsError:
        raise UserError(f"--out {out} appeared while this ran (another run?); pretrain-vit never "
                        "overwrites: these weights were not saved") from None
    print(f"{steps} steps in {time.time() - t:.0f} s; wrote {out} "
          f"({os.path.getsize(out) / 1e6:.1f} MB)")
    return 0
