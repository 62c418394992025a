"""`python -m minihires tokens`: visual-token and FLOP budget per image size."""
from __future__ import annotations

import argparse

from minihires.analysis.budget import PROMPT_TOKENS, budget, format_params, format_table
from minihires.cli.errors import ArgumentParser, command, user_input
from minihires.model.config import preset


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be WIDTHxHEIGHT (e.g. 1344x896), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"--size must have a positive width and height, got {text!r}")
    return w, h


@command
def cli_tokens(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m minihires tokens", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", action="append", metavar="WxH",
                   help="image size, repeatable or comma-separated (default 672x672,1344x896)")
    p.add_argument("--preset", default="paper", help="model preset (default paper)")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                   help=f"text tokens besides the image (default {PROMPT_TOKENS})")
    args = p.parse_args(argv)
    with user_input():
        cfg = preset(args.preset)
        sizes = [parse_size(s) for arg in (args.size or ["672x672,1344x896"])
                 for s in arg.split(",")]
    if args.prompt_tokens < 0:
        p.error(f"--prompt-tokens must be >= 0, got {args.prompt_tokens}")
    v, lm = cfg.vit, cfg.llama
    print(f"preset {args.preset}: ViT {v.image_size} px / patch {v.patch_size}, "
          f"{v.num_hidden_layers} layers x {v.hidden_size}; LLM {lm.num_hidden_layers} layers x "
          f"{lm.hidden_size}; HiRes max_slices {cfg.max_slices}, {cfg.compression} window "
          f"{cfg.sms.window}")
    print(f"LLM prefill = visual tokens + {args.prompt_tokens} prompt tokens; KV cache float16; "
          "FLOPs = 2 x multiply-adds (dense attention)\n")
    rows = [r for w, h in sizes for r in budget(w, h, cfg, args.prompt_tokens)]
    print(format_table(rows) + "\n")
    print(format_params(cfg, args.preset))
    return 0
