"""`pretrain-vit`: its batches put the entity where the geometry says, the canvas stage lays
each slice's tokens on the right canvas cells and lets a slice see another only through the
adapters (or the whole-canvas pass), a few steps teach the head something, and the files it
writes start `train --vit-init` and `ablate --vit-init/--sra-vit-init` runs."""
import dataclasses
import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minihires.cli.ablate import cli_ablate
from minihires.cli.pretrain_vit import cli_pretrain_vit
from minihires.cli.train import cli_train
from minihires.model import slicing
from minihires.model.config import tiny
from minihires.training import checkpoint as ckpt
from minihires.training import pretrain_vit as P
from minihires.training.ablate import encoder_id

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slice_batch_holds_one_whole_entity_per_slice():
    x, y, seam, mask = P.slice_batch(random.Random(0), 64)
    assert x.shape == (64, 3, 32, 32) and mask is None and not seam.any()
    assert 10 < int((y < 2).sum()) < 54 and int(y.max()) < len(P.LABELS)
    assert (y == 0).any() and (y == 1).any()                    # whole and broken boards
    mean, std = torch.tensor(slicing.CLIP_MEAN), torch.tensor(slicing.CLIP_STD)
    black = (-mean / std).view(1, 3, 1, 1)                          # the background, normalised
    frame = (x - black).abs().sum(1) > 1e-4                         # (64, 32, 32): lit pixels
    for k in range(64):                                 # the whole 16-px outline in the slice
        rows, cols = frame[k].any(1).nonzero(), frame[k].any(0).nonzero()
        assert int(rows.max() - rows.min()) == 15 == int(cols.max() - cols.min())
        assert len(rows) == 16 == len(cols)


def test_canvas_batch_labels_seams_from_geometry_and_masks_the_entity():
    x, y, seam, mask = P.canvas_batch(random.Random(0), 40)
    assert x.shape == (40 * 4, 3, 32, 32) and mask.shape == (40, 16, 16)
    board = y < 2
    assert board.any() and (~board).any() and seam.any() and (~seam).any()
    for k in range(40):                                 # 16-px entities touch 4 or 5 patches a side
        rows, cols = mask[k].any(1).nonzero(), mask[k].any(0).nonzero()
        assert 4 <= len(rows) <= 5 and 4 <= len(cols) <= 5
        assert rows.diff(dim=0).eq(1).all() and cols.diff(dim=0).eq(1).all()
        on = bool((rows.min() < 8 <= rows.max()) or (cols.min() < 8 <= cols.max()))
        assert on == bool(seam[k])                      # touches two slices' tokens iff cut


def test_canvas_tokens_put_each_slice_token_on_its_canvas_cell():
    class Stub(torch.nn.Module):                        # token = (slice, row, col) of the patch
        def forward(self, x, grids):
            n = x.shape[0]
            k = torch.arange(n).view(n, 1, 1).expand(n, 8, 8)
            i = torch.arange(8).view(1, 8, 1).expand(n, 8, 8)
            j = torch.arange(8).view(1, 1, 8).expand(n, 8, 8)
            t = torch.stack([k, i, j], -1).reshape(n, 64, 3).float()
            return torch.cat([torch.zeros(n, 1, 3), t], 1)
    t = P.canvas_tokens(Stub(), torch.zeros(2 * 4, 3, 32, 32), (2, 2))
    assert t.shape == (2, 16, 16, 3)
    for b in range(2):
        for y in range(16):
            for x in range(16):
                assert t[b, y, x].tolist() == [b * 4 + (y // 8) * 2 + x // 8, y % 8, x % 8]


@pytest.mark.parametrize("sra", [(), (0, 1, 2)])
def test_only_the_adapters_let_a_slice_see_its_neighbour(sra):
    torch.manual_seed(0)
    vit = P.build_vit(sra)
    for a in vit.sra.values():                          # as after training: not the identity
        torch.nn.init.normal_(a.proj.weight, std=0.1)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)   # one canvas, 2 x 2 slices
    P.canvas_tokens(vit, x, (2, 2))[0, :8, 7].sum().backward()   # slice 0's column at the seam
    assert x.grad[0].abs().sum() > 0
    assert bool(x.grad[1].abs().sum() > 0) == bool(sra)          # slice 1, across the seam


def test_whole_canvas_tokens_match_the_whole_canvas_control():
    from minihires.model.hires_llava import HiResLLaVA
    torch.manual_seed(0)
    model = HiResLLaVA(dataclasses.replace(tiny(), use_sra=False, whole_canvas=True)).eval()
    vit = P.build_vit(())
    vit.load_state_dict(model.vision_tower.state_dict())
    x = torch.randn(4, 3, 32, 32, requires_grad=True)   # one canvas, 2 x 2 slices
    t = P.canvas_tokens(vit, x, (2, 2), whole=True)     # (1, 16, 16, D)
    with torch.no_grad():                               # the control's per-slice pieces
        want = model._whole_canvas_features(torch.cat([torch.zeros(1, 3, 32, 32), x]),
                                            [(2, 2)])[1:]                   # (4, 8, 8, D)
    got = t.detach().reshape(2, 8, 2, 8, -1).permute(0, 2, 1, 3, 4)  # (2 rows, 2 cols, 8, 8, D)
    torch.testing.assert_close(got.reshape(4, 8, 8, -1), want)       # slices in raster order
    t[0, :8, 7].sum().backward()                        # slice 0's column at the seam
    assert x.grad[1].abs().sum() > 0                    # reaches slice 1 with no adapters


def test_a_few_steps_teach_the_classes():
    """40 steps of the slices stage tell the 8 pattern classes apart well above chance (1/8;
    about 49% here, and the full stage reaches 100%)."""
    lines = []
    _, curve = P.pretrain("slices", 40, batch=32, every=20, progress=lines.append)
    assert [c[0] for c in curve] == [20, 40] and len(lines) == 2
    assert curve[-1][3] > 0.3 and math.isnan(curve[-1][1])          # no seam-cut boards: nan
    with pytest.raises(ValueError, match="one slice at a time"):
        P.pretrain("slices", 1, sra_layers=(0,))
    with pytest.raises(ValueError, match="takes no adapters"):
        P.pretrain("canvas", 1, sra_layers=(0,), whole=True)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Files the command wrote: the slices stage (1 step), then the canvas stage from it with
    adapters after every block, and without adapters."""
    d = tmp_path_factory.mktemp("vit")
    common = ["--steps", "1", "--batch", "4", "--threads", "1"]
    assert cli_pretrain_vit(["--stage", "slices", *common, "--out", str(d / "s.pt")]) == 0
    assert cli_pretrain_vit(["--stage", "canvas", "--init", str(d / "s.pt"), "--sra-layers",
                             "0,1,2", *common, "--out", str(d / "sra.pt")]) == 0
    assert cli_pretrain_vit(["--stage", "canvas", "--init", str(d / "s.pt"), "--sra-layers",
                             "none", *common, "--seed", "1", "--out", str(d / "plain.pt")]) == 0
    return d


def test_the_files_hold_the_stage_s_weights(encoders):
    s, sra = torch.load(encoders / "s.pt"), torch.load(encoders / "sra.pt")
    assert not any(k.startswith("sra.") for k in s)             # no neighbours, no adapter
    assert {k.split(".")[1] for k in sra if k.startswith("sra.")} == {"0", "1", "2"}
    assert not torch.equal(s["embeddings.patch_embedding.weight"],
                           sra["embeddings.patch_embedding.weight"])        # it trained on


def test_train_vit_init_starts_the_vision_tower_from_the_file(encoders, tmp_path):
    """At lr 1e-12 two steps move no weight by more than rounding, so the trained vision
    tower, adapters included, is the file's; the run records the file's SHA-256."""
    out = tmp_path / "run"
    assert cli_train(["--steps", "2", "--batch-size", "2", "--eval-n", "4", "--quiet",
                      "--lr", "1e-12", "--sra-layers", "0,1,2",
                      "--vit-init", str(encoders / "sra.pt"), "--out", str(out)]) == 0
    model, _, _ = ckpt.load_run(out)
    got, want = model.vision_tower.state_dict(), torch.load(encoders / "sra.pt")
    assert got.keys() == want.keys() and any(k.startswith("sra.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-8, msg=k)
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["vit_init"] == str(encoders / "sra.pt")
    assert saved["vit_init_sha256"] == P.file_sha256(encoders / "sra.pt")


def test_a_resume_before_the_first_checkpoint_needs_the_same_file(encoders, tmp_path, capsys):
    """A run stopped before its first checkpoint (config.json and tokenizer.model only)
    starts again from its --vit-init file, so that file must still be there and unchanged;
    then it ends with the uninterrupted run's weights. Once a checkpoint exists, the file is
    no longer needed."""
    vit = tmp_path / "vit.pt"
    shutil.copy(encoders / "plain.pt", vit)
    straight, half = tmp_path / "straight", tmp_path / "half"
    assert cli_train(["--steps", "2", "--batch-size", "2", "--eval-n", "0", "--quiet",
                      "--no-sra", "--vit-init", str(vit), "--out", str(straight)]) == 0
    half.mkdir()
    for name in (ckpt.CONFIG, ckpt.TOKENIZER):
        shutil.copy(straight / name, half / name)
    shutil.copy(encoders / "s.pt", vit)                             # fits, but another file
    with pytest.raises(SystemExit) as e:
        cli_train(["--resume", str(half), "--quiet"])
    assert e.value.code == 2 and "has changed since the run recorded it" in capsys.readouterr().err
    vit.unlink()
    with pytest.raises(SystemExit):
        cli_train(["--resume", str(half), "--quiet"])
    assert "no checkpoint yet" in capsys.readouterr().err
    shutil.copy(encoders / "plain.pt", vit)                         # the run's file again
    assert cli_train(["--resume", str(half), "--quiet", "--stop-at", "1"]) == 0
    vit.unlink()                                                    # the checkpoint holds it now
    assert cli_train(["--resume", str(half), "--quiet"]) == 0
    a, b = load_file(straight / ckpt.WEIGHTS), load_file(half / ckpt.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ablate_gives_each_variant_its_encoder_and_names_it(encoders, tmp_path, capsys):
    runs = tmp_path / "abl"
    vit = tmp_path / "plain.pt"
    shutil.copy(encoders / "plain.pt", vit)
    argv = ["--steps", "1", "--batch-size", "2", "--eval-n", "4", "--quiet",
            "--variants", "sms", "sms+sra", "--sra-layers", "0,1,2",
            "--vit-init", str(vit), "--sra-vit-init", str(encoders / "sra.pt")]
    assert cli_ablate([*argv, "--runs", str(runs)]) == 0
    for key, f in (("sms", vit), ("sms+sra", encoders / "sra.pt")):
        train = json.loads((runs / f"{key}-seed0" / "config.json").read_text())["train"]
        assert train["vit_init"] == str(f) and train["vit_init_sha256"] == P.file_sha256(f)
    figures = json.loads((runs / "ablation.json").read_text())["variants"]
    assert figures["sms"]["vit_init"] == f"plain.pt sha256:{P.file_sha256(vit)[:16]}"
    assert figures["sms+sra"]["vit_init"].startswith("sra.pt sha256:")
    assert "plain.pt" in (runs / "ablation.md").read_text()
    # the finished runs are read back only with the same file contents, wherever it lies
    moved = tmp_path / "moved.pt"
    vit.rename(moved)
    again = [a if a != str(vit) else str(moved) for a in argv]
    assert cli_ablate([*again, "--resume", str(runs), "--out", str(tmp_path / "t.md")]) == 0
    assert "read back" in capsys.readouterr().out
    shutil.copy(encoders / "s.pt", moved)                           # other weights, same name
    with pytest.raises(SystemExit) as e:
        cli_ablate([*again, "--resume", str(runs), "--out", str(tmp_path / "t.md")])
    assert e.value.code == 2 and "vit_init_sha256 differs" in capsys.readouterr().err


def test_sra_vit_init_none_trains_the_sra_variants_from_scratch(encoders, tmp_path):
    runs = tmp_path / "abl"
    assert cli_ablate(["--steps", "1", "--batch-size", "2", "--eval-n", "4", "--quiet",
                       "--variants", "sms", "sms+sra", "--vit-init", str(encoders / "plain.pt"),
                       "--sra-vit-init", "none", "--runs", str(runs)]) == 0
    train = {key: json.loads((runs / f"{key}-seed0" / "config.json").read_text())["train"]
             for key in ("sms", "sms+sra")}
    assert train["sms"]["vit_init"] == str(encoders / "plain.pt")
    assert train["sms+sra"]["vit_init"] is None and train["sms+sra"]["vit_init_sha256"] is None
    figures = json.loads((runs / "ablation.json").read_text())["variants"]
    assert figures["sms+sra"]["vit_init"] is None


def test_a_file_changed_during_an_ablation_ends_in_one_error_line(encoders, tmp_path,
                                                                  monkeypatch, capsys):
    from minihires.training import train as T
    vit = tmp_path / "v.pt"
    shutil.copy(encoders / "plain.pt", vit)
    real = T.train

    def train_then_change(*args, **kwargs):          # someone replaces the file after a run
        metrics = real(*args, **kwargs)
        shutil.copy(encoders / "s.pt", vit)
        return metrics
    monkeypatch.setattr(T, "train", train_then_change)
    with pytest.raises(SystemExit) as e:
        cli_ablate(["--steps", "1", "--batch-size", "2", "--eval-n", "4", "--quiet",
                    "--variants", "avg", "sms", "--vit-init", str(vit),
                    "--runs", str(tmp_path / "abl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "slices + SMS, seed 0" in err
    assert "has changed since the run recorded it" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--stage", "slices", "--init", "x.pt"], "belong to --stage canvas"),
    (["--stage", "canvas", "--sra-layers", "7"], "blocks 0..2"),
    (["--stage", "canvas", "--sra-layers", "1", "--whole"], "takes no adapters"),
    (["--stage", "canvas", "--init", "/nonexistent.pt"], "--init: "),
    (["--stage", "canvas", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["--stage", "canvas", "--sra-layers", "-1"], "numbered from 0"),
    (["--stage", "canvas", "--seed", str(10**20)], "--seed must be in"),
])
def test_pretrain_vit_errors_name_the_flag(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_pretrain_vit([*argv, "--out", str(tmp_path / "v.pt")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "v.pt").exists()


def test_misfitting_or_foreign_files_are_named_before_any_run(encoders, tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("not torch")
    torch.save({"not.a.vit.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    weights = torch.load(encoders / "s.pt")
    torch.save({**weights, "post_layernorm.weight": weights["post_layernorm.weight"] * torch.nan},
               tmp_path / "nan.pt")
    torch.save({k: v.long() for k, v in weights.items()}, tmp_path / "int.pt")
    torch.save({k: v.to_sparse() for k, v in weights.items()}, tmp_path / "sparse.pt")
    cases = [(cli_pretrain_vit, ["--stage", "canvas", "--init", str(tmp_path / "junk.pt"),
                                 "--out", str(tmp_path / "v.pt")], "not a weights file"),
             (cli_pretrain_vit, ["--stage", "canvas", "--init", str(tmp_path / "bad.pt"),
                                 "--out", str(tmp_path / "v.pt")], "do not fit"),
             (cli_pretrain_vit, ["--stage", "slices", "--out", str(encoders / "s.pt")],
              "never overwrites"),
             # adapters after blocks 0-2 in the file, after block 1 in the model: said, not dropped
             (cli_train, ["--vit-init", str(encoders / "sra.pt"), "--sra-layers", "1",
                          "--out", str(tmp_path / "r")], "--vit-init: these weights do not fit"),
             (cli_ablate, ["--variants", "sms+sra", "--vit-init", str(tmp_path / "bad.pt"),
                           "--runs", str(tmp_path / "a")], "variant sms+sra"),
             (cli_ablate, ["--variants", "sms", "--sra-vit-init", str(encoders / "sra.pt"),
                           "--runs", str(tmp_path / "a")], "none is chosen"),
             (cli_pretrain_vit, ["--stage", "canvas", "--init", str(tmp_path / "nan.pt"),
                                 "--out", str(tmp_path / "v.pt")], "NaN or infinite"),
             (cli_train, ["--vit-init", str(tmp_path / "int.pt"), "--out", str(tmp_path / "r")],
              "not dense floating-point"),
             (cli_train, ["--vit-init", str(tmp_path / "sparse.pt"), "--out", str(tmp_path / "r")],
              "sparse_coo tensor")]
    for cli, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()
    assert not (tmp_path / "v.pt").exists()


def test_the_output_is_never_replaced_even_when_it_appears_during_the_run(tmp_path):
    out = tmp_path / "v.pt"
    out.write_text("another run's file")
    with pytest.raises(FileExistsError):
        ckpt.atomic_create(out, lambda tmp: torch.save({}, tmp))
    assert out.read_text() == "another run's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.pt"]   # no temporary left


def test_a_loss_that_is_not_finite_stops_the_stage():
    """Finite weights of absurd size (1e30 times a fresh ViT's) overflow in the first forward."""
    huge = {k: v * 1e30 for k, v in P.saved_weights(P.build_vit(()), "slices").items()}
    assert all(torch.isfinite(v).all() for v in huge.values())
    with pytest.raises(FloatingPointError, match="at step 1: training diverged"):
        P.pretrain("canvas", 2, (), huge, batch=2, progress=lambda line: None)
