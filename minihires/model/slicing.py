"""Slicing: from an image of any size and mode to encoder-sized crops.

    image W x H  --plan-->  grid (r, c)  --crops-->  [1 + r*c, 3, S, S]
                                                      crop 0 = thumbnail (whole image at S x S)
                                                      crops 1.. = slices, row-major over the grid

Choices that are ours, not the paper's (the paper does not spell them out):

- The grid rule (after LLaVA-UHD): ideal slice count n = ceil(W*H / S^2) capped at
  `max_slices`; among grids with r*c in {n-1, n, n+1} (within the cap, >= 1) pick the
  one whose aspect c/r is closest to W/H in log space; ties go to fewer slices, then to
  more columns. Compared with exact fractions, so the rule is deterministic.
- A 1x1 grid means thumbnail + ONE slice (the image at S x S twice: a small image pays
  for one redundant crop, but the token layout has a single rule for every image).
- Slices are cut from the image resized to c*S x r*S (aspect distorted within the
  grid's tolerance; no padding). With `overlap` o > 0 (the ablation's control) the canvas
  stays the same, at native resolution, and windows of S step by S*(1-o) across it, the
  last one flush with the edge: 1 + ceil((c-1)/(1-o)) columns of slices (3 for c = 2 and
  o = 0.5), likewise rows (`slice_grid`). Neighbours share a fraction o of their width,
  and every object lies whole inside some window; o = 0 is the paper's setting.
- Resampling is bicubic (as CLIP's preprocessing); the thumbnail may use a box filter
  instead (`ModelConfig.thumbnail_filter`). Pixels are normalised with CLIP's mean and std.
- Colour rule of `load_image`: see its docstring.
"""
from __future__ import annotations

import math
import os
import warnings
from fractions import Fraction
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from minihires.model.config import ModelConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb threshold (~ 9459 x 9459)

Grid = tuple[int, int]
ImageLike = Union[str, os.PathLike, Image.Image]


# ----------------------------------------------------------------------------- grid rule

def plan(width: int, height: int, slice_size: int, max_slices: int) -> Grid:
    """The slicing grid (rows, cols) for a `width` x `height` image (rule in the module doc)."""
    for name, v in (("width", width), ("height", height), ("slice_size", slice_size),
                    ("max_slices", max_slices)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    n = min(math.ceil(width * height / slice_size ** 2), max_slices)
    candidates = []
    for m in (n - 1, n, n + 1):
        if not 1 <= m <= max_slices:
            continue
        for r in range(1, m + 1):
            if m % r == 0:
                candidates.append((r, m // r))

    def key(rc: Grid):
        r, c = rc
        # |log(W/H) - log(c/r)| = log(max(x, 1/x)) with x = W*r / (H*c): compare exactly.
        a, b = width * r, height * c
        return (Fraction(max(a, b), min(a, b)), r * c, -c)

    return min(candidates, key=key)


def tokens_per_side(cfg: "ModelConfig") -> int:
    """h: a crop's tokens per side after compression (g/k with "sms"/"avg", g with "none")."""
    g = cfg.vit.image_size // cfg.vit.patch_size
    return g // cfg.sms.window if cfg.compression in ("sms", "avg") else g


def num_image_tokens(grid: Grid, cfg: "ModelConfig") -> int:
    """How many embeddings one image with slicing `grid` puts into the LLM's sequence.

    The single source of truth (the model asserts that it splices exactly this many):
      llava15:          g*g patch tokens of the thumbnail, nothing else.
      hires:            h*h thumbnail tokens + 1 newline, then per slice row
                        c*h*h slice tokens + 1 newline (none if use_slices=False),
                        h = g/k with compression "sms"/"avg", h = g with "none".
    """
    g = cfg.vit.image_size // cfg.vit.patch_size
    if cfg.mode == "llava15":
        return g * g
    h = tokens_per_side(cfg)
    n = h * h + 1
    if cfg.use_slices:
        r, c = grid
        n += r * (c * h * h + 1)
    return n


# ----------------------------------------------------------------------------- loading

def load_image(image: ImageLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, orient and convert an image to 8-bit RGB, with clear errors.

    image: a path or a PIL image. Errors (ValueError, naming the problem): zero width or
    height, more than `max_pixels` pixels (decompression bomb; checked from the header,
    before decoding; Pillow's own hard limit of 2 x Image.MAX_IMAGE_PIXELS also applies to
    files), truncated, corrupt or unrecognised files. A missing file: FileNotFoundError.

    Orientation: the EXIF orientation tag is applied (ImageOps.exif_transpose).
    Colour rule (ours):
      - alpha (RGBA, LA, PA, P or L/RGB with a transparency key, premultiplied RGBa/La)
        is composited on white;
      - 16-bit grey (I;16*) is scaled by 255/65535;
      - 32-bit int (I) and float (F) grey have no fixed range: min..max is stretched to
        0..255 (a constant image is clipped to 0..255); a float image holding NaN or an
        infinity is refused (ValueError): no stretch of it means anything;
      - every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX ...) goes through
        Pillow's convert("RGB").
    """
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if not os.path.exists(name):
            raise FileNotFoundError(f"image file not found: {name}")
        if os.path.isdir(name):
            raise ValueError(f"image {name} is a folder, not an image file")
        try:
            with warnings.catch_warnings():     # our own max_pixels check below is the guard
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(name)
        except UnidentifiedImageError as e:
            raise ValueError(f"cannot read image {name}: not a recognised image format") from e
        except Image.DecompressionBombError as e:
            raise ValueError(f"image {name} is too large (decompression bomb): {e}") from e
        except OSError as e:                    # unreadable: permissions, a device, ...
            raise ValueError(f"cannot read image {name}: {e.strerror or e}") from e
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise TypeError(f"image must be a path or a PIL.Image.Image, got {type(image).__name__}")

    w, h = img.size
    if w <= 0 or h <= 0:
        raise ValueError(f"{name} has size {w} x {h}: width and height must be positive")
    if w * h > max_pixels:
        raise ValueError(f"{name} is {w} x {h} = {w * h} pixels, more than max_pixels = "
                         f"{max_pixels} (decompression bomb guard)")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode {name}: the file is truncated or corrupt ({e})") from e
    img = ImageOps.exif_transpose(img)
    return to_rgb(img, name)


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Convert any Pillow mode to RGB by the rule in `load_image`'s docstring (`name`
    names the image in errors)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("RGBa", "La"):                       # premultiplied: c_p + (255 - a) over white
        a = np.asarray(img).astype(np.float32)       # (H, W, 4) or (H, W, 2)
        rgb = a[..., :-1] + (255.0 - a[..., -1:])
        if rgb.shape[-1] == 1:
            rgb = np.repeat(rgb, 3, axis=-1)         # (H, W, 3)
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        a = np.asarray(img.convert("RGBA")).astype(np.float32)  # (H, W, 4)
        alpha = a[..., 3:] / 255.0
        rgb = a[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if mode.startswith("I;16"):
        grey = np.asarray(img).astype(np.float32) * (255.0 / 65535.0)
        return _grey_to_rgb(grey)
    if mode in ("I", "F"):
        grey = np.asarray(img).astype(np.float64)
        bad = int((~np.isfinite(grey)).sum())
        if bad:
            raise ValueError(f"{name} ({mode} mode) holds {bad} non-finite pixel value(s) "
                             "(nan or inf): its range cannot be stretched to 0..255")
        lo, hi = float(grey.min()), float(grey.max())
        grey = (grey - lo) * (255.0 / (hi - lo)) if hi > lo else grey
        return _grey_to_rgb(grey)
    return img.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    g8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)        # (H, W)
    return Image.fromarray(np.repeat(g8[..., None], 3, axis=-1), "RGB")  # (H, W, 3)


# ----------------------------------------------------------------------------- crops

def slice_grid(grid: Grid, overlap: float = 0.0) -> Grid:
    """The rows and columns of slices cut from a canvas planned as `grid` (r, c): the same
    without overlap; with overlap o, 1 + ceil((n-1)/(1-o)) windows per axis. This is the
    grid the token layout and SliceRestore see (`num_image_tokens`, `HiResLLaVA`)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    more = lambda n: 1 + math.ceil(Fraction(n - 1) / (1 - Fraction(overlap)))   # noqa: E731
    return (more(grid[0]), more(grid[1])) if overlap else tuple(grid)


def layout_grid(width: int, height: int, cfg: "ModelConfig") -> Grid:
    """The slice grid of a width x height image under `cfg`: plan, then `slice_grid`."""
    return slice_grid(plan(width, height, cfg.vit.image_size, cfg.max_slices), cfg.overlap)


def slice_boxes(grid: Grid, slice_size: int, overlap: float = 0.0):
    """The canvas size (c*S, r*S) of a planned `grid` and each slice's box (left, top, right,
    bottom), row-major over `slice_grid(grid, overlap)`; every box is S x S. overlap = 0 cuts
    the canvas into a plain tiling; o > 0 steps windows by S*(1-o), the last flush with the
    canvas edge."""
    r, c = grid
    S = slice_size
    rows, cols = slice_grid(grid, overlap)
    stride = S * (1.0 - overlap)

    def at(k: int, n: int) -> int:                      # left/top pixel of window k of n
        return min(int(math.floor(k * stride + 0.5)), (n - 1) * S)

    boxes = [(at(j, c), at(i, r), at(j, c) + S, at(i, r) + S)
             for i in range(rows) for j in range(cols)]
    return (c * S, r * S), boxes


def resize_for_grid(image: Image.Image, grid: Grid, slice_size: int, overlap: float = 0.0) -> Image.Image:
    """The image resized to the canvas its slices are cut from: c*S x r*S."""
    canvas, _ = slice_boxes(grid, slice_size, overlap)
    return image.resize(canvas, Image.Resampling.BICUBIC)


def normalize(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> CLIP-normalised float tensor [3, H, W]."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())    # (H, W, 3)
    x = x.permute(2, 0, 1).float().div_(255.0)                         # (3, H, W)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


THUMBNAIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX}


def crops(image: ImageLike, grid: Grid | None, slice_size: int, overlap: float = 0.0,
          thumbnail_filter: str = "bicubic") -> torch.Tensor:
    """Thumbnail + slices of `image`, CLIP-normalised: [1 + r'*c', 3, S, S], where
    (r', c') = slice_grid(grid, overlap) (= grid without overlap).

    grid None: the thumbnail alone, [1, 3, S, S] (thumbnail-only ablations and llava15).
    thumbnail_filter: "bicubic" or "box" (`ModelConfig.thumbnail_filter`).
    """
    if thumbnail_filter not in THUMBNAIL_FILTERS:
        raise ValueError(f"thumbnail_filter must be one of {sorted(THUMBNAIL_FILTERS)}, "
                         f"got {thumbnail_filter!r}")
    img = load_image(image)
    S = slice_size
    thumb = img.resize((S, S), THUMBNAIL_FILTERS[thumbnail_filter])
    if grid is None:
        return normalize(thumb).unsqueeze(0)                            # (1, 3, S, S)
    r, c = grid
    if r <= 0 or c <= 0:
        raise ValueError(f"grid must have positive rows and cols, got {grid}")
    canvas = normalize(resize_for_grid(img, grid, S, overlap))         # (3, H', W')
    _, boxes = slice_boxes(grid, S, overlap)
    pieces = [canvas[:, top:bottom, left:right] for left, top, right, bottom in boxes]
    return torch.stack([normalize(thumb)] + pieces)                    # (1 + r'*c', 3, S, S)
