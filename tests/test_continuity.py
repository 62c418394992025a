"""EntityGrid-QA's continuity task, checked on rendered pixels, not on the generator's word:
the thumbnail shows every board alike, a seam-cut board leaves each slice a crop that a board
with the other answer also leaves, and an uncut board's slice does show the break."""
import itertools
import random

import pytest
import torch
from PIL import Image, ImageDraw

from minihires.data import entitygrid as eg
from minihires.data.entities import (
    BOARD,
    BOARD_ALIGN,
    BOARD_FRAME,
    POSITIONS,
    band_pixels,
    bands,
    board_texture,
    crosses_seam,
    draw_board_pixels,
    place_board,
    render,
)
from minihires.model import slicing

CFG = eg.EntityGridConfig(tasks=eg.TASKS)
S = CFG.slice_size


class FixedRng(random.Random):
    """Stands in for random.Random in place_board: the split axis we ask for."""

    def __init__(self, axis, seed=0):
        super().__init__(seed)
        self.axis = axis

    def choice(self, seq):
        return self.axis if set(seq) == {"v", "h"} else super().choice(seq)


def board(position, broken, axis="v", seed=0):
    return place_board("red", position, CFG, broken, FixedRng(axis, seed))


def crops_of(image, thumbnail_filter="box"):
    return slicing.crops(image, (CFG.rows, CFG.cols), S, 0.0, thumbnail_filter)  # (5, 3, S, S)


def crops(entity, thumbnail_filter="box"):
    return crops_of(render([entity], CFG), thumbnail_filter)


def crops_from_pixels(entity, px):
    """The crops of a board drawn from an explicit interior px instead of its texture seed."""
    image = Image.new("RGB", (CFG.width, CFG.height), CFG.background)
    draw_board_pixels(ImageDraw.Draw(image), entity.colour, entity.bbox, entity.split[0], px)
    return crops_of(image)


def phases(px):
    """Each band's checkerboard phase left and right of the line, read back from the pixels."""
    n = len(px)
    rows = [max(0, BOARD_ALIGN * b - BOARD_FRAME) for b in range(bands(n))]   # a row of each band
    left = [(px[y][0] + y) % 2 for y in rows]
    right = [(px[y][n // 2] + y + n // 2) % 2 for y in rows]
    return left, right


def test_a_board_is_checkerboard_bands_continuous_but_one():
    assert bands(12) == 4                                        # rows 0-1, 2-5, 6-9, 10-11
    for seed, broken in itertools.product(range(20), (-1, 0, 1, 3)):
        px = board_texture(12, seed, broken)
        left, right = phases(px)
        assert px == band_pixels(12, left, right)               # bands of 1-px checkerboard
        assert px == board_texture(12, seed, broken)             # a seed is one texture
        jumps = [b for b in range(4) if left[b] != right[b]]
        assert jumps == ([] if broken < 0 else [broken])         # one band jumps at the line
        assert left == phases(board_texture(12, seed, -1))[0]  # same texture, broken or not
        for y in range(0, 12, 2):                                # every 2x2 block half lit
            assert all(sum(px[y][x:x + 2]) + sum(px[y + 1][x:x + 2]) == 2 for x in range(0, 12, 2))


@pytest.mark.parametrize("position,axis", list(itertools.product(POSITIONS, "vh")))
def test_the_box_thumbnail_shows_every_board_alike(position, axis):
    thumbs = [crops(board(position, broken, axis, seed))[0]
              for broken in (False, True) for seed in range(4)]
    assert all(torch.equal(thumbs[0], t) for t in thumbs[1:])


def test_a_bicubic_thumbnail_would_show_the_break():
    """Why the continuity task needs `thumbnail_filter="box"`: bicubic's wider kernel mixes
    neighbouring cells, so a thumbnail keeps a blurred trace of the texture and its symmetry."""
    whole = crops(board("center", False), "bicubic")[0]
    broken = crops(board("center", True), "bicubic")[0]
    assert (whole - broken).abs().max() > 0.01


def halves(entity):
    """The slices (1-based crop indices) holding the board's first and second halves."""
    x0, y0, x1, y1 = entity.bbox
    first = (x0 + 2, y0 + 2)                                   # interior corner, 1st half
    second = (x1 - 3, y1 - 3)                                  # interior corner, 2nd half
    slot = lambda x, y: 1 + (y // S) * CFG.cols + x // S
    return slot(*first), slot(*second)


@pytest.mark.parametrize("position", [p for p in POSITIONS if board(p, False).on_seam])
@pytest.mark.parametrize("seed", range(3))
def test_each_slice_of_a_seam_cut_board_is_also_a_slice_of_the_other_answer(position, seed):
    """A broken board's first-half slice is that of the whole board with the same first half;
    its second-half slice is that of the whole board with the same second half. So each slice
    alone is drawn by both answers: only the two halves together tell them apart."""
    e = board(position, True, seed=seed)
    axis, texture, band = e.split
    n = e.bbox[2] - e.bbox[0] - 4
    px = board_texture(n, texture, band)
    left, right = phases(px)
    whole = band_pixels(n, left, left)                         # the 1st half, continued
    twin = band_pixels(n, right, right)                        # the 2nd half, continued
    assert crops_from_pixels(e, px)[0].equal(crops(e)[0])
    first, second = halves(e)
    assert first != second                                    # the seam splits the halves
    mine, same_first, same_second = crops(e), crops_from_pixels(e, whole), crops_from_pixels(e, twin)
    assert torch.equal(mine[first], same_first[first])
    assert torch.equal(mine[second], same_second[second])
    assert not torch.equal(mine, same_first) and not torch.equal(mine, same_second)


@pytest.mark.parametrize("position", [p for p in POSITIONS if not board(p, False).on_seam])
def test_an_uncut_board_shows_its_break_inside_one_slice(position):
    for axis in "vh":
        whole, broken = crops(board(position, False, axis)), crops(board(position, True, axis))
        differ = [k for k in range(1, 5) if not torch.equal(whole[k], broken[k])]
        assert len(differ) == 1                               # one encoder sees both halves
        assert halves(board(position, True, axis)) == (differ[0], differ[0])


def test_boards_lie_on_patches_and_seam_cut_boards_are_split_along_their_seam():
    for position, axis in itertools.product(POSITIONS, "vh"):
        e = board(position, True, axis)
        x0, y0, x1, y1 = e.bbox
        assert x0 % BOARD_ALIGN == 0 and y0 % BOARD_ALIGN == 0
        assert ((x0 + x1) // 2) % BOARD_ALIGN == 0              # the line on a patch boundary
        cut_v = any(x0 < m * S < x1 for m in range(1, CFG.cols))
        cut_h = any(y0 < m * S < y1 for m in range(1, CFG.rows))
        assert e.on_seam == crosses_seam(e.bbox, S, CFG.rows, CFG.cols) == (cut_v or cut_h)
        if cut_v and not cut_h:
            assert e.split[0] == "v" and (x0 + x1) // 2 % S == 0
        if cut_h and not cut_v:
            assert e.split[0] == "h" and (y0 + y1) // 2 % S == 0


def test_either_half_alone_is_equally_likely_under_both_answers():
    """The second half's band phases are uniform for both answers (a broken band flips a
    uniform phase), and so are the first half's."""
    counts = {False: [0, 0], True: [0, 0]}
    for seed in range(2000):
        for broken in (False, True):
            e = board("top", broken, seed=seed)
            n = e.bbox[2] - e.bbox[0] - 4
            left, right = phases(board_texture(n, e.split[1], e.split[2]))
            b = e.split[2] if broken else seed % bands(n)
            counts[broken][right[b]] += 1
    for broken, c in counts.items():
        assert all(abs(k - 1000) < 115 for k in c), (broken, c)    # ~5 sigma of 1000 +- 22


def test_samples_are_deterministic_balanced_and_answerable():
    split = eg.test_split(9 * len(eg.TASKS), CFG)
    assert sorted(s.task for s in split) == sorted(eg.TASKS * 9)
    cont = [s for s in split if s.task == "continuity"]
    assert sorted(s.positions[0] for s in cont) == sorted(POSITIONS)   # each position once
    for s in split:
        again = eg.sample(s.seed, CFG)
        assert again.image.tobytes() == s.image.tobytes() and again.answer == s.answer
        if s.task == "continuity":
            target = s.entities[s.targets[0]]
            assert target.cls == BOARD and s.answer == ("yes" if target.broken else "no")
            assert s.on_seam == target.on_seam
            assert all(e.cls == BOARD for e in s.entities)
            assert (s.question, s.answer, "continuity") in eg.questions_about(s.entities, CFG)
    answers = [s.answer for s in eg.test_split(720, CFG) if s.task == "continuity"]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    assert set(eg.answer_vocabulary(CFG)) >= {"yes", "no"}


def test_the_default_tasks_keep_the_three_task_split():
    default = eg.EntityGridConfig()
    assert default.tasks == ("recognition", "position", "counting")
    assert [eg.sample(s, default).task for s in eg.test_seeds(6)] == list(default.tasks) * 2
    with pytest.raises(ValueError, match="tasks"):
        eg.EntityGridConfig(tasks=("continuity", "reading"))
    with pytest.raises(ValueError, match="tasks"):
        eg.EntityGridConfig(tasks=())


def test_scores_split_each_task_by_seam_side():
    split = eg.test_split(72, CFG)
    m = eg.score([s.answer if s.on_seam else "wrong" for s in split], split)
    for t in eg.TASKS:
        assert m["seam"][t]["on_seam"] == 100.0 and m["seam"][t]["off_seam"] == 0.0
        assert m["seam"][t]["discrepancy"] == -100.0
    assert m["counts"]["continuity/on_seam"] + m["counts"]["continuity/off_seam"] == 18
