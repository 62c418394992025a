"""`python experiments/seam_boards.py`: the continuity boards that were tried.

An experiment outside the package. EntityGrid-QA's first continuity board, *phase*, had two
halves of one phase bit each, and the language model answered by comparing the bits across
slices (docs/results.md, "What the benchmark measures"). The boards here take that shortcut
away: both sides hold as many bands of each phase, whole or broken, so the answer takes the
order of every band on both sides. Board C won and is now the package's board
(`minihires.data.entities.draw_board`); phase, A and B stay here so that the results'
earlier commands still run. Each has a 2-pixel frame, corners on even pixels (identical box
thumbnails for both answers), and is split along the seam that cuts it (each slice of a
seam-cut board is also given by a board with the other answer):

    A  6 bands 2 px wide across the line, each a 1-pixel checkerboard of its own phase;
       broken: two neighbouring bands of different phases trade phases beyond the line
    B  as A, the two bands not neighbours (each break is 2 px long: a ViT patch that no whole
       board contains)
    C  12 rows (v) or columns (h) 1 px wide that cross the line, each lit on every other
       pixel with its own phase, half of them phase 1; broken: every row shifts by one pixel
       at the line (the package's board)
    phase  a 1-pixel checkerboard, each half of phase 0 or 1; broken: the phases differ

Either side alone has exactly the same distribution for both answers: on A and B the near
side is drawn in proportion to the swaps it allows and a swap undoes itself; on C the far side
of a broken board is the near side's complement, another balanced sequence.

Two commands, with --board A, B, C or phase:

    probe    the tiny ViT alone, a linear head on its mean token, trained to tell broken from
             whole inside one slice (off-seam positions); held-out accuracy, split by where
             the line runs (through patches' middles, or along their edges). --classes also
             teaches the 8 pattern classes (an encoder pretrained on every entity kind, whole)
    ablate   `python -m minihires ablate ...` (the arguments after --, `--vit-init FILE`
             among them for a ViT that `probe --save FILE` wrote; without it the ViT starts
             from scratch, as the shipped encoders learned the package's board) with this
             board in place of the package's. The runs of results.md ran before 2026-12-08:
             add `--steps 1200 --token-shift 0` to reprint them

docs/results.md, "Boards that only a local comparison answers", has the measured tables and
the commands. Choices are ours: sizes, AdamW at lr 1e-3, batch 64, 512 held-out slices.
"""
from __future__ import annotations

import random
import sys
import time

import torch
from PIL import Image, ImageDraw

from minihires.cli.errors import ArgumentParser, command
from minihires.data import entities, entitygrid
from minihires.model import slicing
from minihires.model.config import tiny
from minihires.model.vit import VisionTransformer

CFG = entitygrid.EntityGridConfig(tasks=entitygrid.TASKS)
OFF_SEAM = ("top left", "top right", "bottom left", "bottom right")
PACKAGE_BOARD = (entities.draw_board, entities.place_board)   # board C; `use` replaces them
BOARDS = ("A", "B", "C", "phase")


def _swaps(side, neighbours: bool):
    """Pairs (i, k) of different phases that a broken board may trade: neighbours (k = i + 1,
    board A) or not (k >= i + 2, board B)."""
    n = len(side)
    return [(i, k) for i in range(n) for k in (range(i + 1, min(i + 2, n)) if neighbours
                                               else range(i + 2, n)) if side[i] != side[k]]


def halves(board: str, broken: bool, rng) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(near side, far side) phases of a 16-pixel board of kind `board`."""
    if board == "C":
        return entities.board_halves(12, broken, rng)
    neighbours = board == "A"
    sides = [tuple((k >> i) & 1 for i in range(6)) for k in range(64)]
    near = rng.choices(sides, [len(_swaps(s, neighbours)) for s in sides])[0]
    if not broken:
        return near, near
    i, k = rng.choice(_swaps(near, neighbours))
    far = list(near)
    far[i], far[k] = near[k], near[i]
    return near, tuple(far)


def draw_phase(d, colour, bbox, split):
    """The phase board: 2-px frame, a checkerboard of phase split[1] before the centre line
    and split[2] after it."""
    axis, first, second = split
    x0, y0, x1, y1 = bbox
    rgb = entities.COLOURS[colour]
    d.rectangle((x0, y0, x1 - 1, y1 - 1), outline=rgb, width=2)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    d.point([(x, y) for y in range(y0 + 2, y1 - 2) for x in range(x0 + 2, x1 - 2)
             if (x + y + (second if (x >= cx if axis == "v" else y >= cy) else first)) % 2 == 0],
            fill=rgb)


def draw(board: str):
    """A `draw_board(draw, colour, bbox, split)` for boards of kind `board`."""
    if board == "C":
        return PACKAGE_BOARD[0]
    if board == "phase":
        return draw_phase

    def draw_board(d, colour, bbox, split):          # A and B: 6 bands of checks, 2 px wide
        axis, near, far = split
        x0, y0, x1, y1 = bbox
        rgb = entities.COLOURS[colour]
        d.rectangle((x0, y0, x1 - 1, y1 - 1), outline=rgb, width=2)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        lit = []
        for y in range(y0 + 2, y1 - 2):
            for x in range(x0 + 2, x1 - 2):
                band, beyond = ((y - y0 - 2) // 2, x >= cx) if axis == "v" else \
                    ((x - x0 - 2) // 2, y >= cy)
                if (x + y + (far if beyond else near)[band]) % 2 == 0:
                    lit.append((x, y))
        d.point(lit, fill=rgb)
    return draw_board


def place(board: str):
    """A `place_board(colour, position, cfg, broken, rng)` for boards of kind `board`."""
    if board == "C":
        return PACKAGE_BOARD[1]

    def place_board(colour, position, cfg, broken, rng):
        if cfg.entity_px != 16:
            raise ValueError(f"these boards are 16 px; got entity_px {cfg.entity_px}")
        cx, cy = entities.centre(position, cfg.width, cfg.height)
        x0, y0 = (cx - 8) & ~1, (cy - 8) & ~1
        bbox = (x0, y0, x0 + 16, y0 + 16)
        axis = entities.split_axis(bbox, cfg.slice_size, cfg.rows, cfg.cols, rng)
        if board == "phase":
            first = rng.randint(0, 1)
            near, far = first, 1 - first if broken else first
        else:
            near, far = halves(board, broken, rng)
        return entities.Entity(entities.BOARD, colour, position, bbox,
                               entities.crosses_seam(bbox, cfg.slice_size, cfg.rows, cfg.cols),
                               (axis, near, far))
    return place_board


def use(board: str) -> None:
    """Put board `board` in the package's place: every sample drawn after this uses it."""
    entities.draw_board = draw(board)                # render() looks it up at call time
    entitygrid.place_board = place(board)            # entitygrid imported it by name


def slice_batch(board: str, rng, n: int, classes: bool = False):
    """n single-slice crops of off-seam entities: (crops [n, 3, S, S], label [n], mid [n],
    is_board [n]). Boards are labelled 0 (whole) or 1 (broken); with `classes`, half the
    crops instead hold a pattern entity of any colour, labelled 2 + its class index, and the
    boards get any colour too. mid: a board's line crosses the ViT's 4 x 4 patches in their
    middle."""
    xs, ys, mids, boards = [], [], [], []
    names, colours = list(entities.CLASSES), list(entities.COLOURS)
    for _ in range(n):
        image = Image.new("RGB", (CFG.width, CFG.height))
        if classes and rng.random() < 0.5:
            cls = rng.choice(names)
            e = entities.place(cls, rng.choice(colours), rng.choice(OFF_SEAM), CFG,
                               rng.randint(-CFG.jitter, CFG.jitter),
                               rng.randint(-CFG.jitter, CFG.jitter))
            entities.draw_entity(ImageDraw.Draw(image), e.cls, e.colour, e.bbox)
            label, mid = 2 + names.index(cls), False
        else:
            broken = rng.random() < 0.5
            colour = rng.choice(colours) if classes else "red"
            e = place(board)(colour, rng.choice(OFF_SEAM), CFG, broken, rng)
            draw(board)(ImageDraw.Draw(image), e.colour, e.bbox, e.split)
            x0, y0, x1, y1 = e.bbox
            line = (x0 + x1) // 2 if e.split[0] == "v" else (y0 + y1) // 2
            label, mid = int(broken), line % 4 == 2
        k = 1 + (e.bbox[1] // CFG.slice_size) * CFG.cols + e.bbox[0] // CFG.slice_size
        xs.append(slicing.crops(image, (CFG.rows, CFG.cols), CFG.slice_size, 0.0, "box")[k])
        ys.append(label)
        mids.append(mid)
        boards.append(label < 2)
    return torch.stack(xs), torch.tensor(ys), torch.tensor(mids), torch.tensor(boards)


def probe(board: str, steps: int, seed: int = 0, every: int = 100, progress=print,
          classes: bool = False):
    """Train the tiny ViT + a linear head (2 outputs, 10 with `classes`) on `slice_batch`;
    -> (vit, [(step, board acc, acc where the line is mid-patch, on patch edges, class acc)])."""
    torch.manual_seed(seed)
    m = tiny()
    m.vit.sra_layers = (1,)             # the preset these boards were measured with (unused here)
    vit = VisionTransformer(m.vit, m.sra)
    head = torch.nn.Linear(m.vit.hidden_size, 2 + len(entities.CLASSES) * classes)
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3)
    rng = random.Random(seed)
    tx, ty, tmid, tboard = slice_batch(board, random.Random(seed + 99), 512, classes)

    def logits(x):                                   # the mean of the patch tokens (no CLS)
        return head(vit(x, None)[:, 1:].mean(1))
    curve = []
    for step in range(1, steps + 1):
        x, y, _, _ = slice_batch(board, rng, 64, classes)
        loss = torch.nn.functional.cross_entropy(logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                ok = logits(tx).argmax(1) == ty
            acc = [ok[sel].float().mean().item() if sel.any() else float("nan") for sel in
                   (tboard, tboard & tmid, tboard & ~tmid, ~tboard)]
            curve.append((step, *acc))
            progress(f"step {step}: loss {loss.item():.3f}, held-out boards {100 * acc[0]:.1f}% "
                     f"(line through patches {100 * acc[1]:.1f}%, along patch edges "
                     f"{100 * acc[2]:.1f}%)" + (f", classes {100 * acc[3]:.1f}%" if classes else ""))
    return vit, curve


@command
def cli_seam_boards(argv: list[str]) -> int:
    p = ArgumentParser(prog="python experiments/seam_boards.py",
                       description="Continuity boards without a one-bit summary per side.")
    p.add_argument("what", choices=("probe", "ablate"))
    p.add_argument("--board", choices=BOARDS, required=True,
                   help="A, B, C (above) or phase: the package's one-bit board")
    p.add_argument("--steps", type=int, default=200, help="probe: training steps")
    p.add_argument("--seed", type=int, default=0, help="probe: seed")
    p.add_argument("--every", type=int, default=100, help="probe: evaluate every N steps")
    p.add_argument("--threads", type=int, default=None, help="probe: CPU threads")
    p.add_argument("--save", default=None, help="probe: write the ViT's weights here")
    p.add_argument("--classes", action="store_true",
                   help="probe: also teach the pattern classes (half the crops), boards in any colour")
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = p.parse_args(argv[:cut]), argv[cut + 1:]
    if args.what == "probe":
        if args.steps < 1 or args.every < 1:
            p.error(f"--steps and --every must be >= 1, got {args.steps} and {args.every}")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        t = time.time()
        vit, _ = probe(args.board, args.steps, args.seed, args.every, classes=args.classes)
        print(f"board {args.board}: {args.steps} steps in {time.time() - t:.0f} s")
        if args.save:
            torch.save({k: v for k, v in vit.state_dict().items() if not k.startswith("sra.")},
                       args.save)
            print(f"wrote {args.save}")
        return 0
    use(args.board)
    from minihires.cli.ablate import cli_ablate
    if not any(a.split("=")[0] == "--vit-init" for a in rest):
        rest = ["--vit-init", "none", *rest]    # the shipped encoders learned board C, not these
    return cli_ablate(rest)


if __name__ == "__main__":
    sys.exit(cli_seam_boards(sys.argv[1:]))
