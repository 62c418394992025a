"""stitch / split / canvases: kernels against the reference, the reference against loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import devices, examples
from hypothesis import given
from hypothesis import strategies as st

import minihires.ops as ops
from minihires.ops import reference as ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = devices("stitch", "split")
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


@examples(0.4)
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
@given(grids=grids_st, h=st.integers(1, 5), w=st.integers(1, 5), C=st.integers(1, 9),
       dtype=st.sampled_from(DTYPES), contiguous=st.booleans())
def test_naive_versions_match(device, grids, h, w, C, dtype, contiguous):
    x = make_slices(grids, h, w, C, dtype, device, contiguous)
    flat = [v for g in grids for v in g]
    packed = torch.ops.minihires.stitch_naive(x, flat)
    assert torch.equal(packed, ref.stitch(x, grids))
    assert torch.equal(torch.ops.minihires.split_naive(packed, flat, h, w), x)
    assert torch.equal(torch.ops.minihires.split_naive(packed.t().contiguous().t(), flat, h, w), x)


@pytest.mark.parametrize("device", DEVICES)
def test_last_kernel_names_the_version(device):
    """torch.ops.minihires.last_kernel() reports what the dispatcher ran (the GPU tests use it
    to assert which CUDA variant ran)."""
    x = torch.randn(6, 2, 3, 4, device=device)
    torch.ops.minihires.stitch_naive(x, [2, 3])
    assert torch.ops.minihires.last_kernel().startswith(f"stitch {device} ")
    naive = torch.ops.minihires.last_kernel()
    torch.ops.minihires.split(ops.stitch(x, [(2, 3)]), [2, 3], 2, 3)
    fast = torch.ops.minihires.last_kernel()
    assert fast.startswith(f"split {device} ") and fast.split()[2] != naive.split()[2]


def test_backend_is_the_cpu_kernel():
    assert ops.backend("stitch") == "cpu kernel" and ops.backend("split") == "cpu kernel"
    with pytest.raises(ValueError, match="unknown op"):
        ops.backend("nope")


@pytest.mark.parametrize("device", DEVICES)
def test_canvases_are_views(device):
    x = torch.randn(7, 2, 3, 4, device=device)
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
    assert ops.split(torch.empty(16, 0, device=device), [(2, 2)], 2, 2).shape == (4, 2, 2, 0)
    for op in (torch.ops.minihires.stitch, torch.ops.minihires.stitch_naive):
        assert op(x, []).shape == (0, 5) and op(y, [2, 2]).shape == (16, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_gradcheck_and_gradgradcheck_float64(device, naive):
    """Both ops are linear, so the second derivative is zero, and the backward (the other
    op) must itself be differentiable for gradgradcheck to see that."""
    grids, flat = [(1, 2), (2, 1), (1, 1)], [1, 2, 2, 1, 1, 1]
    stitch_op = torch.ops.minihires.stitch_naive if naive else torch.ops.minihires.stitch
    split_op = torch.ops.minihires.split_naive if naive else torch.ops.minihires.split
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    p = torch.randn(5 * 6, 3, dtype=torch.float64, device=device, requires_grad=True)
    for fn, arg in ((lambda t: stitch_op(t, flat), x), (lambda t: split_op(t, flat, 2, 3), p),
                    (lambda t: ops.stitch(t, grids), x), (lambda t: ops.split(t, grids, 2, 3), p)):
        assert torch.autograd.gradcheck(fn, (arg,))
        assert torch.autograd.gradgradcheck(fn, (arg,))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_the_other_op(device):
    grids = [(2, 3)]
    x = torch.randn(6, 2, 2, 3, device=device, requires_grad=True)
    g = torch.randn(24, 3, device=device)
    (ops.stitch(x, grids) * g).sum().backward()
    assert torch.equal(x.grad, ref.split(g, grids, 2, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("suffix", ["", "_naive"])
def test_opcheck(device, suffix):
    x = torch.randn(7, 2, 3, 5, device=device, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.minihires, "stitch" + suffix).default, (x, [1, 3, 2, 2]))
    p = torch.randn(42, 5, device=device, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.minihires, "split" + suffix).default, (p, [1, 3, 2, 2], 2, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    grids = [(1, 3), (2, 2)]

    def f(x):
        packed = ops.stitch(x, grids)
        return ops.split(packed * 2 + 1, grids, 2, 3)

    x = torch.randn(7, 2, 3, 4, device=device, requires_grad=True)
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

    @pytest.mark.parametrize("front", [ops, ref], ids=["ops", "reference"])
    @pytest.mark.parametrize("bad", [[(1.5, 2)], [(1.0, 1), (1, 1)], [(True, 2)], [(1, False)],
                                     torch.tensor([[1.0, 2.0]]), [(np.float64(2), 1)]], ids=repr)
    def test_grid_entries_must_be_integers(self, front, bad):
        """int(1.5) would silently read grid (1, 2) as (1, 2): float and bool entries are refused."""
        with pytest.raises(TypeError, match=r"grids\[0\] (rows|cols) must be an int"):
            front.stitch(torch.randn(2, 2, 2, 3), bad)

    @pytest.mark.parametrize("front", [ops, ref], ids=["ops", "reference"])
    def test_integer_types_are_fine(self, front):
        x = torch.randn(6, 2, 2, 3)
        want = ref.stitch(x, [(2, 3)])
        for grids in ([(np.int64(2), np.int32(3))], np.array([[2, 3]]), torch.tensor([[2, 3]]),
                      [(torch.tensor(2), 3)]):
            assert torch.equal(front.stitch(x, grids), want)
        assert torch.equal(front.split(want, [(2, 3)], np.int64(2), torch.tensor(2)), x)

    @pytest.mark.parametrize("front", [ops, ref], ids=["ops", "reference"])
    def test_split_sizes_must_be_integers(self, front):
        with pytest.raises(TypeError, match="h must be an int"):
            front.split(torch.randn(6, 3), [(1, 1)], 2.0, 3)
        with pytest.raises(TypeError, match="w must be an int"):
            front.split(torch.randn(6, 3), [(1, 1)], 2, True)

    def test_sizes_beyond_int64_are_refused(self):
        with pytest.raises(ValueError, match="fit int64"):
            ops.stitch(torch.randn(1, 1, 1, 1), [(2**63, 1)])
        with pytest.raises(ValueError, match="more than int64 holds"):
            ops.stitch(torch.randn(2, 1, 1, 1), [(2**62, 2), (2, 2**62), (1, 2)])
        with pytest.raises(ValueError, match="a slice of h x w x C"):
            ops.split(torch.empty(0, 3), [], 2**62, 2**62)

    def test_zero_slice_size_is_refused_for_empty_batches_too(self):
        """The fake kernel and the C++ kernel both refuse h = 0 or w = 0, whatever N is."""
        for N in (0, 2):
            with pytest.raises(ValueError, match="must be positive"):
                ops.stitch(torch.randn(N, 0, 3, 4), [(1, 2)] if N else [])
            with pytest.raises(RuntimeError, match="must be positive"):
                torch.ops.minihires.stitch(torch.randn(N, 3, 0, 4), [1, 2] if N else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("suffix", ["", "_naive"])
def test_cpp_checks_guard_direct_calls(device, suffix):
    """The C++ checks, from both versions on each device (tests/test_ops_fuzz.py fuzzes them)."""
    stitch_op = getattr(torch.ops.minihires, "stitch" + suffix)
    split_op = getattr(torch.ops.minihires, "split" + suffix)
    x = torch.randn(5, 2, 2, 3, device=device)
    with pytest.raises(RuntimeError, match="grids hold 4 slices but slices has N = 5"):
        stitch_op(x, [2, 2])
    with pytest.raises(RuntimeError, match="must be positive"):
        stitch_op(x[:1], [1, -1])
    with pytest.raises(RuntimeError, match="more than int64 holds"):  # the sum wraps to 5 in int64
        stitch_op(x, [9223372036854775806, 9223372036854775806, 1, 1])
    with pytest.raises(RuntimeError, match=r"\(rows, cols\) pairs"):
        stitch_op(x, [2, 2, 1])
    with pytest.raises(RuntimeError, match="packed has 10 rows"):
        split_op(torch.randn(10, 3, device=device), [1, 2], 2, 2)
    with pytest.raises(RuntimeError, match="more than int64 holds"):
        split_op(torch.randn(20, 3, device=device), [9223372036854775806, 9223372036854775806, 1, 1], 2, 2)
    with pytest.raises(RuntimeError, match="more than int64 holds"):  # N*h*w wraps to 4
        split_op(torch.randn(4, 3, device=device), [1, 1], 4, 2**62 + 1)


@pytest.mark.cuda("stitch", "split")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_v1_v2_and_alignment(poison, dtype):
    """On a GPU: both CUDA versions and every vector width v2 picks, asserted through
    last_kernel(): C sets the run's byte size, a one-element offset misaligns a pointer."""
    esize = torch.tensor([], dtype=dtype).element_size()
    grids, h, w = [(1, 1), (2, 3), (3, 2)], 4, 5
    flat = [v for g in grids for v in g]
    for C in (1, 3, 8, 17, 64, 1024):
        x = make_slices(grids, h, w, C, dtype, "cuda", True)
        want = ref.stitch(x, grids)
        run = w * C * esize  # bytes of one run; fresh tensors are 16-byte aligned
        widest = next(v for v in (16, 8, 4, 2, 1) if run % v == 0)
        assert torch.equal(ops.stitch(x, grids), want)
        assert torch.ops.minihires.last_kernel() == f"stitch cuda v2 vec={widest}B launches=1"
        assert torch.equal(torch.ops.minihires.stitch_naive(x, flat), want)
        assert torch.ops.minihires.last_kernel() == "stitch cuda v1 launches=1"
        assert torch.equal(ops.split(want, grids, h, w), x)
        assert torch.ops.minihires.last_kernel() == f"split cuda v2 vec={widest}B launches=1"
        # misaligned base pointers, a view starting one element in: the packed input of
        # split, and the slices (source) of stitch
        big = torch.randn(want.numel() + 1, device="cuda").to(dtype)
        packed = big[1:].view_as(want)
        assert torch.equal(ops.split(packed, grids, h, w), ref.split(packed, grids, h, w))
        assert torch.ops.minihires.last_kernel() == f"split cuda v2 vec={min(widest, esize)}B launches=1"
        source = big[1:].view_as(x)
        assert torch.equal(ops.stitch(source, grids), ref.stitch(source, grids))
        assert torch.ops.minihires.last_kernel() == f"stitch cuda v2 vec={min(widest, esize)}B launches=1"
        assert torch.equal(torch.ops.minihires.stitch_naive(source, flat), ref.stitch(source, grids))


@pytest.mark.cuda("stitch", "split")
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_cuda_many_images_take_several_launches(poison, naive):
    """The grid tables travel as a kernel argument of up to 128 images: 300 images of mixed
    grids take three launches, and the rows of each chunk land in the right place."""
    gen = torch.Generator().manual_seed(0)
    grids = [tuple(int(v) for v in torch.randint(1, 4, (2,), generator=gen)) for _ in range(300)]
    flat = [v for g in grids for v in g]
    x = make_slices(grids, 2, 3, 5, torch.float32, "cuda", True)
    stitch_op = torch.ops.minihires.stitch_naive if naive else torch.ops.minihires.stitch
    split_op = torch.ops.minihires.split_naive if naive else torch.ops.minihires.split
    packed = stitch_op(x, flat)
    assert torch.ops.minihires.last_kernel().endswith("launches=3")
    assert torch.equal(packed, ref.stitch(x, grids))
    assert torch.equal(split_op(packed, flat, 2, 3), x)


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
