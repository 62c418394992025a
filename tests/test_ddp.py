"""`torchrun --nproc_per_node=2 -m minihires train`: DistributedDataParallel on 2 CPU processes
(gloo). Ranks draw disjoint samples, so without gradient all-reduce their weights would
drift apart; the run gathers every rank's parameter hash after the last step, and the
test checks they agree with each other and with the saved weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from minihires import checkpoint as ckpt
from minihires import data, entitygrid
from minihires.model import HiResLLaVA
from minihires.train import param_hash


def test_ranks_draw_disjoint_samples():
    cfg = entitygrid.EntityGridConfig()
    r0 = {s.seed for step in range(3) for s in data.train_samples(0, step, 4, cfg, 0, 2)}
    r1 = {s.seed for step in range(3) for s in data.train_samples(0, step, 4, cfg, 1, 2)}
    assert len(r0) == len(r1) == 12 and not r0 & r1


def test_torchrun_two_ranks_stay_in_sync(tmp_path):
    """2 gloo ranks, 4 steps, the vision side frozen from step 2 (DDP is rebuilt there)."""
    out = tmp_path / "ddp"
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "minihires", "train", "--steps", "4", "--batch-size", "2", "--eval-n", "3",
           "--freeze-vision-at", "2",
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("EntityGrid-QA test split") == 1          # only rank 0 reports
    metrics = json.loads((out / ckpt.METRICS).read_text())
    assert metrics["world_size"] == 2 and metrics["samples_seen"] == 4 * 2 * 2
    hashes = metrics["rank_param_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    model, _, _ = ckpt.load_run(out)
    assert param_hash(model) == hashes[0]                              # what rank 0 saved
    # the weights moved: DDP trained, it did not just keep the (shared) initialisation
    cfg = model.cfg
    torch.manual_seed(0)
    init = HiResLLaVA(cfg).state_dict()
    saved = load_file(out / ckpt.WEIGHTS)
    assert any(not torch.equal(init[k], saved[k]) for k in saved)


def test_single_process_has_no_rank_hashes(tmp_path):
    from minihires.train import cli_train
    out = tmp_path / "one"
    assert cli_train(["--steps", "1", "--batch-size", "2", "--eval-n", "0", "--out", str(out),
                      "--quiet"]) == 0
    assert json.loads((out / ckpt.METRICS).read_text())["rank_param_hashes"] is None
