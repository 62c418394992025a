"""`python -m minihires bench`: user errors are one `error:` line (exit 2) before anything runs;
tables are written as they are measured."""
from __future__ import annotations

import subprocess
import sys

import pytest

from minihires.benchmarks import stitch as stitch_bench
from minihires.benchmarks import window_attn_pool as window_bench
from minihires.cli import bench


def test_bogus_sizes_is_one_error_line_and_exit_2():
    """The whole command, as a user runs it: no partial tables, no traceback."""
    out = subprocess.run([sys.executable, "-m", "minihires", "bench", "--sizes", "bogus"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stdout == "", "nothing may be measured or printed before the flags are checked"
    assert out.stderr.strip().splitlines() == ["error: --sizes 'bogus': stitch has sizes clip, paper, large, all"]


@pytest.mark.parametrize("argv, message", [
    (["all", "--sizes", "clip"], "window_attn_pool has sizes paper, large, all"),
    (["stitch", "--sizes", "bogus"], "stitch has sizes clip, paper, large, all"),
    (["nope"], "invalid choice: 'nope'"),
    (["--device", "bogus"], "--device must be"),
    (["--out", "/nonexistent-folder/bench.md"], "does not exist"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_user_errors_are_one_line_before_any_output(argv, message, monkeypatch, capsys):
    def must_not_run(*args):
        raise AssertionError("a benchmark ran before the flags were checked")

    monkeypatch.setattr(stitch_bench, "run", must_not_run)
    monkeypatch.setattr(window_bench, "run", must_not_run)
    with pytest.raises(SystemExit) as exit_:
        bench.cli_bench(argv)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_each_table_is_written_as_soon_as_it_is_measured(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.md"
    seen = []

    def fake_run(name):
        def run(device, sizes):
            seen.append(out.read_text())  # what the file holds when this table starts
            return f"{name} on {device}, sizes={sizes}\n\n| a |\n|---|\n| 1 |"
        return run

    monkeypatch.setattr(stitch_bench, "run", fake_run("stitch"))
    monkeypatch.setattr(window_bench, "run", fake_run("window_attn_pool"))
    assert bench.cli_bench(["all", "--device", "cpu", "--sizes", "paper", "--out", str(out)]) == 0
    assert seen[0] == "" and seen[1].startswith("stitch on cpu, sizes=paper")
    text = out.read_text()
    assert "stitch on cpu" in text and "window_attn_pool on cpu" in text
    assert "window_attn_pool on cpu" in capsys.readouterr().out
