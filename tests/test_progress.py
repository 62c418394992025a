"""Progress bars: redrawn in place in a terminal, sparse plain lines in a log."""
import io
import re
import subprocess
import sys
import time

from minihires.training import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdm_as_usual():
    out = _Terminal()
    with progress.bar(3, file=out, desc="t") as bar:
        assert bar.mininterval == 0.1              # tqdm's default
        for _ in range(3):
            bar.update(1)
    assert "\r" in out.getvalue()


def test_a_log_gets_at_most_one_line_per_percent():
    out = io.StringIO()
    with progress.bar(1000, file=out, desc="t") as bar:
        for _ in range(1000):
            bar.update(1)
            bar.last_print_t -= progress.LOG_EVERY_S   # as if every step took that long
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) <= 2 + 100 // progress.LOG_EVERY_PERCENT
    assert "1000/1000" in lines[-1]


def test_train_logged_to_a_pipe_writes_a_line_every_few_seconds(tmp_path):
    """A 20-step run with stderr to a pipe: no carriage returns, and the training bar writes
    at most its first and last line plus one per LOG_EVERY_S seconds (not one per step)."""
    steps = 20
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "minihires", "train", "--steps", str(steps), "--batch-size", "1",
         "--turns", "1", "--eval-n", "0", "--threads", "1", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if re.match(r"train:", line)]
    assert lines and f"{steps}/{steps}" in lines[-1]
    assert len(lines) <= 2 + elapsed / progress.LOG_EVERY_S
    assert len(lines) < steps
