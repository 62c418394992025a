"""EntityGrid-QA's continuity task, checked on rendered pixels, not on the generator's word:
the thumbnail shows every board alike, a seam-cut board leaves each slice a crop that both
answers share, and an uncut board's slice does show the break."""
import itertools

import pytest
import torch

from minihires.data import entitygrid as eg
from minihires.data.entities import BOARD, POSITIONS, crosses_seam, place_board, render
from minihires.model import slicing

CFG = eg.EntityGridConfig(tasks=eg.TASKS)
S = CFG.slice_size
PHASES = {False: [(0, 0), (1, 1)], True: [(0, 1), (1, 0)]}     # broken -> (1st, 2nd) phases


class FixedRng:
    """Stands in for random.Random in place_board: the axis and first phase we ask for."""

    def __init__(self, axis, first):
        self.axis, self.first = axis, first

    def choice(self, seq):
        assert set(seq) == {"v", "h"}
        return self.axis

    def randint(self, a, b):
        return self.first


def board(position, broken, first, axis="v"):
    return place_board("red", position, CFG, broken, FixedRng(axis, first))


def crops(entity, thumbnail_filter="box"):
    image = render([entity], CFG)
    return slicing.crops(image, (CFG.rows, CFG.cols), S, 0.0, thumbnail_filter)  # (5, 3, S, S)


def variants(position, axis):
    """Every drawing of a board at `position`: {broken: [crops of each phase pair]}."""
    return {broken: [crops(board(position, broken, first, axis)) for first in (0, 1)]
            for broken in (False, True)}


@pytest.mark.parametrize("position,axis", list(itertools.product(POSITIONS, "vh")))
def test_the_box_thumbnail_shows_every_board_alike(position, axis):
    v = variants(position, axis)
    thumbs = [c[0] for cs in v.values() for c in cs]
    assert all(torch.equal(thumbs[0], t) for t in thumbs[1:])


def test_a_bicubic_thumbnail_would_show_the_break():
    """Why the continuity task needs `thumbnail_filter="box"`: bicubic's wider kernel rings
    at the phase break."""
    whole = crops(board("center", False, 0), "bicubic")[0]
    broken = crops(board("center", True, 0), "bicubic")[0]
    assert (whole - broken).abs().max() > 0.02


@pytest.mark.parametrize("position", [p for p in POSITIONS
                                      if board(p, False, 0).on_seam])
def test_each_slice_of_a_seam_cut_board_is_the_same_for_both_answers(position):
    """Each slice's crop of a broken board is also a crop of a whole one (and back): no slice
    alone tells the answers apart. The break is visible only across slices."""
    e = board(position, False, 0)
    axis = e.split[0]
    v = variants(position, axis)
    for k in range(1, 1 + CFG.rows * CFG.cols):
        whole = {tuple(c[k].flatten().tolist()) for c in v[False]}
        broken = {tuple(c[k].flatten().tolist()) for c in v[True]}
        assert whole == broken, f"slice {k}"
    # ...and the images do differ: the break is real, across the seam
    assert not torch.equal(v[False][0], v[True][0])


@pytest.mark.parametrize("position", [p for p in POSITIONS if not board(p, False, 0).on_seam])
def test_an_uncut_board_shows_its_break_inside_one_slice(position):
    for axis in "vh":
        v = variants(position, axis)
        k = next(k for k in range(1, 5) if not torch.equal(v[False][0][k], v[True][0][k]))
        # the one slice that differs holds the whole board: a single encoder can answer
        others = [j for j in range(1, 5) if j != k]
        assert all(torch.equal(v[False][0][j], v[True][0][j]) for j in others)


def test_seam_cut_boards_are_split_along_their_seam():
    for position in POSITIONS:
        e = board(position, True, 0, axis="v")
        x0, y0, x1, y1 = e.bbox
        assert x0 % 2 == 0 and y0 % 2 == 0                     # on the thumbnail's 2x2 blocks
        cut_v = any(x0 < m * S < x1 for m in range(1, CFG.cols))
        cut_h = any(y0 < m * S < y1 for m in range(1, CFG.rows))
        assert e.on_seam == crosses_seam(e.bbox, S, CFG.rows, CFG.cols) == (cut_v or cut_h)
        if cut_v and not cut_h:
            assert e.split[0] == "v" and (x0 + x1) // 2 % S == 0
        if cut_h and not cut_v:
            assert e.split[0] == "h" and (y0 + y1) // 2 % S == 0


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
