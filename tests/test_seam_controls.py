"""The two seam controls beside SliceRestore: overlapping windows at native resolution, and
one ViT pass over the whole canvas (`ModelConfig.overlap`, `ModelConfig.whole_canvas`)."""
import dataclasses

import pytest
import torch
from PIL import Image

from minihires.model import HiResLLaVA, image_inputs, preset, slicing
from minihires.model.slicing import slice_boxes, slice_grid


def tiny(**kw):
    return dataclasses.replace(preset("tiny"), **kw)


@pytest.mark.parametrize("grid,overlap,want", [((2, 2), 0.0, (2, 2)), ((2, 2), 0.5, (3, 3)),
                                               ((2, 3), 0.5, (3, 5)), ((1, 2), 0.25, (1, 3)),
                                               ((3, 1), 0.75, (9, 1))])
def test_overlap_adds_windows_on_the_same_canvas(grid, overlap, want):
    assert slice_grid(grid, overlap) == want
    canvas, boxes = slice_boxes(grid, 32, overlap)
    assert canvas == (grid[1] * 32, grid[0] * 32) and len(boxes) == want[0] * want[1]
    for left, top, right, bottom in boxes:             # S x S windows inside the canvas
        assert right - left == bottom - top == 32
        assert 0 <= left and right <= canvas[0] and 0 <= top and bottom <= canvas[1]
    assert boxes[-1][2:] == canvas                     # the last window is flush with the edge


def test_overlapping_slices_are_native_resolution_windows():
    """Each slice is a plain window of the same c*S x r*S canvas as without overlap: no
    resampling, so 1-pixel patterns survive, and a half-slice stride holds every seam's
    neighbourhood whole in the middle window."""
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=g,
                                        dtype=torch.uint8).numpy())
    plain = slicing.crops(img, (2, 2), 32, 0.0)                         # (5, 3, 32, 32)
    over = slicing.crops(img, (2, 2), 32, 0.5)                          # (10, 3, 32, 32)
    canvas = slicing.normalize(slicing.resize_for_grid(img, (2, 2), 32))
    for k, (left, top, right, bottom) in enumerate(slice_boxes((2, 2), 32, 0.5)[1]):
        assert torch.equal(over[1 + k], canvas[:, top:bottom, left:right])
    assert torch.equal(over[1], plain[1]) and torch.equal(over[9], plain[4])   # the corners
    cfg = tiny(use_sra=False, overlap=0.5)
    crops, grid = image_inputs(img, cfg)
    assert grid == (3, 3) and crops.shape[0] == 10
    torch.manual_seed(0)
    seq = HiResLLaVA(cfg).eval().encode_images(crops, [grid])[0]
    assert seq.shape[0] == slicing.num_image_tokens((3, 3), cfg)


def _pair(**kw):
    torch.manual_seed(0)
    whole = HiResLLaVA(tiny(use_sra=False, whole_canvas=True, **kw)).eval()
    sliced = HiResLLaVA(tiny(use_sra=False, **kw)).eval()
    sliced.load_state_dict(whole.state_dict())
    return whole, sliced


def test_whole_canvas_on_one_slice_is_ordinary_slicing():
    """A 1x1 grid's canvas is its one slice: the control and plain slicing agree exactly."""
    whole, sliced = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = whole.encode_images(x, [(1, 1)])[0], sliced.encode_images(x, [(1, 1)])[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_whole_canvas_features_are_the_canvas_pass_cut_into_pieces():
    whole, _ = _pair()
    torch.manual_seed(1)
    x = torch.randn(1 + 6, 3, 32, 32)                                  # thumbnail + 2x3 slices
    vit = whole.vision_tower
    canvas = x[1:].reshape(2, 3, 3, 32, 32).permute(2, 0, 3, 1, 4).reshape(1, 3, 64, 96)
    with torch.no_grad():
        feats = whole._whole_canvas_features(x, [(2, 3)])               # (7, g, g, Dv)
        tokens = vit(canvas)[0, 1:].reshape(2, 8, 3, 8, -1)             # (r, g, c, g, Dv)
        want = tokens.permute(0, 2, 1, 3, 4).reshape(6, 8, 8, -1)       # (r*c, g, g, Dv)
        torch.testing.assert_close(feats[1:], want)
        torch.testing.assert_close(feats[0], vit(x[:1])[0, 1:].reshape(8, 8, -1))


def test_only_the_whole_canvas_sees_across_seams():
    """A token of slice 1 depends on slice 2's pixels in the control, never in plain slicing
    (without SRA nothing crosses a seam)."""
    whole, sliced = _pair()
    h = slicing.tokens_per_side(whole.cfg)
    first_slice_token = h * h + 1                      # after the thumbnail and its newline
    for model, crosses in ((whole, True), (sliced, False)):
        x = torch.randn(5, 3, 32, 32, requires_grad=True)
        model.encode_images(x, [(2, 2)])[0][first_slice_token].sum().backward()
        assert (x.grad[2].abs().sum() > 0) == crosses
        assert x.grad[1].abs().sum() > 0


@pytest.mark.parametrize("kw", [dict(whole_canvas=True),                       # SRA on
                                dict(whole_canvas=True, use_sra=False, overlap=0.5),
                                dict(whole_canvas=True, use_sra=False, use_slices=False),
                                dict(thumbnail_filter="lanczos")])
def test_controls_that_make_no_sense_are_named_errors(kw):
    with pytest.raises(ValueError, match="whole_canvas|thumbnail_filter"):
        tiny(**kw).validate()


def test_train_runs_the_seam_benchmark_settings(tmp_path, capsys):
    """`train --tasks ... --thumbnail-filter box --whole-canvas --no-sra` trains, scores the
    continuity task by seam side, and a resume keeps every setting."""
    import json

    from minihires.cli.train import cli_train
    from minihires.training import checkpoint as ckpt
    out = tmp_path / "run"
    argv = ["--steps", "2", "--batch-size", "2", "--eval-n", "8", "--tasks",
            "continuity,recognition", "--thumbnail-filter", "box", "--whole-canvas", "--no-sra",
            "--out", str(out), "--quiet"]
    assert cli_train(argv) == 0
    printed = capsys.readouterr().out
    assert "continuity on-seam" in printed and "whole_canvas=True" in printed
    m = json.loads((out / ckpt.METRICS).read_text())
    assert m["tasks"] == ["continuity", "recognition"] and m["whole_canvas"] is True
    assert m["counts"]["continuity"] == 4 and m["counts"]["recognition"] == 4
    assert m["counts"]["continuity/on_seam"] + m["counts"]["continuity/off_seam"] == 4
    model, _, cfg = ckpt.load_run(out)
    assert model.cfg.whole_canvas and model.cfg.thumbnail_filter == "box"
    assert cfg["data"].tasks == ("continuity", "recognition")
