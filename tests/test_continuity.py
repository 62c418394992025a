"""EntityGrid-QA's continuity task, checked on rendered pixels, not on the generator's word:
the thumbnail shows every board alike, each side of a board has the same distribution for
both answers, a seam-cut board leaves each slice a crop that a board with the other answer
also gives, and an uncut board's break is a mark that no whole board shows."""
import itertools
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch

from minihires.data import entitygrid as eg
from minihires.data.entities import (BOARD, POSITIONS, Entity, band_count, board_halves,
                                     crosses_seam, place_board, render, swaps)
from minihires.model import slicing

CFG = eg.EntityGridConfig(tasks=eg.TASKS)
S = CFG.slice_size
N = band_count(CFG.entity_px)                       # 6 bands on the default canvas
SIDES = [tuple((k >> i) & 1 for i in range(N)) for k in range(2 ** N)]


def board(position, near, far, axis="v"):
    """A board at `position` with the band phases asked for, split along `axis` unless a seam
    decides (as `place_board` does)."""
    e = place_board("red", position, CFG, False, random.Random(0))
    axis = e.split[0] if e.on_seam and position != "center" else axis
    return Entity(BOARD, "red", position, e.bbox, e.on_seam, (axis, near, far))


def swapped(side, i, k):
    far = list(side)
    far[i], far[k] = side[k], side[i]
    return tuple(far)


def crops(entity, thumbnail_filter="box"):
    image = render([entity], CFG)
    return slicing.crops(image, (CFG.rows, CFG.cols), S, 0.0, thumbnail_filter)  # (5, 3, S, S)


def some_boards(position, axis, count=12):
    """{broken: [board, ...]}: whole boards and broken ones at `position`."""
    rng = random.Random(position + axis)
    out = {False: [], True: []}
    for _ in range(count):
        for broken in (False, True):
            out[broken].append(board(position, *board_halves(N, broken, rng), axis))
    return out


@pytest.mark.parametrize("position,axis", list(itertools.product(POSITIONS, "vh")))
def test_the_box_thumbnail_shows_every_board_alike(position, axis):
    boards = some_boards(position, axis)
    thumbs = [crops(b)[0] for bs in boards.values() for b in bs]
    assert all(torch.equal(thumbs[0], t) for t in thumbs[1:])


def test_a_bicubic_thumbnail_would_show_the_break():
    """Why the continuity task needs `thumbnail_filter="box"`: bicubic's wider kernel rings
    at the break."""
    side = (0, 1, 1, 0, 1, 0)
    whole = crops(board("center", side, side), "bicubic")[0]
    broken = crops(board("center", side, swapped(side, 0, 2)), "bicubic")[0]
    assert (whole - broken).abs().max() > 0.02


def test_each_side_alone_has_the_same_distribution_for_both_answers():
    """Exactly, by enumeration: P(near side) = P(far side | broken) = P(far side | whole), and
    a swap keeps the number of bands of each phase (no count tells the sides apart)."""
    weight = {s: Fraction(len(swaps(s))) for s in SIDES}
    total = sum(weight.values())
    near = {s: w / total for s, w in weight.items()}
    far_broken = Counter()
    for s in SIDES:
        for i, k in swaps(s):
            far_broken[swapped(s, i, k)] += near[s] / len(swaps(s))
            assert sorted(swapped(s, i, k)) == sorted(s) and k - i >= 2
    assert {s: far_broken[s] for s in SIDES} == near
    # and the sampler draws that law: near sides over 4000 draws, each side's frequency
    rng = random.Random(0)
    draws = [board_halves(N, broken, rng) for broken in (False, True) for _ in range(2000)]
    for which in (0, 1):
        freq = Counter(d[which] for d in draws[2000:])     # broken boards' near, then far side
        assert max(abs(freq[s] / 2000 - float(p)) for s, p in near.items()) < 0.02
    assert all(d[0] == d[1] for d in draws[:2000]) and all(d[0] != d[1] for d in draws[2000:])


@pytest.mark.parametrize("position", [p for p in POSITIONS if board(p, SIDES[1], SIDES[1]).on_seam])
def test_each_slice_of_a_seam_cut_board_is_a_crop_of_a_board_with_the_other_answer(position):
    """A broken board (near A, far B) gives each slice the crop that the whole board A gives
    (on the near side) or the whole board B gives (on the far side): no slice alone tells the
    answers apart; the break shows only across the seam."""
    rng = random.Random(position)
    for _ in range(5):
        near, far = board_halves(N, True, rng)
        broken = crops(board(position, near, far))
        whole_near, whole_far = crops(board(position, near, near)), crops(board(position, far, far))
        for k in range(1, 1 + CFG.rows * CFG.cols):
            assert torch.equal(broken[k], whole_near[k]) or torch.equal(broken[k], whole_far[k])
        assert not torch.equal(broken, whole_near)               # the break is real


def interior_patches(entity):
    """The ViT's 4x4 patches (canvas-aligned) inside the board's frame, as bytes."""
    img = np.asarray(render([entity], CFG))[..., 0] > 0
    x0, y0, x1, y1 = entity.bbox
    return {img[y:y + 4, x:x + 4].tobytes() for y in range(0, CFG.height, 4)
            for x in range(0, CFG.width, 4)
            if x0 + 2 <= x and x + 4 <= x1 - 2 and y0 + 2 <= y and y + 4 <= y1 - 2}


@pytest.mark.parametrize("position,axis", [("top left", "v"), ("top left", "h"),
                                           ("bottom right", "v"), ("bottom right", "h")])
def test_an_uncut_board_shows_its_break_inside_one_slice(position, axis):
    """An off-seam board lies in one slice, whose crop differs between the answers. Where the
    line crosses patches in their middle (x or y = 2 mod 4), the break is a patch that no
    whole board of either orientation contains; along patch edges it is not."""
    whole_patches = set()
    for side in SIDES:
        if swaps(side):
            for ax in "vh":
                whole_patches |= interior_patches(board(position, side, side, ax))
    rng = random.Random(1)
    e = board(position, *board_halves(N, True, rng), axis)
    assert not e.on_seam
    w = crops(board(position, e.split[1], e.split[1], axis))
    differ = [k for k in range(1, 5) if not torch.equal(crops(e)[k], w[k])]
    assert len(differ) == 1                                  # one slice holds the whole board
    x0, y0, x1, y1 = e.bbox
    line = (x0 + x1) // 2 if axis == "v" else (y0 + y1) // 2
    marks = interior_patches(e) - whole_patches
    assert bool(marks) == (line % 4 == 2)


def test_seam_cut_boards_are_split_along_their_seam():
    rng = random.Random(0)
    for position in POSITIONS:
        e = place_board("red", position, CFG, True, rng)
        x0, y0, x1, y1 = e.bbox
        assert x0 % 2 == 0 and y0 % 2 == 0                     # on the thumbnail's 2x2 blocks
        cut_v = any(x0 < m * S < x1 for m in range(1, CFG.cols))
        cut_h = any(y0 < m * S < y1 for m in range(1, CFG.rows))
        assert e.on_seam == crosses_seam(e.bbox, S, CFG.rows, CFG.cols) == (cut_v or cut_h)
        if cut_v and not cut_h:
            assert e.split[0] == "v" and (x0 + x1) // 2 % S == 0
        if cut_h and not cut_v:
            assert e.split[0] == "h" and (y0 + y1) // 2 % S == 0


def test_boards_need_room_for_three_bands():
    with pytest.raises(ValueError, match="at least 10 px"):
        eg.EntityGridConfig(tasks=eg.TASKS, entity_size=0.25)          # 8 px: 2 bands
    with pytest.raises(ValueError, match="at least 3 bands"):
        board_halves(2, True, random.Random(0))
    eg.EntityGridConfig(entity_size=0.25)                               # no boards: fine
    e = board("top left", SIDES[1], SIDES[1])
    from PIL import Image, ImageDraw
    from minihires.data.entities import draw_board
    draw = ImageDraw.Draw(Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="phases"):
        draw_board(draw, "red", e.bbox, ("v", (0, 1), (0, 1)))
    with pytest.raises(ValueError, match="square"):
        draw_board(draw, "red", (0, 0, 16, 15), e.split)


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
