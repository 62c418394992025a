"""Config validation: one `validate()` per config dataclass, a ValueError naming the field;
the holes it closes (SRA without blocks, overlapping slices restored as if disjoint); the
command line's view of them; and the model's own token-count guard, which `python -O` keeps."""
import dataclasses

import pytest
import torch

from minihires.cli.train import cli_train
from minihires.model import HiResLLaVA, slicing
from minihires.model.config import COMPRESSIONS, PRESETS, tiny
from minihires.training.ablate import VARIANTS
from minihires.training.train import TrainConfig


def replaced(cfg, part=None, **kw):
    """cfg with fields of the top level (part None) or of one part ("vit", "llama", ...) changed."""
    if part is None:
        return dataclasses.replace(cfg, **kw)
    return dataclasses.replace(cfg, **{part: dataclasses.replace(getattr(cfg, part), **kw)})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    PRESETS[name]().validate()


@pytest.mark.parametrize("part, change, message", [
    ("llama", dict(hidden_size=0), "llama.hidden_size must be a positive int"),
    ("llama", dict(vocab_size="256"), "llama.vocab_size must be a positive int"),
    ("llama", dict(hidden_size=124), "llama.hidden_size 124 is not divisible by llama.num_attention_heads 8"),
    ("llama", dict(hidden_size=136, num_attention_heads=8), "head_dim 17 must be even"),
    ("llama", dict(num_key_value_heads=3), "llama.num_key_value_heads 3 must divide"),
    ("llama", dict(rope_theta=0.0), "llama.rope_theta must be a positive number"),
    ("vit", dict(image_size=30), "vit.image_size 30 is not a multiple of vit.patch_size 4"),
    ("vit", dict(num_attention_heads=5), "vit.hidden_size 64 is not divisible by vit.num_attention_heads 5"),
    ("vit", dict(feature_layer=4), "vit.feature_layer 4 out of range for 3 layers"),
    ("vit", dict(sra_layers=(3,)), "vit.sra_layers has block 3"),    # feature_layer -1: blocks 0..2
    ("sra", dict(kernel_size=2), "sra.kernel_size must be odd and positive"),
    ("sra", dict(downsample=0), "sra.downsample must be >= 1"),
    ("sra", dict(num_heads=3), "sra.num_heads 3 does not divide the width 64"),
    ("sms", dict(window=3), "sms.window 3 does not divide the token grid g = 8"),
    ("sms", dict(num_heads=3), "sms.num_heads 3 does not divide the width 64"),
    ("sms", dict(mlp_ratio=0.0), "sms.mlp_ratio must be a positive number"),
    (None, dict(mode="uhd"), "mode must be one of ('hires', 'llava15')"),
    (None, dict(compression="max"), f"compression must be one of {COMPRESSIONS}"),
    (None, dict(overlap=1.0), "overlap must be in [0, 1)"),
    (None, dict(max_slices=0), "max_slices must be >= 1"),
    (None, dict(image_token_index=-1), "image_token_index must be an int >= 0 or None"),
])
def test_a_bad_field_is_named_by_validate_and_by_the_model(part, change, message):
    cfg = replaced(tiny(), part, **change)
    with pytest.raises(ValueError) as e:
        cfg.validate()
    assert message in str(e.value)
    with pytest.raises(ValueError) as e:                      # the model checks the same way
        HiResLLaVA(cfg)
    assert message in str(e.value)


def test_a_part_the_config_does_not_build_is_not_held_to_its_width():
    """sra.num_heads must divide the ViT width only when adapters are built; sms.num_heads
    only when the Self-Mining sampler is."""
    replaced(replaced(tiny(), "sra", num_heads=3), use_sra=False).validate()
    replaced(replaced(tiny(), "sms", num_heads=3), compression="avg").validate()
    replaced(replaced(tiny(), "sms", window=3), compression="none").validate()


def test_sra_with_no_blocks_is_an_error():
    """use_sra=True with an empty vit.sra_layers once built no adapter and said nothing (and
    the FLOP budget counted 0 for SRA)."""
    cfg = replaced(tiny(), "vit", sra_layers=())
    for check in (cfg.validate, lambda: HiResLLaVA(cfg)):
        with pytest.raises(ValueError, match=r"use_sra is True but vit\.sra_layers is empty"):
            check()
    for fine in (dict(use_sra=False), dict(use_slices=False), dict(mode="llava15")):
        m = HiResLLaVA(replaced(cfg, **fine))                 # SRA off: nothing to run after
        assert len(m.vision_tower.sra) == 0


def test_overlap_with_sra_is_an_error():
    """SliceRestore stitches the slices back as if they were disjoint: overlapping slices
    with SRA on once trained silently on a wrong canvas."""
    cfg = replaced(tiny(), overlap=0.25)
    assert cfg.use_sra                                        # the preset's default
    for check in (cfg.validate, lambda: HiResLLaVA(cfg), TrainConfig(overlap=0.25).validate):
        with pytest.raises(ValueError, match=r"overlap 0\.25 needs use_sra=False"):
            check()
    HiResLLaVA(replaced(cfg, use_sra=False))
    TrainConfig(overlap=0.25, use_sra=False).validate()


def test_train_overlap_without_no_sra_is_one_error_line_and_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli_train(["--overlap", "0.25", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: --overlap: overlap 0.25 needs use_sra=False") and \
        len(err.splitlines()) == 1, err
    assert not out.exists()                                   # refused before the folder is claimed


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_ablation_variant_is_a_valid_config(variant):
    name, switches = VARIANTS[variant]
    tc = TrainConfig(**switches)
    tc.validate()
    cfg = tc.model_config()
    if cfg.overlap > 0:
        assert not cfg.use_sra, name


def test_the_token_count_guard_is_an_error_not_an_assert(monkeypatch):
    """encode_images checks that it laid out slicing.num_image_tokens tokens per image with a
    RuntimeError (a bare assert vanishes under python -O)."""
    cfg = tiny()
    torch.manual_seed(0)
    m = HiResLLaVA(cfg).eval()
    grids, real = [(1, 2)], slicing.num_image_tokens
    pixels = torch.randn(3, 3, cfg.vit.image_size, cfg.vit.image_size)
    with torch.no_grad():
        [seq] = m.encode_images(pixels, grids)
    assert seq.shape[0] == real((1, 2), cfg)
    monkeypatch.setattr(slicing, "num_image_tokens", lambda grid, c: real(grid, c) + 1)
    n = real((1, 2), cfg)
    with pytest.raises(RuntimeError, match=rf"laid out as {n} tokens.*says {n + 1}"), torch.no_grad():
        m.encode_images(pixels, grids)
