"""Progress bars that read well where they end up.

In a terminal, a tqdm bar redrawn in place. Anywhere else (CI, `> file`, a pipe), each redraw
would be one more line of the log (a line per training step), so there the bar is written
as plain lines, a new one only when both `LOG_EVERY_S` seconds and `LOG_EVERY_PERCENT` % of
the total have passed since the last: a bar writes at most 100 / LOG_EVERY_PERCENT lines and
at most one per LOG_EVERY_S seconds, plus its first and last line.
"""
from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

LOG_EVERY_S = 5.0
LOG_EVERY_PERCENT = 1


class _Lines:
    """The file a non-interactive bar writes to: each redraw ('\\r' + bar) becomes one line,
    blank writes (the padding and the newline tqdm ends a bar with) are dropped."""

    def __init__(self, file: TextIO):
        self.file = file

    def write(self, s: str) -> None:
        s = s.replace("\r", "").rstrip()
        if s:
            self.file.write(s + "\n")

    def flush(self) -> None:
        self.file.flush()

    def __getattr__(self, name):            # encoding, closed, ...: the real file's
        return getattr(self.file, name)


def is_interactive(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):    # no isatty, or a closed file
        return False


def bar(total: int, file: TextIO | None = None, **kwargs) -> tqdm:
    """A tqdm bar over `total` on `file` (default stderr), as the module docstring says:
    redrawn in place in a terminal, sparse plain lines elsewhere. kwargs go to tqdm."""
    file = sys.stderr if file is None else file
    if is_interactive(file):
        return tqdm(total=total, file=file, dynamic_ncols=True, **kwargs)
    return tqdm(total=total, file=_Lines(file), mininterval=LOG_EVERY_S,
                miniters=max(1, total * LOG_EVERY_PERCENT // 100),
                maxinterval=float("inf"),   # tqdm's monitor would otherwise lower miniters
                **kwargs)
