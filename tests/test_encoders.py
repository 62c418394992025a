"""The shipped encoders (`minihires.training.encoders`): each file is the one its README names
(SHA-256), fits the ViT of its kind, holds trained weights, and a run picks the file that fits
its model, or none where no shipped file applies, and says so when none fits."""
import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minihires.cli.train import cli_train
from minihires.data.entitygrid import TASKS
from minihires.training import checkpoint as ckpt
from minihires.model.vit import VisionTransformer
from minihires.training import encoders as E
from minihires.training.ablate import VARIANTS, variant_config
from minihires.training.pretrain_vit import file_sha256
from minihires.training.train import TrainConfig, check_vit_init

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_hashes() -> dict[str, str]:
    """file name -> SHA-256 from the table in minihires/weights/README.md."""
    text = (E.WEIGHTS / "README.md").read_text()
    return dict(re.findall(r"^\| `(tiny-vit-[a-z]+\.pt)` \|.*\| `([0-9a-f]{64})` \|$", text, re.M))


def test_every_shipped_file_is_the_one_its_readme_names():
    assert readme_hashes() == {f: file_sha256(E.WEIGHTS / f) for f in E.FILES.values()}


@pytest.mark.parametrize("key,kind", [("sms+sra", "sra"), ("sms", "none"), ("avg", "none"),
                                      ("thumbnail", "none"), ("overlap", "none"),
                                      ("whole", "whole")])
def test_each_variant_gets_the_file_of_its_kind_and_it_fits(key, kind):
    tc = E.resolve(variant_config(TrainConfig(sra_layers=list(E.SRA_LAYERS)), key))
    assert tc.vit_init == str(E.WEIGHTS / E.FILES[kind])
    check_vit_init(tc)                      # every encoder weight there, adapters only if used
    weights = torch.load(tc.vit_init)
    adapters = {k.split(".")[1] for k in weights if k.startswith("sra.")}
    assert adapters == ({"0", "1", "2"} if kind == "sra" else set())
    assert set(VARIANTS) == {"thumbnail", "avg", "sms", "sms+sra", "overlap", "whole"}


def test_the_files_hold_trained_weights_not_a_fresh_init():
    """A fresh tiny ViT at seed 0 differs from every file, every weight is finite, and the
    canvas stages made different files from their shared start."""
    torch.manual_seed(0)
    cfg = TrainConfig().model_config()
    fresh = VisionTransformer(cfg.vit, cfg.sra).state_dict()
    files = {k: torch.load(E.WEIGHTS / f) for k, f in E.FILES.items()}
    key = "embeddings.patch_embedding.weight"
    for w in files.values():
        assert not torch.equal(w[key], fresh[key])
        assert all(torch.isfinite(v).all() for v in w.values())
    assert not torch.equal(files["none"][key], files["sra"][key])


def test_the_main_job_starts_from_the_sra_file_and_others_from_what_they_name():
    assert TrainConfig().vit_init == E.BUNDLED
    main = E.resolve(TrainConfig())
    assert main.vit_init == str(E.WEIGHTS / "tiny-vit-sra.pt")
    assert main.vit_init_sha256 == file_sha256(main.vit_init)               # checked on load
    assert E.resolve(TrainConfig(vit_init=None)).vit_init is None           # from scratch
    assert E.resolve(TrainConfig(vit_init="my.pt")).vit_init == "my.pt"
    for other in (dict(preset="paper"), dict(init_from_run="RUN"), dict(data="rows.json"),
                  dict(init_from_llava="DIR"), dict(init_from_hf=["A", "B"])):
        tc = dataclasses.replace(TrainConfig(), **other)
        assert not E.applies(tc) and E.resolve(tc).vit_init is None


def test_adapters_that_no_file_has_are_an_error_that_names_the_way_out():
    with pytest.raises(ValueError, match=r"blocks \[1\].*--vit-init none"):
        E.resolve(TrainConfig(sra_layers=[1]))
    assert E.resolve(TrainConfig(sra_layers=[1], vit_init=None)).vit_init is None


def test_a_missing_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "WEIGHTS", tmp_path)
    with pytest.raises(FileNotFoundError, match="tiny-vit-sra.pt is missing"):
        E.resolve(TrainConfig())


def test_train_records_the_file_and_vit_init_none_trains_from_scratch(tmp_path, capsys):
    common = ["--steps", "1", "--batch-size", "2", "--eval-n", "0", "--quiet"]
    assert cli_train([*common, "--out", str(tmp_path / "a")]) == 0
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["train"]
    assert saved["vit_init"] == str(E.WEIGHTS / "tiny-vit-sra.pt")
    assert saved["vit_init_sha256"] == file_sha256(E.WEIGHTS / "tiny-vit-sra.pt")
    assert "vision tower from" in capsys.readouterr().out
    assert cli_train([*common, "--vit-init", "none", "--out", str(tmp_path / "b")]) == 0
    saved = json.loads((tmp_path / "b" / "config.json").read_text())["train"]
    assert saved["vit_init"] is None and saved["vit_init_sha256"] is None
    with pytest.raises(SystemExit) as e:
        cli_train([*common, "--sra-layers", "1", "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "--vit-init none" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_run_folder_from_before_the_defaults_changed_resumes_as_it_was(tmp_path):
    """Folders saved before 2026-12-08 hold null for sra_layers, thumbnail_filter and tasks
    (then: block 1, bicubic, three tasks) and no vit_init. Stopped before its first
    checkpoint, such a run starts again: it must train the model and tasks it was made with
    (its config.json and tokenizer say which), and end as the uninterrupted run."""
    old = ["--steps", "2", "--batch-size", "2", "--eval-n", "0", "--quiet", "--sra-layers", "1",
           "--thumbnail-filter", "bicubic", "--tasks", ",".join(TASKS[:3]), "--vit-init", "none"]
    straight, half = tmp_path / "straight", tmp_path / "half"
    assert cli_train([*old, "--out", str(straight)]) == 0
    half.mkdir()
    cfg = json.loads((straight / ckpt.CONFIG).read_text())
    cfg["train"].update(sra_layers=None, thumbnail_filter=None, tasks=None)
    for k in ("vit_init", "vit_init_sha256"):
        del cfg["train"][k]
    (half / ckpt.CONFIG).write_text(json.dumps(cfg))
    shutil.copy(straight / ckpt.TOKENIZER, half / ckpt.TOKENIZER)
    assert cli_train(["--resume", str(half), "--quiet"]) == 0
    a, b = (load_file(d / ckpt.WEIGHTS) for d in (straight, half))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
