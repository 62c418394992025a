"""minihires.budget: token counts against the model's real splice and transformers'
LLaVA-NeXT, FLOP formulas against torch.utils.flop_counter, parameters against transformers."""
from __future__ import annotations

import dataclasses
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minihires.analysis import budget
from minihires.cli.tokens import cli_tokens
from minihires.model import HiResLLaVA, image_inputs
from minihires.model.config import paper, tiny

# LLaVA-NeXT sizes (width, height): square, wide, tall, extreme, tiny, odd
NEXT_SIZES = [(672, 672), (1344, 896), (896, 1344), (1008, 336), (336, 1008), (500, 333),
              (1000, 200), (224, 224), (4000, 3000), (799, 601), (1920, 1080), (300, 900)]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- LLaVA-NeXT


def transformers_next_counts(width, height):
    """(processor's count, model's packed feature count) from transformers' LLaVA-NeXT code."""
    tf = pytest.importorskip("transformers", reason="LLaVA-NeXT counts are checked against transformers")
    from transformers.models.llava_next.modeling_llava_next import (
        LlavaNextModel,
        get_anyres_image_grid_shape,
    )
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
    cfg = tf.LlavaNextConfig()
    proc = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints),
                           patch_size=14, num_additional_image_tokens=1)
    proc._get_unpadded_features = partial(LlavaNextProcessor._get_unpadded_features, proc)
    n_proc = LlavaNextProcessor._get_number_of_features(proc, height, width, 336, 336) - 1  # CLS
    rows, cols = get_anyres_image_grid_shape((height, width), cfg.image_grid_pinpoints, 336)
    feats = torch.zeros(1 + rows * cols, 24 * 24, 1)       # (crops, g*g, D): only shapes matter
    packed, lens = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=cfg), [feats], torch.tensor([[height, width]]), "default",
        image_newline=torch.zeros(1))
    return n_proc, int(lens[0]), (rows, cols), cfg.image_grid_pinpoints


@pytest.mark.parametrize("width, height", NEXT_SIZES)
def test_llava_next_tokens_match_transformers(width, height):
    n_proc, n_model, grid, pins = transformers_next_counts(width, height)
    assert pins == budget.NEXT_PINPOINTS
    ours, our_grid = budget.llava_next_tokens(width, height, paper().vit)
    assert ours == n_proc == n_model and our_grid == grid


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000))
def test_select_best_resolution_is_transformers(width, height):
    pytest.importorskip("transformers", reason="compared with transformers' rule")
    from transformers.image_processing_utils import select_best_resolution
    pins = budget.NEXT_PINPOINTS
    assert budget.select_best_resolution(height, width, pins) == \
        tuple(select_best_resolution((height, width), pins))


# ----------------------------------------------------------------------------- HiRes-LLaVA


def cfg_for(**kw):
    cfg = tiny()
    cfg.max_slices = 6
    cfg.sra = dataclasses.replace(cfg.sra, downsample=3)    # ceil pooling: canvases of 8k tokens
    return dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("kw", [{}, {"compression": "none"}, {"use_slices": False},
                                {"mode": "llava15"}, {"use_sra": False, "overlap": 0.5},
                                {"use_sra": False, "whole_canvas": True}],
                         ids=["sms", "none", "thumb", "llava15", "overlap", "whole-canvas"])
def test_hires_tokens_match_the_spliced_count(kw):
    cfg = cfg_for(**kw)
    torch.manual_seed(0)
    model = HiResLLaVA(cfg).eval()
    for w, h in [(20, 20), (100, 30), (64, 64), (64, 96), (200, 40), (33, 70)]:
        crops, grid = image_inputs(Image.new("RGB", (w, h), (90, 30, 200)), cfg)
        with torch.no_grad():
            seq = model.encode_images(crops, [grid])[0]
        rows = {r.method: r for r in budget.budget(w, h, cfg, prompt=0)}
        row = rows["LLaVA-1.5" if cfg.mode == "llava15" else "HiRes-LLaVA"]
        assert row.tokens == seq.shape[0] and row.crops == crops.shape[0], (w, h)


def counted(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (3, 1)])
def test_vision_flops_match_the_flop_counter(grid):
    cfg = cfg_for()
    torch.manual_seed(0)
    model = HiResLLaVA(cfg).eval()
    model.sampler.use_kernel = False                        # the reference: einsums it can count
    crops = 1 + grid[0] * grid[1]
    x = torch.randn(crops, 3, 32, 32)
    g = cfg.vit.grid
    want = (budget.vit_flops(cfg.vit, crops) + budget.sra_flops(cfg, grid)
            + budget.connector_flops(cfg, crops, crops * (g // 2) ** 2))
    assert counted(lambda: model.encode_images(x, [grid])) == want

    base = dataclasses.replace(cfg, mode="llava15")
    model = HiResLLaVA(base).eval()
    want = budget.vit_flops(cfg.vit, 1) + budget.connector_flops(base, 1, g * g)
    assert counted(lambda: model.encode_images(x[:1], [grid])) == want


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (2, 3)])
def test_whole_canvas_vision_flops_match_the_flop_counter(grid):
    """The control's price: one ViT pass over the r*S x c*S canvas (attention over all its
    tokens at once) instead of r*c passes over S x S slices."""
    cfg = cfg_for(use_sra=False, whole_canvas=True)
    torch.manual_seed(0)
    model = HiResLLaVA(cfg).eval()
    model.sampler.use_kernel = False
    crops = 1 + grid[0] * grid[1]
    x = torch.randn(crops, 3, 32, 32)
    g = cfg.vit.grid
    want = (budget.vit_flops(cfg.vit, 1) + budget.vit_flops(cfg.vit, 1, grid)
            + budget.connector_flops(cfg, crops, crops * (g // 2) ** 2))
    assert counted(lambda: model.encode_images(x, [grid])) == want
    if grid != (1, 1):
        assert budget.vit_flops(cfg.vit, 1, grid) > budget.vit_flops(cfg.vit, grid[0] * grid[1])


@pytest.mark.parametrize("kv_heads, tied", [(4, True), (2, False)])
def test_llm_flops_and_kv_cache_match_the_model(kv_heads, tied):
    cfg = tiny().llama
    cfg = dataclasses.replace(cfg, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    from minihires.model.llama import Llama
    llm = Llama(cfg).eval()
    T = 37
    x = torch.randn(1, T, cfg.hidden_size)
    assert counted(lambda: llm(x)) == budget.llm_prefill_flops(cfg, T)
    cache = llm.new_cache()
    with torch.no_grad():
        llm(x, cache=cache)
    stored = sum(t.numel() for t in cache.keys + cache.values + cache.block_inputs)
    assert cfg.token_shift and stored * budget.KV_BYTES == budget.kv_cache_bytes(cfg, T)


# ----------------------------------------------------------------------------- parameters, CLI


def test_paper_parameter_counts_match_transformers():
    tf = pytest.importorskip("transformers", reason="compared with transformers' models")
    parts = budget.parameter_counts(paper())
    with torch.device("meta"):
        clip = tf.CLIPVisionModel(tf.LlavaConfig().vision_config)         # ViT-L/14-336
        llama = tf.LlamaForCausalLM(tf.LlamaConfig())                     # LLaMA-7B shape
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert parts["vision tower"] == count(clip)
    assert parts["language model"] == count(llama)
    assert 0.29e9 < parts["vision tower"] < 0.31e9 and 6.6e9 < parts["language model"] < 6.8e9
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_cli(capsys):
    assert cli_tokens(["--size", "672x672", "--size", "1344x896,200x100",
                              "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    cfg = tiny()
    for w, h in [(672, 672), (1344, 896), (200, 100)]:
        n, grid = budget.hires_tokens(w, h, cfg)
        line = next(l for l in out.splitlines() if l.startswith(f"{w}x{h}") and "HiRes" in l)
        assert f"{grid[0]}x{grid[1]}" in line.split() and str(n) in line.split()
    assert "parameters of preset tiny" in out
    with pytest.raises(SystemExit):
        cli_tokens(["--size", "672by672"])
    assert "--size must be WIDTHxHEIGHT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_tokens(["--preset", "huge"])
    assert "unknown preset" in capsys.readouterr().err
