"""`python -m minihires ablate`: every variant trains with one budget; the table reports each
variant's own run; bad arguments are clear errors."""
import json

import pytest

from minihires.cli.ablate import cli_ablate
from minihires.training.ablate import VARIANTS


def test_two_variants_two_seeds(tmp_path, capsys):
    runs = tmp_path / "abl"
    argv = ["--steps", "3", "--batch-size", "4", "--eval-n", "9", "--seeds", "0", "1",
            "--variants", "thumbnail", "sms+sra", "--runs", str(runs), "--quiet"]
    assert cli_ablate(argv) == 0
    table = (runs / "ablation.md").read_text()
    assert table.strip() in capsys.readouterr().out      # printed and written alike
    rows = [line for line in table.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == [VARIANTS["thumbnail"][0], VARIANTS["sms+sra"][0]]
    for key in ("thumbnail", "sms+sra"):
        cfgs = [json.loads((runs / f"{key}-seed{s}" / "config.json").read_text()) for s in (0, 1)]
        assert all((runs / f"{key}-seed{s}" / "metrics.json").exists() for s in (0, 1))
        assert {c["train"]["steps"] for c in cfgs} == {3} and {c["train"]["seed"] for c in cfgs} == {0, 1}
    thumb = json.loads((runs / "thumbnail-seed0" / "config.json").read_text())
    full = json.loads((runs / "sms+sra-seed0" / "config.json").read_text())
    assert thumb["model"]["use_slices"] is False and full["model"]["use_sra"] is True
    # the same figures as JSON beside the table, each seed's own run
    figures = json.loads((runs / "ablation.json").read_text())
    assert figures["seeds"] == [0, 1] and list(figures["variants"]) == ["thumbnail", "sms+sra"]
    for key in ("thumbnail", "sms+sra"):
        saved = [json.loads((runs / f"{key}-seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
        got = figures["variants"][key]["runs"]
        assert [g["accuracy"] for g in got] == [m["accuracy"] for m in saved]
        assert [g["visual_tokens"] for g in got] == [m["visual_tokens"] for m in saved]
        assert all(g["continuity_on"] is None for g in got)      # not asked: default tasks
    # the visual-token column comes from each variant's own model: thumbnail-only reads fewer
    tokens = [int(r.split("|")[-4]) for r in rows]
    assert tokens[0] < tokens[1]
    # and the ViT FLOPs column: the thumbnail alone costs a fifth of thumbnail + 4 slices
    flops = [float(r.split("|")[-3]) for r in rows]
    assert flops[0] * 5 == pytest.approx(flops[1], rel=0.1)
    assert figures["variants"]["thumbnail"]["vit_gflops"] == pytest.approx(flops[0], rel=1e-2)


@pytest.mark.parametrize("argv, message", [
    (["--eval-n", "0"], "--eval-n must be >= 1"),
    (["--seeds", "1", "1"], "duplicates"),
    (["--variants", "nope"], "invalid choice"),
])
def test_bad_arguments(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_ablate([*argv, "--runs", str(tmp_path / "r")])
    assert e.value.code == 2 and message in capsys.readouterr().err
