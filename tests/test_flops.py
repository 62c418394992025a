"""minihires.analysis.flops and the speed fields of `train`: FLOP counts against a hand count,
the matmul peak, the RNG left alone, metrics.json and the printed table."""
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from minihires.analysis import flops
from minihires.cli.train import cli_train
from minihires.training import checkpoint as ckpt
from minihires.training.evaluate import results_table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_forward_backward_matches_a_hand_count():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)                       # (3, 8) @ (8, 4): 3 * 8 * 4 multiply-adds
    x = torch.randn(3, 8)
    mm = 2 * 3 * 8 * 4
    assert flops.step_flops(lambda: lin(x))[0] == mm
    # backward: the weight's gradient only (x needs none), then the input's too
    assert flops.step_flops(lambda: lin(x).sum().backward())[0] == 2 * mm
    x.requires_grad_(True)
    assert flops.step_flops(lambda: lin(x).sum().backward())[0] == 3 * mm


def test_attention_counts_its_two_matrix_products():
    B, H, T, S, D = 2, 3, 5, 7, 8                  # q @ k^T and attn @ v: 2 x B*H*T*S*D each
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    assert flops.step_flops(lambda: F.scaled_dot_product_attention(q, k, v))[0] == 4 * B * H * T * S * D
    q.requires_grad_(True)   # backward, as torch counts it: the scores again, then 4 gradients
    total = flops.step_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())[0]
    assert total == 2 * B * H * T * S * D * (2 + 5)


def test_per_module_counts_split_the_total():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(5, 8)
    total, by_module = flops.step_flops(lambda: net(x))
    assert total == 2 * 5 * (8 * 16 + 16 * 2) == by_module["Global"]
    assert by_module["Sequential.0"] == 2 * 5 * 8 * 16
    assert by_module["Sequential.2"] == 2 * 5 * 16 * 2


def test_counting_leaves_the_rng_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    flops.step_flops(lambda: torch.rand(100) @ torch.rand(100))
    flops.matmul_peak(n=32, seconds=0.0)
    assert torch.equal(torch.rand(3), expected)


def test_matmul_peak_is_positive_and_utilisation_is_the_ratio():
    peak = flops.matmul_peak(n=128, seconds=0.02)
    assert math.isfinite(peak) and peak > 0
    assert flops.utilisation(6e9, 2.0, 6e9) == pytest.approx(0.5)


def test_train_records_and_prints_its_speed(trained_run):
    m = json.loads((trained_run / ckpt.METRICS).read_text())
    assert m["step_flops"] > 0 and m["matmul_peak_flop_s"] > 0 and m["samples_per_s"] > 0
    assert m["achieved_flop_s"] == pytest.approx(m["step_flops"] * m["steps"] / m["train_time_s"])
    assert m["mfu"] == pytest.approx(m["achieved_flop_s"] / m["matmul_peak_flop_s"])
    table = results_table(m)
    assert "samples/s" in table and "GFLOP a step" in table and "utilisation (MFU)" in table


def test_freezing_the_vision_side_counts_a_cheaper_step(tmp_path):
    out = tmp_path / "run"
    assert cli_train(["--steps", "2", "--freeze-vision-at", "1", "--batch-size", "1",
                      "--turns", "1", "--eval-n", "0", "--quiet", "--out", str(out)]) == 0
    m = json.loads((out / ckpt.METRICS).read_text())
    assert 0 < m["step_flops_frozen"] < m["step_flops"]
