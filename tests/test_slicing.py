"""slicing: the grid rule, image loading (modes, orientation, bad files) and crops."""
import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from minihires import ops
from minihires.model import slicing
from minihires.model.config import tiny

# ----------------------------------------------------------------------------- grid rule

def candidates(n_cap, max_slices):
    out = []
    for m in (n_cap - 1, n_cap, n_cap + 1):
        if 1 <= m <= max_slices:
            out += [(r, m // r) for r in range(1, m + 1) if m % r == 0]
    return out


@settings(max_examples=200, deadline=None)
@given(W=st.integers(1, 8192), H=st.integers(1, 8192),
       S=st.sampled_from([14, 32, 224, 336]), cap=st.integers(1, 12))
def test_plan_rule(W, H, S, cap):
    r, c = slicing.plan(W, H, S, cap)
    n = min(math.ceil(W * H / S ** 2), cap)
    assert 1 <= r * c <= cap
    assert r * c in (n - 1, n, n + 1)
    # aspect-optimal among the candidates, by an independent float computation
    err = lambda rc: abs(math.log(W / H) - math.log(rc[1] / rc[0]))  # noqa: E731
    cands = candidates(n, cap)
    best = min(err(rc) for rc in cands)
    assert err((r, c)) <= best + 1e-12
    for rc in cands:                     # ties: fewer slices, then more columns
        if abs(err(rc) - err((r, c))) < 1e-12:
            assert (r * c, -c) <= (rc[0] * rc[1], -rc[1])
    assert slicing.plan(W, H, S, cap) == (r, c)   # deterministic


def test_plan_examples():
    assert slicing.plan(1000, 300, 336, 6) == (1, 3)      # n = 3, wide
    assert slicing.plan(300, 1000, 336, 6) == (3, 1)      # n = 3, tall
    assert slicing.plan(10, 10, 336, 6) == (1, 1)         # small image: one slice
    assert slicing.plan(24, 24, 10, 8) == (2, 3)          # square, n = 6: 2x3 ties 3x2 -> more columns
    assert slicing.plan(64, 64, 32, 4) == (2, 2)
    assert slicing.plan(8192, 8192, 336, 6) == (2, 3)     # capped at 6 (5, 6 and 7 cannot be square)
    assert slicing.plan(5000, 10, 32, 1) == (1, 1)        # cap 1: no choice


@pytest.mark.parametrize("bad", [dict(width=0), dict(height=-3), dict(slice_size=0),
                                 dict(max_slices=0), dict(width=2.5), dict(height=True)])
def test_plan_bad_input(bad):
    args = dict(width=100, height=100, slice_size=32, max_slices=4) | bad
    name = next(iter(bad))
    with pytest.raises((ValueError, TypeError), match=name):
        slicing.plan(**args)


def test_num_image_tokens_by_hand():
    cfg = tiny()                       # g = 32/4 = 8, window 2 -> h = 4, 16 tokens per crop
    assert slicing.num_image_tokens((2, 2), cfg) == 16 + 1 + 2 * (2 * 16 + 1)
    assert slicing.num_image_tokens((1, 3), cfg) == 16 + 1 + 1 * (3 * 16 + 1)
    cfg.compression = "none"
    assert slicing.num_image_tokens((1, 1), cfg) == 64 + 1 + 64 + 1
    cfg.use_slices = False
    assert slicing.num_image_tokens((3, 2), cfg) == 64 + 1
    cfg.mode = "llava15"
    assert slicing.num_image_tokens((3, 2), cfg) == 64


# ----------------------------------------------------------------------------- loading

def rgb_of(img):
    return np.asarray(slicing.load_image(img)).astype(int)


def test_modes_alpha_on_white():
    im = Image.new("RGBA", (3, 1))
    im.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    px = rgb_of(im)[0]
    assert px[0].tolist() == [255, 255, 255]        # fully transparent -> white
    assert px[1].tolist() == [255, 0, 0]            # opaque unchanged
    assert px[2].tolist() == [127, 127, 127]        # half black over white
    la = Image.new("LA", (1, 1), (0, 0))
    assert rgb_of(la)[0, 0].tolist() == [255, 255, 255]
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    p.putdata([0, 1])
    p.info["transparency"] = 0
    assert rgb_of(p)[0].tolist() == [[255, 255, 255], [0, 255, 0]]
    pa = p.convert("PA")
    assert rgb_of(pa)[0].tolist() == [[255, 255, 255], [0, 255, 0]]
    rgba_premul = Image.new("RGBa", (1, 1), (0, 0, 0, 0))
    assert rgb_of(rgba_premul)[0, 0].tolist() == [255, 255, 255]
    la_premul = Image.frombytes("La", (2, 1), bytes([0, 0, 100, 255]))
    assert rgb_of(la_premul)[0].tolist() == [[255] * 3, [100] * 3]


def test_modes_high_bit_depth():
    i16 = Image.new("I;16", (3, 1))
    i16.putdata([0, 257 * 100, 65535])
    assert rgb_of(i16)[0, :, 0].tolist() == [0, 100, 255]
    i32 = Image.new("I", (3, 1))
    i32.putdata([-1000, 0, 1000])                    # stretched min..max -> 0..255
    assert rgb_of(i32)[0, :, 0].tolist() == [0, 128, 255]
    f = Image.new("F", (3, 1))
    f.putdata([0.0, 0.5, 1.0])
    assert rgb_of(f)[0, :, 1].tolist() == [0, 128, 255]
    const = Image.new("F", (2, 2), 7.0)              # constant: clipped, not divided by zero
    assert (rgb_of(const) == 7).all()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_float_images_with_non_finite_pixels_are_refused(tmp_path, bad):
    """One inf used to stretch every other pixel to 0: a black image, answered about."""
    a = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    a[1, 2] = bad
    img = Image.fromarray(a, mode="F")
    with pytest.raises(ValueError, match=r"image \(F mode\) holds 1 non-finite pixel"):
        slicing.load_image(img)
    path = tmp_path / "float.tiff"
    img.save(path)
    with pytest.raises(ValueError, match=r"float\.tiff \(F mode\) holds 1 non-finite"):
        slicing.load_image(path)
    with pytest.raises(ValueError, match="non-finite"):
        slicing.crops(path, (1, 1), 8)


ALL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
             "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "F"]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_mode_becomes_rgb(mode):
    img = Image.new(mode, (5, 3))
    out = slicing.load_image(img)
    assert out.mode == "RGB" and out.size == (5, 3)
    x = slicing.crops(img, (1, 2), 8)
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all()


def test_simple_modes_values():
    assert rgb_of(Image.new("1", (1, 1), 1))[0, 0].tolist() == [255] * 3
    assert rgb_of(Image.new("L", (1, 1), 77))[0, 0].tolist() == [77] * 3
    assert rgb_of(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))[0, 0].tolist() == [255] * 3


def test_exif_orientation(tmp_path):
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    im.putpixel((0, 0), (255, 0, 0))                 # red at top left
    exif = im.getexif()
    exif[0x0112] = 6                                 # "rotate 90 CW to display"
    path = tmp_path / "rot.png"
    im.save(path, exif=exif)
    out = slicing.load_image(path)
    assert out.size == (2, 4)
    assert out.getpixel((1, 0)) == (255, 0, 0)       # top left moved to top right


def png_header(w, h):
    """A PNG that declares w x h pixels but holds no data (a decompression-bomb header)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 100_000])   # over our guard; over Pillow's hard limit
def test_bomb(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(ValueError, match="decompression bomb"):
        slicing.load_image(path)


def test_max_pixels_argument():
    with pytest.raises(ValueError, match="max_pixels"):
        slicing.load_image(Image.new("RGB", (20, 20)), max_pixels=399)
    assert slicing.load_image(Image.new("RGB", (20, 20)), max_pixels=400).size == (20, 20)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (0, 0)])
def test_size_zero(size):
    with pytest.raises(ValueError, match="width and height must be positive"):
        slicing.load_image(Image.new("RGB", size))
    with pytest.raises(ValueError, match="width and height must be positive"):
        slicing.crops(Image.new("L", size), (1, 1), 8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated"):
        slicing.load_image(path)


def test_unreadable_and_missing(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="not a recognised image"):
        slicing.load_image(path)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        slicing.load_image(tmp_path / "nope.png")
    with pytest.raises(TypeError, match="image must be"):
        slicing.load_image(42)
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder"):
        slicing.load_image(tmp_path)


# ----------------------------------------------------------------------------- crops

def noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (2, 2), (3, 2)])
def test_crops_tile_resized_image(grid):
    S, img = 16, noise_image(50, 37)
    x = slicing.crops(img, grid, S)
    r, c = grid
    assert x.shape == (1 + r * c, 3, S, S)
    assert torch.equal(x[0], slicing.normalize(img.resize((S, S), Image.Resampling.BICUBIC)))
    packed = ops.stitch(x[1:].permute(0, 2, 3, 1).contiguous(), [grid])   # (r*S*c*S, 3)
    canvas = packed.view(r * S, c * S, 3).permute(2, 0, 1)                 # (3, r*S, c*S)
    expected = slicing.normalize(slicing.resize_for_grid(img, grid, S))
    assert expected.shape == (3, r * S, c * S)
    assert torch.equal(canvas, expected)


def test_crops_overlap():
    """Overlap keeps the c*S x r*S canvas (native resolution) and lays more windows on it."""
    S, o, img = 32, 0.5, noise_image(90, 70)
    (W, H), boxes = slicing.slice_boxes((2, 3), S, o)
    assert (W, H) == (3 * S, 2 * S) and slicing.slice_grid((2, 3), o) == (3, 5)
    x = slicing.crops(img, (2, 3), S, overlap=o)
    assert x.shape == (1 + 15, 3, S, S)
    s = x[1:].view(3, 5, 3, S, S)                            # (r', c', 3, S, S)
    assert torch.equal(s[0, 0, :, :, 16:], s[0, 1, :, :, :16])   # right half = neighbour's left half
    assert torch.equal(s[0, 4, :, 16:, :], s[1, 4, :, :16, :])   # bottom half = lower neighbour's top
    assert not torch.equal(s[0, 0], s[0, 1])
    canvas = slicing.normalize(slicing.resize_for_grid(img, (2, 3), S, o))
    assert torch.equal(canvas, slicing.normalize(slicing.resize_for_grid(img, (2, 3), S)))
    for k, (left, top, right, bottom) in enumerate(boxes):
        assert torch.equal(x[1 + k], canvas[:, top:bottom, left:right])
    # the plain tiling's slices are among the windows: every other one
    plain = slicing.crops(img, (2, 3), S)
    assert torch.equal(s[0, 0], plain[1]) and torch.equal(s[2, 4], plain[6])
    with pytest.raises(ValueError, match="overlap"):
        slicing.crops(img, (1, 2), S, overlap=1.0)


def test_crops_thumbnail_only_and_normalisation():
    x = slicing.crops(Image.new("RGB", (7, 9), (255, 255, 255)), None, 8)
    assert x.shape == (1, 3, 8, 8)
    white = (1 - torch.tensor(slicing.CLIP_MEAN)) / torch.tensor(slicing.CLIP_STD)
    assert torch.allclose(x[0, :, 3, 3], white)
