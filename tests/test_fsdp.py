"""`train --data --fsdp` under torchrun (2 CPU processes, gloo) against one process.

- FSDP2 on 2 ranks x 2 rows gives, step by step, the losses of 1 process x 4 rows (the loss
  is normalised by the step's answer tokens over every rank, so a step is one global batch);
- its sharded (DCP) checkpoint resumes on 2 processes bitwise (same losses, same weights),
  and on 1 process (resharded) close to the uninterrupted 1-process run;
- the run folder's model.safetensors (gathered at the end) loads with `eval`'s loader.
Tiny random CLIP + LLaMA folders from `transformers` (tests/llava_fixtures.py), activation
checkpointing on, text-only rows mixed in."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from llava_fixtures import export, hf_folders

from minihires.cli.train import cli_train
from minihires.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    (root / "hf").mkdir()
    vision, llm, _ = hf_folders(root / "hf")
    data = export(root / "eg", n=10, turns=2, text_rows=2)
    args = ["--data", str(data), "--image-folder", str(root / "eg"), "--init-from-hf",
            str(vision), str(llm), "--steps", str(STEPS), "--ckpt-every", "2",
            "--grad-checkpointing", "--quiet", "--threads", "1"]
    return root, args


def torchrun(cwd: Path, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "minihires", "train", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(run: Path) -> list[float]:
    return json.loads((run / "train_state.json").read_text())["losses"]


def test_fsdp_two_ranks_match_one_process_and_resume(setup):
    root, args = setup
    one, two, cut = root / "one", root / "two", root / "cut"
    assert cli_train([*args, "--batch-size", "4", "--out", str(one)]) == 0
    torchrun(root, *args, "--batch-size", "2", "--fsdp", "--out", str(two))
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert len(losses(two)) == STEPS

    # interrupted after step 2, resumed on 2 processes: bitwise the uninterrupted run
    torchrun(root, *args, "--batch-size", "2", "--fsdp", "--out", str(cut), "--stop-at", "2")
    assert json.loads((cut / "train_state.json").read_text())["step"] == 2
    shutil.copytree(cut, root / "cut1")
    torchrun(root, "--resume", str(cut), "--quiet")
    assert losses(cut) == losses(two)
    m_two = json.loads((two / ckpt.METRICS).read_text())
    m_cut = json.loads((cut / ckpt.METRICS).read_text())
    assert m_cut["param_hash"] == m_two["param_hash"]

    # the 2-process checkpoint resumes on 1 process (DCP reshards), the same global batch as
    # 2 accumulated micro-batches of 2 rows
    assert cli_train(["--resume", str(root / "cut1"), "--quiet", "--threads", "1",
                      "--grad-accum", "2"]) == 0
    assert losses(root / "cut1") == pytest.approx(losses(one), rel=1e-5, abs=1e-6)

    # the gathered weights load as eval and ask load them
    _, tok, cfg = ckpt.load_run(two)
    assert cfg["train"]["fsdp"] and tok.vocab_size > 0
