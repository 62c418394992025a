"""`python -m minihires ablate`: every variant trains with one budget; the table reports each
variant's own run; bad arguments are clear errors."""
import dataclasses
import json

import pytest

from minihires.cli.ablate import cli_ablate
from minihires.training.ablate import VARIANTS, vit_gflops
from minihires.training.train import TrainConfig


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
    assert thumb["model"]["llama"]["token_shift"] == 3 == full["model"]["llama"]["token_shift"]
    # each variant's vision tower from the shipped encoder of its kind
    assert thumb["train"]["vit_init"].endswith("minihires/weights/tiny-vit-none.pt")
    assert full["train"]["vit_init"].endswith("minihires/weights/tiny-vit-sra.pt")
    # the same figures as JSON beside the table, each seed's own run
    figures = json.loads((runs / "ablation.json").read_text())
    assert figures["seeds"] == [0, 1] and list(figures["variants"]) == ["thumbnail", "sms+sra"]
    assert figures["token_shift"] == 3                            # the tiny preset's
    for key in ("thumbnail", "sms+sra"):
        saved = [json.loads((runs / f"{key}-seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
        got = figures["variants"][key]["runs"]
        assert [g["accuracy"] for g in got] == [m["accuracy"] for m in saved]
        assert [g["visual_tokens"] for g in got] == [m["visual_tokens"] for m in saved]
        assert all(g["continuity"] is not None for g in got)     # one of the default tasks
    # the visual-token column comes from each variant's own model: thumbnail-only reads fewer
    tokens = [int(r.split("|")[-4]) for r in rows]
    assert tokens[0] < tokens[1]
    # and the ViT FLOPs column: the thumbnail alone costs a fifth of thumbnail + 4 slices,
    # which the adapters after every block make dearer
    flops = [float(r.split("|")[-3]) for r in rows]
    assert flops[0] * 5 == pytest.approx(vit_gflops(TrainConfig(), "sms"), rel=1e-2)
    assert flops[1] > flops[0] * 5 * 1.1
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


def test_sra_layers_apply_to_the_sra_variant_only(tmp_path):
    runs = tmp_path / "abl"
    argv = ["--steps", "2", "--batch-size", "4", "--eval-n", "9", "--variants", "sms", "sms+sra",
            "--sra-layers", "0,2", "--vit-init", "none", "--runs", str(runs), "--quiet"]
    assert cli_ablate(argv) == 0                           # no shipped file has blocks 0, 2
    layers = {k: json.loads((runs / f"{k}-seed0" / "config.json").read_text())["model"]["vit"]
              ["sra_layers"] for k in ("sms", "sms+sra")}
    assert layers == {"sms": [0, 1, 2], "sms+sra": [0, 2]}   # sms keeps the preset's, unused
    assert "SRA after ViT blocks 0, 2" in (runs / "ablation.md").read_text()


def test_resume_reads_back_finished_runs_resumes_and_adds(tmp_path, capsys):
    runs = tmp_path / "abl"
    common = ["--steps", "3", "--batch-size", "4", "--eval-n", "9", "--quiet"]
    assert cli_ablate([*common, "--variants", "sms", "--seeds", "0", "1", "--runs", str(runs)]) == 0
    first = {s: json.loads((runs / f"sms-seed{s}" / "metrics.json").read_text()) for s in (0, 1)}
    (runs / "sms-seed1" / "metrics.json").unlink()          # as if killed before its eval
    capsys.readouterr()
    assert cli_ablate([*common, "--variants", "sms", "avg", "--seeds", "0", "1",
                       "--resume", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "slices + SMS (seed 0): finished in" in out and "read back" in out
    assert "slices + SMS (seed 1): 3 steps" in out           # resumed at its last checkpoint
    again = json.loads((runs / "sms-seed1" / "metrics.json").read_text())
    assert again["param_hash"] == first[1]["param_hash"] and again["accuracy"] == first[1]["accuracy"]
    figures = json.loads((runs / "ablation.json").read_text())
    assert list(figures["variants"]) == ["sms", "avg"]       # avg trained now, both seeds
    assert all((runs / f"avg-seed{s}" / "metrics.json").is_file() for s in (0, 1))
    assert [r["accuracy"] for r in figures["variants"]["sms"]["runs"]] == [
        first[0]["accuracy"], first[1]["accuracy"]]


def test_resume_refuses_a_folder_of_another_configuration(tmp_path, capsys):
    runs = tmp_path / "abl"
    common = ["--batch-size", "4", "--eval-n", "9", "--quiet", "--variants", "sms"]
    assert cli_ablate([*common, "--steps", "2", "--runs", str(runs)]) == 0
    with pytest.raises(SystemExit) as e:
        cli_ablate([*common, "--steps", "3", "--resume", str(runs)])
    assert e.value.code == 2 and "steps differs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_ablate([*common, "--steps", "2", "--resume", str(tmp_path / "nope")])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_a_train_run_folder_counts_as_its_variant(tmp_path):
    """`train --no-sra` and ablate's sms variant build the same model: the run is reusable."""
    from minihires.training import train as T
    from minihires.training.ablate import finished_run, variant_config
    tc = T.TrainConfig(steps=2, batch_size=4, eval_n=9, use_sra=False)
    T.train(tc, tmp_path / "run", progress=False)
    base = T.TrainConfig(steps=2, batch_size=4, eval_n=9, sra_layers=[0, 1, 2])
    assert finished_run(variant_config(base, "sms"), tmp_path / "run")["steps"] == 2
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    del cfg["train"]["stage"]                   # a folder saved before the field existed
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    assert finished_run(variant_config(base, "sms"), tmp_path / "run")["steps"] == 2
    with pytest.raises(ValueError, match="steps differs"):
        finished_run(variant_config(dataclasses.replace(base, steps=3), "sms"), tmp_path / "run")
    with pytest.raises(ValueError, match="vit_init_sha256, model differ"):   # and its encoder
        finished_run(variant_config(base, "sms+sra"), tmp_path / "run")


def test_token_shift_reaches_every_variant(tmp_path):
    """`ablate --token-shift 0` trains every variant with the LLM as plain LLaMA, and says so."""
    runs = tmp_path / "abl"
    argv = ["--steps", "1", "--batch-size", "2", "--eval-n", "3", "--variants", "avg", "sms",
            "--token-shift", "0", "--runs", str(runs), "--quiet"]
    assert cli_ablate(argv) == 0
    for key in ("avg", "sms"):
        cfg = json.loads((runs / f"{key}-seed0" / "config.json").read_text())
        assert cfg["model"]["llama"]["token_shift"] == 0
    assert json.loads((runs / "ablation.json").read_text())["token_shift"] == 0
    assert "token shift 0" in (runs / "ablation.md").read_text()
