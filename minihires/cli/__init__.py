"""The command line: `python -m minihires COMMAND ...`, one module per command.

The library below never parses arguments or prints; these modules do. A command module
defines `cli_<command>(argv: list[str]) -> int` (`-` in a command's name is `_` here) with
its own argparse, so adding a command never touches the others. A user error (bad flag, file
or folder) ends a command with one line, `error: <message>`, and exit status 2
(`minihires.cli.errors`).
"""
from __future__ import annotations

import importlib
import logging
import sys

from minihires.cli.errors import UserError, report

# command -> (module, one-line help)
COMMANDS = {
    "train": ("minihires.cli.train", "train the tiny model on EntityGrid-QA: the main job (default preset tiny)"),
    "eval": ("minihires.cli.eval", "re-score a run folder on the EntityGrid-QA test split"),
    "ask": ("minihires.cli.ask", "answer a question about an image with a trained or HF model"),
    "entitygrid": ("minihires.cli.entitygrid", "export EntityGrid-QA images and questions"),
    "pretrain-vit": ("minihires.cli.pretrain_vit",
                     "pretrain the tiny ViT on labelled entities (train --vit-init)"),
    "ablate": ("minihires.cli.ablate", "train the ablation variants and print their table"),
    "tokens": ("minihires.cli.tokens", "visual-token and FLOP budget per image size"),
    "memory": ("minihires.cli.memory", "GPU memory per rank for a training stage (estimate)"),
    "bench": ("minihires.cli.bench", "kernel benchmarks: stitch, window_attn_pool"),
}


def usage() -> str:
    lines = ["usage: python -m minihires COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`python -m minihires COMMAND --help` for a command's options.")
    return "\n".join(lines)


def cli_function(command: str):
    """The `cli_<command>` function of a command (`-` in its name is `_` in Python's)."""
    module = importlib.import_module(COMMANDS[command][0])
    return getattr(module, f"cli_{command.replace('-', '_')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if not logging.getLogger().handlers:    # the library's messages, as plain lines on stderr
        logging.basicConfig(format="%(message)s", level=logging.INFO)
    if command not in COMMANDS:
        report(UserError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)} "
                         "(`python -m minihires --help`)"))
        return 2
    try:
        return int(cli_function(command)(rest) or 0)
    except UserError as e:                   # a command without the cli_errors.command wrapper
        report(e)
        return 2

