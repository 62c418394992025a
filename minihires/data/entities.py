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
is a 2-pixel frame around bands 2 pixels wide that cross a line through its centre; each band
is a 1-pixel checkerboard whose phase (0 or 1) is its own random bit, the same on both sides
of the line when the board is whole. A board is *broken* when two bands, not neighbours and
of different phases, trade phases beyond the line: each of them shifts by one pixel there,
along its 2 pixels of the line. Why it is built so (all ours):

    not the thumbnail   corners on even pixels, bands on even pixels: every 2x2 block is all
                        frame or half lit, so a 2x2 box thumbnail (`slicing.crops`) shows
                        every board alike, broken or not
    not a fragment      a board that a seam cuts is split along that seam (`split_axis`), so
                        each slice holds one side: a sequence of band phases. The near side's
                        sequence is drawn with probability proportional to the swaps it
                        allows, and a broken board's far side is that sequence after one of
                        them; a swap is its own inverse, so either side, alone, has the same
                        distribution whether the board is whole or broken (`board_halves`)
    no short summary    both sides hold as many bands of each phase, whole or broken: telling
                        them apart takes the order of every band on both sides, a bit per band
                        (a board whose halves differ in one bit is answered by the language
                        model comparing the two bits; docs/results.md)
    a local mark        the break, 2 pixels of a one-pixel shift, looks like nothing else in a
                        board (two swapped neighbours would make it 4 pixels long, which is
                        what the boundary between two bands of the other orientation looks
                        like). A ViT patch whose middle the line crosses shows it; where the
                        line runs along patch edges, as it always does on a seam, it lies
                        between two neighbouring patches

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
BAND = 2                   # a board band's width, pixels: whole 2x2 blocks for the thumbnail


def band_count(side: int) -> int:
    """Bands of a board `side` pixels wide: its interior inside the 2-pixel frame, in bands."""
    return (side - 4) // BAND


def swaps(bands: tuple[int, ...]) -> list[tuple[int, int]]:
    """The band pairs (i, k) a broken board may trade: not neighbours, different phases."""
    n = len(bands)
    return [(i, k) for i in range(n) for k in range(i + 2, n) if bands[i] != bands[k]]


def board_halves(n: int, broken: bool, rng) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Band phases (near side, far side) of an n-band board.

    The near side is drawn with probability proportional to len(swaps(side)); a broken board's
    far side is the near side after one of those swaps, drawn uniformly. The pair (side, swap)
    is then uniform over all such pairs, and since a swap undoes itself, the far side has the
    near side's distribution: each side alone says nothing about the answer.
    """
    if not isinstance(n, int) or n < 3:
        raise ValueError(f"a board needs at least 3 bands (a swap of two non-neighbours), got {n!r}")
    sides = [tuple((k >> i) & 1 for i in range(n)) for k in range(2 ** n)]
    near = rng.choices(sides, [len(swaps(side)) for side in sides])[0]
    if not broken:
        return near, near
    i, k = rng.choice(swaps(near))
    far = list(near)
    far[i], far[k] = near[k], near[i]
    return near, tuple(far)


def draw_board(draw: ImageDraw.ImageDraw, colour: str, bbox: tuple[int, int, int, int],
               split: tuple[str, tuple[int, ...], tuple[int, ...]]) -> None:
    """A board in bbox: 2-px frame, bands across the split line with phases split[1] before
    the line and split[2] after it. split[0]: "v" (a vertical line at the centre column: bands
    are rows, sides left and right) or "h" (a horizontal line at the centre row: bands are
    columns, sides above and below)."""
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {sorted(COLOURS)}, got {colour!r}")
    x0, y0, x1, y1 = bbox
    if x1 - x0 != y1 - y0 or (x1 - x0) % 2 or band_count(x1 - x0) < 3:
        raise ValueError(f"a board must be square with an even side of at least 10 pixels "
                         f"(frame + 3 bands), got {bbox}")
    n = band_count(x1 - x0)
    axis, near, far = split
    if (axis not in ("v", "h") or any(len(side) != n or set(side) - {0, 1}
                                      for side in (near, far))):
        raise ValueError(f"split must be ('v' or 'h', {n} phases 0/1, {n} phases 0/1), "
                         f"got {split!r}")
    rgb = COLOURS[colour]
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=rgb, width=2)   # inclusive corners
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    lit = []
    for y in range(y0 + 2, y1 - 2):
        for x in range(x0 + 2, x1 - 2):
            if axis == "v":    # bands are rows, numbered from the top
                band, beyond = (y - y0 - 2) // BAND, x >= cx
            else:              # bands are columns, numbered from the left
                band, beyond = (x - x0 - 2) // BAND, y >= cy
            if (x + y + (far if beyond else near)[band]) % 2 == 0:
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
    split: tuple | None = None   # boards only: (axis, near side's bands, far side's bands)

    @property
    def broken(self) -> bool:
        """A board whose two sides' band phases differ."""
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


def place_board(colour: str, position: str, cfg, broken: bool, rng) -> Entity:
    """A board of cfg.entity_px pixels (rounded down to even) at `position`: no jitter, corners
    on even pixels, split along a seam that cuts it, band phases from `board_halves`."""
    cx, cy = centre(position, cfg.width, cfg.height)
    side = cfg.entity_px & ~1
    x0, y0 = (cx - side // 2) & ~1, (cy - side // 2) & ~1
    bbox = (x0, y0, x0 + side, y0 + side)
    axis = split_axis(bbox, cfg.slice_size, cfg.rows, cfg.cols, rng)
    near, far = board_halves(band_count(side), broken, rng)
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
