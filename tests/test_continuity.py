"""EntityGrid-QA's continuity task, checked on rendered pixels, not on the generator's word:
the thumbnail shows every board alike, a seam-cut board leaves each slice a crop that a board
with the other answer also gives, either half alone has the same distribution for both
answers, and an uncut board's slice does show the break."""
import itertools
import random

import pytest
import torch
from PIL import ImageDraw

from minihires.data import entitygrid as eg
from minihires.data.entities import (
    BOARD,
    POSITIONS,
    Entity,
    board_halves,
    crosses_seam,
    draw_board,
    place_board,
    render,
)
from minihires.model import slicing

CFG = eg.EntityGridConfig(tasks=eg.TASKS)
S = CFG.slice_size
N = CFG.entity_px - 4                       # lines in a board


def board(position, near, far, axis=None):
    """The board place_board puts at `position`, with the line phases we ask for (and the
    split axis, where no single seam decides it)."""
    e = place_board("red", position, CFG, False, random.Random(0))
    return Entity(BOARD, "red", position, e.bbox, e.on_seam, (axis or e.split[0], near, far))


def crops(entity, thumbnail_filter="box"):
    image = render([entity], CFG)
    return slicing.crops(image, (CFG.rows, CFG.cols), S, 0.0, thumbnail_filter)  # (5, 3, S, S)


def flip(half):
    return tuple(1 - v for v in half)


def some_halves(k, seed=0):
    rng = random.Random(seed)
    return [board_halves(N, False, rng)[0] for _ in range(k)]


@pytest.mark.parametrize("position,axis", list(itertools.product(POSITIONS, "vh")))
def test_the_box_thumbnail_shows_every_board_alike(position, axis):
    thumbs = [crops(board(position, near, far, axis))[0]
              for near in some_halves(4) for far in (near, flip(near))]
    assert all(torch.equal(thumbs[0], t) for t in thumbs[1:])


def test_a_bicubic_thumbnail_would_show_the_break():
    """Why the continuity task needs `thumbnail_filter="box"`: bicubic's wider kernel rings
    at the break."""
    near = some_halves(1)[0]
    whole = crops(board("center", near, near), "bicubic")[0]
    broken = crops(board("center", near, flip(near)), "bicubic")[0]
    assert (whole - broken).abs().max() > 0.02


@pytest.mark.parametrize("position", [p for p in POSITIONS if board(p, (0,) * N, (0,) * N).on_seam])
def test_each_slice_of_a_seam_cut_board_is_also_a_slice_of_a_board_with_the_other_answer(position):
    """A broken board (near, flip(near)) and the whole boards (near, near) and (flip(near),
    flip(near)): every slice of the broken one equals that slice of one of the whole ones. No
    slice alone tells the answers apart; the break is visible only across the seam."""
    for near in some_halves(6, seed=position):
        broken = crops(board(position, near, flip(near)))
        whole_near = crops(board(position, near, near))
        whole_far = crops(board(position, flip(near), flip(near)))
        for k in range(1, 1 + CFG.rows * CFG.cols):
            assert torch.equal(broken[k], whole_near[k]) or torch.equal(broken[k], whole_far[k])
        assert not torch.equal(broken, whole_near) and not torch.equal(broken, whole_far)


def test_either_half_has_the_same_distribution_for_both_answers():
    """The near half is uniform over sequences with N/2 lines at phase 1, for either answer;
    a broken board's far half is its complement, and complementing maps that set onto itself
    one to one, so the far half is uniform over the same set. No count tells the sides apart."""
    balanced = {s for s in itertools.product((0, 1), repeat=N) if sum(s) == N // 2}
    assert {flip(s) for s in balanced} == balanced
    rng = random.Random(0)
    for broken in (False, True):
        for _ in range(200):
            near, far = board_halves(N, broken, rng)
            assert near in balanced and far in balanced and (near != far) == broken


@pytest.mark.parametrize("position", [p for p in POSITIONS
                                      if not board(p, (0,) * N, (0,) * N).on_seam])
def test_an_uncut_board_shows_its_break_inside_one_slice(position):
    near = some_halves(1)[0]
    for axis in "vh":
        whole, broken = (crops(board(position, near, far, axis)) for far in (near, flip(near)))
        differ = [k for k in range(1, 5) if not torch.equal(whole[k], broken[k])]
        assert len(differ) == 1     # the slice that holds the whole board: one encoder answers


def test_seam_cut_boards_are_split_along_their_seam():
    for position in POSITIONS:
        e = place_board("red", position, CFG, True, random.Random(0))
        x0, y0, x1, y1 = e.bbox
        assert x0 % 2 == 0 and y0 % 2 == 0 and e.broken       # on the thumbnail's 2x2 blocks
        cut_v = any(x0 < m * S < x1 for m in range(1, CFG.cols))
        cut_h = any(y0 < m * S < y1 for m in range(1, CFG.rows))
        assert e.on_seam == crosses_seam(e.bbox, S, CFG.rows, CFG.cols) == (cut_v or cut_h)
        if cut_v and not cut_h:
            assert e.split[0] == "v" and (x0 + x1) // 2 % S == 0
        if cut_h and not cut_v:
            assert e.split[0] == "h" and (y0 + y1) // 2 % S == 0


@pytest.mark.parametrize("slice_size", [40, 48, 64])
def test_the_promises_hold_on_other_even_slice_sizes(slice_size):
    """The same pixel checks on bigger canvases that the geometry check accepts."""
    cfg = eg.EntityGridConfig(tasks=eg.TASKS, slice_size=slice_size)
    n = cfg.entity_px - 4
    near = board_halves(n, False, random.Random(slice_size))[0]
    e = place_board("red", "top", cfg, False, random.Random(0))
    assert e.on_seam and e.split[0] == "v" and (e.bbox[0] + e.bbox[2]) // 2 == slice_size

    def crops_of(a, b):
        image = render([Entity(BOARD, "red", "top", e.bbox, True, ("v", a, b))], cfg)
        return slicing.crops(image, (2, 2), slice_size, 0.0, "box")
    broken, whole_near, whole_far = crops_of(near, flip(near)), crops_of(near, near), \
        crops_of(flip(near), flip(near))
    assert torch.equal(broken[0], whole_near[0]) and torch.equal(broken[0], whole_far[0])
    for k in range(1, 5):
        assert torch.equal(broken[k], whole_near[k]) or torch.equal(broken[k], whole_far[k])


def test_boards_that_cannot_keep_the_promises_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        eg.EntityGridConfig(tasks=eg.TASKS, entity_size=0.45)      # 14 px: split on an odd pixel
    eg.EntityGridConfig(entity_size=0.45)                          # fine without continuity
    with pytest.raises(ValueError, match="even slice_size"):
        eg.EntityGridConfig(tasks=eg.TASKS, slice_size=33)         # split at 32, seam at 33
    with pytest.raises(ValueError, match="2x2 grid"):
        eg.EntityGridConfig(tasks=eg.TASKS, rows=3, cols=3)        # a 3x3 box thumbnail
    image = render([], CFG)
    with pytest.raises(ValueError, match="12 phases"):
        draw_board(ImageDraw.Draw(image), "red", (0, 0, 16, 16), ("v", (0, 1), (1, 0)))
    with pytest.raises(ValueError, match="split must be"):
        draw_board(ImageDraw.Draw(image), "red", (0, 0, 16, 16), ("d", (0,) * 12, (0,) * 12))
    with pytest.raises(ValueError, match="split must be"):            # the first board's split
        draw_board(ImageDraw.Draw(image), "red", (0, 0, 16, 16), ("v", 0, 1))


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


def test_the_default_tasks_are_all_four():
    default = eg.EntityGridConfig()
    assert default.tasks == ("recognition", "position", "counting", "continuity") == eg.TASKS
    assert [eg.sample(s, default).task for s in eg.test_seeds(8)] == list(default.tasks) * 2
    three = eg.EntityGridConfig(tasks=eg.TASKS[:3])       # the split before continuity joined
    assert [eg.sample(s, three).task for s in eg.test_seeds(6)] == list(eg.TASKS[:3]) * 2
    # where boards cannot be drawn, the default is the first three; asked for, an error
    for geometry in (dict(rows=2, cols=3), dict(slice_size=48, entity_size=0.45)):
        assert eg.EntityGridConfig(**geometry).tasks == eg.TASKS[:3]
        with pytest.raises(ValueError, match="continuity boards"):
            eg.EntityGridConfig(**geometry, tasks=eg.TASKS)
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
