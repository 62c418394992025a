"""The seam-board experiment's boards keep the benchmark's promises, checked on pixels: box
thumbnails alike for both answers, each slice of a seam-cut board also given by a board with
the other answer, no count that tells the sides apart; and its two commands run.

Part of the suite: `python -m pytest` collects experiments/ too."""
import random

import pytest
import torch
from PIL import Image, ImageDraw

import seam_boards as SB
from minihires.data import entities, entitygrid
from minihires.model import slicing

CFG = SB.CFG
SEAM_CUT = [p for p in entities.POSITIONS if p in ("top", "left", "right", "bottom")]


def crops(board, position, split):
    e = SB.place(board)("red", position, CFG, False, random.Random(0))
    e = entities.Entity(entities.BOARD, "red", position, e.bbox, e.on_seam, (e.split[0], *split))
    image = Image.new("RGB", (CFG.width, CFG.height))
    SB.draw(board)(ImageDraw.Draw(image), "red", e.bbox, e.split)
    return e, slicing.crops(image, (CFG.rows, CFG.cols), CFG.slice_size, 0.0, "box")


@pytest.mark.parametrize("board", ["A", "B", "C"])
def test_boards_hide_the_answer_from_the_thumbnail_and_from_each_slice(board):
    rng = random.Random(board)
    for position in SEAM_CUT:
        for _ in range(4):
            near, far = SB.halves(board, True, rng)
            assert near != far and sorted(near) == sorted(far)        # no count tells them apart
            e, broken = crops(board, position, (near, far))
            assert e.on_seam
            _, whole_near = crops(board, position, (near, near))
            _, whole_far = crops(board, position, (far, far))
            assert torch.equal(broken[0], whole_near[0]) and torch.equal(broken[0], whole_far[0])
            for k in range(1, 5):
                assert torch.equal(broken[k], whole_near[k]) or torch.equal(broken[k], whole_far[k])
            assert not torch.equal(broken, whole_near)


@pytest.mark.parametrize("neighbours", [True, False])
def test_either_side_alone_has_the_same_distribution_for_both_answers(neighbours):
    """By enumeration, boards A and B: P(near side) = P(far side of a broken board)."""
    from collections import Counter
    from fractions import Fraction
    sides = [tuple((k >> i) & 1 for i in range(6)) for k in range(64)]
    weight = {s: Fraction(len(SB._swaps(s, neighbours))) for s in sides}
    near = {s: w / sum(weight.values()) for s, w in weight.items()}
    far = Counter()
    for s in sides:
        for i, k in SB._swaps(s, neighbours):
            swapped = list(s)
            swapped[i], swapped[k] = s[k], s[i]
            far[tuple(swapped)] += near[s] / len(SB._swaps(s, neighbours))
    assert {s: far[s] for s in sides} == near


def test_board_b_swaps_two_bands_that_are_not_neighbours():
    rng = random.Random(0)
    for _ in range(200):
        near, far = SB.halves("B", True, rng)
        changed = [i for i in range(6) if near[i] != far[i]]
        assert len(changed) == 2 and changed[1] - changed[0] >= 2
        near, far = SB.halves("A", True, rng)
        changed = [i for i in range(6) if near[i] != far[i]]
        assert len(changed) == 2 and changed[1] - changed[0] == 1


def test_use_puts_the_board_in_the_generator(monkeypatch):
    monkeypatch.setattr(entities, "draw_board", entities.draw_board)
    monkeypatch.setattr(entitygrid, "place_board", entitygrid.place_board)
    before = [s.image.tobytes() for s in entitygrid.test_split(8, CFG)]
    SB.use("C")                                         # the package's own board: no change
    assert [s.image.tobytes() for s in entitygrid.test_split(8, CFG)] == before
    SB.use("B")
    after = entitygrid.test_split(8, CFG)
    cont = [i for i, s in enumerate(after) if s.task == "continuity"]
    assert cont and all(len(after[i].entities[0].split[1]) == 6 for i in cont)
    assert all(before[i] != after[i].image.tobytes() for i in cont)
    assert all(before[i] == after[i].image.tobytes() for i in range(8) if i not in cont)
    SB.use("C")
    assert [s.image.tobytes() for s in entitygrid.test_split(8, CFG)] == before


def test_the_phase_board_draws_as_the_package_drew_it():
    """The first board, kept here: halves of one checkerboard phase each, broken when they
    differ; each half alone a perfect checkerboard."""
    e = SB.place("phase")("red", "top", CFG, True, random.Random(0))
    assert e.on_seam and e.split[0] == "v" and e.split[1] != e.split[2] and e.broken
    image = Image.new("RGB", (CFG.width, CFG.height))
    SB.draw("phase")(ImageDraw.Draw(image), "red", e.bbox, e.split)
    x0, y0, x1, y1 = e.bbox
    lit = {(x, y) for y in range(y0 + 2, y1 - 2) for x in range(x0 + 2, x1 - 2)
           if image.getpixel((x, y)) != (0, 0, 0)}
    cx = (x0 + x1) // 2
    for x, y in lit:
        assert (x + y + (e.split[2] if x >= cx else e.split[1])) % 2 == 0
    assert len(lit) == (x1 - x0 - 4) * (y1 - y0 - 4) // 2


def test_probe_runs_and_reports_both_line_placements():
    x, y, mid, board = SB.slice_batch("B", random.Random(0), 64)
    assert x.shape == (64, 3, CFG.slice_size, CFG.slice_size) and 10 < int(y.sum()) < 54
    assert 0 < int(mid.sum()) < 64 and board.all()     # both kinds of off-seam line occur
    x, y, mid, board = SB.slice_batch("C", random.Random(0), 64, classes=True)
    assert 10 < int(board.sum()) < 54 and ((y >= 2) == ~board).all() and int(y.max()) <= 9
    assert not mid[~board].any()
    lines = []
    _, curve = SB.probe("phase", 2, every=1, progress=lines.append)
    assert [c[0] for c in curve] == [1, 2] and len(lines) == 2
    assert all(0.0 <= a <= 1.0 for c in curve for a in c[1:4])
    _, curve = SB.probe("C", 1, progress=lines.append, classes=True)
    assert "classes" in lines[-1] and 0.0 <= curve[-1][4] <= 1.0


def test_command_line_errors_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        SB.cli_seam_boards(["probe", "--board", "D"])
    assert "--board" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        SB.cli_seam_boards(["probe", "--board", "C", "--steps", "0"])
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):                     # the package's flags, after --
        SB.cli_seam_boards(["ablate", "--board", "C", "--", "--vit-init", "/nonexistent/vit.pt"])
    assert "--vit-init" in capsys.readouterr().err
