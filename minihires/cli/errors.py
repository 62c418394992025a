"""Errors a user can fix, and how every command reports them.

A bad flag, file or folder is a `UserError`. The command prints one line on stderr,
`error: <message>`, and exits with status 2 (argparse's status for bad arguments), without a
traceback; the message names what is wrong (the flag, the file, the field). Anything else
keeps its traceback: it is a bug, or a failure outside the user's input.

    p = ArgumentParser(prog=...)       argparse whose errors are UserErrors (no usage dump)
    @command                           on cli_<command>: a UserError -> the `error:` line, exit 2
    with user_input():                 ValueError / missing-file errors raised while reading a
                                       user's file or checking a flag -> UserError
    check_device(name, flag)           'cpu', 'cuda' or 'cuda:N' (a GPU that exists)

Library functions raise ValueError / FileNotFoundError (as Python code expects); the command
line turns them into UserErrors only around the calls that read its inputs, so that a
ValueError from a bug elsewhere still shows its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import re
import sys

# errors that, raised while reading a file or folder the user named, describe that input
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError, FileExistsError)


class UserError(Exception):
    """Bad input from the user (a flag, a file, a folder): reported as `error: <message>`."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors (unknown flag, invalid int, p.error(...)) raise
    UserError, so that they print as one `error:` line like every other user error."""

    def error(self, message: str):
        raise UserError(message)


def command(fn):
    """Decorate cli_<command>(argv): a UserError prints `error: <message>` on stderr and
    exits with status 2 (SystemExit, as argparse does)."""
    @functools.wraps(fn)
    def wrapper(argv):
        try:
            return fn(argv)
        except UserError as e:
            report(e)
            raise SystemExit(2) from None
    return wrapper


def report(e: BaseException) -> None:
    """Print the one-line `error: ...` of a user error (newlines folded into the line)."""
    message = " ".join(str(e).split("\n")).strip()
    print(f"error: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def user_input(prefix: str = "", errors: tuple = INPUT_ERRORS):
    """Turn `errors` raised inside the block (reading a user's file, checking a flag) into a
    UserError with the same message, after `prefix` (e.g. "--resume: ")."""
    try:
        yield
    except UserError:
        raise
    except errors as e:
        raise UserError(f"{prefix}{_message(e)}") from e


def _message(e: BaseException) -> str:
    """str(e), but an OSError without text gets its file name and reason."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e.__class__.__name__}"
    return str(e) or e.__class__.__name__


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(name: str, flag: str = "--device") -> str:
    """`name` if it is 'cpu', 'cuda' or 'cuda:N' with that GPU present; else a UserError naming
    the flag. (Other torch device types, 'meta' included, hold no real weights to run.)"""
    import torch
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise UserError(f"{flag} must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name}: torch sees no CUDA GPU")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: there are only {torch.cuda.device_count()} "
                            "CUDA GPU(s)")
    return name
