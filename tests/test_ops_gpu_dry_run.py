"""tests/gpu/run.sh --dry-run on this (CPU) machine: the GPU check's time budget, preflight,
imports and the collection of its kernel tests, proven by CI before a GPU machine runs it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "tests" / "gpu" / "run.sh"


def test_dry_run_passes():
    out = subprocess.run(["bash", str(RUN_SH), "--dry-run"], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHON=sys.executable), cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    budget = re.search(r"the step limits add up to (\d+) s \(< 480 s\)", log)
    assert budget and int(budget.group(1)) < 480, log
    summary = log.strip().splitlines()[-1]
    assert summary.startswith("summary: machine=exit0") and "preflight=exit0" in summary, summary
    assert summary.endswith("status=0"), summary
    collected = re.search(r"^(\d+)/\d+ tests collected", log, re.M)
    assert collected and int(collected.group(1)) > 50, "the cuda-marked kernel tests were not all collected"
    assert "sanitize: " in log and "every result as the reference's" in log


def test_the_time_limits_hold_the_budget_by_construction():
    """The limits in the script itself add up to under 8 minutes (one device command may run 10)."""
    text = RUN_SH.read_text()
    limits = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A LIMIT=\((.*?)\)", text, re.S).group(1)))
    steps = re.search(r"STEPS=\((.*?)\)", text).group(1).split()
    assert set(steps) == set(limits), (steps, limits)
    assert sum(int(v) for v in limits.values()) < 480


def test_unknown_argument_is_refused():
    out = subprocess.run(["bash", str(RUN_SH), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: unknown argument --frobnicate")


def _collect(*args):
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *args,
                          "tests/test_stitch.py", "tests/test_window_attn_pool.py",
                          *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_ops_*.py"))],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return {line.strip() for line in out.stdout.splitlines() if "::" in line}


def test_every_device_parametrised_kernel_test_runs_its_cuda_instance_under_the_cuda_marker():
    """`pytest -m cuda` (what tests/gpu/run.sh runs) must select the cuda twin of every
    kernel test that has a cpu instance, so that nothing device-parametrised is CPU-only."""
    every, marked = _collect(), _collect("-m", "cuda")
    cpu = [node for node in every if "[" in node and "cpu" in node[node.index("[") + 1:-1].split("-")]
    missing = []
    for node in cpu:
        name, params = node[:node.index("[")], node[node.index("[") + 1:-1].split("-")
        twin = f"{name}[{'-'.join('cuda' if p == 'cpu' else p for p in params)}]"
        if twin not in marked:
            missing.append(twin)
    assert not missing, f"not selected by -m cuda: {missing}"
    assert len(cpu) > 30, f"only {len(cpu)} device-parametrised kernel tests"
