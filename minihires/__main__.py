"""`python -m minihires COMMAND ...`: one dispatcher, each command lives in its module.

A command module defines `cli_<command>(argv: list[str]) -> int` with its own argparse,
so adding a command never touches the others. A user error (bad flag, file or folder) ends a
command with one line, `error: <message>`, and exit status 2 (`minihires.cli_errors`).
"""
from __future__ import annotations

import importlib
import sys

from .cli_errors import UserError, report

# command -> (module, one-line help)
COMMANDS = {
    "train": ("minihires.train", "train a model from scratch on EntityGrid-QA (default preset tiny)"),
    "eval": ("minihires.evaluate", "re-score a run folder on the EntityGrid-QA test split"),
    "ask": ("minihires.ask", "answer a question about an image with a trained or HF model"),
    "entitygrid": ("minihires.entitygrid", "export EntityGrid-QA images and questions"),
    "ablate": ("minihires.ablate", "train the ablation variants and print their table"),
    "tokens": ("minihires.budget", "visual-token and FLOP budget per image size"),
    "bench": ("minihires.bench", "kernel benchmarks: stitch, window_attn_pool"),
    "lookup": ("minihires.lookup", "the LLM's entity lookup without the vision tower (a lab)"),
}


def usage() -> str:
    lines = ["usage: python -m minihires COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`python -m minihires COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        report(UserError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)} "
                         "(`python -m minihires --help`)"))
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(getattr(module, f"cli_{command}")(rest) or 0)
    except UserError as e:                   # a command without the cli_errors.command wrapper
        report(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
