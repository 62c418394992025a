"""minihires.probe: the recomputed attention is the layer's own, token boxes follow the layout,
entity_attention's masses are sane, and `eval --attention` prints them."""
import dataclasses

import pytest
import torch

from minihires.analysis import probe
from minihires.data import entitygrid
from minihires.model import HiResLLaVA, slicing
from minihires.model.config import LlamaConfig, tiny
from minihires.model.llama import Llama, rotary_cos_sin
from minihires.model.tokenizer import Tokenizer


def test_last_row_attention_reproduces_the_layer_output():
    torch.manual_seed(0)
    llm = Llama(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, rope_theta=50.0))
    attn = llm.layers[0].self_attn
    x = torch.randn(3, 11, 32)
    cos, sin = rotary_cos_sin(torch.arange(11).expand(3, 11), attn.head_dim, 50.0, x.dtype)
    a = probe.last_row_attention(attn, x, cos, sin)                      # (3, 4, 11)
    assert a.shape == (3, 4, 11)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4))
    # weights @ values through o_proj must give the layer's own output at the last position
    v = attn.v_proj(x).view(3, 11, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)  # (3, 4, 11, 8)
    y = attn.o_proj((a[:, :, None] @ v).reshape(3, 32))
    torch.testing.assert_close(y, attn(x, cos, sin, None, None)[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [(2, 2), (1, 3), (2, 1)])
def test_token_boxes_tile_the_canvas(grid):
    cfg = tiny()
    boxes = probe.token_boxes(cfg, grid, 96, 64)
    assert len(boxes) == slicing.num_image_tokens(grid, cfg)
    h = slicing.tokens_per_side(cfg)
    thumb, slices = boxes[:h * h], [b for b in boxes[h * h:] if b is not None]
    area = lambda bs: sum((b[2] - b[0]) * (b[3] - b[1]) for b in bs)  # noqa: E731
    assert area(thumb) == pytest.approx(96 * 64) and area(slices) == pytest.approx(96 * 64)
    assert boxes[h * h] is None and boxes.count(None) == 1 + grid[0]
    # the first token of the last slice row starts at that row's top-left corner
    first_last_row = boxes[len(boxes) - 1 - grid[1] * h * h]
    assert first_last_row[:2] == pytest.approx((0, 64 * (grid[0] - 1) / grid[0]))


def test_entity_attention_masses():
    torch.manual_seed(0)
    cfg = tiny()
    data_cfg = entitygrid.EntityGridConfig(slice_size=cfg.vit.image_size)
    tok = Tokenizer.train(entitygrid.question_texts(data_cfg), 256)
    cfg.image_token_index = tok.image_id
    model = HiResLLaVA(cfg)
    samples = entitygrid.test_split(60, data_cfg)
    mass = probe.entity_attention(model, tok, [s for s in samples if s.task == "position"])
    L, nh = cfg.llama.num_hidden_layers, cfg.llama.num_attention_heads
    assert mass.shape == (L, nh, 2)
    assert (mass > 0).all() and (mass.sum(-1) <= 1).all()
    with pytest.raises(ValueError, match="two entities"):
        probe.entity_attention(model, tok, [s for s in samples if len(s.entities) == 1])
    text = probe.entity_attention_table(mass, "title")
    assert text.splitlines()[0] == "title" and len(text.splitlines()) == 2 + L * nh


def test_token_boxes_thumbnail_only_and_llava15():
    cfg = dataclasses.replace(tiny(), use_slices=False)
    boxes = probe.token_boxes(cfg, (2, 2), 64, 64)
    assert len(boxes) == slicing.num_image_tokens((2, 2), cfg) and boxes[-1] is None
    with pytest.raises(ValueError, match="llava15"):
        probe.token_boxes(dataclasses.replace(tiny(), mode="llava15"), (2, 2), 64, 64)
    with pytest.raises(ValueError, match="overlap is 0.25"):
        probe.token_boxes(dataclasses.replace(tiny(), overlap=0.25, use_sra=False), (2, 2), 64, 64)


def test_eval_attention_on_an_overlap_run_is_a_clear_error(tmp_path, capsys):
    from minihires.cli.eval import cli_eval
    from minihires.cli.train import cli_train
    run = tmp_path / "overlap"
    assert cli_train(["--steps", "1", "--batch-size", "2", "--eval-n", "0", "--overlap", "0.25",
                      "--no-sra", "--quiet", "--out", str(run)]) == 0
    with pytest.raises(SystemExit):
        cli_eval([str(run), "--n", "9", "--attention"])
    err = capsys.readouterr().err
    assert err.startswith("error: --attention") and "overlap 0.25" in err
