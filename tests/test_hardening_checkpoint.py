"""Run folders under attack: a resume that would go backwards, shared default folders, folders
that are not ours, non-finite weights and losses, and SIGKILL while a checkpoint is written.
Each case once passed silently or lost data; now it is a named error or a consistent folder."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minihires.cli.eval import cli_eval
from minihires.cli.train import cli_train
from minihires.training import checkpoint as ckpt
from minihires.training import train as T

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "checkpoint.json"      # a run folder's checkpoint manifest (checkpoint.MANIFEST)
TINY = ["--batch-size", "2", "--turns", "2", "--eval-n", "0", "--quiet", "--threads", "1"]


def fails(capsys, fn, argv, *needles):
    """fn(argv) exits with status 2 and one `error:` line holding every needle."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run of 4 steps stopped after 3 (checkpoint every step), and the same run straight."""
    base = tmp_path_factory.mktemp("stopped")
    args = ["--steps", "4", "--ckpt-every", "1", *TINY]
    assert cli_train([*args, "--out", str(base / "straight")]) == 0
    assert cli_train([*args, "--out", str(base / "split"), "--stop-at", "3"]) == 0
    return base


def manifest(run: Path) -> dict | None:
    """The run's checkpoint manifest, read as plain JSON (None if it has none)."""
    return json.loads((run / MANIFEST).read_text()) if (run / MANIFEST).is_file() else None


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# ------------------------------------------------------------------ a resume only goes forward

def test_resume_with_stop_at_below_the_saved_step_is_refused(stopped, tmp_path, capsys):
    run = copy_run(stopped / "split", tmp_path / "r")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    fails(capsys, cli_train, ["--resume", str(run), "--stop-at", "2", "--quiet"],
          "--stop-at 2", "step of the run's checkpoint (3)")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before      # untouched


def test_resume_of_a_config_whose_steps_were_lowered_is_refused(stopped, tmp_path, capsys):
    run = copy_run(stopped / "split", tmp_path / "r")
    cfg = json.loads((run / ckpt.CONFIG).read_text())
    cfg["train"]["steps"] = 2
    (run / ckpt.CONFIG).write_text(json.dumps(cfg))
    fails(capsys, cli_train, ["--resume", str(run), "--quiet"],
          str(run / ckpt.CONFIG), "train.steps = 2", "(3)")
    assert not (run / ckpt.METRICS).exists()


def test_resume_at_the_saved_step_and_past_it_still_works(stopped, tmp_path):
    run = copy_run(stopped / "split", tmp_path / "r")
    assert cli_train(["--resume", str(run), "--stop-at", "3", "--quiet"]) == 0   # no-op
    assert cli_train(["--resume", str(run), "--quiet"]) == 0
    a, b = load_file(stopped / "straight" / ckpt.WEIGHTS), load_file(run / ckpt.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / ckpt.METRICS).read_text())["steps"] == 4


def test_resume_repairs_a_zero_byte_tokenizer_and_the_run_evaluates(stopped, tmp_path):
    """A zero-byte tokenizer.model: --resume once reported success and left a run that could
    not be evaluated. The tokenizer is rebuilt from the config, checked against the digest
    the checkpoint's manifest holds, and rewritten."""
    run = copy_run(stopped / "split", tmp_path / "r")
    good = (run / ckpt.TOKENIZER).read_bytes()
    (run / ckpt.TOKENIZER).write_bytes(b"")
    assert cli_train(["--resume", str(run), "--quiet"]) == 0
    assert (run / ckpt.TOKENIZER).read_bytes() == good
    assert cli_eval([str(run), "--n", "3"]) == 0


def test_another_runs_tokenizer_is_refused_by_eval_and_replaced_by_resume(stopped, tmp_path,
                                                                           capsys):
    """A valid tokenizer of another vocabulary is not the file the manifest names: eval
    refuses it (it would decode the answers wrongly); --resume puts the run's own back."""
    run = copy_run(stopped / "split", tmp_path / "r")
    good = (run / ckpt.TOKENIZER).read_bytes()
    other = tmp_path / "other"
    assert cli_train(["--steps", "1", "--no-span-words", *TINY, "--out", str(other)]) == 0
    assert (other / ckpt.TOKENIZER).read_bytes() != good
    (run / ckpt.TOKENIZER).write_bytes((other / ckpt.TOKENIZER).read_bytes())
    capsys.readouterr()
    fails(capsys, cli_eval, [str(run), "--n", "3"], str(run / ckpt.TOKENIZER),
          "is not the file that")
    assert cli_train(["--resume", str(run), "--quiet"]) == 0
    assert (run / ckpt.TOKENIZER).read_bytes() == good


# ------------------------------------------------------------------ folders: claimed, not ours

def test_default_run_folders_of_the_same_second_differ(tmp_path, monkeypatch):
    """Two runs without --out in the same second: two folders, each with its own config
    and weights (they once shared runs/<timestamp>)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    for seed in (0, 1):
        assert cli_train(["--steps", "1", "--seed", str(seed), *TINY]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == ["20260101-000000", "20260101-000000-2"]
    for seed, run in zip((0, 1), runs):
        metrics = json.loads((run / ckpt.METRICS).read_text())
        assert ckpt.load_config(run)[1]["seed"] == metrics["seed"] == seed
        assert T.param_hash(ckpt.load_run(run)[0]) == metrics["param_hash"]


def test_claim_run_dir_never_reuses_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "X")
    got = [ckpt.claim_run_dir(root=tmp_path) for _ in range(3)]
    assert [p.name for p in got] == ["X", "X-2", "X-3"] and all(p.is_dir() for p in got)


def test_train_out_refuses_a_non_empty_folder_that_is_not_a_run(stopped, tmp_path, capsys):
    """A folder holding another run's checkpoint but no config.json is not overwritten."""
    other = tmp_path / "other"
    other.mkdir()
    for name in (ckpt.WEIGHTS, ckpt.STATE):
        (other / name).write_bytes((stopped / "split" / name).read_bytes())
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    fails(capsys, cli_train, ["--steps", "1", *TINY, "--out", str(other)],
          f"--out {other}", "not empty")
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_train_out_accepts_an_empty_folder_and_one_with_stale_temporaries(tmp_path):
    empty, stale = tmp_path / "empty", tmp_path / "stale"
    empty.mkdir()
    stale.mkdir()
    (stale / ".config.json.abc123.tmp").write_text("{")
    for out in (empty, stale):
        assert cli_train(["--steps", "1", *TINY, "--out", str(out)]) == 0
        assert ckpt.load_run(out)[0] is not None
    assert not list(stale.glob("*.tmp")) and not list(stale.glob(".*.tmp"))


# ------------------------------------------------------------------ non-finite weights, losses

def test_load_run_refuses_non_finite_weights(stopped, tmp_path, capsys):
    run = copy_run(stopped / "straight", tmp_path / "nan")
    weights = load_file(run / ckpt.WEIGHTS)
    name = "language_model.layers.1.mlp.up_proj.weight"
    weights[name][3, 4] = float("nan")
    save_file(weights, run / ckpt.WEIGHTS)
    (run / MANIFEST).unlink(missing_ok=True)   # as a folder from before manifests: no digest
    (run / ckpt.STATE).unlink()
    with pytest.raises(ValueError, match=rf"{ckpt.WEIGHTS}: tensor {name} holds 1 non-finite"):
        ckpt.load_run(run)
    fails(capsys, cli_eval, [str(run), "--n", "3"], str(run / ckpt.WEIGHTS), name)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                       capsys):
    """The loss turns NaN at step 3: train stops with a named error before the optimizer step;
    the step-2 checkpoint stays, finite and loadable, and nothing of step 3 is written."""
    calls = {"n": 0, "counting": False}
    forward, step_flops = T.HiResLLaVA.forward, T.flops.step_flops

    def poisoned(self, *args, **kw):
        logits, loss = forward(self, *args, **kw)
        if calls["counting"]:                 # the FLOP count's forward is not a step
            return logits, loss
        calls["n"] += 1
        return logits, (loss * float("nan") if calls["n"] == 3 else loss)

    def counted(fn):
        calls["counting"] = True
        try:
            return step_flops(fn)
        finally:
            calls["counting"] = False

    monkeypatch.setattr(T.HiResLLaVA, "forward", poisoned)
    monkeypatch.setattr(T.flops, "step_flops", counted)
    out = tmp_path / "nan"
    line = fails(capsys, cli_train, ["--steps", "5", "--ckpt-every", "2", *TINY, "--out", str(out)],
                 "diverged at step 3", "loss nan", "nothing was saved after step 2")
    assert str(out) in line
    assert manifest(out)["step"] == 2
    model, _, _ = ckpt.load_run(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / ckpt.METRICS).exists()


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="tensor weight holds 1 non-finite"):
        ckpt.save_checkpoint(tmp_path, model, opt, 1)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ killed while writing

KILLER = textwrap.dedent("""
    import os, sys, time
    from minihires.training import checkpoint as ckpt
    from minihires.cli.train import cli_train
    when = os.environ.get("KILL_WHEN")            # NAME:PHASE:CALL, e.g. model.safetensors:tmp:2
    if when:
        name, phase, call = when.split(":")
        seen = {"n": 0}
        write = ckpt.atomic_write
        def atomic_write(path, fn):
            if os.path.basename(path) != name:
                return write(path, fn)
            seen["n"] += 1
            if seen["n"] != int(call):
                return write(path, fn)
            if phase == "tmp":                     # the temporary file written, not yet moved
                def slow(tmp):
                    fn(tmp)
                    open(os.environ["KILL_FLAG"], "w").close()
                    time.sleep(600)
                return write(path, slow)
            write(path, fn)                        # "after": moved, the next file not written
            open(os.environ["KILL_FLAG"], "w").close()
            time.sleep(600)
        ckpt.atomic_write = atomic_write
    sys.exit(cli_train(sys.argv[1:]))
""")
KILL_ARGS = ["--steps", "4", "--ckpt-every", "1", *TINY]


def start(tmp_path: Path, out: Path, when: str | None, extra=()) -> subprocess.Popen:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", KILL_FLAG=str(tmp_path / "flag"), KILL_WHEN=when or "")
    return subprocess.Popen([sys.executable, str(script), *KILL_ARGS, "--out", str(out), *extra],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_flag(tmp_path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not (tmp_path / "flag").exists():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout, "kill point not reached"
        time.sleep(0.05)


def check_consistent(out: Path, straight: Path, capsys) -> None:
    """After a SIGKILL: eval loads weights that belong to the manifest's checkpoint or gives a
    named error; --resume cleans temporaries and ends bitwise equal to the uninterrupted run."""
    listed = manifest(out)
    if listed is not None and (out / ckpt.WEIGHTS).is_file():
        try:
            ckpt.load_run(out)
            step = int(load_file_metadata(out / ckpt.WEIGHTS))
            assert step == listed["step"]
        except ValueError as e:             # names the lagging file and the repair
            assert any(str(out / n) in str(e) for n in (ckpt.WEIGHTS, ckpt.STATE)), e
            assert "is not the file that" in str(e) and "--resume" in str(e), e
    assert cli_train(["--resume", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    a, b = load_file(straight / ckpt.WEIGHTS), load_file(out / ckpt.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert manifest(out)["step"] == 4
    model, _, _ = ckpt.load_run(out)
    assert T.param_hash(model) == json.loads((straight / ckpt.METRICS).read_text())["param_hash"]


def load_file_metadata(path: Path) -> str:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return f.metadata()["step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli_train([*KILL_ARGS, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("when", [
    "train_state.pt:tmp:2",         # a half-written resume state (a .tmp left behind)
    "train_state.pt:after:2",       # the new state, the old weights and manifest
    "model.safetensors:after:2",    # the new state and weights, the old manifest
    "model.safetensors:tmp:1",      # the first checkpoint, its weights half written
    "tokenizer.model:tmp:1",        # before the first checkpoint: config.json, no tokenizer
    "tokenizer.model:after:1",      # before the first checkpoint: config and tokenizer only
])
def test_sigkill_during_a_checkpoint_leaves_a_consistent_run(when, straight, tmp_path, capsys):
    out = tmp_path / "run"
    proc = start(tmp_path, out, when)
    wait_flag(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if "tmp" in when:
        assert [p for p in out.iterdir() if p.name.endswith(".tmp")], "no temporary to clean"
    if when.startswith(("train_state.pt:after", "model.safetensors:after")):
        # the old code's silent case: eval scored the weights of step 1 beside a step-2 state
        with pytest.raises(ValueError, match="is not the file that"):
            ckpt.load_run(out)
    check_consistent(out, straight, capsys)


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_at_a_random_moment_leaves_a_consistent_run(seed, straight, tmp_path, capsys):
    out = tmp_path / "run"
    proc = start(tmp_path, out, None)
    t0 = time.monotonic()
    while not (out / ckpt.CONFIG).exists():        # past start-up: the run is training
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() - t0 < 300
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    check_consistent(out, straight, capsys)
