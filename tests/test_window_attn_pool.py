"""window_attn_pool kernels (C++ CPU, CUDA v1/v2) against the float64 reference.

Accuracy rule (docs/design.md, "Kernel contracts"): float32 within 1e-5 relative error (max abs error over
max abs value) of a float64 reference; bfloat16/float16 at most twice the reference's own
error in that precision (the reference run in that dtype vs float64). Gradients get an
absolute floor besides, from the size of the terms they sum (see `grad_floors`). The CUDA
kernels are built with --use_fast_math (csrc/README.md): their float32 results differ from
the CPU's by a few ulps, well inside the same rule. Fresh allocations are poisoned with NaN,
so an element a kernel forgets to write fails. Example counts come from the hypothesis
profile (tests/conftest.py).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import devices, examples
from hypothesis import given
from hypothesis import strategies as st

from minihires import ops
from minihires.ops import reference
from minihires.ops._extension import has_kernel

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW = (torch.bfloat16, torch.float16)
KERNEL = has_kernel("window_attn_pool", "cpu")
needs_kernel = pytest.mark.skipif(not KERNEL, reason="minihires._C not built (pip install --no-build-isolation -e .)")
fwd_op, bwd_op = "window_attn_pool", "window_attn_pool_backward"
# Kernel tests run on the CPU here and on the GPU too where tests/gpu/run.sh runs them.
DEVICES = devices(fwd_op, bwd_op)
ON_DEVICES = pytest.mark.parametrize("device", DEVICES)


# --- helpers ------------------------------------------------------------------------------
def make(shape, dtype, device, gen, layout="contiguous"):
    """Random tensor of `shape`; 'strided' and 'permuted' give non-contiguous views."""
    if layout == "strided":   # every other channel of a wider tensor
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)\
            .to(device=device, dtype=dtype)[..., ::2]
    if layout == "permuted":  # stored [N, W, H, nh, d], viewed as [N, H, W, nh, d]
        s = list(shape)
        s[1], s[2] = s[2], s[1]
        return torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def problem(n, hq, wq, kh, kw, nh, d, dtype, device="cpu", seed=0, layouts=("contiguous",) * 3):
    gen = torch.Generator().manual_seed(seed)
    q = make((n, hq, wq, nh, d), dtype, device, gen, layouts[0])
    k = make((n, hq * kh, wq * kw, nh, d), dtype, device, gen, layouts[1])
    v = make((n, hq * kh, wq * kw, nh, d), dtype, device, gen, layouts[2])
    return q, k, v


def err(x, ref64):
    return (x.double().cpu() - ref64.cpu()).abs().max().item() if x.numel() else 0.0


def assert_accurate(got, ref_same_dtype, ref64, what="", grad=False, floor=0.0):
    """float32/64: relative error <= 1e-5 / 1e-12; bf16/fp16: <= twice the reference's own
    error in that dtype (floored at half an ulp of the largest value, for tiny tensors).

    grad=True (ours): a gradient element can be a small difference of larger terms
    (ds_t = p_t (dp_t - D) when the dp_t are close), where the float32 reference's own error
    exceeds 1e-5 relative; float32 gradients may then be off by up to 4x that error.
    floor: an absolute tolerance below which any error passes (grad_floors), for gradients
    whose exact value is far smaller than the terms they are summed from."""
    assert not got.isnan().any(), f"{what}: NaN in the output (an unwritten element?)"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    e = err(got, ref64)
    if got.dtype in LOW:
        tol = max(2 * err(ref_same_dtype, ref64), 0.5 * torch.finfo(got.dtype).eps * scale)
    elif got.dtype == torch.float32:
        tol = max(1e-5 * scale, 4 * err(ref_same_dtype, ref64) if grad else 0.0)
    else:
        tol = 1e-12 * scale
    tol = max(tol, floor)
    assert e <= tol, f"{what}: max error {e:.3g} > tolerance {tol:.3g} ({got.dtype})"


def windows(x, window):
    """[N, Hq*kh, Wq*kw, nh, d] -> [N, Hq, Wq, nh, T, d]: each query's keys (or values)."""
    n, H, W, nh, d = x.shape
    kh, kw = window
    x = x.reshape(n, H // kh, kh, W // kw, kw, nh, d).permute(0, 1, 3, 5, 2, 4, 6)  # (N, Hq, Wq, nh, kh, kw, d)
    return x.reshape(n, H // kh, W // kw, nh, kh * kw, d)                          # (N, Hq, Wq, nh, T, d)


def grad_floors(q, k, v, g, window, scale):
    """Absolute error floors for (dq, dk, dv), from the size of the terms each one sums.

    dq = scale sum_t p_t (dp_t - D) k_t and dk_t = scale p_t (dp_t - D) q, with dp_t = g.v_t:
    the exact value can be 0 (a 1x1 window: p = 1, dp = D, so dq = dk = 0) while every term
    is about scale |dp| |k| (or |q|) in size, and a kernel's rounding (fused multiply-adds on
    the GPU, the rounding of the saved lse) leaves errors of a few ulps of those terms, not of
    the zero result. The floor is 4 T ulps (of the accumulation dtype) of the largest term;
    dv_t = p_t g has no cancellation: 4 ulps of |g|."""
    kh, kw = window
    T = kh * kw
    q64, k64, v64, g64 = (x.detach().double().cpu() for x in (q, k, v, g))
    if q64.numel() == 0:
        return {"dq": 0.0, "dk": 0.0, "dv": 0.0}
    eps = torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).eps
    dp = torch.einsum("nijhd,nijhtd->nijht", g64, windows(v64, window)).abs().max().item()
    term = abs(scale) * dp
    return {"dq": 4 * T * eps * term * k64.abs().max().item(), "dk": 4 * T * eps * term * q64.abs().max().item(),
            "dv": 4 * eps * g64.abs().max().item()}


def ref_lse(q, k, window, scale):
    """float64 log-sum-exp of each query's window logits, for checking the saved lse."""
    return (torch.einsum("nijhd,nijhtd->nijht", q.double(), windows(k.double(), window)) * scale).logsumexp(-1)


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
                   st.integers(1, 3), st.one_of(st.integers(1, 20), st.sampled_from([32, 33, 64])))
layouts = st.tuples(*[st.sampled_from(["contiguous", "strided", "permuted"])] * 3)
scales = st.one_of(st.none(), st.floats(0.05, 2.0))


# --- the reference itself ------------------------------------------------------------------
@examples()
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3),
                       st.integers(1, 3), st.integers(1, 2), st.integers(1, 5)),
       seed=st.integers(0, 2**16), scale=scales)
def test_naive_loops_check_the_reference(shape, seed, scale):
    n, hq, wq, kh, kw, nh, d = shape
    q, k, v = problem(n, hq, wq, kh, kw, nh, d, torch.float64, seed=seed)
    want = reference.window_attn_pool_naive(q, k, v, (kh, kw), scale)
    torch.testing.assert_close(reference.window_attn_pool(q, k, v, (kh, kw), scale), want, rtol=1e-12, atol=1e-12)


# --- forward ------------------------------------------------------------------------------
@needs_kernel
@ON_DEVICES
@examples()
@given(shape=shapes, dtype=st.sampled_from(DTYPES), lay=layouts, seed=st.integers(0, 2**16), scale=scales,
       naive=st.booleans())
def test_forward_matches_reference(poison, device, shape, dtype, lay, seed, scale, naive):
    n, hq, wq, kh, kw, nh, d = shape
    q, k, v = problem(n, hq, wq, kh, kw, nh, d, dtype, device, seed=seed, layouts=lay)
    ref64 = reference.window_attn_pool(q.double(), k.double(), v.double(), (kh, kw), scale)
    ref_dt = reference.window_attn_pool(q, k, v, (kh, kw), scale)
    sc = d ** -0.5 if scale is None else scale
    op = torch.ops.minihires.window_attn_pool_naive if naive else torch.ops.minihires.window_attn_pool
    out, lse = op(q, k, v, kh, kw, sc)
    assert out.dtype == dtype and out.shape == q.shape
    assert_accurate(out, ref_dt, ref64, "naive" if naive else "fast")
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), ref_lse(q, k, (kh, kw), sc), rtol=1e-5, atol=1e-5)
    if not naive:  # the public front runs the same kernel
        assert torch.equal(ops.window_attn_pool(q, k, v, (kh, kw), scale), out)


@needs_kernel
def test_backend_is_the_cpu_kernel():
    assert ops.backend("window_attn_pool", "cpu") == "cpu kernel"


# --- backward -----------------------------------------------------------------------------
def grads(fn, q, k, v, g):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), g)


@needs_kernel
@ON_DEVICES
@examples()
@given(shape=shapes, dtype=st.sampled_from(DTYPES), lay=layouts, seed=st.integers(0, 2**16),
       scale=scales, naive=st.booleans())
def test_gradients_match_reference_autograd(poison, device, shape, dtype, lay, seed, scale, naive):
    n, hq, wq, kh, kw, nh, d = shape
    q, k, v = problem(n, hq, wq, kh, kw, nh, d, dtype, device, seed=seed, layouts=lay)
    g = make(q.shape, dtype, device, torch.Generator().manual_seed(seed + 1), lay[0])
    sc = d ** -0.5 if scale is None else scale
    op = torch.ops.minihires.window_attn_pool_naive if naive else torch.ops.minihires.window_attn_pool
    got = grads(lambda a, b, c: op(a, b, c, kh, kw, sc)[0], q, k, v, g)
    ref_fn = lambda a, b, c: reference.window_attn_pool(a, b, c, (kh, kw), scale)  # noqa: E731
    want64 = grads(ref_fn, q.double(), k.double(), v.double(), g.double())
    want_dt = grads(ref_fn, q, k, v, g)
    floors = grad_floors(q, k, v, g, (kh, kw), sc)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want_dt, want64):
        assert a.shape == c.shape and a.dtype == dtype
        assert_accurate(a, b, c, name, grad=True, floor=floors[name])


def test_gradient_floor_is_scaled_not_blanket():
    """The floor lets a gradient whose exact value is 0 carry rounding noise of its terms
    (what a fused multiply-add leaves), and nothing like a real error."""
    q, k, v = problem(1, 2, 2, 1, 1, 2, 16, torch.float32, seed=7)  # 1x1 window: dq = dk = 0 exactly
    g = torch.randn_like(q)
    floors = grad_floors(q, k, v, g, (1, 1), 0.25)
    zero = torch.zeros_like(q, dtype=torch.float64)
    noise = torch.full_like(q, 1e-7 * 0.25 * 4.0)  # ~1 ulp of the terms scale |dp| |k|
    assert 0 < floors["dq"] < 1e-3 and floors["dv"] < 1e-5
    assert_accurate(noise, zero.float(), zero, "noise", grad=True, floor=floors["dq"])
    with pytest.raises(AssertionError, match="tolerance"):  # without the floor, the same noise fails
        assert_accurate(noise, zero.float(), zero, "noise", grad=True)
    with pytest.raises(AssertionError, match="tolerance"):  # a real error fails with it
        assert_accurate(torch.full_like(q, 1e-3), zero.float(), zero, "error", grad=True, floor=floors["dq"])


@needs_kernel
@ON_DEVICES
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_gradcheck_float64(device, naive):
    q, k, v = problem(2, 2, 3, 2, 3, 2, 5, torch.float64, device, seed=3, layouts=("permuted", "strided", "contiguous"))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    if naive:
        fn = lambda a, b, c: torch.ops.minihires.window_attn_pool_naive(a, b, c, 2, 3, 0.7)[0]  # noqa: E731
    else:
        fn = lambda a, b, c: ops.window_attn_pool(a, b, c, (2, 3), 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@needs_kernel
@ON_DEVICES
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_gradgradcheck_float64(device, naive):
    """Second derivatives (create_graph=True) are the reference's, not zeros."""
    q, k, v = problem(1, 2, 1, 2, 1, 1, 2, torch.float64, device, seed=4, layouts=("strided", "contiguous", "permuted"))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    if naive:
        fn = lambda a, b, c: torch.ops.minihires.window_attn_pool_naive(a, b, c, 2, 1, 0.8)[0]  # noqa: E731
    else:
        fn = lambda a, b, c: ops.window_attn_pool(a, b, c, (2, 1), 0.8)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (q, k, v))
    # only one input needing gradients
    assert torch.autograd.gradgradcheck(lambda b: fn(q.detach(), b, v.detach()), (k,))


@needs_kernel
@ON_DEVICES
def test_second_derivative_matches_the_reference(device):
    q, k, v = problem(2, 2, 2, 2, 2, 2, 4, torch.float64, device, seed=6)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    g = torch.randn_like(q)

    def hessian_vector(fn):
        dq, dk, dv = torch.autograd.grad(fn(q, k, v), (q, k, v), g, create_graph=True)
        return torch.autograd.grad((dq.square().sum() + (dk * dv).sum()), (q, k, v))

    got = hessian_vector(lambda a, b, c: ops.window_attn_pool(a, b, c, 2, 0.6))
    want = hessian_vector(lambda a, b, c: reference.window_attn_pool(a, b, c, 2, 0.6))
    for a, b in zip(got, want):
        assert b.abs().max() > 0.01  # a real second derivative: zeros would fail
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_kernel
@ON_DEVICES
def test_backward_op_is_not_silently_differentiated(device):
    """Called directly on inputs that need gradients, the backward op refuses to be
    differentiated (an error, not torch's zeros)."""
    q, k, v = problem(1, 1, 1, 2, 2, 1, 3, torch.float64, device, seed=8)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = torch.ops.minihires.window_attn_pool(q, k, v, 2, 2, 0.5)
    dq, dk, dv = torch.ops.minihires.window_attn_pool_backward(torch.ones_like(out), q, k, v, lse, 2, 2, 0.5)
    with pytest.raises(RuntimeError, match="not differentiable"):
        dq.sum().backward()


# --- torch.library integration ------------------------------------------------------------
@needs_kernel
@ON_DEVICES
@pytest.mark.parametrize("name", ["window_attn_pool", "window_attn_pool_naive"])
def test_opcheck(device, name):
    q, k, v = problem(2, 2, 2, 2, 1, 2, 6, torch.float32, device, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(getattr(torch.ops.minihires, name).default, (q, k, v, 2, 1, 0.4))
    out, lse = getattr(torch.ops.minihires, name)(q, k, v, 2, 1, 0.4)
    bwd = getattr(torch.ops.minihires, name.replace("pool", "pool_backward"))
    torch.library.opcheck(bwd.default, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), lse, 2, 1, 0.4))
    # the backward op with inputs that need gradients: its (refusing) autograd is registered
    torch.library.opcheck(bwd.default, (torch.randn_like(out), q, k, v, lse.detach(), 2, 1, 0.4),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_kernel
@ON_DEVICES
def test_torch_compile_fullgraph(device):
    q, k, v = problem(2, 3, 2, 2, 2, 2, 8, torch.float32, device, seed=9)

    def loss(q, k, v):
        return ops.window_attn_pool(q, k, v, 2).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    want = grads(loss, q, k, v, torch.tensor(1.0, device=device))
    got = grads(compiled, q, k, v, torch.tensor(1.0, device=device))
    # the compiled backward runs the backward kernel (not the differentiable fallback)
    assert torch.ops.minihires.last_kernel().startswith(f"window_attn_pool_backward {device} ")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --- properties ---------------------------------------------------------------------------
@needs_kernel
@ON_DEVICES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_window_1x1(poison, device, dtype, naive):
    """One key per window: softmax of one logit is 1, so out = v exactly, dv = dout, and the
    true dq, dk are 0 (the kernels may leave rounding noise of their terms: grad_floors)."""
    q, k, v = problem(2, 3, 4, 1, 1, 2, 7, dtype, device, seed=1)
    g = torch.randn_like(q)
    op = torch.ops.minihires.window_attn_pool_naive if naive else torch.ops.minihires.window_attn_pool
    assert torch.equal(op(q, k, v, 1, 1, 7 ** -0.5)[0], v)
    if not naive:
        assert torch.equal(ops.window_attn_pool(q, k, v, 1), v)
    dq, dk, dv = grads(lambda a, b, c: op(a, b, c, 1, 1, 7 ** -0.5)[0], q, k, v, g)
    floors = grad_floors(q, k, v, g, (1, 1), 7 ** -0.5)
    zero = torch.zeros_like(q, dtype=torch.float64)
    assert_accurate(dq, zero.to(dtype), zero, "dq", grad=True, floor=floors["dq"])
    assert_accurate(dk, zero.to(dtype), zero, "dk", grad=True, floor=floors["dk"])
    assert_accurate(dv, g, g.double(), "dv", grad=True, floor=floors["dv"])


@needs_kernel
@ON_DEVICES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_keys_give_the_window_mean(poison, device, dtype):
    n, hq, wq, kh, kw, nh, d = 2, 2, 3, 3, 2, 2, 5
    q, _, v = problem(n, hq, wq, kh, kw, nh, d, dtype, device, seed=2)
    one_key = torch.randn(n, hq, 1, wq, 1, nh, d, dtype=dtype, device=device)        # (N, Hq, 1, Wq, 1, nh, d)
    k = one_key.expand(n, hq, kh, wq, kw, nh, d).reshape(n, hq * kh, wq * kw, nh, d)  # same key in each window
    mean = v.reshape(n, hq, kh, wq, kw, nh, d).mean(dim=(2, 4))                        # (N, Hq, Wq, nh, d)
    torch.testing.assert_close(ops.window_attn_pool(q, k, v, (kh, kw)), mean)


@needs_kernel
@ON_DEVICES
def test_each_query_sees_only_its_window(poison, device):
    """Changing the keys/values of one window changes that window's output only."""
    q, k, v = problem(1, 3, 3, 2, 2, 1, 4, torch.float64, device, seed=4)
    out = ops.window_attn_pool(q, k, v, 2)
    k2, v2 = k.clone(), v.clone()
    k2[0, 2:4, 4:6] += 1.0   # window (1, 2)
    v2[0, 2:4, 4:6] -= 3.0
    changed = (ops.window_attn_pool(q, k2, v2, 2) != out).any(dim=(-1, -2))[0].cpu()  # (Hq, Wq)
    want = torch.zeros(3, 3, dtype=torch.bool)
    want[1, 2] = True
    assert torch.equal(changed, want)


@needs_kernel
@ON_DEVICES
@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_empty_inputs(poison, device, naive):
    op = torch.ops.minihires.window_attn_pool_naive if naive else torch.ops.minihires.window_attn_pool
    for n, hq, nh in ((0, 3, 2), (2, 0, 2), (2, 3, 0)):  # no images, no query rows, no heads
        q, k, v = problem(n, hq, 2, 2, 2, nh, 4, torch.float32, device)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out, lse = op(q, k, v, 2, 2, 0.5)
        assert out.shape == q.shape and lse.shape == q.shape[:4]
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=False)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert ops.window_attn_pool(q, k, v, 2).shape == q.shape


# --- bad input ----------------------------------------------------------------------------
BAD = [
    ("does not tile", lambda q, k, v: (q, k[:, :-1], v[:, :-1], 2)),
    ("heads, d", lambda q, k, v: (q[..., :1, :], k, v, 2)),
    ("heads, d", lambda q, k, v: (q[..., :3], k, v, 2)),
    ("same shape", lambda q, k, v: (q, k, v[..., :3], 2)),
    ("share a dtype", lambda q, k, v: (q.double(), k, v, 2)),
    ("float32, float64", lambda q, k, v: (q.int(), k.int(), v.int(), 2)),
    ("must be positive", lambda q, k, v: (q, k, v, 0)),
    ("must be positive", lambda q, k, v: (q, k, v, (2, -1))),
    ("window must be", lambda q, k, v: (q, k, v, 2.0)),
    ("window must be", lambda q, k, v: (q, k, v, (2, 2, 1))),
    ("window must be", lambda q, k, v: (q, k, v, (2,))),
    ("window must be", lambda q, k, v: (q, k, v, (2.0, 2))),
    ("window must be", lambda q, k, v: (q, k, v, (True, 2))),
    ("window must be", lambda q, k, v: (q, k, v, True)),
    ("window must be", lambda q, k, v: (q, k, v, np.float64(2))),
    ("one device", lambda q, k, v: (q.to("meta"), k, v, 2)),
    ("N = ", lambda q, k, v: (q[:1], k, v, 2)),
    ("must be [N, H, W", lambda q, k, v: (q[0], k, v, 2)),
]


@pytest.mark.parametrize("front", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("match, mutate", BAD, ids=[f"{i}-{m}" for i, (m, _) in enumerate(BAD)])
def test_bad_input_raises_clear_error(front, match, mutate):
    q, k, v = problem(2, 2, 2, 2, 2, 2, 4, torch.float32)
    with pytest.raises((ValueError, TypeError), match=re.escape(match)):
        front.window_attn_pool(*mutate(q, k, v))


@pytest.mark.parametrize("front", [ops, reference], ids=["ops", "reference"])
def test_integer_windows_of_any_integer_type(front):
    q, k, v = problem(1, 2, 2, 2, 2, 1, 4, torch.float32)
    want = front.window_attn_pool(q, k, v, (2, 2))
    for window in (np.int64(2), (np.int32(2), 2), torch.Size([2, 2]), [torch.tensor(2), 2]):
        torch.testing.assert_close(front.window_attn_pool(q, k, v, window), want, rtol=0, atol=0)


@pytest.mark.parametrize("front", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), np.float32("nan"), 10**400],
                         ids=["nan", "inf", "-inf", "np-nan", "int-overflow"])
def test_scale_must_be_finite(front, scale):
    q, k, v = problem(1, 2, 2, 2, 2, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="scale must be finite"):
        front.window_attn_pool(q, k, v, 2, scale=scale)


@pytest.mark.parametrize("front", [ops, reference], ids=["ops", "reference"])
def test_scale_must_be_a_real_number(front):
    q, k, v = problem(1, 2, 2, 2, 2, 1, 4, torch.float32)
    for scale in (True, "0.5", torch.tensor(0.5)):
        with pytest.raises(TypeError, match="scale must be a real number"):
            front.window_attn_pool(q, k, v, 2, scale=scale)
    torch.testing.assert_close(front.window_attn_pool(q, k, v, 2, scale=np.float32(0.5)),
                               reference.window_attn_pool(q, k, v, 2, scale=0.5))


def test_empty_head_and_huge_windows():
    q, k, v = problem(1, 2, 2, 2, 2, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="head size d"):
        ops.window_attn_pool(q[..., :0], k[..., :0], v[..., :0], 2)
    with pytest.raises(ValueError, match="more than int64 holds"):
        ops.window_attn_pool(q[:, :0, :0], k[:, :0, :0], v[:, :0, :0], (2**62, 4))
    q4 = torch.zeros(1, 4, 2, 1, 4)
    with pytest.raises(ValueError, match="does not tile"):  # 4*(2^62 + 1) is 4 modulo 2^64
        ops.window_attn_pool(q4, q4, q4, (2**62 + 1, 1))
    # no query rows (Hq = 0): any window tiles, and both backends return the empty result
    q0 = torch.zeros(1, 0, 2, 1, 4, requires_grad=True)
    for front in (ops, reference):
        out = front.window_attn_pool(q0, q0, q0, (2**62, 1))
        assert out.shape == q0.shape and torch.autograd.grad(out.sum(), q0)[0].shape == q0.shape


@needs_kernel
@ON_DEVICES
@pytest.mark.parametrize("suffix", ["", "_naive"])
def test_cpp_checks_guard_direct_calls(device, suffix):
    fwd = getattr(torch.ops.minihires, "window_attn_pool" + suffix)
    bwd = getattr(torch.ops.minihires, "window_attn_pool_backward" + suffix)
    q, k, v = problem(1, 2, 2, 2, 2, 1, 4, torch.float32, device)
    with pytest.raises(RuntimeError, match="does not tile"):
        fwd(q, k, v, 3, 2, 0.5)
    with pytest.raises(RuntimeError, match="must be positive"):
        fwd(q, k, v, 0, 2, 0.5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(RuntimeError, match="scale must be finite"):
            fwd(q, k, v, 2, 2, bad)
    q4 = torch.zeros(1, 4, 1, 1, 1, device=device)  # 4*(2^62 + 1) wraps to 4 in int64
    with pytest.raises(RuntimeError, match="does not tile"):
        fwd(q4, q4, q4, 2**62 + 1, 1, 1.0)
    out, lse = fwd(q, k, v, 2, 2, 0.5)
    with pytest.raises(RuntimeError, match="lse must be"):
        bwd(out, q, k, v, lse.double(), 2, 2, 0.5)
    with pytest.raises(RuntimeError, match="grad_out must have"):
        bwd(out[:, :1], q, k, v, lse, 2, 2, 0.5)
    with pytest.raises(RuntimeError, match="grad_out must match"):
        bwd(out.double(), q, k, v, lse, 2, 2, 0.5)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        bwd(out, q, k, v, lse, 2, 2, float("nan"))


@needs_kernel
def test_last_kernel_names_the_version():
    q, k, v = problem(1, 2, 2, 2, 2, 1, 4, torch.float32)
    torch.ops.minihires.window_attn_pool_naive(q, k, v, 2, 2, 0.5)
    assert torch.ops.minihires.last_kernel() == "window_attn_pool cpu naive"
    grads(lambda a, b, c: ops.window_attn_pool(a, b, c, 2), q, k, v, torch.ones_like(q))
    assert torch.ops.minihires.last_kernel() == "window_attn_pool_backward cpu fast"


# --- CUDA (run by tests/gpu/run.sh on a machine with a GPU) -------------------------------
CUDA_CASES = [  # (n, hq, wq, kh, kw, nh, d): vector path, scalar path (odd d), v1 fallback, >16 keys
    (2, 3, 2, 2, 2, 4, 64), (1, 2, 3, 2, 3, 3, 33), (1, 2, 2, 1, 2, 2, 8), (1, 1, 2, 2, 2, 1, 520),
    (1, 2, 1, 5, 4, 2, 16), (3, 4, 4, 3, 3, 2, 1),
]


@pytest.mark.cuda(fwd_op, bwd_op)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_v1_v2_and_reference_agree(poison, case, dtype):
    n, hq, wq, kh, kw, nh, d = case
    q, k, v = problem(n, hq, wq, kh, kw, nh, d, dtype, "cuda", seed=sum(case), layouts=("contiguous", "permuted",
                                                                                        "contiguous"))
    g = torch.randn_like(q)
    ref_fn = lambda a, b, c: reference.window_attn_pool(a, b, c, (kh, kw))  # noqa: E731
    want64 = grads(ref_fn, q.double(), k.double(), v.double(), g.double())
    want_dt = grads(ref_fn, q, k, v, g)
    out64 = ref_fn(q.double(), k.double(), v.double())
    for name in ("window_attn_pool", "window_attn_pool_naive"):
        fn = lambda a, b, c: getattr(torch.ops.minihires, name)(a, b, c, kh, kw, d ** -0.5)[0]  # noqa: E731
        assert_accurate(fn(q, k, v), ref_fn(q, k, v), out64, f"{name} forward")
        floors = grad_floors(q, k, v, g, (kh, kw), d ** -0.5)
        for gname, a, b, c in zip(("dq", "dk", "dv"), grads(fn, q, k, v, g), want_dt, want64):
            assert_accurate(a, b, c, f"{name} {gname}", grad=True, floor=floors[gname])


# Every v2 code path, with the variant the dispatcher must pick (csrc/cuda/window_attn_pool.cu,
# plan_for): VEC = 16 bytes of elements when d allows it (else 1), G lanes per row, chunks per
# lane; rows that need more than 16 elements per lane run v1.
VARIANTS = [  # (dtype, d, variant)
    (torch.float32, 64, "v2 vec=4 G=16 chunks=1"), (torch.float32, 256, "v2 vec=4 G=32 chunks=2"),
    (torch.float32, 512, "v2 vec=4 G=32 chunks=4"), (torch.float32, 7, "v2 vec=1 G=8 chunks=1"),
    (torch.float32, 33, "v2 vec=1 G=32 chunks=2"), (torch.float32, 97, "v2 vec=1 G=32 chunks=4"),
    (torch.float32, 129, "v1 (row too long for v2)"), (torch.float32, 516, "v1 (row too long for v2)"),
    (torch.float64, 64, "v2 vec=2 G=32 chunks=1"), (torch.float64, 128, "v2 vec=2 G=32 chunks=2"),
    (torch.float64, 256, "v2 vec=2 G=32 chunks=4"), (torch.float64, 33, "v2 vec=1 G=32 chunks=2"),
    (torch.float64, 258, "v1 (row too long for v2)"),
    (torch.bfloat16, 64, "v2 vec=8 G=8 chunks=1"), (torch.bfloat16, 512, "v2 vec=8 G=32 chunks=2"),
    (torch.bfloat16, 97, "v2 vec=1 G=32 chunks=4"), (torch.bfloat16, 520, "v1 (row too long for v2)"),
    (torch.float16, 16, "v2 vec=8 G=2 chunks=1"), (torch.float16, 512, "v2 vec=8 G=32 chunks=2"),
    (torch.float16, 5, "v2 vec=1 G=8 chunks=1"), (torch.float16, 41, "v2 vec=1 G=32 chunks=2"),
]


@pytest.mark.cuda(fwd_op, bwd_op)
@pytest.mark.parametrize("dtype, d, variant", VARIANTS, ids=lambda x: str(x).replace(" ", "_"))
def test_cuda_every_variant(poison, dtype, d, variant):
    """Each variant runs (asserted through last_kernel()) and matches the reference."""
    q, k, v = problem(1, 2, 2, 2, 1, 2, d, dtype, "cuda", seed=d)
    g = torch.randn_like(q)
    ref_fn = lambda a, b, c: reference.window_attn_pool(a, b, c, (2, 1))  # noqa: E731
    fn = lambda a, b, c: ops.window_attn_pool(a, b, c, (2, 1))  # noqa: E731
    assert_accurate(fn(q, k, v), ref_fn(q, k, v), ref_fn(q.double(), k.double(), v.double()), "forward")
    assert torch.ops.minihires.last_kernel() == f"window_attn_pool cuda {variant}"
    got = grads(fn, q, k, v, g)
    assert torch.ops.minihires.last_kernel() == f"window_attn_pool_backward cuda {variant}"
    floors = grad_floors(q, k, v, g, (2, 1), d ** -0.5)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, grads(ref_fn, q, k, v, g),
                             grads(ref_fn, q.double(), k.double(), v.double(), g.double())):
        assert_accurate(a, b, c, name, grad=True, floor=floors[name])


@pytest.mark.cuda(fwd_op, bwd_op)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_misaligned_pointers_take_the_scalar_path(poison, dtype):
    """A storage offset of one element breaks 16-byte alignment: v2 must fall back to scalar loads."""
    d = 64
    base = torch.randn(1 + 2 * 2 * 2 * d, device="cuda").to(dtype)
    k = base[1:].view(1, 2, 2, 2, d)                                   # (1, 2, 2, 2, d), contiguous, misaligned
    q = torch.randn(1, 1, 1, 2, d, device="cuda").to(dtype)
    v, g = torch.randn_like(k), torch.randn_like(q)
    ref_fn = lambda *x: reference.window_attn_pool(*x, 2)  # noqa: E731
    out = ops.window_attn_pool(q, k, v, 2)
    assert torch.ops.minihires.last_kernel().startswith("window_attn_pool cuda v2 vec=1 ")
    assert_accurate(out, ref_fn(q, k, v), ref_fn(q.double(), k.double(), v.double()), "forward")
    got = grads(lambda *x: ops.window_attn_pool(*x, 2), q, k, v, g)
    assert torch.ops.minihires.last_kernel().startswith("window_attn_pool_backward cuda v2 vec=1 ")
    floors = grad_floors(q, k, v, g, (2, 2), d ** -0.5)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, grads(ref_fn, q, k, v, g),
                             grads(ref_fn, q.double(), k.double(), v.double(), g.double())):
        assert_accurate(a, b, c, name, grad=True, floor=floors[name])


@pytest.mark.cuda(fwd_op, bwd_op)
def test_cuda_gradcheck_and_opcheck():
    q, k, v = problem(2, 2, 3, 2, 3, 2, 5, torch.float64, "cuda", seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.window_attn_pool(a, b, c, (2, 3)), (q, k, v))
    torch.library.opcheck(torch.ops.minihires.window_attn_pool.default, (q.float(), k.float(), v.float(), 2, 3, 0.5))


@pytest.mark.cuda(fwd_op, bwd_op)
def test_cuda_matches_cpu_kernel():
    q, k, v = problem(2, 4, 4, 2, 2, 4, 64, torch.float32, seed=12)
    out_cpu = ops.window_attn_pool(q, k, v, 2)
    torch.testing.assert_close(ops.window_attn_pool(q.cuda(), k.cuda(), v.cuda(), 2).cpu(), out_cpu,
                               rtol=1e-5, atol=1e-6)
