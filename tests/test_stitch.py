"""stitch / split / canvases: kernels against the reference, the reference against loops."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minihires.ops as ops
from minihires.ops import reference as ref

from conftest import DEVICES

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("poison")


def naive_stitch(slices, grids):
    """Python loops over canvas pixels: the definition, checks the reference itself."""
    _, h, w, C = slices.shape
    rows, first = [], 0
    for r, c in grids:
        for y in range(r * h):
            for x in range(c * w):
                rows.append(slices[first + (y // h) * c + x // w, y % h, x % w])
        first += r * c
    return torch.stack(rows) if rows else slices.new_empty((0, C))


grid = st.tuples(st.integers(1, 4), st.integers(1, 4))
long_grid = st.one_of(st.tuples(st.just(1), st.integers(1, 8)), st.tuples(st.integers(1, 8), st.just(1)))
grids_st = st.lists(st.one_of(grid, long_grid), min_size=1, max_size=5)


def make_slices(grids, h, w, C, dtype, device, contiguous):
    n = sum(r * c for r, c in grids)
    if contiguous:
        return torch.randn(n, h, w, C, dtype=torch.float64).to(dtype=dtype, device=device)
    # a view into a wider buffer: strided rows and a storage offset (misaligned base pointer)
    x = torch.randn(n, h, w, C + 3, dtype=torch.float64).to(dtype=dtype, device=device)[..., 1:C + 1]
    assert not x.is_contiguous() or n * h * w == 1
    return x


@settings(max_examples=10)
@given(grids=st.lists(grid, min_size=1, max_size=3), h=st.integers(1, 3), w=st.integers(1, 3),
       C=st.integers(1, 5))
def test_reference_matches_loops(grids, h, w, C):
    x = make_slices(grids, h, w, C, torch.float64, "cpu", True)
    assert torch.equal(ref.stitch(x, grids), naive_stitch(x, grids))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(grids=grids_st, h=st.integers(1, 6), w=st.integers(1, 6), C=st.integers(1, 19),
       contiguous=st.booleans())
def test_kernel_matches_reference(device, dtype, grids, h, w, C, contiguous):
    x = make_slices(grids, h, w, C, dtype, device, contiguous)
    packed = ops.stitch(x, grids)
    assert torch.equal(packed, ref.stitch(x, grids))  # bit-exact: a permutation of rows
    back = ops.split(packed, grids, h, w)
    assert torch.equal(back, x) and back.is_contiguous()
    assert torch.equal(ops.split(packed.t().contiguous().t(), grids, h, w), x)  # strided packed
    for view, want in zip(ops.canvases(packed, grids, h, w), ref.canvases(ref.stitch(x, grids), grids, h, w)):
        assert torch.equal(view, want)


@pytest.mark.parametrize("device", DEVICES)
@given(grids=grids_st, h=st.integers(1, 5), w=st.integers(1, 5), C=st.integers(1, 9))
def test_naive_versions_match(device, grids, h, w, C):
    x = make_slices(grids, h, w, C, torch.float32, device, True)
    flat = [v for g in grids for v in g]
    packed = torch.ops.minihires.stitch_naive(x, flat)
    assert torch.equal(packed, ref.stitch(x, grids))
    assert torch.equal(torch.ops.minihires.split_naive(packed, flat, h, w), x)


def test_backend_is_the_cpu_kernel():
    assert ops.backend("stitch") == "cpu kernel" and ops.backend("split") == "cpu kernel"
    with pytest.raises(ValueError, match="unknown op"):
        ops.backend("nope")


def test_canvases_are_views():
    x = torch.randn(7, 2, 3, 4)
    packed = ops.stitch(x, [(1, 3), (2, 2)])
    a, b = ops.canvases(packed, [(1, 3), (2, 2)], 2, 3)
    assert a.shape == (2, 9, 4) and b.shape == (4, 6, 4)
    assert a.data_ptr() == packed.data_ptr() and b.data_ptr() == packed[18:].data_ptr()
    # canvas pixel (y, x) of image 1 comes from slice 3 + (y//2)*2 + x//3
    assert torch.equal(b[3, 4], x[3 + 1 * 2 + 1, 1, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    x = torch.empty(0, 3, 4, 5, device=device)
    packed = ops.stitch(x, [])
    assert packed.shape == (0, 5)
    assert ops.split(packed, [], 3, 4).shape == (0, 3, 4, 5)
    y = torch.empty(4, 2, 2, 0, device=device)  # C = 0
    assert ops.stitch(y, [(2, 2)]).shape == (16, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    grids = [(1, 2), (2, 1), (1, 1)]
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.stitch(t, grids), (x,))
    p = torch.randn(5 * 6, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.split(t, grids, 2, 3), (p,))
    assert torch.autograd.gradgradcheck(lambda t: ops.stitch(t, grids), (x,))


def test_backward_is_the_other_op():
    grids = [(2, 3)]
    x = torch.randn(6, 2, 2, 3, requires_grad=True)
    g = torch.randn(24, 3)
    (ops.stitch(x, grids) * g).sum().backward()
    assert torch.equal(x.grad, ref.split(g, grids, 2, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(7, 2, 3, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.minihires.stitch.default, (x, [1, 3, 2, 2]))
    p = torch.randn(42, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.minihires.split.default, (p, [1, 3, 2, 2], 2, 3))
    torch.library.opcheck(torch.ops.minihires.stitch_naive.default, (x.detach(), [1, 3, 2, 2]))


def test_torch_compile_fullgraph():
    grids = [(1, 3), (2, 2)]

    def f(x):
        packed = ops.stitch(x, grids)
        return ops.split(packed * 2 + 1, grids, 2, 3)

    x = torch.randn(7, 2, 3, 4, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.equal(out, x * 2 + 1)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


class TestBadInput:
    def test_grids_do_not_sum_to_n(self):
        with pytest.raises(ValueError, match="hold 4 slices but slices has N = 5"):
            ops.stitch(torch.randn(5, 2, 2, 3), [(2, 2)])
        with pytest.raises(ValueError, match="hold 4 slices"):
            ref.stitch(torch.randn(5, 2, 2, 3), [(2, 2)])
        with pytest.raises(RuntimeError, match="grids hold 4 slices but slices has N = 5"):
            torch.ops.minihires.stitch(torch.randn(5, 2, 2, 3), [2, 2])

    def test_non_positive_sizes(self):
        with pytest.raises(ValueError, match="must be positive"):
            ops.stitch(torch.randn(0, 2, 2, 3), [(0, 2)])
        with pytest.raises(ValueError, match="must be positive"):
            ops.split(torch.randn(4, 3), [(1, 1)], 0, 4)
        with pytest.raises(RuntimeError, match="must be positive"):
            torch.ops.minihires.split(torch.randn(4, 3), [1, 1], 2, -2)
        with pytest.raises(RuntimeError, match="must be positive"):
            torch.ops.minihires.stitch(torch.randn(1, 2, 2, 3), [1, -1])

    def test_packed_wrong_length(self):
        with pytest.raises(ValueError, match="packed has 10 rows but grids"):
            ops.split(torch.randn(10, 3), [(1, 2)], 2, 2)
        with pytest.raises(RuntimeError, match="packed has 10 rows"):
            torch.ops.minihires.split(torch.randn(10, 3), [1, 2], 2, 2)

    def test_wrong_rank_and_dtype(self):
        with pytest.raises(ValueError, match=r"slices must be \[N, h, w, C\]"):
            ops.stitch(torch.randn(4, 2, 2), [(2, 2)])
        with pytest.raises(ValueError, match="must be float32, float64, float16 or bfloat16"):
            ops.stitch(torch.zeros(4, 2, 2, 3, dtype=torch.int64), [(2, 2)])
        with pytest.raises(RuntimeError, match="must be float32"):
            torch.ops.minihires.stitch(torch.zeros(4, 2, 2, 3, dtype=torch.int32), [2, 2])
        with pytest.raises(ValueError, match="rows, cols"):
            ops.stitch(torch.randn(4, 2, 2, 3), [(2, 2, 1)])
        with pytest.raises(RuntimeError, match=r"\(rows, cols\) pairs"):
            torch.ops.minihires.stitch(torch.randn(4, 2, 2, 3), [2, 2, 1])
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            ops.stitch([[1.0]], [(1, 1)])


@pytest.mark.cuda("stitch", "split")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_v1_v2_and_alignment(dtype):
    """On a GPU: both CUDA versions, every vector width (odd C gives 2/1-byte vectors)."""
    for C in (1, 3, 8, 17, 64, 1024):
        grids = [(1, 1), (2, 3), (3, 2)]
        x = make_slices(grids, 4, 5, C, dtype, "cuda", True)
        flat = [v for g in grids for v in g]
        want = ref.stitch(x, grids)
        assert torch.equal(ops.stitch(x, grids), want)
        assert torch.equal(torch.ops.minihires.stitch_naive(x, flat), want)
        assert torch.equal(ops.split(want, grids, 4, 5), x)
        # misaligned base pointer: a view starting one element in
        big = torch.randn(want.numel() + 1, device="cuda").to(dtype)
        packed = big[1:].view_as(want)
        assert torch.equal(ops.split(packed, grids, 4, 5), ref.split(packed, grids, 4, 5))


def test_fallback_without_the_extension():
    """With minihires._C missing, every op runs its reference twin and one warning says why."""
    import subprocess
    import sys
    code = """
import sys, warnings
class Block:  # make `import minihires._C` fail, as on a machine where it was never built
    def find_spec(self, name, path=None, target=None):
        if name == "minihires._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch
import minihires.ops as ops
from minihires.ops import reference as ref
assert ops.backend("stitch") == "reference" and ops.backend("window_attn_pool") == "reference"
x = torch.randn(5, 2, 3, 4)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    p = ops.stitch(x, [(1, 1), (2, 2)])
    ops.split(p, [(1, 1), (2, 2)], 2, 3)
assert torch.equal(p, ref.stitch(x, [(1, 1), (2, 2)]))
assert len(w) == 1 and "pip install --no-build-isolation -e ." in str(w[0].message), [str(m.message) for m in w]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
