"""`torchrun --nproc_per_node=2 -m minihires train`: DistributedDataParallel on 2 CPU processes
(gloo). Ranks draw disjoint samples, so without gradient all-reduce their weights would
drift apart; the run gathers every rank's parameter hash after the last step, and the
test checks they agree with each other and with the saved weights.

The lifecycle (minihires.distributed): every rank leaves the process group together and with
nothing of it left running (no gloo thread survives `train`, which once let a rank's exit race
its peer's and abort it), and a rank that fails stops its peer at once, with its error."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minihires.data import batches as data
from minihires.data import entitygrid
from minihires.model import HiResLLaVA
from minihires.training import checkpoint as ckpt
from minihires.training.train import param_hash

ROOT = Path(__file__).resolve().parents[1]

# torchrun runs this instead of `-m minihires`: the same main(), then each rank reports the
# gloo threads still alive; FAIL_RANK1_AT_BATCH makes rank 1's data fail at that batch.
WRAPPER = textwrap.dedent("""
    import os, sys
    from minihires.data import batches as data
    fail_at = os.environ.get("FAIL_RANK1_AT_BATCH")
    if fail_at and os.environ["RANK"] == "1":
        real, calls = data.make_batch, [0]
        def make_batch(*a, **kw):
            calls[0] += 1
            if calls[0] == int(fail_at):
                raise ValueError("injected failure on rank 1")
            return real(*a, **kw)
        data.make_batch = make_batch
    from minihires.cli import main
    try:
        code = main(sys.argv[1:])
    finally:
        if os.path.isdir("/proc/self/task"):
            names = []
            for t in os.listdir("/proc/self/task"):
                try:
                    names.append(open(f"/proc/self/task/{t}/comm").read().strip())
                except OSError:
                    pass
            gloo = sorted(n for n in names if "gloo" in n)
            print(f"rank {os.environ['RANK']} gloo threads after main: {gloo}", file=sys.stderr,
                  flush=True)
    sys.exit(code)
""")


def torchrun(tmp_path: Path, out: Path, *extra: str, env_extra=None, timeout=300):
    script = tmp_path / "rank_main.py"
    script.write_text(WRAPPER)
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), "train", "--steps", "4", "--batch-size", "2", "--eval-n", "3",
           "--out", str(out), "--quiet", *extra]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


def check_run(proc, out: Path) -> None:
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr, log
    assert proc.stdout.count("EntityGrid-QA test split") == 1, log      # only rank 0 reports
    for rank in (0, 1):                # the group is really gone: nothing of gloo still runs
        assert f"rank {rank} gloo threads after main: []" in proc.stderr, log
    metrics = json.loads((out / ckpt.METRICS).read_text())
    assert metrics["world_size"] == 2 and metrics["samples_seen"] == 4 * 2 * 2
    hashes = metrics["rank_param_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    model, _, _ = ckpt.load_run(out)
    assert param_hash(model) == hashes[0]                              # what rank 0 saved


def test_ranks_draw_disjoint_samples():
    cfg = entitygrid.EntityGridConfig()
    r0 = {s.seed for step in range(3) for s in data.train_samples(0, step, 4, cfg, 0, 2)}
    r1 = {s.seed for step in range(3) for s in data.train_samples(0, step, 4, cfg, 1, 2)}
    assert len(r0) == len(r1) == 12 and not r0 & r1


def test_torchrun_two_ranks_stay_in_sync(tmp_path):
    """2 gloo ranks, 4 steps, the vision side frozen from step 2 (DDP is rebuilt there)."""
    out = tmp_path / "ddp"
    check_run(torchrun(tmp_path, out, "--freeze-vision-at", "2"), out)
    # the weights moved: DDP trained, it did not just keep the (shared) initialisation
    model, _, _ = ckpt.load_run(out)
    torch.manual_seed(0)
    init = HiResLLaVA(model.cfg).state_dict()
    saved = load_file(out / ckpt.WEIGHTS)
    assert any(not torch.equal(init[k], saved[k]) for k in saved)


def test_a_failing_rank_stops_its_peer_at_once_with_its_error(tmp_path):
    """Rank 1 fails at its second batch: rank 0 stops too (not after the 10-minute collective
    timeout), saying which rank failed and why; no metrics are written."""
    out = tmp_path / "ddp"
    proc = torchrun(tmp_path, out, env_extra={"FAIL_RANK1_AT_BATCH": "2"}, timeout=240)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert "rank 0 stopped because rank 1: ValueError: injected failure on rank 1" in \
        proc.stderr, proc.stderr[-4000:]
    assert not (out / ckpt.METRICS).exists()
    assert "rank 1 gloo threads after main: []" in proc.stderr     # left cleanly on errors too


@pytest.mark.slow
def test_torchrun_stress_under_load(tmp_path):
    """The two-rank run N times in a row (MINIHIRES_DDP_STRESS_N, default 10), with and
    without --freeze-vision-at, beside a process that keeps a core busy: every run passes."""
    n = int(os.environ.get("MINIHIRES_DDP_STRESS_N", "10"))
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for i in range(n):
            out = tmp_path / f"ddp{i}"
            extra = ("--freeze-vision-at", "2") if i % 2 == 0 else ()
            proc = torchrun(tmp_path, out, *extra)
            try:
                check_run(proc, out)
            except AssertionError as e:
                raise AssertionError(f"run {i + 1} of {n} failed: {e}") from None
    finally:
        burner.kill()
        burner.wait()


def test_single_process_has_no_rank_hashes(trained_run):
    metrics = json.loads((trained_run / ckpt.METRICS).read_text())   # a run without torchrun
    assert metrics["world_size"] == 1 and metrics["rank_param_hashes"] is None
