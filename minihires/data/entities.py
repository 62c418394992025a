"""EntityGrid-QA entities: eight pattern classes that only full resolution tells apart.

Our design (the paper's generator is not public). Every entity is the same square with a
1-pixel outline, in one colour; classes differ only in the 1-pixel pattern inside it. Each
pattern lights exactly half of the interior and belongs to one of two families:

    row family     every row alternates on/off; rows differ only by a phase 0 or 1:
                   pixel (x, y) is on iff (x + phase[y % period]) is even
    column family  the transpose: every column alternates, phase per column

In either family every 2x2 window holds exactly two lit pixels, and a symmetric resampling
filter that halves the size (box, bilinear, bicubic, Lanczos: its even and odd taps carry
equal weight) maps the interior to one flat 50% blend of colour and background. So the
thumbnail (the 2x2 canvas resized to S x S) keeps colour, size and place but not class;
only the full-resolution slices show it. What survives downsampling is a faint difference
along the pattern's edges. A nearest-neighbour thumbnail would alias instead: the slicer
must use an antialiasing filter.

Patterns are printed in canvas coordinates, like a fabric the entity is cut from: (x, y)
above are canvas pixels, not offsets inside the entity. Every period divides 4, and slices
start at multiples of S (a multiple of 4), so any 4x4 ViT patch inside an entity shows one
whole period at the same phase, wherever the entity is jittered and whichever slice it
falls in. Each class is then a fixed 4x4 stencil that a single patch embedding can tell
apart.

One more kind, for the continuity task: a *board*, whose answer no fragment shows. A board
is a 2-pixel frame around n = entity_px - 4 lines 1 pixel wide (rows, or columns) that cross
a split line through its centre. Each line is lit on every other pixel, at its own phase 0
or 1, and half the lines have phase 1. The board is *broken* when every line shifts by one
pixel at the split: the far half's phases are then the near half's complement, itself
another sequence with half its lines at phase 1. So either half alone, for either answer,
is a random balanced sequence; no summary of one half (a count, a bit, a mean) says broken or
whole, and only comparing the two halves line by line answers.

Boards are drawn unjittered with their corners and split on even pixels, so that the
thumbnail of the default 2x2 canvas (a 2x2 box average, `slicing.crops`) holds exactly one
lit pixel of every line in every 2x2 block and turns every board into the same flat blend,
broken or not. A board that straddles a seam is split along that seam (`split_axis`), so each
slice holds one half and no single slice can answer.

Drawing is machine independent: integer coordinates, Pillow `ImageDraw.rectangle` (outline,
width 1) and `ImageDraw.point`, no fonts, no antialiasing.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, ImageDraw

# class -> (family, phase sequence). Names are plural nouns so that questions read
# "What is at the top? red stripes", "Where are the red stripes?".
CLASSES: dict[str, tuple[str, tuple[int, ...]]] = {
    "bars": ("row", (0,)),                  # vertical 1-px lines
    "checks": ("row", (0, 1)),              # 1-px checkerboard
    "zigzags": ("row", (0, 0, 1, 1)),       # vertical lines that jog every 2 rows
    "chevrons": ("row", (0, 1, 1, 0)),      # vertical lines that jog right, then back
    "bricks": ("row", (0, 0, 0, 1)),        # vertical lines broken every 4th row
    "stripes": ("col", (0,)),               # horizontal 1-px lines
    "waves": ("col", (0, 0, 1, 1)),         # horizontal lines that jog every 2 columns
    "dashes": ("col", (0, 0, 0, 1)),        # horizontal lines broken every 4th column
}
PATTERN_PERIOD = 4   # every phase sequence's length divides it (the tiny ViT's patch size)

# Saturated colours on a black background; the 50% blend in the thumbnail keeps them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 240),
    "yellow": (235, 215, 40),
}

# name -> (column, row) of the centre in sixths of the canvas width and height.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (1, 1), "top": (3, 1), "top right": (5, 1),
    "left": (1, 3), "center": (3, 3), "right": (5, 3),
    "bottom left": (1, 5), "bottom": (3, 5), "bottom right": (5, 5),
}


def is_lit(cls: str, x: int, y: int) -> bool:
    """Whether canvas pixel (x, y) is lit when it lies inside an entity of class `cls`."""
    family, phase = CLASSES[cls]
    if family == "row":
        return (x + phase[y % len(phase)]) % 2 == 0
    return (y + phase[x % len(phase)]) % 2 == 0


def draw_entity(draw: ImageDraw.ImageDraw, cls: str, colour: str,
                bbox: tuple[int, int, int, int]) -> None:
    """Draw one entity into the pixel box bbox = (x0, y0, x1, y1), x1 and y1 exclusive."""
    if cls not in CLASSES:
        raise ValueError(f"cls must be one of {sorted(CLASSES)}, got {cls!r}")
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {sorted(COLOURS)}, got {colour!r}")
    x0, y0, x1, y1 = bbox
    if x1 - x0 < 3 or y1 - y0 < 3:
        raise ValueError(f"bbox must be at least 3x3 pixels (outline + interior), got {bbox}")
    rgb = COLOURS[colour]
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=rgb, width=1)  # inclusive corners
    lit = [(x, y) for y in range(y0 + 1, y1 - 1) for x in range(x0 + 1, x1 - 1)
           if is_lit(cls, x, y)]
    draw.point(lit, fill=rgb)


BOARD = "board"            # the continuity task's entity kind (not a pattern class)


def draw_board(draw: ImageDraw.ImageDraw, colour: str, bbox: tuple[int, int, int, int],
               split: tuple[str, tuple[int, ...], tuple[int, ...]]) -> None:
    """A board: 2-px frame; inside, line i lit where (position along it + phase) is even, its
    phase `near[i]` before the split line and `far[i]` after it. split = (axis, near, far),
    axis "v" (a vertical split at the centre column: lines are rows, halves left and right)
    or "h" (a horizontal split at the centre row: lines are columns, halves above and below);
    near and far hold a 0/1 phase per line, entity_px - 4 of them."""
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {sorted(COLOURS)}, got {colour!r}")
    x0, y0, x1, y1 = bbox
    if x1 - x0 != y1 - y0 or x1 - x0 < 6:
        raise ValueError(f"a board needs a square of at least 6x6 pixels (frame + interior), "
                         f"got {bbox}")
    n = x1 - x0 - 4
    if (not isinstance(split, (tuple, list)) or len(split) != 3 or split[0] not in ("v", "h")
            or any(not isinstance(half, (tuple, list)) or len(half) != n
                   or not set(half) <= {0, 1} for half in split[1:])):
        raise ValueError(f"split must be ('v' or 'h', {n} phases 0/1, {n} phases 0/1) for a "
                         f"{n + 4}-px board, got {split!r}")
    axis, near, far = split
    rgb = COLOURS[colour]
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=rgb, width=2)   # inclusive corners
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    lit = []
    for y in range(y0 + 2, y1 - 2):
        for x in range(x0 + 2, x1 - 2):
            line, beyond, along = ((y - y0 - 2, x >= cx, x) if axis == "v"
                                   else (x - x0 - 2, y >= cy, y))
            if (along + (far if beyond else near)[line]) % 2 == 0:
                lit.append((x, y))
    draw.point(lit, fill=rgb)


def centre(position: str, width: int, height: int) -> tuple[int, int]:
    """Integer pixel centre of a named position on a width x height canvas."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {list(POSITIONS)}, got {position!r}")
    kx, ky = POSITIONS[position]
    return width * kx // 6, height * ky // 6


def crosses_seam(bbox: tuple[int, int, int, int], slice_size: int, rows: int, cols: int) -> bool:
    """True iff the box has pixels on both sides of an inner slice boundary.

    Slice boundaries lie at multiples of slice_size; a boundary b cuts the box when pixels
    b - 1 and b are both inside it, i.e. x0 < b < x1 (x1 exclusive).
    """
    x0, y0, x1, y1 = bbox
    return (any(x0 < m * slice_size < x1 for m in range(1, cols))
            or any(y0 < m * slice_size < y1 for m in range(1, rows)))


@dataclass(frozen=True)
class Entity:
    cls: str
    colour: str
    position: str
    bbox: tuple[int, int, int, int]   # pixels (x0, y0, x1, y1), x1 and y1 exclusive
    on_seam: bool                     # crosses_seam(bbox, ...): geometry, not the name
    split: tuple[str, tuple[int, ...], tuple[int, ...]] | None = None
    # ^ boards only: (axis, near half's line phases, far half's), see draw_board

    @property
    def broken(self) -> bool:
        """A board whose lines shift at the split (the halves' phases differ)."""
        return self.split is not None and self.split[1] != self.split[2]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.cls}"


def place(cls: str, colour: str, position: str, cfg, dx: int = 0, dy: int = 0) -> Entity:
    """An entity of cfg.entity_px pixels centred on `position`, shifted by (dx, dy).

    cfg: an `EntityGridConfig` (width, height, entity_px, slice_size, rows, cols).
    """
    cx, cy = centre(position, cfg.width, cfg.height)
    x0, y0 = cx - cfg.entity_px // 2 + dx, cy - cfg.entity_px // 2 + dy
    bbox = (x0, y0, x0 + cfg.entity_px, y0 + cfg.entity_px)
    return Entity(cls, colour, position, bbox,
                  crosses_seam(bbox, cfg.slice_size, cfg.rows, cfg.cols))


def split_axis(bbox: tuple[int, int, int, int], slice_size: int, rows: int, cols: int,
               rng) -> str:
    """Where a board's split line runs: along the seam that cuts the board (so each slice holds
    one half), either way when both seams cut it or none does (drawn from `rng`)."""
    x0, y0, x1, y1 = bbox
    v = any(x0 < m * slice_size < x1 for m in range(1, cols))
    h = any(y0 < m * slice_size < y1 for m in range(1, rows))
    return "v" if v and not h else "h" if h and not v else rng.choice("vh")


def board_halves(n: int, broken: bool, rng) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(near, far) phases of a board's n lines: n/2 of the near ones, drawn from `rng`, at
    phase 1; far = near, or (broken) its complement."""
    near = [0] * n
    for i in rng.sample(range(n), n // 2):
        near[i] = 1
    return tuple(near), tuple(1 - v for v in near) if broken else tuple(near)


def boards_fit(slice_size: int, rows: int, cols: int, entity_px: int) -> bool:
    """Whether continuity boards can be drawn on this canvas (`check_board_geometry`)."""
    try:
        check_board_geometry(slice_size, rows, cols, entity_px)
    except ValueError:
        return False
    return True


def check_board_geometry(slice_size: int, rows: int, cols: int, entity_px: int) -> None:
    """ValueError unless boards on this canvas keep their promises (each checked on pixels in
    tests/test_continuity.py): a 2 x 2 grid (the box thumbnail halves the canvas, turning every
    board into one blend), entity_px a multiple of 4 and at least 8 (an even number of lines,
    the split on an even pixel) and an even slice_size (the split of a cut board on its seam)."""
    if (rows, cols) != (2, 2):
        raise ValueError(f"continuity boards are built for a 2x2 grid of slices, got "
                         f"{rows}x{cols}")
    if entity_px < 8 or entity_px % 4:
        raise ValueError(f"continuity boards need entity_px to be a multiple of 4 and at least "
                         f"8 (the split on an even pixel, an even number of lines), got "
                         f"{entity_px}; change entity_size or slice_size")
    if slice_size % 2:
        raise ValueError(f"continuity boards need an even slice_size (a cut board's split on "
                         f"its seam), got {slice_size}")


def place_board(colour: str, position: str, cfg, broken: bool, rng) -> Entity:
    """A board of cfg.entity_px pixels at `position`: no jitter, corners on even pixels,
    split along a seam that cuts it, line phases drawn from `rng` (`board_halves`)."""
    check_board_geometry(cfg.slice_size, cfg.rows, cfg.cols, cfg.entity_px)
    cx, cy = centre(position, cfg.width, cfg.height)
    x0, y0 = (cx - cfg.entity_px // 2) & ~1, (cy - cfg.entity_px // 2) & ~1
    bbox = (x0, y0, x0 + cfg.entity_px, y0 + cfg.entity_px)
    axis = split_axis(bbox, cfg.slice_size, cfg.rows, cfg.cols, rng)
    near, far = board_halves(cfg.entity_px - 4, broken, rng)
    return Entity(BOARD, colour, position, bbox,
                  crosses_seam(bbox, cfg.slice_size, cfg.rows, cfg.cols), (axis, near, far))


def render(entities: Iterable[Entity], cfg) -> Image.Image:
    """Draw entities on a fresh cfg.width x cfg.height canvas of cfg.background."""
    image = Image.new("RGB", (cfg.width, cfg.height), tuple(cfg.background))
    draw = ImageDraw.Draw(image)
    for e in entities:
        if e.cls == BOARD:
            draw_board(draw, e.colour, e.bbox, e.split)
        else:
            draw_entity(draw, e.cls, e.colour, e.bbox)
    return image
